"""User-defined hyperparameters (``t1t2_fast.Tunable``) against the float64 finite-difference oracle
(docs/tunables.md, docs/design.md "T2: tunables").

The three worked examples: label smoothing (a Tunable in the loss), concrete dropout (a Tunable inside
a layer of the model, whose uniform noise comes from torch's generator) and an auxiliary loss weight
(a Tunable in the loss). For each, J(λ) = C_val(θ⁺(λ)) is differentiated by a fourth-order central
stencil in λ, each point running the real T1 step from the same state with the same generator state,
and the validation loss evaluated inside ``evaluating()`` (what ``hyper_step`` gives its validation
closure). ``hyper_step``'s hypergradient before the hyper-optimizer's update (``last_hypergrad``) must
match it: "exact" to 1e-6 (as the noise hyperparameters), "fd" and "fd-central" at fd_eps = 1e-6 to the
first-order error measured for the noise hyperparameters (tests/noise/test_noise_hypergrad.py).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2
from conftest import backends
from oracle import OPTIMIZER_CONFIGS, STENCIL_POINTS, STENCIL_WEIGHTS, relative_error

BACKENDS = backends("reference", "cpp")


def _data(g, n, d, classes, dtype):
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


class LabelSmoothing:
    """A tanh MLP trained with label smoothing c (a Tunable in the loss), validated with plain CE."""

    names = {"l2.0.weight", "l2.2.weight", "tunable.label_smoothing"}
    tuned = "tunable.label_smoothing"

    def __init__(self, seed=0, dtype=torch.float64, n=12, init=0.2):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
        self.tunables = [t1t2.Tunable(init, transform="linear", bounds=(0.0, 1.0), eval_value=0.0,
                                      name="label_smoothing")]
        self.penalties = [t1t2.L2(1e-2)]
        self.x, self.y = _data(g, n, 3, 3, dtype)
        self.xv, self.yv = _data(g, n, 3, 3, dtype)

    def train(self, model, tunables):
        return lambda: t1t2.smoothed_cross_entropy(model(self.x), self.y, tunables[0])

    def val(self, model, tunables):  # under evaluating() the Tunable is 0: plain cross-entropy
        return lambda: t1t2.smoothed_cross_entropy(model(self.xv), self.yv, tunables[0])


class ConcreteDropoutNet:
    """A tanh MLP with a ConcreteDropout layer (its rate p a Tunable inside the model)."""

    names = {"l2.0.weight", "l2.3.weight", "tunable.2.p"}
    tuned = "tunable.2.p"

    def __init__(self, seed=0, dtype=torch.float64, n=12, p=0.3):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), t1t2.ConcreteDropout(p, temperature=0.1),
                                   nn.Linear(6, 2)).to(dtype)
        self.tunables = []
        self.penalties = [t1t2.L2(1e-2)]
        self.x, self.y = _data(g, n, 3, 2, dtype)
        self.xv, self.yv = _data(g, n, 3, 2, dtype)

    def train(self, model, tunables):
        return lambda: F.cross_entropy(model(self.x), self.y)

    def val(self, model, tunables):  # under evaluating() ConcreteDropout is the identity
        return lambda: F.cross_entropy(model(self.xv), self.yv)


class AuxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(3, 6)
        self.main = nn.Linear(6, 2)
        self.aux = nn.Linear(6, 1)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.main(h), self.aux(h).squeeze(1)


class AuxiliaryLoss:
    """L = CE(main head) + w·MSE(auxiliary head), w a Tunable in the loss; validation: the main loss."""

    names = {"l2.trunk.weight", "l2.main.weight", "l2.aux.weight", "tunable.aux_weight"}
    tuned = "tunable.aux_weight"

    def __init__(self, seed=0, dtype=torch.float64, n=12, w=0.5):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = AuxNet().to(dtype)
        self.tunables = [t1t2.Tunable(w, transform="log", name="aux_weight")]
        self.penalties = [t1t2.L2(1e-2)]
        self.x, self.y = _data(g, n, 3, 2, dtype)
        self.z = torch.randn(n, generator=g, dtype=dtype)
        self.xv, self.yv = _data(g, n, 3, 2, dtype)

    def train(self, model, tunables):
        def closure():
            logits, aux = model(self.x)
            return F.cross_entropy(logits, self.y) + tunables[0]() * F.mse_loss(aux, self.z)
        return closure

    def val(self, model, tunables):
        return lambda: F.cross_entropy(model(self.xv)[0], self.yv)


CASES = {"label_smoothing": LabelSmoothing, "concrete_dropout": ConcreteDropoutNet, "aux_weight": AuxiliaryLoss}


def _seeded(opt):
    """The generator state of the T1 step after ``opt.steps`` steps (concrete dropout's uniform noise):
    the same for the step under test and every point of the oracle."""
    torch.manual_seed(1000 + opt.steps)


def warmed_up(case, steps=3, **kwargs):
    model, tunables = copy.deepcopy((case.model, case.tunables))
    opt = t1t2.T1T2(model, case.penalties, tunables=tunables, hyper_every=1, **kwargs)
    for _ in range(steps):
        _seeded(opt)
        opt.step(case.train(model, tunables))
        opt.hyper_step(case.val(model, tunables))
    return model, tunables, opt


def hypergrad_of_next_step(case, state):
    model, tunables, opt = copy.deepcopy(state)
    _seeded(opt)
    opt.step(case.train(model, tunables))
    opt.hyper_step(case.val(model, tunables))
    return {k: v.clone() for k, v in opt.last_hypergrad.items()}


def oracle(case, state, delta=1e-4):
    """Central differences in every raw hyperparameter of J(λ) = C_val(θ⁺(λ)), the validation loss
    evaluated as hyper_step evaluates it (inside evaluating())."""
    out = {}
    for name, raw in state[2].raw_hyperparameters().items():
        fd = torch.zeros(raw.numel(), dtype=torch.float64)
        for j in range(raw.numel()):
            vals = []
            for sign in STENCIL_POINTS:
                model, tunables, opt = copy.deepcopy(state)
                with torch.no_grad():
                    opt.raw_hyperparameters()[name].view(-1)[j] += sign * delta
                _seeded(opt)
                opt.step(case.train(model, tunables))
                with torch.no_grad(), t1t2.evaluating():
                    vals.append(case.val(model, tunables)().item())
            fd[j] = sum(w * f for w, f in zip(STENCIL_WEIGHTS, vals)) / delta
        out[name] = fd.reshape(raw.shape)
    return out


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_matches_the_oracle(case_name, opt_name, backend):
    case = CASES[case_name]()
    state = warmed_up(case, noise_hypergrad="exact", backend=backend, **OPTIMIZER_CONFIGS[opt_name])
    ours = hypergrad_of_next_step(case, state)
    fd = oracle(case, state)
    assert set(ours) == case.names
    assert relative_error(ours, fd) < 1e-6, (ours, fd)
    tuned = case.tuned  # the tunable on its own, not only the total
    assert relative_error({tuned: ours[tuned]}, {tuned: fd[tuned]}) < 1e-6, (ours[tuned], fd[tuned])
    assert float(fd[tuned].abs()) > 1e-6  # the oracle sees λ: the comparison is not 0 against 0


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("mode", ["fd", "fd-central"])
def test_finite_difference_modes_match_the_oracle(case_name, mode):
    """fd's error is O(fd_eps) (measured 6e-7 at fd_eps = 1e-6 for the noise levels), fd-central's
    O(fd_eps²) down to float64 rounding."""
    case = CASES[case_name]()
    state = warmed_up(case, noise_hypergrad=mode, fd_eps=1e-6, **OPTIMIZER_CONFIGS["momentum"])
    ours = hypergrad_of_next_step(case, state)
    fd = oracle(case, state)
    tuned = case.tuned
    tol = 1e-5 if mode == "fd" else 1e-6  # measured: fd 4e-8 ... 3e-6, fd-central 1e-10 ... 1e-9
    assert relative_error({tuned: ours[tuned]}, {tuned: fd[tuned]}) < tol, (ours[tuned], fd[tuned])
    assert relative_error(ours, fd) < tol, (ours, fd)


def test_smoothed_cross_entropy_is_torchs_label_smoothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, 3, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (7, 3), generator=g)
    for c in (0.0, 0.1, 0.7):
        for reduction in ("mean", "sum", "none"):
            want = F.cross_entropy(logits, target, label_smoothing=c, reduction=reduction)
            got = t1t2.smoothed_cross_entropy(logits, target, torch.tensor(c, dtype=torch.float64),
                                              reduction=reduction)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    c = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)  # differentiable in c
    t1t2.smoothed_cross_entropy(logits, target, c).backward()
    assert c.grad is not None and float(c.grad) != 0.0


def test_validation_closure_sees_the_evaluation_values():
    """hyper_step's validation closure runs inside evaluating(): a Tunable gives its eval_value (or its
    current value, detached, without one), ConcreteDropout is the identity, noise is off; the training
    closure's replay sees the training values."""
    case = ConcreteDropoutNet()
    model = copy.deepcopy(case.model)
    ls = t1t2.Tunable(0.2, transform="linear", bounds=(0, 1), eval_value=0.0, name="ls")
    w = t1t2.Tunable(0.5, name="w")
    seen = {}
    drop = model[2]

    def train():
        seen["train"] = (float(ls().detach()), float(w().detach()), t1t2.is_evaluating())
        return t1t2.smoothed_cross_entropy(model(case.x), case.y, ls) + 0.1 * w() * model(case.x).pow(2).mean()

    def val():
        c, cw = ls(), w()
        seen["val"] = (float(c), float(cw), c.requires_grad or cw.requires_grad, t1t2.is_evaluating(),
                       t1t2.noise_enabled(), torch.equal(drop(case.xv), case.xv))
        return F.cross_entropy(model(case.xv), case.yv)

    opt = t1t2.T1T2(model, [], tunables=[ls, w], noise_hypergrad="exact")
    opt.step(train)
    opt.hyper_step(val)
    assert seen["val"] == (0.0, pytest.approx(0.5), False, True, False, True)
    assert seen["train"] == (pytest.approx(0.2), pytest.approx(0.5), False)
    assert not t1t2.is_evaluating()
    model.eval()  # eval mode: the identity too, and a Tunable of the model gives its evaluation value
    assert torch.equal(drop(case.xv), case.xv)


