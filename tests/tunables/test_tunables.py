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


class Mixed:
    """Every replayed kind at once: input noise and concrete dropout in the model, label smoothing in
    the loss, and a penalty: one code path computes the noise and tunable hypergradients together."""

    names = {"l2.1.weight", "l2.4.weight", "noise.0", "tunable.3.p", "tunable.label_smoothing"}
    tuned = "tunable.label_smoothing"

    def __init__(self, seed=0, dtype=torch.float64, n=12):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = nn.Sequential(t1t2.GaussianNoise(0.3), nn.Linear(3, 6), nn.Tanh(),
                                   t1t2.ConcreteDropout(0.3), nn.Linear(6, 3)).to(dtype)
        self.tunables = [t1t2.Tunable(0.2, transform="linear", bounds=(0.0, 1.0), eval_value=0.0,
                                      name="label_smoothing")]
        self.penalties = [t1t2.L2(1e-2)]
        self.x, self.y = _data(g, n, 3, 3, dtype)
        self.xv, self.yv = _data(g, n, 3, 3, dtype)

    def train(self, model, tunables):
        return lambda: t1t2.smoothed_cross_entropy(model(self.x), self.y, tunables[0])

    def val(self, model, tunables):
        return lambda: F.cross_entropy(model(self.xv), self.yv)


CASES = {"label_smoothing": LabelSmoothing, "concrete_dropout": ConcreteDropoutNet, "aux_weight": AuxiliaryLoss,
         "mixed": Mixed}


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
    for name in case.names - {tuned}:  # and each other noise or tunable hyperparameter on its own
        if not name.startswith("l2."):
            assert relative_error({name: ours[name]}, {name: fd[name]}) < 1e-6, (name, ours[name], fd[name])


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


# ---------------------------------------------------------------------------------------------
# The hyperparameter's bookkeeping: names, bounds, views, checkpoints, the guard
# ---------------------------------------------------------------------------------------------
def test_sigmoid_transform():
    from t1t2_fast.penalties import get_transform

    tr = get_transform("sigmoid")
    raw = torch.linspace(-6, 6, 13, dtype=torch.float64, requires_grad=True)
    c = tr.value(raw)
    assert bool(((c > 0) & (c < 1)).all())
    (grad,) = torch.autograd.grad(c.sum(), raw)
    torch.testing.assert_close(tr.derivative(raw.detach()), grad, rtol=1e-12, atol=0)
    for v in (1e-6, 0.1, 0.5, 0.9, 1 - 1e-6):
        assert float(tr.value(torch.tensor(tr.inverse(v), dtype=torch.float64))) == pytest.approx(v, rel=1e-9)
    assert tr.inverse(0.0) == -float("inf") and tr.inverse(1.0) == float("inf")
    for bad in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match="sigmoid"):
            t1t2.Tunable(bad, transform="sigmoid")
    # bounds inside (0, 1) project λ
    t = t1t2.Tunable(0.5, transform="sigmoid", bounds=(0.2, 0.6))
    t.raw.fill_(10.0)
    t.project()
    assert float(t.value()) == pytest.approx(0.6)


def test_names_and_their_errors():
    case = ConcreteDropoutNet()
    model = copy.deepcopy(case.model)
    w = t1t2.Tunable(0.5, name="aux_weight")
    opt = t1t2.T1T2(model, [], tunables=[w])
    assert list(opt.hyperparameters()) == ["tunable.2.p", "tunable.aux_weight"]
    assert opt.hyperparameters()["tunable.2.p"] == pytest.approx(0.3)
    assert "tunable.aux_weight" in repr(opt)
    with pytest.raises(ValueError, match="has no name"):
        t1t2.T1T2(copy.deepcopy(case.model), [], tunables=[t1t2.Tunable(0.5)])
    with pytest.raises(ValueError, match="two hyperparameters are named 'tunable.w'"):
        t1t2.T1T2(copy.deepcopy(case.model), [], tunables=[t1t2.Tunable(0.5, name="w"), t1t2.Tunable(1.0, name="w")])
    with pytest.raises(ValueError, match="finds by itself"):
        t1t2.T1T2(model, [], tunables=[model[2].p])
    with pytest.raises(TypeError, match="must be a t1t2_fast.Tunable"):
        t1t2.T1T2(copy.deepcopy(case.model), [], tunables=[0.5])
    with pytest.raises(ValueError, match="outside bounds"):
        t1t2.Tunable(2.0, transform="linear", bounds=(0, 1))


