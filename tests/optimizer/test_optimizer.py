"""Behaviour of the T1T2 optimizer beyond the hypergradient math: resume, copies, errors."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2
from oracle import OPTIMIZER_CONFIGS, Problem


def run(problem, model, opt, steps):
    """Training loop as a user writes it; returns the trajectory of θ and λ (copies)."""
    traj = []
    for _ in range(steps):
        opt.step(problem.train_closure(model))
        if opt.hyper_due:
            opt.hyper_step(problem.val_closure(model))
        traj.append(([p.detach().clone() for p in model.parameters()],
                     {k: v.detach().clone() for k, v in opt.raw_hyperparameters().items()}))
    return traj


def make(problem, opt_name="adam", **kw):
    model = copy.deepcopy(problem.model)
    pens = [t1t2.L2(0.05, per="layer"), t1t2.L1(0.01, per="unit", transform="softplus"),
            t1t2.L2(0.01, per="network", decoupled=True, params="bias")]
    opt = t1t2.T1T2(model, pens, hyper_every=3, hyper_lr=0.05, **{**OPTIMIZER_CONFIGS[opt_name], **kw})
    return model, opt


def assert_same_trajectory(a, b):
    assert len(a) == len(b)
    for (pa, ra), (pb, rb) in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(pa, pb))
        assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)


@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
@pytest.mark.parametrize("stop_at_stash", [False, True])
def test_state_dict_resume_is_bit_identical(opt_name, stop_at_stash):
    problem = Problem(seed=5, dtype=torch.float32)
    model, opt = make(problem, opt_name)
    run(problem, model, opt, 5)
    if stop_at_stash:  # stop between a T1 step and its hyper_step
        opt.step(problem.train_closure(model))
        assert opt.hyper_due
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    reference = run(problem, model, opt, 7)

    other = Problem(seed=6, dtype=torch.float32)  # a different initialisation, overwritten by the load
    model2, opt2 = make(other, opt_name)
    buf.seek(0)
    ckpt = torch.load(buf)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.hyper_due == stop_at_stash
    assert_same_trajectory(reference, run(problem, model2, opt2, 7))


def test_deepcopy_of_model_and_optimizer_continues_identically():
    problem = Problem(seed=7)
    model, opt = make(problem)
    run(problem, model, opt, 4)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.params[0] is next(model2.parameters())
    assert_same_trajectory(run(problem, model, opt, 5), run(problem, model2, opt2, 5))


def test_load_state_dict_rejects_other_hyperparameters():
    problem = Problem(seed=7)
    _, opt = make(problem)
    other = t1t2.T1T2(copy.deepcopy(problem.model), [t1t2.L2(0.1)])
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not a T1T2 state_dict"):
        other.load_state_dict(torch.optim.SGD(problem.model.parameters(), lr=0.1).state_dict())


def test_names_values_and_raw_writes():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = t1t2.T1T2(model, [t1t2.L2(1e-3, per="layer"), t1t2.L1(1e-5, per="unit"),
                            t1t2.L2(2e-3, per="element", params=["0.bias"])])
    hp = opt.hyperparameters()
    assert list(hp) == ["l2.0.weight", "l2.2.weight", "l1.0.weight", "l1.2.weight", "l2.0.bias"]
    assert hp["l2.0.weight"] == pytest.approx(1e-3) and isinstance(hp["l2.0.weight"], float)
    assert hp["l1.0.weight"].shape == (3,) and hp["l2.0.bias"].shape == (3,)
    with torch.no_grad():
        opt.raw_hyperparameters()["l2.2.weight"].fill_(math.log(0.5))
    assert opt.hyperparameters()["l2.2.weight"] == pytest.approx(0.5)
    net = t1t2.T1T2(model, [t1t2.L2(1e-3, per="network")])
    assert list(net.hyperparameters()) == ["l2"]


def test_linear_transform_is_projected_into_bounds():
    problem = Problem(seed=8)
    model = copy.deepcopy(problem.model)
    opt = t1t2.T1T2(model, [t1t2.L2(1e-4, transform="linear")], lr=0.3, hyper_optimizer="sgd", hyper_lr=1e6)
    raw0 = {k: float(v) for k, v in opt.raw_hyperparameters().items()}
    opt.step(problem.train_closure(model))
    opt.hyper_step(problem.val_closure(model))
    values = opt.hyperparameters()
    h = {k: float(v) for k, v in opt.last_hypergrad.items()}
    assert all(v >= 0.0 for v in values.values())
    assert any(v == 0.0 for v in values.values()), "a huge hyper step should hit the lower bound"
    # the step descends (λ − η_h·h), then the projection clips at 0: a hyperparameter whose
    # hypergradient is positive lands on the bound, one whose hypergradient is negative grows
    assert any(g > 0 for g in h.values()) and any(g < 0 for g in h.values()), h
    for name, value in values.items():
        assert value == max(raw0[name] - 1e6 * h[name], 0.0), (name, value, raw0[name], h[name])
    with pytest.raises(ValueError, match="outside bounds"):
        t1t2.L2(0.5, transform="linear", bounds=(0.0, 0.1))


def test_step_without_closure_uses_existing_grad():
    problem = Problem(seed=9)
    m1, m2 = copy.deepcopy(problem.model), copy.deepcopy(problem.model)
    o1 = t1t2.T1T2(m1, [t1t2.L2(0.05)], **OPTIMIZER_CONFIGS["adam"])
    o2 = t1t2.T1T2(m2, [t1t2.L2(0.05)], **OPTIMIZER_CONFIGS["adam"])
    o1.step(problem.train_closure(m1))
    o2.zero_grad()
    problem.train_closure(m2)().backward()
    assert o2.step() is None
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    o1.hyper_step(problem.val_closure(m1))
    o2.hyper_step(problem.val_closure(m2))
    assert all(torch.equal(o1.last_hypergrad[k], o2.last_hypergrad[k]) for k in o1.last_hypergrad)


def test_matches_torch_optimizers_without_penalty_effect():
    """With c = 0 (linear transform) the T1 step is PyTorch's SGD / Adam."""
    problem = Problem(seed=10)
    for name, cfg in OPTIMIZER_CONFIGS.items():
        m1, m2 = copy.deepcopy(problem.model), copy.deepcopy(problem.model)
        ours = t1t2.T1T2(m1, [t1t2.L2(0.0, transform="linear")], **cfg)
        kw = {k: v for k, v in cfg.items() if k != "optimizer"}
        theirs = (torch.optim.SGD if cfg["optimizer"] == "sgd" else torch.optim.Adam)(m2.parameters(), **kw)
        for _ in range(4):
            ours.step(problem.train_closure(m1))
            theirs.zero_grad()
            problem.train_closure(m2)().backward()
            theirs.step()
        for a, b in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)


