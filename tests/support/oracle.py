"""Shared helpers for the float64 finite-difference oracle (the hypergradient contract of docs/design.md)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2

OPTIMIZER_CONFIGS = {
    "sgd": dict(optimizer="sgd", lr=0.3),
    "momentum": dict(optimizer="sgd", lr=0.3, momentum=0.9),
    "nesterov": dict(optimizer="sgd", lr=0.3, momentum=0.9, nesterov=True),
    "adam": dict(optimizer="adam", lr=0.05, betas=(0.8, 0.9)),
}


class Problem:
    """A tiny smooth classifier (tanh, so the validation loss is smooth in θ) with fixed data."""

    def __init__(self, seed=0, dtype=torch.float64, sizes=(3, 4, 2), n=12):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        self.model = nn.Sequential(*layers[:-1]).to(dtype)
        self.x = torch.randn(n, sizes[0], generator=g, dtype=dtype)
        self.y = torch.randint(0, sizes[-1], (n,), generator=g)
        self.xv = torch.randn(n, sizes[0], generator=g, dtype=dtype)
        self.yv = torch.randint(0, sizes[-1], (n,), generator=g)

    def train_closure(self, model):
        return lambda: F.cross_entropy(model(self.x), self.y)

    def val_closure(self, model):
        return lambda: F.cross_entropy(model(self.xv), self.yv)

    def val_loss(self, model):
        with torch.no_grad():
            return self.val_closure(model)().item()


def warmed_up(problem: Problem, penalties, steps=3, **opt_kwargs):
    """Model and optimizer after a few T1 steps, so momentum / Adam state is non-trivial."""
    model = copy.deepcopy(problem.model)
    opt = t1t2.T1T2(model, penalties, hyper_every=1, **opt_kwargs)
    for _ in range(steps):
        opt.step(problem.train_closure(model))
    return model, opt


def analytic_hypergrad(problem, model, opt):
    model, opt = copy.deepcopy((model, opt))
    opt.step(problem.train_closure(model))
    assert opt.hyper_due
    opt.hyper_step(problem.val_closure(model))
    return {k: v.clone() for k, v in opt.last_hypergrad.items()}


def _t1_from(problem, model, opt, name, index, delta):
    """θ⁺ after the real T1 step from (model, opt) with raw λ[name][index] shifted by delta."""
    model, opt = copy.deepcopy((model, opt))
    with torch.no_grad():
        opt.raw_hyperparameters()[name].view(-1)[index] += delta
    opt.step(problem.train_closure(model))
    return model, [p.detach().clone() for p in model.parameters()]


# Fourth-order central stencil: truncation error O(δ⁴), so δ = 1e-4 sits far above float64
# rounding (≈1e-12 relative) and far below the curvature of Adam's update in λ.
STENCIL_POINTS = (2.0, 1.0, -1.0, -2.0)
STENCIL_WEIGHTS = (-1 / 12, 8 / 12, -8 / 12, 1 / 12)


def fd_hypergrad(problem, model, opt, penalties, delta=1e-4, sgd_step=False):
    """Central finite differences of J(λ) = C2(θ⁺(λ)) for every entry of every raw hyperparameter.

    With ``sgd_step`` the oracle of the paper's approximation (hypergrad="sgd"): the validation
    gradient is taken at the real θ⁺, the step's dependence on λ is that of a plain SGD step,
    J̃(λ) = C2(θ⁺_real(λ₀) + θ⁺_sgd(λ) − θ⁺_sgd(λ₀)).
    """
    if sgd_step:
        real_model, _ = _t1_from(problem, model, opt, next(iter(opt.raw_hyperparameters())), 0, 0.0)
        theta_real = [p.detach().clone() for p in real_model.parameters()]
        sgd_model = copy.deepcopy(model)
        sgd_opt = t1t2.T1T2(sgd_model, penalties, optimizer="sgd", lr=opt.param_groups[0]["lr"],
                            backend="reference")
        sgd_opt.steps = opt.steps  # noise keys count T1 steps: the plain SGD step draws the real step's ε
        with torch.no_grad():
            for n, raw in sgd_opt.raw_hyperparameters().items():
                raw.copy_(opt.raw_hyperparameters()[n])
        _, theta_sgd0 = _t1_from(problem, sgd_model, sgd_opt, n, 0, 0.0)
    out = {}
    for name, raw in opt.raw_hyperparameters().items():
        fd = torch.zeros(raw.numel(), dtype=torch.float64)
        for j in range(raw.numel()):
            vals = []
            for sign in STENCIL_POINTS:
                if sgd_step:
                    _, theta_sgd = _t1_from(problem, sgd_model, sgd_opt, name, j, sign * delta)
                    probe = copy.deepcopy(real_model)
                    with torch.no_grad():
                        for p, a, b, c in zip(probe.parameters(), theta_real, theta_sgd, theta_sgd0):
                            p.copy_(a + (b - c))
                else:
                    probe, _ = _t1_from(problem, model, opt, name, j, sign * delta)
                vals.append(problem.val_loss(probe))
            fd[j] = sum(w * f for w, f in zip(STENCIL_WEIGHTS, vals)) / delta
        out[name] = fd.reshape(raw.shape)
    return out


def relative_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
    den = sum(float(b[k].double().pow(2).sum()) for k in b) ** 0.5
    return num / den