def test_loss_tunables_follow_the_parameters_dtype():
    """λ of a Tunable in the loss is held in the compute dtype (float64 here) so that float64 runs tune
    in float64; the raw tensor the optimizer updates is the module's own."""
    case = AuxiliaryLoss()
    model, tunables = copy.deepcopy((case.model, case.tunables))
    assert tunables[0].raw.dtype == torch.float32
    opt = t1t2.T1T2(model, [], tunables=tunables)
    assert tunables[0].raw.dtype == torch.float64
    assert opt.raw_hyperparameters()["tunable.aux_weight"] is tunables[0].raw
    opt.raw_hyperparameters()["tunable.aux_weight"].fill_(0.0)
    assert float(tunables[0].value()) == 1.0  # log transform: exp(0)
    half = copy.deepcopy(case.model).half()
    drop = t1t2.ConcreteDropout(0.2)
    half.add_module("drop", drop)
    half.half()
    assert drop.p.raw.dtype == torch.float32  # .half() does not round λ


def test_bounds_views_and_log_dict():
    case = LabelSmoothing()
    model, tunables = copy.deepcopy((case.model, case.tunables))
    opt = t1t2.T1T2(model, [], tunables=tunables, hyper_optimizer="sgd", hyper_lr=1e6)
    assert opt.bounds()["tunable.label_smoothing"] == (0.0, 1.0)
    for _ in range(2):  # a huge step is projected into [0, 1]
        opt.step(case.train(model, tunables))
        opt.hyper_step(case.val(model, tunables))
    c = opt.hyperparameters()["tunable.label_smoothing"]
    assert 0.0 <= c <= 1.0 and c != pytest.approx(0.2)
    assert opt.clipped.get("tunable.label_smoothing", 0) >= 1
    assert opt.set_bounds("tunable.*", 0.05, 0.1) == ["tunable.label_smoothing"]
    assert tunables[0].bounds == (0.05, 0.1)  # the module's own copy follows
    assert 0.05 <= float(tunables[0]().detach()) <= 0.1
    logged = opt.log_dict()
    assert logged["t1t2/tunable.label_smoothing"] == pytest.approx(float(tunables[0].value()))
    assert "t1t2/hypergrad/tunable.label_smoothing" in logged


@pytest.mark.parametrize("split_inside", [False, True], ids=["between_iterations", "before_hyper_step"])
def test_state_dict_resume_is_bit_identical(split_inside):
    """λ of the model's and the loss's Tunables round-trips through state_dict; a checkpoint taken
    between step and hyper_step keeps the generator state its replay needs (concrete dropout's
    uniform noise), so the resumed hyper step (with train=) gives the same λ bit for bit."""
    case = ConcreteDropoutNet()
    case.tunables = [t1t2.Tunable(0.5, name="w")]
    train = lambda model, tunables: (lambda: F.cross_entropy(model(case.x), case.y)  # noqa: E731
                                     + tunables[0]() * model(case.x).pow(2).mean())
    make = lambda model, tunables: t1t2.T1T2(model, [t1t2.L2(1e-2)], tunables=tunables,  # noqa: E731
                                             noise_hypergrad="fd", **OPTIMIZER_CONFIGS["adam"])

    def run(split):
        model, tunables = copy.deepcopy((case.model, case.tunables))
        opt = make(model, tunables)
        for k in range(5):
            if k == split and not split_inside:
                sd_model, sd_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
                model, tunables = copy.deepcopy((case.model, case.tunables))
                opt = make(model, tunables)
                model.load_state_dict(sd_model)
                opt.load_state_dict(sd_opt)
            torch.manual_seed(100 + k)
            opt.step(train(model, tunables))
            torch.manual_seed(200 + k)  # the validation's own draws; the replay rewinds to the step's
            if k == split and split_inside:
                sd_model, sd_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
                model, tunables = copy.deepcopy((case.model, case.tunables))
                opt = make(model, tunables)
                model.load_state_dict(sd_model)
                opt.load_state_dict(sd_opt)
                opt.hyper_step(case.val(model, tunables), train=train(model, tunables))
            else:
                opt.hyper_step(case.val(model, tunables))
        return [p.clone() for p in model.parameters()], {k: v.clone() for k, v in opt.raw_hyperparameters().items()}

    (p1, r1), (p2, r2) = run(split=None), run(split=2)
    assert set(r1) == {"l2.0.weight", "l2.3.weight", "tunable.2.p", "tunable.w"}
    assert not torch.equal(r1["tunable.2.p"], case.model[2].p.raw.double())  # λ moved
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert all(torch.equal(r1[k], r2[k]) for k in r1)


