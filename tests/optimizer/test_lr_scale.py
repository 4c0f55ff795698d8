"""Learning-rate scales (T1T2(tune_lr=...)): hypergradients against float64 finite differences of
J(λ) = C2(θ⁺(λ)) (the harness of test_hypergrad_fd.py, same tolerance), for every optimizer and
granularity, alone and with penalties at s ≠ 1; schedulers, resume, bounds and names."""
import copy
import math

import pytest
import torch

import t1t2_fast as t1t2
from conftest import backends
from oracle import OPTIMIZER_CONFIGS, Problem, analytic_hypergrad, fd_hypergrad, relative_error, warmed_up

BACKENDS = backends("reference", "cpp")
ALL_BACKENDS = backends("reference", "cpp", "triton")  # triton: interpreted on CPU, small problems only
TOL = 1e-6  # test_hypergrad_fd.py's

CONFIGS = {**OPTIMIZER_CONFIGS, "adamw": dict(optimizer="adamw", lr=0.05, betas=(0.8, 0.9), weight_decay=0.1)}
# "group": the first layer in a group of its own (another lr), the rest in the default group
GROUPS = [{"params": r"^0\.", "lr": 0.2}]


def _kwargs(opt_name, granularity):
    kw = dict(CONFIGS[opt_name], tune_lr=granularity)
    if granularity == "group":
        lr = kw["lr"]
        kw["param_groups"] = [{**GROUPS[0], "lr": lr * 0.5}]
    return kw


def _set_scales(opt, values=(0.7, 1.3, 0.9, 1.1)):
    """s ≠ 1 (and different per hyperparameter), so that every place s enters is exercised."""
    with torch.no_grad():
        for k, (name, raw) in enumerate(sorted(opt.raw_hyperparameters().items())):
            if name.startswith("lr_scale"):
                raw.fill_(math.log(values[k % len(values)]))


def _warmed_up(problem, penalties, scales=True, **kw):
    model, opt = warmed_up(problem, penalties, steps=0, **kw)
    if scales:
        _set_scales(opt)
    for _ in range(3):
        opt.step(problem.train_closure(model))
    return model, opt


NAMES = {"network": {"lr_scale"},
         "layer": {"lr_scale.0.weight", "lr_scale.0.bias", "lr_scale.2.weight", "lr_scale.2.bias"},
         "group": {"lr_scale.group0", "lr_scale.group1"}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["network", "layer", "group"])
@pytest.mark.parametrize("opt_name", list(CONFIGS))
def test_lr_scale_hypergrad_matches_finite_differences(opt_name, granularity, backend):
    problem = Problem(seed=11)
    model, opt = _warmed_up(problem, [], backend=backend, **_kwargs(opt_name, granularity))
    h = analytic_hypergrad(problem, model, opt)
    names = NAMES[granularity] | ({"l2.0.weight", "l2.2.weight"} if opt_name == "adamw" else set())
    assert set(h) == names
    fd = fd_hypergrad(problem, model, opt, [])
    assert relative_error(h, fd) <= TOL, {k: (h[k], fd[k]) for k in h}
    for name in NAMES[granularity]:  # each scale on its own, not only the total
        assert relative_error({name: h[name]}, {name: fd[name]}) <= TOL, name


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opt_name", list(CONFIGS))
def test_penalties_and_lr_scales_at_s_not_one(opt_name, backend):
    """Coupled L2 per layer, L1 per unit and a decoupled network-wide L2 with lr scales per layer at
    s ≠ 1: the penalty hypergradients see J = −sη (or adam's J, which holds s) and −2sηθ."""
    problem = Problem(seed=12, sizes=(3, 5, 2))
    penalties = [t1t2.L2(0.05, per="layer"), t1t2.L1(0.01, per="unit", transform="softplus"),
                 t1t2.L2(0.02, per="network", decoupled=True, params=lambda n, p: n.endswith("bias"))]
    if opt_name == "adamw":
        penalties = penalties[1:]  # adamw's own decoupled L2 is on the weights
    model, opt = _warmed_up(problem, penalties, backend=backend, **_kwargs(opt_name, "layer"))
    assert any(float(r) != 0 for n, r in opt.raw_hyperparameters().items() if n.startswith("lr_scale"))
    h = analytic_hypergrad(problem, model, opt)
    fd = fd_hypergrad(problem, model, opt, penalties)
    assert relative_error(h, fd) <= TOL, {k: (h[k], fd[k]) for k in h}
    for name in h:
        assert relative_error({name: h[name]}, {name: fd[name]}) <= TOL, name


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_penalties_and_lr_scales_with_parameter_groups(backend):
    """Two groups of different lr with a scale each, and penalties across both groups."""
    problem = Problem(seed=13, sizes=(3, 5, 2))
    penalties = [t1t2.L2(0.05, per="layer"), t1t2.L2(0.02, per="network", decoupled=True,
                                                          params=lambda n, p: n.endswith("bias"))]
    model, opt = _warmed_up(problem, penalties, backend=backend, **_kwargs("momentum", "group"))
    h = analytic_hypergrad(problem, model, opt)
    fd = fd_hypergrad(problem, model, opt, penalties)
    assert relative_error(h, fd) <= TOL, {k: (h[k], fd[k]) for k in h}