def test_lr_scheduler_drives_the_learning_rate():
    """T1T2 is a torch.optim.Optimizer: schedulers change param_groups[0]["lr"], which the next
    T1 step (and the Jacobian it stashes) uses."""
    problem = Problem(seed=11)
    m1, m2 = copy.deepcopy(problem.model), copy.deepcopy(problem.model)
    scheduled = t1t2.T1T2(m1, [t1t2.L2(0.05)], lr=0.2, hyper_lr=0.0)
    sched = torch.optim.lr_scheduler.StepLR(scheduled, step_size=1, gamma=0.5)
    fixed = t1t2.T1T2(m2, [t1t2.L2(0.05)], lr=0.1, hyper_lr=0.0)
    scheduled.step(problem.train_closure(m1))
    scheduled.hyper_step(problem.val_closure(m1))
    sched.step()
    assert scheduled.param_groups[0]["lr"] == pytest.approx(0.1)
    m2.load_state_dict(m1.state_dict())
    for model, opt in ((m1, scheduled), (m2, fixed)):
        opt.step(problem.train_closure(model))
        opt.hyper_step(problem.val_closure(model))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert all(torch.equal(scheduled.last_hypergrad[k], fixed.last_hypergrad[k]) for k in fixed.last_hypergrad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_parameters_track_float64(dtype):
    """Low-precision parameters compute in float32; the hypergradient stays close to float64's."""
    problem = Problem(seed=12)
    results = {}
    for dt in (torch.float64, dtype):
        model = copy.deepcopy(problem.model).to(dt)
        opt = t1t2.T1T2(model, [t1t2.L2(0.05)], **OPTIMIZER_CONFIGS["momentum"])
        x, y, xv, yv = problem.x.to(dt), problem.y, problem.xv.to(dt), problem.yv
        for _ in range(3):
            opt.step(lambda: F.cross_entropy(model(x).float(), y))
            opt.hyper_step(lambda: F.cross_entropy(model(xv).float(), yv))
        assert all(v.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
                   for v in opt.raw_hyperparameters().values())
        results[dt] = torch.stack([v.double() for v in opt.last_hypergrad.values()])
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(results[dtype], results[torch.float64], rtol=tol, atol=tol * 1e-2)


# -- clear errors ------------------------------------------------------------------------------
def test_hyper_step_before_any_step():
    problem = Problem()
    model, opt = make(problem)
    with pytest.raises(RuntimeError, match="before any step"):
        opt.hyper_step(problem.val_closure(model))


def test_hyper_step_without_stash():
    problem = Problem()
    model, opt = make(problem)  # hyper_every=3
    opt.step(problem.train_closure(model))
    assert not opt.hyper_due
    with pytest.raises(RuntimeError, match="hyper_due"):
        opt.hyper_step(problem.val_closure(model))
    opt.step(problem.train_closure(model))
    opt.step(problem.train_closure(model))
    opt.hyper_step(problem.val_closure(model))
    with pytest.raises(RuntimeError, match="used once"):
        opt.hyper_step(problem.val_closure(model))


def test_penalty_matching_no_parameter():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="matches no trainable parameter.*0.weight"):
        t1t2.T1T2(model, [t1t2.L2(1e-3, params="conv")])


