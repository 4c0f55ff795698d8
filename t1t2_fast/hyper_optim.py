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
        no host read (the lazy non-finite guard)."""
        moved = []
        keep = None if ok is None else ~ok
        for h in hypers:
            g = hypergrads[h.name]
            old = None if ok is None else h.raw.clone()
            if self.name == "sgd":
                h.raw.add_(g, alpha=-self.lr)
            else:
                b1, b2 = self.betas
                st = self.state.get(h.name)
                if st is None:
                    st = self.state[h.name] = {"exp_avg": torch.zeros_like(h.raw), "exp_avg_sq": torch.zeros_like(h.raw)}
                if ok is not None:
                    m_old, s_old = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(self.eps)
                h.raw.addcdiv_(st["exp_avg"], denom, value=-self.lr / (1 - b1 ** t))
                if ok is not None:
                    st["exp_avg"].copy_(torch.where(keep, m_old, st["exp_avg"]))
                    st["exp_avg_sq"].copy_(torch.where(keep, s_old, st["exp_avg_sq"]))
            m = h.project()
            if ok is not None:
                h.raw.copy_(torch.where(keep, old, h.raw))
                m = m * ok
            moved.append(m)
        if moved:
            counts = (torch.stack(moved) > 0).to(torch.int64)
            self._clip_names = [h.name for h in hypers]
            self._clip_pending = counts if self._clip_pending is None else self._clip_pending + counts
