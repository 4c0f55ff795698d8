"""T1-T2 across processes (torch.distributed, DistributedDataParallel).

The math is unchanged (docs/design.md). What each piece needs across ranks:

- T1: the gradient is averaged by DDP's own all-reduce; θ, optimizer state and λ are then
  identical on every rank, so the T1 update (and the stash: pre-step θ, Adam's D) is too.
- T2, penalties: h_g = dc/dλ · Σ_{i∈g} J_i v_i m_i is linear in the validation gradient v, and J, m,
  dc/dλ depend only on θ, the optimizer state and λ. With mean losses on equal shards the full-batch
  v is the mean of the ranks' v_r, so the mean of the ranks' h is the full-batch h: ranks all-reduce
  the small hypergradient vector, never v.
- T2, noise: h_σ = ∂σ[uᵀ∇θL(θ; σ, ε)] with u = J ⊙ v is *bilinear* in v and the training shard
  (through ∇θL), so the mean over ranks of ∂σ[u_rᵀ∇θL_r] misses the cross terms ∂σ[u_sᵀ∇θL_r]. To
  stay equal to one process that sees all the data, ``distributed_noise="exact"`` (default) first
  averages v (one all-reduce the size of the parameters, like DDP's gradient all-reduce, on hyper
  steps of models with noise only); each rank then takes ∂σ[ūᵀ∇θL_r] on its own shard and the ranks
  all-reduce those small σ-gradients. ``"local"`` skips the v all-reduce: each rank uses its own v,
  which is unbiased (v_r and training shard r are independent) but not the one-process value.
- Noise draws: each rank's GaussianNoise modules get their own seed (``module_seed``: the rank is
  folded into the key; rank 0 keeps the single-process key), so ranks draw different ε and each
  replays its own exactly.
- λ: updated from the same averaged h on every rank; the same all-reduce carries a 52-bit hash of
  every rank's λ so a drift is caught at once, on every rank, with the names of the hyperparameters
  that differ.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .rng import noise_key

DISTRIBUTED_NOISE = ("exact", "local")


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the module whose parameters are trained, the DistributedDataParallel wrapper or None).
    Hyperparameters are named after the inner module, so a DDP run and a one-process run have the
    same names (``l2.fc1.weight``, not ``l2.module.fc1.weight``) and exchange state_dicts."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, model
    return model, None


def resolve_group(ddp: nn.Module | None, process_group):
    """The process group T2 reduces over, or None for a one-process optimizer.

    - ``process_group=None`` (default): the DDP wrapper's group if the model is wrapped (the default
      group unless DDP was given another); else, when torch.distributed is initialized with more than
      one process, the default group. The latter is how frameworks (Lightning, Hugging Face
      Trainer/accelerate, most hand-written loops) work: they build the optimizer from the unwrapped
      module and train through a DDP wrapper the optimizer never sees; without the default group the
      ranks' λ would silently drift apart. Otherwise none.
    - ``process_group=False``: none, explicitly (each rank updates λ from its own hypergradients).
    - a group: used as given (a plain module whose gradients the user averages himself)."""
    import torch.distributed as dist

    if process_group is False:
        return None
    if process_group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("T1T2(process_group=...) needs torch.distributed to be initialized "
                               "(torch.distributed.init_process_group) first")
        return process_group
    if ddp is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    if not (dist.is_available() and dist.is_initialized()):  # pragma: no cover - DDP needs it already
        raise RuntimeError("the model is wrapped in DistributedDataParallel but torch.distributed is not initialized")
    return getattr(ddp, "process_group", None) or dist.group.WORLD


def module_seed(seed: int, index: int, rank: int = 0) -> int:
    """Seed of the ``index``-th GaussianNoise module on ``rank``: rank 0 has the one-process seed, the
    other ranks fold their rank in, so every rank draws its own ε (and replays it exactly)."""
    return noise_key(seed, index) if rank == 0 else noise_key(seed, index, rank)


def no_sync(ddp: nn.Module | None):
    """DDP's ``no_sync()`` for the forwards/backwards of a hyper step (the validation pass and the
    noise replay): they must not start DDP's gradient all-reduce (T2 averages its own, much smaller
    vectors) nor leave DDP's reducer waiting for a backward that never reaches the parameters."""
    return ddp.no_sync() if ddp is not None else contextlib.nullcontext()


_HASH_WEIGHTS: dict = {}