def test_overlapping_penalties():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="two penalties define the hyperparameter 'l2.0.weight'"):
        t1t2.T1T2(model, [t1t2.L2(1e-3), t1t2.L2(1e-2, per="unit")])


@pytest.mark.parametrize("kwargs, match", [
    (dict(optimizer="rmsprop"), "unknown optimizer='rmsprop'"),
    (dict(hyper_optimizer="lbfgs"), "unknown hyper_optimizer"),
    (dict(hypergrad="neumann"), "unknown hypergrad"),
    (dict(backend="tpu"), "unknown backend"),
    (dict(hyper_every=0), "hyper_every must be a positive integer"),
    (dict(optimizer="adam", nesterov=True, momentum=0.9), "nesterov=True needs"),
    (dict(lr=-1.0), "lr must be"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        t1t2.T1T2(nn.Linear(3, 2), [t1t2.L2(1e-3)], **kwargs)


@pytest.mark.parametrize("make_penalty, match", [
    (lambda: t1t2.L2(1e-3, per="channel"), "unknown per='channel'"),
    (lambda: t1t2.L2(1e-3, transform="sqrt"), "unknown transform 'sqrt'"),
    (lambda: t1t2.L1(0.0), "positive finite initial value"),
    (lambda: t1t2.L2(-1.0, transform="softplus"), "positive finite initial value"),
])
def test_bad_penalties(make_penalty, match):
    with pytest.raises(ValueError, match=match):
        make_penalty()


def test_closure_must_return_a_scalar():
    problem = Problem()
    model, opt = make(problem)
    with pytest.raises(ValueError, match="scalar loss, got a tensor of shape \\(12,\\)"):
        opt.step(lambda: F.cross_entropy(model(problem.x), problem.y, reduction="none"))
    with pytest.raises(TypeError, match="must return a scalar loss tensor, got float"):
        opt.step(lambda: 1.0)
    for _ in range(3):
        opt.step(problem.train_closure(model))
    with pytest.raises(ValueError, match="validation closure must return a scalar"):
        opt.hyper_step(lambda: model(problem.xv).sum(1))


def test_mixed_dtypes_and_devices():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).double())
    with pytest.raises(ValueError, match="one device with one dtype.*float32.*float64"):
        t1t2.T1T2(model, [t1t2.L2(1e-3)])
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).to("meta"))
    with pytest.raises(ValueError, match="one device with one dtype.*cpu.*meta"):
        t1t2.T1T2(model, [t1t2.L2(1e-3)])


def test_triton_backend_outside_cuda_and_the_interpreter_is_refused_clearly(monkeypatch):
    from t1t2_fast import triton_kernels
    monkeypatch.setattr(triton_kernels, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        t1t2.T1T2(nn.Linear(3, 2), [t1t2.L2(1e-3)], backend="triton")
