"""T1T2's float64 hypergradient against an independent implementation of the same one-step objective.

The finite-difference oracle (test_hypergrad_fd.py) differentiates T1T2's own T1 step, so it checks
self-consistency: halving L2 in both the T1 step and the mixed term passes it. Here nothing of
t1t2_fast is used to compute the reference: the penalty Ω is written out by hand in plain PyTorch
(docs/design.md's table: L2 = Σ cθ², L1 = Σ c|θ|, decoupled L2 applied outside the optimizer as
−η·2cθ), the transforms by hand (exp, softplus, identity), the optimizer's update by hand in
differentiable torch ops (checked against torch.optim itself below), the network evaluated with
torch.func.functional_call at θ and at θ⁺(λ), and h = dC2(θ⁺(λ))/dλ taken by torch.autograd.

Both sides are exact float64 computations of the same number that differ only in operation order,
so they must agree to 1e-10 relative (measured: at most 8e-16).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import t1t2_fast as t1t2
from conftest import backends
from oracle import OPTIMIZER_CONFIGS, Problem, relative_error

BACKENDS = backends("reference", "cpp")
TOL = 1e-10
WARMUP = 3
WEIGHTS = ("0.weight", "2.weight")  # the tensors a penalty selects by default (dim >= 2)
ADAMW = dict(optimizer="adamw", lr=0.05, betas=(0.8, 0.9), weight_decay=0.1)
OPTIMIZERS = {**OPTIMIZER_CONFIGS, "adamw": ADAMW}


# ---------------------------------------------------------------------------------------------
# the independent side: transforms, penalties and optimizer updates written out by hand
# ---------------------------------------------------------------------------------------------
TRANSFORMS = {  # c = φ(λ) and λ = φ⁻¹(c)
    "log": (torch.exp, math.log),
    "softplus": (F.softplus, lambda c: math.log(math.expm1(c))),
    "linear": (lambda lam: lam, lambda c: c),
}


class HandPenalty:
    """One penalty: kind "l2" | "l1" | "decoupled", raw λ per (hyperparameter name) as leaves."""

    def __init__(self, kind, per, transform, c0, shapes):
        self.kind, self.per, self.phi = kind, per, TRANSFORMS[transform][0]
        lam0 = TRANSFORMS[transform][1](c0)
        self.prefix = prefix = "l1" if kind == "l1" else "l2"
        if per == "network":
            self.raw = {prefix: torch.tensor(lam0, dtype=torch.float64)}
        else:
            shape = {"layer": lambda s: (), "unit": lambda s: (s[0],), "element": lambda s: s}[per]
            self.raw = {f"{prefix}.{n}": torch.full(shape(shapes[n]), lam0, dtype=torch.float64) for n in WEIGHTS}

    def coefficient(self, name):
        """c broadcastable against the weight ``name``."""
        lam = self.raw[self.prefix if self.per == "network" else f"{self.prefix}.{name}"]
        c = self.phi(lam)
        return c[:, None] if self.per == "unit" else c

    def omega(self, theta):
        """Ω(θ; c) in the loss (coupled penalties only)."""
        f = (lambda t: t * t) if self.kind == "l2" else torch.abs
        return sum((self.coefficient(n) * f(theta[n])).sum() for n in WEIGHTS)

    def decay(self, theta, lr):
        """The decoupled term −η·2cθ that θ⁺ gets outside the optimizer."""
        return {n: -lr * 2 * self.coefficient(n) * theta[n] for n in WEIGHTS}


def hand_update(theta, g, state, cfg):
    """θ⁺ from θ and the total gradient ĝ, torch.optim's SGD (momentum, Nesterov) and Adam/AdamW
    written out (docs/design.md, "The T1 step"); differentiable in ĝ. Returns (θ⁺, new state)."""
    lr, new = cfg["lr"], {}
    out = {}
    for n, t in theta.items():
        st = state.get(n, {})
        if cfg["optimizer"] == "sgd":
            mu = cfg.get("momentum", 0.0)
            if mu:
                b = g[n] if "buf" not in st else mu * st["buf"] + g[n]
                d = g[n] + mu * b if cfg.get("nesterov") else b
                new[n] = {"buf": b}
            else:
                d = g[n]
            out[n] = t - lr * d
        else:
            (b1, b2), eps, step = cfg["betas"], cfg.get("eps", 1e-8), st.get("step", 0) + 1
            m = b1 * st.get("m", torch.zeros_like(t)) + (1 - b1) * g[n]
            s = b2 * st.get("s", torch.zeros_like(t)) + (1 - b2) * g[n] * g[n]
            mhat, shat = m / (1 - b1 ** step), s / (1 - b2 ** step)
            out[n] = t - lr * mhat / (shat.sqrt() + eps)
            new[n] = {"m": m, "s": s, "step": step}
    return out, new


class Anchor:
    """The model as a pure function of its parameters (functional_call), trained by hand."""

    def __init__(self, problem, pens, cfg):
        self.problem, self.pens, self.cfg = problem, pens, cfg
        self.model = copy.deepcopy(problem.model)
        self.theta = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.state = {}

    def loss(self, theta, x, y):
        return F.cross_entropy(functional_call(self.model, theta, (x,)), y)

    def step(self, differentiable=False):
        """One T1 step from self.theta; θ⁺ is a function of the pens' λ when differentiable."""
        theta = {n: t.detach().requires_grad_() for n, t in self.theta.items()}
        names = list(theta)
        g_data = dict(zip(names, torch.autograd.grad(self.loss(theta, self.problem.x, self.problem.y),
                                                     [theta[n] for n in names])))
        coupled = [p for p in self.pens if p.kind != "decoupled"]
        g = dict(g_data)
        if coupled:
            omega = sum(p.omega(theta) for p in coupled)
            g_pen = torch.autograd.grad(omega, [theta[n] for n in WEIGHTS], create_graph=differentiable)
            for n, gp in zip(WEIGHTS, g_pen):
                g[n] = g[n] + gp
        base = {n: t.detach() for n, t in theta.items()}
        plus, state = hand_update(base, g, self.state, self.cfg)
        for p in self.pens:
            if p.kind == "decoupled":
                for n, d in p.decay(base, self.cfg["lr"]).items():
                    plus[n] = plus[n] + d
        return plus, state

    def warm_up(self, steps):
        for _ in range(steps):
            plus, self.state = self.step()
            self.theta = {n: t.detach() for n, t in plus.items()}
            self.state = {n: {k: (v.detach() if torch.is_tensor(v) else v) for k, v in st.items()}
                          for n, st in self.state.items()}

    def hypergrad(self):
        raws = {k: v for p in self.pens for k, v in p.raw.items()}
        for v in raws.values():
            v.requires_grad_()
        plus, _ = self.step(differentiable=True)
        c2 = self.loss(plus, self.problem.xv, self.problem.yv)
        return dict(zip(raws, torch.autograd.grad(c2, list(raws.values()))))


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------
def t1t2_penalty(kind, per, transform, c0):
    if kind == "l1":
        return t1t2.L1(c0, per=per, transform=transform)
    return t1t2.L2(c0, per=per, transform=transform, decoupled=(kind == "decoupled"))