def test_nonfinite_steps_leave_the_tunable_alone():
    """A NaN training loss skips the T1 step and its hyper step; a NaN validation loss skips the T2
    step: λ of the Tunable is unchanged by both and stays finite."""
    case = AuxiliaryLoss()
    model, tunables = copy.deepcopy((case.model, case.tunables))
    opt = t1t2.T1T2(model, [], tunables=tunables, **OPTIMIZER_CONFIGS["sgd"])
    opt.step(case.train(model, tunables))
    opt.hyper_step(case.val(model, tunables))
    before = tunables[0].raw.clone()
    bad_x = case.x.clone()
    bad_x[0, 0] = float("nan")
    opt.step(lambda: F.cross_entropy(model(bad_x)[0], case.y) + tunables[0]() * model(bad_x)[1].pow(2).mean())
    opt.hyper_step(case.val(model, tunables))
    assert torch.equal(tunables[0].raw, before)
    opt.step(case.train(model, tunables))
    opt.hyper_step(lambda: F.cross_entropy(model(bad_x)[0], case.y))
    assert torch.equal(tunables[0].raw, before)
    assert opt.skipped == {"t1": 1, "t2": 1}
    opt.step(case.train(model, tunables))
    opt.hyper_step(case.val(model, tunables))
    assert not torch.equal(tunables[0].raw, before) and bool(torch.isfinite(tunables[0].raw))


def test_concrete_dropout_is_dropout_at_low_temperature():
    """At a small temperature the relaxed mask is nearly binary: about a fraction p of the entries are
    dropped, the rest scaled by 1/(1 − p), so the mean is kept; the noise comes from torch's generator."""
    drop = t1t2.ConcreteDropout(0.3, temperature=1e-3).double()
    x = torch.ones(200, 500, dtype=torch.float64)
    torch.manual_seed(0)
    y = drop(x)
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # replayable from the generator state
    dropped = (y < 0.01).double().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.01)
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)
    kept = y[y > 0.01]
    assert float((kept - 1 / 0.7).abs().median()) < 1e-3
    with t1t2.evaluating():
        assert drop(x) is x
    chan = t1t2.ConcreteDropout(0.5, temperature=1e-3, per_channel=True).double()
    yc = chan(torch.ones(4, 8, 3, 3, dtype=torch.float64))
    assert torch.equal(yc, yc[:, :, :1, :1].expand_as(yc))  # one mask value per (sample, channel)


class ClassWeights(LabelSmoothing):
    """A vector Tunable: per-class weights of the training cross-entropy (one λ per class)."""

    names = {"l2.0.weight", "l2.2.weight", "tunable.class_weights"}
    tuned = "tunable.class_weights"

    def __init__(self):
        super().__init__()
        self.tunables = [t1t2.Tunable([0.5, 1.0, 2.0], transform="softplus", name="class_weights")]

    def train(self, model, tunables):
        def closure():  # F.cross_entropy(weight=) is not differentiable in the weights: written out
            w = tunables[0]()[self.y]
            return (w * F.cross_entropy(model(self.x), self.y, reduction="none")).sum() / w.sum()
        return closure

    def val(self, model, tunables):
        return lambda: F.cross_entropy(model(self.xv), self.yv)


