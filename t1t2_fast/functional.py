"""The T1 step and the T2 penalty reductions as functions, like torch.optim's ``sgd()``/``adam()``:
``t1_step`` (one fused, in-place T1 step that returns the ``Stash``) and ``penalty_hypergrads``
(the segmented reductions of T2), which ``T1T2`` orchestrates; and a differentiable form of the
T1 step for composing the hypergradient with ordinary autograd.

``θ⁺ = t1_update(params, grads, hypers, ...)`` runs one T1 step out of place; calling ``backward``
on anything computed from θ⁺ fills ``.grad`` of the raw hyperparameters through the fused T2 op
(one-step horizon: θ, the data gradients and the optimizer state are constants, as in T1-T2).
``t1_update_reference`` is its twin built from plain differentiable torch ops, for checking.

    λ = torch.tensor(math.log(1e-3), requires_grad=True)
    new = t1_update(params, grads, [Hyper(λ, "l2", targets=[0, 2])], optimizer="sgd", lr=0.1)
    C2(new).backward()          # λ.grad = dC2/dλ
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

from . import reference
from ._dtypes import PENALTY_KINDS, SEGMENT_LR, compute_dtype, segment_kind
from .backend import resolve_backend
from .penalties import Hyperparameter, Target, get_transform



# ---------------------------------------------------------------------------------------------
# The stash: what a T1 step leaves for the T2 step after it
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Stash:
    """What the T1 step of a hyper iteration saves for the T2 step, in the same pass that updates
    θ: the pre-step θ and ∂θ⁺/∂ĝ (a tensor for adam with the exact Jacobian, else one number per
    tensor), keyed by the tensor's index in the optimizer's parameter list. ``grad_scale``: the
    GradScaler scale of that step (its noise replay is scaled the same way); ``noise``: the noise
    hyperparameters' part (``t1t2_fast.noise.hypergrad.NoiseStash``), set by ``T1T2``. ``lrs``: with
    several parameter groups, each tensor's learning rate η (its group's), which the decoupled-L2
    term −2ηθ uses; None when one η (``lr``) applies to every tensor. ``scale``: with learning-rate
    scales (``T1T2(tune_lr=...)``), each tensor's scale s as the T1 step used it (a 0-d tensor on the
    device); the step then moved θ by s·η·d, so a scalar Jacobian ``jac`` (−η, −η(1+μ)) and the
    decoupled-L2 term are multiplied by s (``jac_of``), while adam's stashed tensor J already holds it."""

    lr: float
    theta: dict[int, torch.Tensor]
    jac: dict[int, torch.Tensor | float]
    grad_scale: float | torch.Tensor | None = None
    noise: object | None = None
    lrs: dict[int, float] | None = None
    found: torch.Tensor | None = None  # the lazy guard's skip flag of that T1 step (> 0: skipped, stash unset)
    scale: dict[int, torch.Tensor] | None = None

    def lr_of(self, index: int) -> float:
        return self.lr if self.lrs is None else self.lrs[index]

    def jac_of(self, index: int):
        """∂θ⁺/∂ĝ of tensor ``index`` as the step took it: adam's tensor, or the scalar times its lr
        scale s (a 0-d device tensor, no host read) when there are lr scales."""
        j = self.jac[index]
        if self.scale is None or isinstance(j, torch.Tensor):
            return j
        return self.scale[index] * j

    def state(self, names: list[str]) -> dict:
        """A state_dict entry: the tensors copied, keyed by parameter name (the noise part apart)."""
        clone = lambda x: x.clone() if isinstance(x, torch.Tensor) else x
        out = {"lr": self.lr, "grad_scale": self.grad_scale,
               "theta": {names[i]: t.clone() for i, t in self.theta.items()},
               "jac": {names[i]: clone(j) for i, j in self.jac.items()}}
        if self.lrs is not None:
            out["lrs"] = {names[i]: lr for i, lr in self.lrs.items()}
        if self.found is not None:
            out["found"] = self.found.detach().clone()
        if self.scale is not None:
            out["scale"] = {names[i]: s.detach().clone() for i, s in self.scale.items()}
        return out

    @classmethod
    def from_state(cls, state: dict, index: dict[str, int], device: torch.device) -> "Stash":
        """The inverse of ``state``: ``index`` maps parameter names to indices."""
        move = lambda x: x.to(device) if isinstance(x, torch.Tensor) and x.dim() > 0 else (
            x.clone() if isinstance(x, torch.Tensor) else x)
        lrs, scale = state.get("lrs"), state.get("scale")
        return cls(state["lr"], {index[n]: t.to(device).clone() for n, t in state["theta"].items()},
                   {index[n]: move(j) for n, j in state["jac"].items()}, grad_scale=state.get("grad_scale"),
                   lrs=None if lrs is None else {index[n]: float(lr) for n, lr in lrs.items()},
                   found=None if state.get("found") is None else state["found"].to(device).clone(),
                   scale=None if scale is None else {index[n]: s.to(device).clone() for n, s in scale.items()})