class NoiseProblem(Problem):
    """Problem with additive noise after the first layer; validation without noise."""

    def __init__(self, seed):
        super().__init__(seed=seed, sizes=(3, 5, 2))
        m = self.model
        self.model = torch.nn.Sequential(m[0], t1t2.GaussianNoise(0.2, per="unit", num_features=5), m[1],
                                         m[2]).double()

    def val_loss(self, model):
        with t1t2.no_noise():
            return super().val_loss(model)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
def test_noise_and_lr_scales_at_s_not_one(opt_name, backend):
    """The noise hypergradient's u = J⊙v with J = −sη (sgd) or adam's J (which holds s), at s ≠ 1."""
    problem = NoiseProblem(seed=14)
    kw = dict(noise_hypergrad="exact", backend=backend, **_kwargs(opt_name, "layer"))
    model, opt = _warmed_up(problem, [], **kw)
    h = analytic_hypergrad(problem, model, opt)
    fd = fd_hypergrad(problem, model, opt, [])
    assert "noise.1" in h
    assert relative_error(h, fd) <= TOL, {k: (h[k], fd[k]) for k in h}
    assert relative_error({"noise.1": h["noise.1"]}, {"noise.1": fd["noise.1"]}) <= TOL


def _loop(opt, model, problem, steps, scheduler=None):
    for _ in range(steps):
        opt.step(problem.train_closure(model))
        if opt.hyper_due:
            opt.hyper_step(problem.val_closure(model))
        if scheduler is not None:
            scheduler.step()


def test_scheduler_lr_times_scale():
    """A scheduler sets the group's lr; the step moves θ by (that lr)·s·d: the same θ⁺ as a plain
    SGD step with lr·s."""
    problem = Problem(seed=15)
    model = copy.deepcopy(problem.model)
    opt = t1t2.T1T2(model, [], lr=0.3, tune_lr="network", hyper_lr=0.05, backend="reference")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _loop(opt, model, problem, 3, sched)
    lr = opt.param_groups[0]["lr"]
    assert lr == pytest.approx(0.3 * 0.5 ** 3)
    s = opt.hyperparameters()["lr_scale"]
    assert s != 1.0  # the hyper steps moved it
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(problem.train_closure(model))
    model.zero_grad()
    problem.train_closure(model)().backward()  # the gradient at θ⁺ is not what we want: recompute at θ
    probe = copy.deepcopy(problem.model)
    with torch.no_grad():
        for p, b in zip(probe.parameters(), before):
            p.copy_(b)
    torch.nn.functional.cross_entropy(probe(problem.x), problem.y).backward()
    for p, b, q in zip(model.parameters(), before, probe.parameters()):
        torch.testing.assert_close(p.detach(), b - (lr * s) * q.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_is_bit_identical(backend):
    problem = Problem(seed=16)
    kw = dict(backend=backend, **_kwargs("adam", "layer"), hyper_lr=0.01)
    model, opt = _warmed_up(problem, [t1t2.L2(1e-3)], **kw)
    _loop(opt, model, problem, 2)
    opt.step(problem.train_closure(model))  # a pending stash is saved too
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert "scale" in saved_opt["stash"]
    opt.hyper_step(problem.val_closure(model))
    _loop(opt, model, problem, 3)
    model2 = copy.deepcopy(problem.model)
    model2.load_state_dict(saved_model)
    opt2 = t1t2.T1T2(model2, [t1t2.L2(1e-3)], hyper_every=1, **kw)
    opt2.load_state_dict(saved_opt)
    opt2.hyper_step(problem.val_closure(model2))
    _loop(opt2, model2, problem, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for n, raw in opt.raw_hyperparameters().items():
        assert torch.equal(raw, opt2.raw_hyperparameters()[n]), n


def test_names_bounds_and_log_dict():
    problem = Problem(seed=17)
    model = copy.deepcopy(problem.model)
    opt = t1t2.T1T2(model, [], tune_lr="layer", backend="reference")
    assert opt.bounds()["lr_scale.0.weight"] == (1e-3, 1e3)
    assert opt.hyperparameters()["lr_scale.2.bias"] == 1.0
    opt.set_bounds("lr_scale.*", 0.5, 2.0)
    with torch.no_grad():
        opt.raw_hyperparameters()["lr_scale.0.weight"].fill_(5.0)  # s = e⁵, outside: the next hyper step clips
    _loop(opt, model, problem, 1)
    assert opt.hyperparameters()["lr_scale.0.weight"] == pytest.approx(2.0)
    assert opt.clipped["lr_scale.0.weight"] == 1
    logged = opt.log_dict()
    assert "t1t2/lr_scale.0.weight" in logged and "t1t2/hypergrad/lr_scale.0.bias" in logged
    with pytest.raises(ValueError, match="tune_lr"):
        t1t2.T1T2(model, [], tune_lr="unit")


def test_scale_one_is_the_plain_step():
    """tune_lr with s = 1 moves θ exactly as without it (lr·1 is exact in every backend)."""
    problem = Problem(seed=18)
    out = []
    for tune in (None, "layer"):
        model = copy.deepcopy(problem.model)
        opt = t1t2.T1T2(model, [t1t2.L2(1e-3)], optimizer="adam", lr=0.05, tune_lr=tune, backend="cpp"
                        if t1t2.backend._extension.AVAILABLE else "reference", hyper_every=1000)
        for _ in range(3):
            opt.step(problem.train_closure(model))
        out.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*out))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("granularity", ["network", "layer", "group"])
