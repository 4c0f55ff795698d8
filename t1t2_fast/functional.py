"""Differentiable functional form of the T1 step (DESIGN.md §3).

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
from dataclasses import dataclass, field

import torch

from . import reference
from .backend import resolve_backend
from .hyper import Hyperparameter, Target, get_transform
from .steps import penalty_hypergrads, t1_step


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
        if h.kind not in reference.PENALTY_KINDS:
            raise ValueError(f"hypers[{k}]: unknown kind {h.kind!r}; expected one of {reference.PENALTY_KINDS}")
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
        thetas = [ctx.stash["theta"][i] for i in ctx.indices]
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
        acc = reference.accumulate_dtype(p.dtype)
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