def compare(problem, specs, cfg, backend):
    """specs: [(kind, per, transform, c0)]. Warm both up WARMUP steps at fixed λ, then compare the
    next step's hypergradient; θ after the warm-up must agree too (the same convention)."""
    model = copy.deepcopy(problem.model)
    opt = t1t2.T1T2(model, [t1t2_penalty(*s) for s in specs], hyper_every=WARMUP + 1, backend=backend,
                    hypergrad="exact", **cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    pens = [HandPenalty(*s, shapes) for s in specs]
    if cfg["optimizer"] == "adamw":  # its weight decay: a decoupled L2 with c = wd/2 on each weight
        pens.append(HandPenalty("decoupled", "layer", "log", cfg["weight_decay"] / 2, shapes))
    hand_cfg = dict(cfg, optimizer="sgd" if cfg["optimizer"] == "sgd" else "adam")
    anchor = Anchor(problem, pens, hand_cfg)
    for _ in range(WARMUP):
        opt.step(problem.train_closure(model))
    anchor.warm_up(WARMUP)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), anchor.theta[n], rtol=1e-12, atol=1e-14)
    for k, v in opt.raw_hyperparameters().items():  # the same λ (the transforms' inverses agree)
        torch.testing.assert_close(v, next(p.raw[k] for p in pens if k in p.raw), rtol=1e-14, atol=0)
    opt.step(problem.train_closure(model))
    opt.hyper_step(problem.val_closure(model))
    ours = {k: v.clone() for k, v in opt.last_hypergrad.items()}
    ref = anchor.hypergrad()
    assert ours.keys() == ref.keys()
    err = relative_error(ours, ref)
    assert err <= TOL, {k: (ours[k], ref[k]) for k in ours}
    for k in ours:  # each hyperparameter on its own, not only the total
        assert relative_error({k: ours[k]}, {k: ref[k]}) <= TOL, (k, ours[k], ref[k])
    return err


C0 = {"l2": 0.05, "l1": 0.02, "decoupled": 0.05}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZER_CONFIGS))
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("per", ["network", "layer", "unit", "element"])
@pytest.mark.parametrize("kind", ["l2", "l1", "decoupled"])
def test_hypergradient_matches_an_independent_implementation(kind, per, transform, opt_name, backend):
    compare(Problem(seed=11), [(kind, per, transform, C0[kind])], OPTIMIZER_CONFIGS[opt_name], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", [[], [("l1", "unit", "softplus", 0.02)]], ids=["alone", "with-l1-per-unit"])
def test_adamw_weight_decay_hypergradient_matches_an_independent_implementation(extra, backend):
    compare(Problem(seed=12), extra, ADAMW, backend)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_the_hand_update_is_torch_optim(opt_name):
    """The anchor's update is torch.optim's: four steps of the hand update on a loss with a hand
    L2 + L1 against torch.optim.SGD / Adam / AdamW on the same loss, float64, to rounding."""
    cfg = OPTIMIZERS[opt_name]
    problem = Problem(seed=13)
    shapes = {n: tuple(p.shape) for n, p in problem.model.named_parameters()}
    pens = [HandPenalty("l2", "unit", "log", 0.05, shapes), HandPenalty("l1", "layer", "softplus", 0.02, shapes)]
    if opt_name == "adamw":
        pens.append(HandPenalty("decoupled", "layer", "log", cfg["weight_decay"] / 2, shapes))
    anchor = Anchor(problem, pens, dict(cfg, optimizer="sgd" if cfg["optimizer"] == "sgd" else "adam"))
    model = copy.deepcopy(problem.model)
    kw = {k: v for k, v in cfg.items() if k != "optimizer"}
    torch_opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg["optimizer"]]
    if opt_name == "adamw":  # T1T2 decays the weights only (weight_decay_params: dim >= 2)
        groups = [{"params": [p for p in model.parameters() if p.dim() >= 2]},
                  {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = list(model.parameters())
    opt = torch_opt(groups, **kw)
    params = dict(model.named_parameters())
    for _ in range(4):
        opt.zero_grad()
        loss = problem.train_closure(model)() + sum(p.omega(params) for p in pens if p.kind != "decoupled")
        loss.backward()
        opt.step()
        anchor.warm_up(1)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), anchor.theta[n], rtol=1e-13, atol=1e-15)