def test_each_scale_multiplies_the_lr_of_the_tensors_it_names(granularity, backend):
    """Plain SGD with s set per hyperparameter: θ⁺_i = θ_i − lr_group·s_i·g_i for every tensor, with s_i
    the scale whose name covers tensor i (the FD tests cannot see a scale acting on the wrong tensors,
    as the finite differences perturb the same λ)."""
    problem = Problem(seed=19)
    model = copy.deepcopy(problem.model)
    opt = t1t2.T1T2(model, [], backend=backend, **_kwargs("sgd", granularity))
    values = {}
    with torch.no_grad():
        for k, (name, raw) in enumerate(sorted(opt.raw_hyperparameters().items())):
            values[name] = 0.5 + 0.25 * k
            raw.fill_(math.log(values[name]))
    names = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in names.items()}
    opt.step(problem.train_closure(model))
    probe = copy.deepcopy(problem.model)
    torch.nn.functional.cross_entropy(probe(problem.x), problem.y).backward()
    grads = {n: p.grad for n, p in probe.named_parameters()}
    for k, group in enumerate(opt.param_groups):
        for p in group["params"]:
            n = next(n for n, q in names.items() if q is p)
            scale = {"network": "lr_scale", "layer": f"lr_scale.{n}", "group": f"lr_scale.group{k}"}[granularity]
            s = math.exp(float(opt.raw_hyperparameters()[scale]))
            torch.testing.assert_close(p.detach(), before[n] - group["lr"] * s * grads[n], rtol=1e-12, atol=1e-14,
                                       msg=f"{n} under {scale}")
    assert len(set(values.values())) == len(values)


class _Smoothed(torch.nn.Module):
    """The problem's MLP with a label-smoothing Tunable as a submodule (not called by forward: the
    training loss calls it), so that copies of the model carry their own."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.smoothing = t1t2.Tunable(0.1, transform="linear", bounds=(0.0, 1.0), eval_value=0.0)

    def forward(self, x):
        return self.net(x)


class SmoothingProblem(Problem):
    def __init__(self, seed):
        super().__init__(seed=seed, sizes=(3, 5, 2))
        self.model = _Smoothed(self.model).double()

    def train_closure(self, model):
        return lambda: t1t2.smoothed_cross_entropy(model(self.x), self.y, model.smoothing)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
def test_tunable_and_lr_scales_at_s_not_one(opt_name, backend):
    """A Tunable of the training loss (label smoothing) with per-tensor lr scales at s ≠ 1 and an L2:
    every hypergradient against finite differences (the Tunable's mixed term uses J = −sη)."""
    problem = SmoothingProblem(seed=20)
    kw = dict(noise_hypergrad="exact", backend=backend, **_kwargs(opt_name, "layer"))
    model, opt = _warmed_up(problem, [t1t2.L2(0.02)], **kw)
    h = analytic_hypergrad(problem, model, opt)
    assert {"tunable.smoothing", "lr_scale.net.0.weight", "l2.net.0.weight"} <= set(h)
    fd = fd_hypergrad(problem, model, opt, [t1t2.L2(0.02)])
    assert relative_error(h, fd) <= TOL, {k: (h[k], fd[k]) for k in h}
    for name in h:
        assert relative_error({name: h[name]}, {name: fd[name]}) <= TOL, name
