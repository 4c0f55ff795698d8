"""The glue between hyperparameters and the fused ops, shared by ``T1T2`` and ``functional``:
per-tensor coefficient lists for the T1 step, and the segment table of the T2 reduction."""
from __future__ import annotations

import torch

from . import reference
from .hyper import Hyperparameter


def coefficient_lists(hypers: list[Hyperparameter], indices: list[int], dtype: torch.dtype,
                      device: torch.device) -> tuple[list, list, list]:
    """Per tensor in ``indices``, the current coefficients of coupled L2, L1 and decoupled L2 as
    flat per-group tensors (empty where a tensor has none; an empty list where no tensor has).
    Two penalties of one kind on one tensor are folded into one, at the finer granularity."""
    slots: dict[str, dict[int, torch.Tensor]] = {"l2": {}, "l1": {}, "decay": {}}
    wanted = set(indices)
    for h in hypers:
        c = h.value().detach().to(dtype).reshape(-1)
        slot = slots["decay" if h.decoupled else h.kind]
        for t in h.targets:
            if t.index not in wanted:
                continue
            have = slot.get(t.index)
            if have is None:
                slot[t.index] = c
            else:  # groupings nest (1 | rows | numel): repeat the coarser one and add
                fine = max(have.numel(), c.numel())
                slot[t.index] = have.repeat_interleave(fine // have.numel()) + c.repeat_interleave(fine // c.numel())
    empty = torch.empty(0, dtype=dtype, device=device)
    return tuple([s.get(i, empty) for i in indices] if s else [] for s in slots.values())


def reused_buffer(cache: dict, key, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[key] if it is an empty_like(like, dtype=dtype) buffer still fit for ``like``, else a
    new one stored there: hyper iterations then write into the same pages every time instead of
    faulting in fresh ones."""
    buf = cache.get(key)
    if buf is None or buf.shape != like.shape or buf.dtype != dtype or buf.device != like.device:
        buf = cache[key] = torch.empty_like(like, dtype=dtype)
    return buf


@torch.no_grad()
def t1_step(backend, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict],
            hypers: list[Hyperparameter], indices: list[int], optimizer: str, lr: float, momentum: float,
            nesterov: bool, betas: tuple[float, float], eps: float, hypergrad: str, stash: bool,
            buffers: dict | None = None, grad_scale: torch.Tensor | None = None,
            found_inf: torch.Tensor | None = None, check_finite: bool = False) -> dict | None:
    """One T1 step of ``params`` in place through the backend's fused op. ``indices`` are the
    tensors' positions in the hyperparameters' target lists; ``states`` their optimizer state dicts
    (created and advanced here). Returns the stash for T2 when ``stash`` is set. ``buffers``, if
    given, keeps the stash tensors between calls (keyed like the stash) so a hyper iteration does
    not fault in fresh pages for them every time; the previous stash is then overwritten.

    ``grad_scale``/``found_inf``/``check_finite``: the op's GradScaler unscale and non-finite guard.
    When ``found_inf`` is given, it is read back after the op (one host sync): if it is set, the
    step was skipped, nothing was written (adam's step count stays too) and this returns None."""
    beta1, beta2 = betas
    acc = reference.accumulate_dtype(params[0].dtype) if params else torch.float32
    state1, state2, bc1, bc2, adam_steps = [], [], [], [], []
    adam = optimizer == "adam"
    for p, state in zip(params, states):
        if adam:
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, dtype=acc)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=acc)
            t = int(state.get("step", 0)) + 1  # committed below, once the step is known to be taken
            adam_steps.append(t)
            state1.append(state["exp_avg"])
            state2.append(state["exp_avg_sq"])
            bc1.append(1 - beta1 ** t)
            bc2.append(1 - beta2 ** t)
        elif momentum > 0:
            # b = 0 before the first step makes b ← μb + ĝ equal PyTorch's first-step b = ĝ
            if "momentum_buffer" not in state:  # (not setdefault: its default would be built every step)
                state["momentum_buffer"] = torch.zeros_like(p, dtype=acc)
            state1.append(state["momentum_buffer"])
    device = params[0].device if params else torch.device("cpu")
    l2, l1, decay = coefficient_lists(hypers, indices, acc, device)
    def stash_buffers(kind):
        cache = {} if buffers is None else buffers
        return [reused_buffer(cache, (kind, i), p, acc) for i, p in zip(indices, params)]

    adam_exact = adam and hypergrad == "exact"
    stash_theta = stash_buffers("theta") if stash else []
    stash_jac = stash_buffers("jac") if stash and adam_exact else []
    guard = {} if grad_scale is None and found_inf is None and not check_finite else dict(
        grad_scale=grad_scale, found_inf=found_inf, check_finite=check_finite)
    backend.t1_step_(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer, lr, momentum,
                     nesterov, beta1, beta2, eps, bc1, bc2, **guard)
    if found_inf is not None and float(found_inf) > 0:
        return None  # skipped: θ, the optimizer state and the stash buffers are as they were
    for state, t in zip(states, adam_steps):  # empty unless adam
        state["step"] = torch.tensor(float(t), dtype=torch.float64)
    if not stash:
        return None
    if hypergrad == "sgd" or adam:
        scalar_jac = -lr
    else:
        scalar_jac = -lr * (1.0 + momentum) if nesterov else -lr
    return {"lr": lr,
            "theta": dict(zip(indices, stash_theta)),
            "jac": dict(zip(indices, stash_jac)) if adam_exact else {i: scalar_jac for i in indices}}


def penalty_hypergrads(backend, hypers: list[Hyperparameter], indices: list[int], v: list[torch.Tensor],
                       stash: dict) -> dict[str, torch.Tensor]:
    """Hypergradients of the raw hyperparameters, h = dc/dλ · Σ_{i∈g} J_i v_i m_i (DESIGN.md §2),
    from the validation gradients ``v`` (aligned with ``indices``) and the stash of the T1 step, in
    one call of the backend's ``penalty_hypergrad``."""
    thetas = [stash["theta"][i] for i in indices]
    acc = thetas[0].dtype if thetas else torch.float32
    jacs = [stash["jac"][i] for i in indices]
    has_tensor = any(isinstance(j, torch.Tensor) for j in jacs)
    jac = [j if isinstance(j, torch.Tensor) else thetas[0].new_empty(0) for j in jacs] if has_tensor else []
    jac_scalar = [0.0 if isinstance(j, torch.Tensor) else float(j) for j in jacs]
    # One segment per (hyperparameter, tensor it acts on in this step); a tensor without a gradient
    # in that step was not updated, so θ⁺ does not depend on λ there.
    position = {i: k for k, i in enumerate(indices)}
    seg_tensor, seg_kind, seg_groups, owner = [], [], [], []
    for h in hypers:
        for t in h.targets:
            if t.index in position:
                seg_tensor.append(position[t.index])
                seg_kind.append(2 if h.decoupled else reference.SEGMENT_KINDS.index(h.kind))
                seg_groups.append(t.num_groups)
                owner.append(h.name)
    flat = backend.penalty_hypergrad(v, thetas, jac, jac_scalar, seg_tensor, seg_kind, seg_groups, stash["lr"])
    pieces: dict[str, list[torch.Tensor]] = {}
    for name, part in zip(owner, torch.split(flat, seg_groups)):
        pieces.setdefault(name, []).append(part)
    out = {}
    for h in hypers:
        parts = pieces.get(h.name) or [torch.zeros(h.raw.numel(), dtype=acc, device=h.raw.device)]
        total = parts[0]
        for part in parts[1:]:  # per="network": its tensors' sums, added in a fixed order
            total = total + part
        out[h.name] = (h.derivative().detach().to(acc) * total.reshape(h.raw.shape)).to(h.raw.dtype)
    return out