def test_only_tunables_needs_the_training_closure():
    """A model with no noise, no penalty and one Tunable: step() without a closure needs
    hyper_step(val, train=...), which then gives the same hypergradient as step(closure)."""
    case = LabelSmoothing()
    case.penalties = []
    outs = []
    for with_closure in (True, False):
        model, tunables = copy.deepcopy((case.model, case.tunables))
        opt = t1t2.T1T2(model, [], tunables=tunables, noise_hypergrad="fd", **OPTIMIZER_CONFIGS["sgd"])
        for _ in range(3):
            if with_closure:
                opt.step(case.train(model, tunables))
                opt.hyper_step(case.val(model, tunables))
            else:
                opt.zero_grad()
                case.train(model, tunables)().backward()
                opt.step()
                opt.hyper_step(case.val(model, tunables), train=case.train(model, tunables))
        outs.append(({k: v.clone() for k, v in opt.last_hypergrad.items()}, [p.clone() for p in model.parameters()]))
    (h1, p1), (h2, p2) = outs
    assert set(h1) == set(h2) == {"tunable.label_smoothing"}
    torch.testing.assert_close(h1, h2, rtol=1e-10, atol=1e-14)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    model, tunables = copy.deepcopy((case.model, case.tunables))
    opt = t1t2.T1T2(model, [], tunables=tunables)
    case.train(model, tunables)().backward()
    opt.step()
    with pytest.raises(RuntimeError, match=r"tunable hyperparameters.*hyper_step\(val_closure, train=train_closure\)"):
        opt.hyper_step(case.val(model, tunables))