# ---------------------------------------------------------------------------------------------
# The T1 step and the T2 penalty reductions
# ---------------------------------------------------------------------------------------------
def coefficient_lists(hypers: list[Hyperparameter], indices: list[int], dtype: torch.dtype,
                      device: torch.device) -> tuple[list, list, list]:
    """Per tensor in ``indices``, the current coefficients of coupled L2, L1 and decoupled L2 as
    flat per-group tensors (empty where a tensor has none; an empty list where no tensor has).
    Two penalties of one kind on one tensor are folded into one, at the finer granularity."""
    slots: dict[str, dict[int, torch.Tensor]] = {"l2": {}, "l1": {}, "decay": {}}
    wanted = set(indices)
    for h in hypers:
        if h.kind == "lr":  # a learning-rate scale: lr_scales below, not a penalty coefficient
            continue
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


def lr_scales(hypers: list[Hyperparameter], indices: list[int], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor | None:
    """The ``lr_scale`` argument of the fused step for the tensors ``indices``: per tensor, the value
    s = φ(λ) of the learning-rate scale that targets it (1 where none does), as one 1-D tensor in the
    compute dtype on the device; None without learning-rate scales (the op then steps with lr as is)."""
    scale_hypers = [h for h in hypers if h.kind == "lr"]
    if not scale_hypers:
        return None
    position = {i: k for k, i in enumerate(indices)}
    one = torch.ones((), dtype=dtype, device=device)
    values: list = [one] * len(indices)
    for h in scale_hypers:
        s = h.value().detach().to(dtype).reshape(())
        for t in h.targets:
            if t.index in position:
                values[position[t.index]] = s
    return torch.stack(values) if values else torch.empty(0, dtype=dtype, device=device)


def reused_buffer(cache: dict, key, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache[key] if it is an empty_like(like, dtype=dtype) buffer still fit for ``like``, else a
    new one stored there: hyper iterations then write into the same pages every time instead of
    faulting in fresh ones."""
    buf = cache.get(key)
    if buf is None or buf.shape != like.shape or buf.dtype != dtype or buf.device != like.device:
        buf = cache[key] = torch.empty_like(like, dtype=dtype)
    return buf


# Adam's step count as a host int, per state["step"] tensor (by id, dropped with the tensor): reading
# the tensor back would be a host read per tensor and step (one put there by load_state_dict is read once)
_ADAM_T: dict[int, tuple] = {}


def _adam_count(state: dict) -> int:
    step = state.get("step")
    if step is None:
        return 0
    known = _ADAM_T.get(id(step))
    return known[1] if known is not None and known[0]() is step else int(step)


def _set_adam_count(state: dict, t: int) -> None:
    step = state["step"] = torch.tensor(float(t), dtype=torch.float64)
    key = id(step)
    _ADAM_T[key] = (weakref.ref(step, lambda _, key=key: _ADAM_T.pop(key, None)), t)


@torch.no_grad()
def t1_step(backend, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict],
            hypers: list[Hyperparameter], indices: list[int], optimizer: str, lr: float, momentum: float,
            nesterov: bool, betas: tuple[float, float], eps: float, hypergrad: str, stash: bool,
            buffers: dict | None = None, grad_scale: torch.Tensor | None = None,
            found_inf: torch.Tensor | None = None, check_finite: bool = False, lazy: bool = False,
            coefficients: dict | None = None) -> Stash | None:
    """One T1 step of ``params`` in place through the backend's fused op. ``indices`` are the
    tensors' positions in the hyperparameters' target lists; ``states`` their optimizer state dicts
    (created and advanced here). Returns the stash for T2 when ``stash`` is set. ``buffers``, if
    given, keeps the stash tensors between calls (keyed by ("theta" | "jac", index)) so a hyper
    iteration does not fault in fresh pages for them every time; the previous stash is then
    overwritten.

    ``grad_scale``/``found_inf``/``check_finite``: the op's GradScaler unscale and non-finite guard.
    When ``found_inf`` is given, it is read back after the op (one host sync): if it is set, the
    step was skipped, nothing was written (adam's step count stays too) and this returns None.
    ``lazy``: it is not read back (no host sync): a skipped step writes nothing in θ, the optimizer
    buffers and the stash buffers, adam's step count advances anyway, and the stash is returned
    (the caller keeps the flag to know it holds nothing of this step). ``coefficients``, if given,
    keeps the penalty coefficient lists between calls while no λ changed (by its version counter)."""
    beta1, beta2 = betas
    acc = compute_dtype(params[0].dtype) if params else torch.float32
    state1, state2, bc1, bc2, adam_steps = [], [], [], [], []
    adam = optimizer == "adam"
    for p, state in zip(params, states):
        if adam:
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, dtype=acc)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=acc)
            t = _adam_count(state) + 1  # committed below, once the step is known to be taken
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
    # λ changes only at hyper steps (in place: its version counter moves), so the coefficient lists
    # (c = φ(λ), a transform per hyperparameter) are kept in ``coefficients`` until one of them moves
    key = (tuple(indices), acc, device, tuple((id(h.raw), h.raw._version) for h in hypers))
    cached = None if coefficients is None else coefficients.get("lists")
    if cached is not None and cached[0] == key:
        l2, l1, decay, lr_scale = cached[1]
    else:
        l2, l1, decay = coefficient_lists(hypers, indices, acc, device)
        # a new tensor whenever λ moved (never written in place): a stash may still hold the old one
        lr_scale = lr_scales(hypers, indices, acc, device)
        if coefficients is not None:
            coefficients["lists"] = (key, (l2, l1, decay, lr_scale))
    def stash_buffers(kind):
        cache = {} if buffers is None else buffers
        return [reused_buffer(cache, (kind, i), p, acc) for i, p in zip(indices, params)]

    adam_exact = adam and hypergrad == "exact"
    stash_theta = stash_buffers("theta") if stash else []
    stash_jac = stash_buffers("jac") if stash and adam_exact else []
    guard = {} if grad_scale is None and found_inf is None and not check_finite else dict(
        grad_scale=grad_scale, found_inf=found_inf, check_finite=check_finite)
    if lr_scale is not None:  # without lr scales the op is called exactly as before they existed
        guard["lr_scale"] = lr_scale
    backend.t1_step_(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer, lr, momentum,
                     nesterov, beta1, beta2, eps, bc1, bc2, **guard)
    if not lazy and found_inf is not None and float(found_inf) > 0:
        return None  # skipped: θ, the optimizer state and the stash buffers are as they were
    for state, t in zip(states, adam_steps):  # empty unless adam
        _set_adam_count(state, t)
    if not stash:
        return None
    if hypergrad == "sgd" or adam:
        scalar_jac = -lr
    else:
        scalar_jac = -lr * (1.0 + momentum) if nesterov else -lr
    return Stash(lr, dict(zip(indices, stash_theta)),
                 dict(zip(indices, stash_jac)) if adam_exact else {i: scalar_jac for i in indices},
                 scale=None if lr_scale is None else dict(zip(indices, lr_scale.unbind())))


def penalty_hypergrads(backend, hypers: list[Hyperparameter], indices: list[int], v: list[torch.Tensor],
                       stash: Stash, params: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Hypergradients of the raw hyperparameters, h = dc/dλ · Σ_{i∈g} J_i v_i m_i (docs/design.md),
    from the validation gradients ``v`` (aligned with ``indices``) and the stash of the T1 step, in
    one call of the backend's ``penalty_hypergrad`` (one per distinct η when parameter groups differ in lr).
    Learning-rate scales (kind "lr") reduce Σ v·(θ⁺ − θ) against ``params`` (θ⁺, the current
    parameters aligned with ``indices``): h_s = (dc/dλ / s)·Σ_{i∈g} v_i(θ⁺_i − θ_i), as ∂θ⁺/∂s = −η·d =
    (θ⁺ − θ)/s; with lr scales, the segments whose Jacobian is a host scalar (−η, −η(1+μ)) and the
    decoupled-L2 ones are multiplied by their tensor's s on the device (no host read)."""
    thetas = [stash.theta[i] for i in indices]
    acc = thetas[0].dtype if thetas else torch.float32
    jacs = [stash.jac[i] for i in indices]
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
                seg_kind.append(SEGMENT_LR if h.kind == "lr" else segment_kind(h.kind, h.decoupled))
                seg_groups.append(t.num_groups)
                owner.append(h.name)
    seg_lr = [stash.lr_of(indices[t]) for t in seg_tensor]
    distinct = list(dict.fromkeys(seg_lr))  # in order of first appearance: deterministic
    has_lr = SEGMENT_LR in seg_kind
    if has_lr and (params is None or len(params) != len(indices)):
        raise ValueError("penalty_hypergrads: learning-rate scales need params, the current θ⁺ of every tensor")
    extra = {"params": [p.detach() for p in params] if has_lr else []}  # θ⁺: read by the lr segments only
    if len(distinct) <= 1:  # one η (one parameter group): one call
        flat = backend.penalty_hypergrad(v, thetas, jac, jac_scalar, seg_tensor, seg_kind, seg_groups,
                                         distinct[0] if distinct else stash.lr, **extra)
    else:  # several groups' η: one call per η over its tensors' segments, put back in segment order
        results: list = [None] * len(seg_tensor)
        for lr in distinct:
            which = [s for s, x in enumerate(seg_lr) if x == lr]
            part = backend.penalty_hypergrad(v, thetas, jac, jac_scalar, [seg_tensor[s] for s in which],
                                             [seg_kind[s] for s in which], [seg_groups[s] for s in which], lr,
                                             **extra)
            for s, piece in zip(which, torch.split(part, [seg_groups[s] for s in which])):
                results[s] = piece
        flat = torch.cat(results)
    pieces: dict[str, list[torch.Tensor]] = {}
    for name, part, t, kind in zip(owner, torch.split(flat, seg_groups), seg_tensor, seg_kind):
        if stash.scale is not None:
            s = stash.scale[indices[t]]
            if kind == SEGMENT_LR:  # Σ v(θ⁺ − θ) = s·vᵀ∂θ⁺/∂s
                part = part / s
            elif kind == segment_kind("l2", True) or not isinstance(stash.jac[indices[t]], torch.Tensor):
                part = part * s  # J = −sη (scalar J) and ∂θ⁺/∂c = −2sηθ (decoupled): s on the device
        pieces.setdefault(name, []).append(part)
    out = {}
    for h in hypers:
        parts = pieces.get(h.name) or [torch.zeros(h.raw.numel(), dtype=acc, device=h.raw.device)]
        total = parts[0]
        for part in parts[1:]:  # per="network": its tensors' sums, added in a fixed order
            total = total + part
        out[h.name] = (h.derivative().detach().to(acc) * total.reshape(h.raw.shape)).to(h.raw.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# The differentiable T1 update
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)  # identity, not tensor comparison
class Hyper:
    """A raw hyperparameter λ (any shape; its numel is the number of groups per target tensor) and
    the penalty it drives: ``kind`` "l2" or "l1", ``targets`` indices into ``params``, ``transform``
    "log" | "linear" | "softplus", ``decoupled`` for AdamW-style L2."""

    raw: torch.Tensor
    kind: str = "l2"
    targets: list[int] = field(default_factory=list)
    transform: str = "log"
    decoupled: bool = False


def _bind(hypers: list[Hyper], params: list[torch.Tensor]) -> list[Hyperparameter]:
    bound = []
    for k, h in enumerate(hypers):
        if h.kind not in PENALTY_KINDS:
            raise ValueError(f"hypers[{k}]: unknown kind {h.kind!r}; expected one of {PENALTY_KINDS}")
        if h.decoupled and h.kind != "l2":
            raise ValueError(f"hypers[{k}]: only l2 can be decoupled")
        if not h.targets:
            raise ValueError(f"hypers[{k}] has no target tensors")
        for i in h.targets:
            if not 0 <= i < len(params):
                raise ValueError(f"hypers[{k}] targets params[{i}], but there are {len(params)} params")
            if params[i].numel() % max(h.raw.numel(), 1):
                raise ValueError(f"hypers[{k}] has {h.raw.numel()} values, which do not divide the "
                                 f"{params[i].numel()} elements of params[{i}]")
        bound.append(Hyperparameter(f"hypers[{k}]", h.kind, h.decoupled, get_transform(h.transform),
                                    h.raw.detach(), (-math.inf, math.inf),
                                    [Target(i, h.raw.numel()) for i in h.targets]))
    return bound


def _copy_state(state, n):
    if state is None:
        return [{} for _ in range(n)]
    return [{k: v.clone() for k, v in s.items()} for s in state]


class _T1Update(torch.autograd.Function):
    @staticmethod
    def forward(ctx, config, *raws):
        backend, bound, params, grads = config["backend"], config["bound"], config["params"], config["grads"]
        new = [p.detach().clone() for p in params]
        indices = list(range(len(new)))
        ctx.stash = t1_step(backend, new, [g.detach() for g in grads], _copy_state(config["state"], len(new)),
                            bound, indices, config["optimizer"], config["lr"], config["momentum"],
                            config["nesterov"], config["betas"], config["eps"], config["hypergrad"], stash=True)
        ctx.backend, ctx.bound, ctx.indices = backend, bound, indices
        return tuple(new)

    @staticmethod
    def backward(ctx, *grad_outputs):
        thetas = [ctx.stash.theta[i] for i in ctx.indices]
        v = [torch.zeros_like(th) if g is None else g.to(th.dtype).contiguous() for th, g in zip(thetas, grad_outputs)]
        hg = penalty_hypergrads(ctx.backend, ctx.bound, ctx.indices, v, ctx.stash)
        return (None, *[hg[h.name] for h in ctx.bound])


def t1_update(params: list[torch.Tensor], grads: list[torch.Tensor], hypers: list[Hyper], *,
              optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, state: list[dict] | None = None,
              hypergrad: str = "exact", backend: str = "auto") -> list[torch.Tensor]:
    """One T1 step, out of place, differentiable with respect to every ``Hyper.raw``.

    ``state``: optional per-parameter optimizer state as in ``T1T2.state`` (``momentum_buffer``, or
    ``exp_avg``, ``exp_avg_sq``, ``step``); it is read, not modified. Returns the new parameters;
    their gradient with respect to the raw hyperparameters goes through the fused T2 op
    (``hypergrad="sgd"`` gives the paper's approximation instead of the exact Jacobian).
    """
    if len(grads) != len(params):
        raise ValueError(f"got {len(params)} params but {len(grads)} grads")
    if not params:
        return []
    bound = _bind(hypers, params)
    config = dict(backend=resolve_backend(backend, params[0].device), bound=bound, params=params, grads=grads,
                  state=state, optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov,
                  betas=tuple(betas), eps=eps, hypergrad=hypergrad)
    return list(_T1Update.apply(config, *[h.raw for h in hypers]))


def t1_update_reference(params, grads, hypers: list[Hyper], *, optimizer: str = "sgd", lr: float = 0.1,
                        momentum: float = 0.0, nesterov: bool = False, betas=(0.9, 0.999), eps: float = 1e-8,
                        state: list[dict] | None = None) -> list[torch.Tensor]:
    """Twin of ``t1_update`` (exact mode) written with plain differentiable torch ops: autograd
    through the update itself gives the hypergradient. NaN where Adam's ŝ = 0 (autograd's
    derivative of √ at 0), which the fused path replaces by its limit."""
    bound = _bind(hypers, params)
    states = _copy_state(state, len(params))
    beta1, beta2 = betas
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        acc = compute_dtype(p.dtype)
        theta, ghat, decay = p.detach().to(acc), g.detach().to(acc), None
        for h, user in zip(bound, hypers):
            if i not in user.targets:
                continue
            c = h.transform.value(user.raw).to(acc).reshape(-1, 1)
            c = c.expand(c.shape[0], theta.numel() // c.shape[0]).reshape(theta.shape)
            if h.decoupled:
                decay = 2 * c * theta if decay is None else decay + 2 * c * theta
            else:
                ghat = ghat + reference.penalty_grad(theta, c, h.kind)
        st = states[i]
        if optimizer == "sgd":
            direction = ghat
            if momentum:
                buf = momentum * st.get("momentum_buffer", torch.zeros_like(theta)) + ghat
                direction = ghat + momentum * buf if nesterov else buf
        else:
            t = int(st.get("step", 0)) + 1
            m = beta1 * st.get("exp_avg", torch.zeros_like(theta)) + (1 - beta1) * ghat
            s = beta2 * st.get("exp_avg_sq", torch.zeros_like(theta)) + (1 - beta2) * ghat * ghat
            direction = (m / (1 - beta1 ** t)) / ((s / (1 - beta2 ** t)).sqrt() + eps)
        new = theta - lr * direction
        if decay is not None:
            new = new - lr * decay
        out.append(new.to(p.dtype))
    return out