def _hash52(x: torch.Tensor) -> torch.Tensor:
    """A 0-d float64 tensor on x's device holding 52 bits of a hash of x's bits (x: 1-D float64),
    exactly representable, computed there (no host read): Σ bits_i·w_i mod 2⁶⁴ with fixed odd
    pseudo-random weights w_i, so a change of any one value always changes the sum, and the top 52
    bits of a mixed sum are kept."""
    n = x.numel()
    key = (n, x.device)
    if key not in _HASH_WEIGHTS:
        g = torch.Generator().manual_seed(0x7431_7432)
        w = torch.randint(-(2 ** 62), 2 ** 62, (n,), generator=g, dtype=torch.int64) * 2 + 1
        _HASH_WEIGHTS.clear()  # one size in use at a time
        _HASH_WEIGHTS[key] = w.to(x.device)
    total = (x.view(torch.int64) * _HASH_WEIGHTS[key]).sum()  # wraps modulo 2⁶⁴
    mixed = total ^ (total >> 29)  # let the high bits depend on the low ones
    return ((mixed >> 12) & ((1 << 52) - 1)).to(torch.float64)


class Reducer:
    """All-reduces of one T1T2 over a process group, with the payload bytes it sent (``comm_bytes``,
    the sum of the reduced tensors' sizes; a ring all-reduce moves about 2(w−1)/w times that per rank)."""

    def __init__(self, group):
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.comm_bytes = 0
        self.calls = 0

    def all_reduce_(self, buf: torch.Tensor, what: str) -> torch.Tensor:
        import torch.distributed as dist

        try:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        except RuntimeError as exc:
            raise RuntimeError(
                f"T1T2.hyper_step on rank {self.rank} of {self.world_size}: the all-reduce of the {what} failed "
                f"or timed out ({type(exc).__name__}: {exc}). Another rank has probably failed or stopped "
                f"calling step()/hyper_step() in step with the others (every rank must call them the same "
                f"number of times); the process group's timeout (init_process_group(timeout=...)) bounds "
                f"this wait") from exc
        self.comm_bytes += buf.numel() * buf.element_size()
        self.calls += 1
        return buf

    def mean_(self, tensors: list[torch.Tensor], what: str) -> None:
        """Replace each tensor (in place) by its mean over the ranks, with one all-reduce."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self.all_reduce_(flat, what).div_(self.world_size)
        for t, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def reduce_hypergrads(self, hypergrads: dict[str, torch.Tensor], hypers,
                          lazy: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Mean over ranks of every hypergradient (in float64), and the check that λ is the same on
        every rank: one all-reduce of [h..., hash of λ in this rank's slot, zeros in the others].
        Returns (the means, None) after checking the hashes on the host, which raises on a drift; with
        ``lazy``, (the means, a 0-d bool tensor on the device: whether every rank has the same λ),
        read by the caller with its other checks (``raise_drift`` then names the culprits)."""
        names = [h.name for h in hypers]
        dev = hypers[0].raw.device if hypers else torch.device("cpu")
        raw = torch.cat([h.raw.detach().reshape(-1).to(torch.float64) for h in hypers])
        slots = torch.zeros(self.world_size, dtype=torch.float64, device=dev)
        slots[self.rank] = _hash52(raw)
        parts = [hypergrads[n].detach().reshape(-1).to(torch.float64) for n in names]
        buf = torch.cat(parts + [slots])
        self.all_reduce_(buf, "hypergradients")
        hashes = buf[-self.world_size:]
        same = (hashes == hashes[0]).all()
        if not lazy and not bool(same):
            self.raise_drift(hypers)
        mean = buf[:-self.world_size] / self.world_size
        out = {}
        for h, part in zip(hypers, torch.split(mean, [p.numel() for p in parts])):
            out[h.name] = part.reshape(h.raw.shape).to(hypergrads[h.name].dtype)
        return out, (same if lazy else None)

    def raise_drift(self, hypers) -> None:
        """The ranks' λ hashes differed: gather all λ (rare path, every rank calls it together) and
        raise, naming the ones that differ."""
        dev = hypers[0].raw.device if hypers else torch.device("cpu")
        raw = torch.cat([h.raw.detach().reshape(-1).to(torch.float64) for h in hypers]).cpu()
        table = torch.zeros(self.world_size, raw.numel(), dtype=torch.float64)
        table[self.rank] = raw
        table = self.all_reduce_(table.to(dev), "hyperparameters (drift check)").cpu()
        bad, start = [], 0
        for h in hypers:
            block = table[:, start:start + h.raw.numel()]
            start += h.raw.numel()
            same = (block == block[0]) | (block.isnan() & block[0].isnan())
            if not bool(same.all()):
                spread = (block.max(0).values - block.min(0).values).max().item()
                ranks = sorted({int(r) for r in (~same).nonzero()[:, 0]})
                bad.append(f"{h.name} (ranks {ranks} differ from rank 0 by up to {spread:.3g})")
        raise RuntimeError(
            "T1T2: the hyperparameters are no longer identical on every rank: " + "; ".join(bad or ["(hash only)"])
            + ". Something changed λ on some ranks only (an in-place write to raw_hyperparameters(), "
              "load_state_dict on one rank, or a different hyper_step sequence); every rank must apply the "
              "same updates")
