"""The hyper-optimizers: the update of the raw hyperparameters λ from their hypergradients h, then
the projection into their bounds, with a count of the steps that hit a bound per hyperparameter.

- ``"sgd"``: λ ← λ − η_h h
- ``"adam"`` (default; the paper's choice): Adam on h with bias correction, λ ← λ − η_h m̂/(√ŝ + ε)
"""
from __future__ import annotations

import torch

from .penalties import Hyperparameter

HYPER_OPTIMIZERS = ("sgd", "adam")


class HyperOptimizer:
    """Updates hyperparameters in place. ``state``: Adam's moments per hyperparameter name;
    ``clipped``: per name, how many hyper steps the projection moved it."""

    def __init__(self, name: str, lr: float, betas: tuple[float, float], eps: float, names: list[str]):
        if name not in HYPER_OPTIMIZERS:
            raise ValueError(f"unknown hyper_optimizer={name!r}; expected one of {HYPER_OPTIMIZERS}")
        self.name, self.lr, self.betas, self.eps = name, lr, tuple(betas), eps
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self._clipped = {n: 0 for n in names}
        self._clip_pending: torch.Tensor | None = None  # per hyperparameter, clipped steps not yet read
        self._bounds_key = self._segment_key = None  # what the cached flat bounds / segment ids were made for

    @property
    def clipped(self) -> dict[str, int]:
        """Per hyperparameter name, the hyper steps that hit a bound (counted on the device, read here)."""
        if self._clip_pending is not None:
            from .guard import host_list
            self.fold_clips(host_list(self._clip_pending))
        return self._clipped

    def fold_clips(self, values: list) -> None:
        """Add the device clip counts, read back as ``values``, to the host ones."""
        for n, m in zip(self._clip_names, values):
            self._clipped[n] = self._clipped.get(n, 0) + int(m)
        self._clip_pending = None

    @clipped.setter
    def clipped(self, value: dict[str, int]) -> None:
        self._clipped, self._clip_pending = dict(value), None

    @torch.no_grad()
    def step(self, hypers: list[Hyperparameter], hypergrads: dict[str, torch.Tensor], t: int,
             ok: torch.Tensor | None = None) -> None:
        """One update of every hyperparameter (``t``: this hyper step's 1-based number, for Adam's
        bias correction), then the projection; the clip counts stay on the device until read.
        ``ok``: a 0-d bool tensor; where it is False nothing changes (λ, the moments, the counts), with
        no host read (the lazy non-finite guard).

        All hyperparameters are updated as one flat vector (their λ, h and moments concatenated):
        a model has few hyperparameter values but often dozens of hyperparameter tensors, and a loop
        of small tensor ops per tensor cost more than the rest of a small model's hyper step."""
        if not hypers:
            return
        raws = [h.raw for h in hypers]
        if len({(r.dtype, r.device) for r in raws}) > 1:  # λ of several dtypes or devices: one call each
            for group in _same_kind(hypers):
                self.step(group, hypergrads, t, ok)
            return
        sizes = [r.numel() for r in raws]
        x = torch.cat([r.reshape(-1) for r in raws])
        g = torch.cat([hypergrads[h.name].reshape(-1).to(x.dtype) for h in hypers])
        if self.name == "sgd":
            new = x.add(g, alpha=-self.lr)
        else:
            b1, b2 = self.betas
            states = [self.state.get(h.name) for h in hypers]
            for h, st in zip(hypers, states):
                if st is None:
                    self.state[h.name] = {"exp_avg": torch.zeros_like(h.raw), "exp_avg_sq": torch.zeros_like(h.raw)}
            states = [self.state[h.name] for h in hypers]
            m_old = torch.cat([st["exp_avg"].reshape(-1) for st in states])
            s_old = torch.cat([st["exp_avg_sq"].reshape(-1) for st in states])
            m = m_old.mul(b1).add_(g, alpha=1 - b1)
            sq = s_old.mul(b2).addcmul_(g, g, value=1 - b2)
            denom = (sq / (1 - b2 ** t)).sqrt_().add_(self.eps)
            new = x.addcdiv(m, denom, value=-self.lr / (1 - b1 ** t))
            if ok is not None:
                m, sq = torch.where(ok, m, m_old), torch.where(ok, sq, s_old)
            _scatter(m, [st["exp_avg"] for st in states], sizes)
            _scatter(sq, [st["exp_avg_sq"] for st in states], sizes)
        lo, hi = self._raw_bounds(hypers, sizes, x)
        clamped = torch.clamp(new, lo, hi)
        moved = clamped != new  # NaN counts as moved, as it did per hyperparameter
        if ok is not None:
            clamped, moved = torch.where(ok, clamped, x), moved & ok
        for raw, piece in zip(raws, clamped.split(sizes)):  # one copy_ each: it bumps λ's version counter,
            raw.copy_(piece.view(raw.shape))                 # which the penalty coefficient cache keys on
        segment = self._segments(sizes, x.device)
        counts = (torch.zeros(len(hypers), dtype=torch.int64, device=x.device)
                  .index_add_(0, segment, moved.to(torch.int64)) > 0).to(torch.int64)
        self._clip_names = [h.name for h in hypers]
        self._clip_pending = counts if self._clip_pending is None else self._clip_pending + counts

    def _raw_bounds(self, hypers: list[Hyperparameter], sizes: list[int], like: torch.Tensor):
        """The bounds in raw units (Hyperparameter.project's), one flat tensor each, kept until a bound changes."""
        key = (tuple((h.name, tuple(h.bounds), h.transform.name) for h in hypers), like.device, like.dtype)
        if self._bounds_key != key:
            lo, hi = [], []
            for h, n in zip(hypers, sizes):
                a, b = h.raw_bounds()
                lo.append(torch.full((n,), a, dtype=like.dtype))
                hi.append(torch.full((n,), b, dtype=like.dtype))
            self._bounds = (torch.cat(lo).to(like.device), torch.cat(hi).to(like.device))
            self._bounds_key = key
        return self._bounds

    def _segments(self, sizes: list[int], device: torch.device) -> torch.Tensor:
        """Which hyperparameter each entry of the flat vector belongs to (kept while the sizes hold)."""
        if self._segment_key != (sizes, device):
            self._segment = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)
            self._segment_key = (sizes, device)
        return self._segment


def _scatter(flat: torch.Tensor, targets: list[torch.Tensor], sizes: list[int]) -> None:
    """Copy the pieces of ``flat`` into ``targets`` in place (one foreach op; it does not bump the
    targets' version counters under a TorchDispatchMode, so not for λ)."""
    torch._foreach_copy_(targets, [piece.view(t.shape) for piece, t in zip(flat.split(sizes), targets)])


def _same_kind(hypers: list[Hyperparameter]) -> list[list[Hyperparameter]]:
    groups: dict = {}
    for h in hypers:
        groups.setdefault((h.raw.dtype, h.raw.device), []).append(h)
    return list(groups.values())