@pytest.mark.parametrize("mode", ["exact", "fd", "fd-central"])
def test_a_vector_tunable_matches_the_oracle_per_entry(mode):
    """("fd" reads ∇cL(θ) from the hooks of the T1 backward, the other modes from autograd.grad.)"""
    case = ClassWeights()
    state = warmed_up(case, noise_hypergrad=mode, fd_eps=1e-6, **OPTIMIZER_CONFIGS["adam"])
    ours = hypergrad_of_next_step(case, state)
    fd = oracle(case, state)
    tol = 1e-5 if mode == "fd" else 1e-6
    assert set(ours) == case.names and ours[case.tuned].shape == (3,)
    assert relative_error(ours, fd) < tol, (ours, fd)
    for j in range(3):  # every entry, not only the vector's norm
        assert float((ours[case.tuned][j] - fd[case.tuned][j]).abs()) < tol * float(fd[case.tuned].norm()), j
    assert state[2].log_dict()["t1t2/tunable.class_weights/mean"] > 0


def test_evaluating_nests_and_decorates():
    @t1t2.evaluating
    def inner():
        return t1t2.is_evaluating(), t1t2.noise_enabled()

    assert not t1t2.is_evaluating() and t1t2.noise_enabled()
    with t1t2.evaluating():
        with t1t2.evaluating():
            assert inner() == (True, False)
        assert t1t2.is_evaluating() and not t1t2.noise_enabled()
    assert inner() == (True, False)
    assert not t1t2.is_evaluating() and t1t2.noise_enabled()
    with pytest.raises(ZeroDivisionError), t1t2.evaluating():
        1 / 0
    assert not t1t2.is_evaluating() and t1t2.noise_enabled()  # left on an exception too


@pytest.mark.parametrize("mode", ["fd", "fd-central"])
def test_compiled_model_with_fallback_random_matches_eager(mode):
    """torch.compile of a model with ConcreteDropout (a Tunable inside, uniforms from torch's
    generator): with ``torch._inductor.config.fallback_random = True`` the compiled draws are eager's,
    so the replay reproduces them and θ and λ follow eager mode (docs/tunables.md, torch.compile).
    Inductor's own generator (the default) draws other numbers: not supported."""
    case = Mixed()

    def run(compiled):
        torch._dynamo.reset()
        model, tunables = copy.deepcopy((case.model, case.tunables))
        forward = torch.compile(model) if compiled else model
        opt = t1t2.T1T2(model, case.penalties, tunables=tunables, noise_hypergrad=mode, fd_eps=1e-6, seed=1,
                        **OPTIMIZER_CONFIGS["momentum"])
        for k in range(3):
            torch.manual_seed(10 + k)
            opt.step(lambda: t1t2.smoothed_cross_entropy(forward(case.x), case.y, tunables[0]))
            opt.hyper_step(lambda: F.cross_entropy(forward(case.xv), case.yv))
        return [p.detach().clone() for p in model.parameters()], {k: v.clone() for k, v in opt.last_hypergrad.items()}

    with torch._inductor.config.patch(fallback_random=True):
        (p1, h1), (p2, h2) = run(False), run(True)
    assert h1.keys() == h2.keys() == case.names
    for k in h1:
        torch.testing.assert_close(h2[k], h1[k], rtol=1e-6, atol=1e-12, msg=k)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_compiled_model_matches_a_compiled_oracle():
    """Under torch.compile with inductor's own generator (the default): the compiled draws are not
    eager's, but the same generator state gives the same draws, so the "fd" hypergradient (∇cL(θ)
    from the hook of the step's compiled-forward leaf, the replay through the compiled model) matches
    the oracle run through compiled models."""
    cache, keep = {}, []

    class Compiled(ConcreteDropoutNet):
        def train(self, model, tunables):
            forward = cache.get(id(model))
            if forward is None:
                forward = cache[id(model)] = torch.compile(model)
                keep.append(model)  # ids stay unique while cached
            return lambda: F.cross_entropy(forward(self.x), self.y)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(cache_size_limit=64, accumulated_cache_size_limit=256):
        case = Compiled()
        state = warmed_up(case, noise_hypergrad="fd", fd_eps=1e-6, **OPTIMIZER_CONFIGS["momentum"])
        ours = hypergrad_of_next_step(case, state)
        fd = oracle(case, state)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # compiled (one graph serves every copy)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    tuned = case.tuned
    assert relative_error({tuned: ours[tuned]}, {tuned: fd[tuned]}) < 1e-5, (ours[tuned], fd[tuned])
    assert relative_error(ours, fd) < 1e-5, (ours, fd)
