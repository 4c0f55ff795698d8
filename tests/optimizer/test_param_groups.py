"""Parameter groups (``T1T2(param_groups=[...])``, torch.optim semantics) and ``optimizer="adamw"``.

The hypergradient with groups of different lr/momentum/betas is checked against float64 central
finite differences of J(λ) = C2(θ⁺(λ)) (tests/support/oracle.py), with penalties whose tensors lie in
one group or span both; a scheduler that changes one group's lr; the state_dict round trip with a
bit-identical continuation; the errors; one group bit-identical to no param_groups; and AdamW
against torch.optim.AdamW and finite differences.
"""
import copy

import pytest
import torch

import t1t2_fast as t1t2
from conftest import backends
from oracle import Problem, analytic_hypergrad, fd_hypergrad, relative_error, warmed_up

BACKENDS = backends("reference", "cpp")
TOL = 1e-6  # the FD oracle's tolerance (tests/optimizer/test_hypergrad_fd.py)

# Problem(sizes=(3, 4, 2)): parameters 0.weight, 0.bias, 2.weight, 2.bias. The first layer gets its
# own group; the second layer falls in the default group (the constructor's options).
FIRST = r"^0\."
GROUP_CONFIGS = {
    "sgd": dict(optimizer="sgd", lr=0.3, param_groups=[{"params": FIRST, "lr": 0.1}]),
    "momentum": dict(optimizer="sgd", lr=0.3, momentum=0.9,
                     param_groups=[{"params": FIRST, "lr": 0.1, "momentum": 0.5}]),
    "nesterov": dict(optimizer="sgd", lr=0.3, momentum=0.9, nesterov=True,
                     param_groups=[{"params": ["0.weight", "0.bias"], "lr": 0.1, "momentum": 0.5}]),
    "adam": dict(optimizer="adam", lr=0.05, betas=(0.8, 0.9),
                 param_groups=[{"params": lambda n, p: n.startswith("0."), "lr": 0.02, "betas": (0.7, 0.95),
                                "eps": 1e-6}]),
}

PENALTIES = {
    "l2": lambda per: [t1t2.L2(0.05, per=per)],
    "l1": lambda per: [t1t2.L1(0.02, per=per)],
    "l2-decoupled": lambda per: [t1t2.L2(0.05, per=per, decoupled=True)],
    # every tensor, biases too: a network-wide one spans both groups with their different η
    "l2-decoupled-all": lambda per: [t1t2.L2(0.05, per=per, decoupled=True, params=lambda n, p: True)],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", list(GROUP_CONFIGS))
@pytest.mark.parametrize("per", ["network", "layer", "unit"])
@pytest.mark.parametrize("penalty", list(PENALTIES))
def test_two_groups_hypergrad_matches_finite_differences(penalty, per, opt_name, backend):
    problem = Problem(seed=1)
    penalties = PENALTIES[penalty](per)
    model, opt = warmed_up(problem, penalties, backend=backend, **GROUP_CONFIGS[opt_name])
    assert len(opt.param_groups) == 2
    h = analytic_hypergrad(problem, model, opt)
    fd = fd_hypergrad(problem, model, opt, penalties)
    assert relative_error(h, fd) <= TOL, {k: (h[k], fd[k]) for k in h}


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_with_noise_hypergrad_match_finite_differences(backend):
    """The noise hypergradient uses u = J⊙v with each tensor's own J (its group's η, μ)."""
    from torch import nn
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), t1t2.GaussianNoise(0.3), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (12,), generator=g)
    xv, yv = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (12,), generator=g)
    loss = torch.nn.functional.cross_entropy
    train, val = (lambda m: lambda: loss(m(x), y)), (lambda m: lambda: loss(m(xv), yv))
    opt = t1t2.T1T2(model, [t1t2.L2(0.05)], backend=backend, optimizer="sgd", lr=0.3, momentum=0.9, nesterov=True,
                    noise_hypergrad="exact", param_groups=[{"params": FIRST, "lr": 0.05, "momentum": 0.5}])
    for _ in range(3):
        opt.step(train(model))
    probe_model, probe = copy.deepcopy((model, opt))
    probe.step(train(probe_model))
    probe.hyper_step(val(probe_model))
    h = probe.last_hypergrad

    def j_of(name, delta):
        m, o = copy.deepcopy((model, opt))
        with torch.no_grad():
            o.raw_hyperparameters()[name].add_(delta)
        o.step(train(m))
        with torch.no_grad(), t1t2.noise.hypergrad.no_noise():
            return val(m)().item()

    d = 1e-4
    fd = {n: torch.tensor((-j_of(n, 2 * d) + 8 * j_of(n, d) - 8 * j_of(n, -d) + j_of(n, -2 * d)) / (12 * d),
                          dtype=torch.float64) for n in h}
    assert relative_error({n: v.double().reshape(()) for n, v in h.items()}, fd) <= TOL, (h, fd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scheduler_acts_per_group(backend):
    """A LambdaLR halves the first group's lr every epoch and leaves the default group's: the T1
    steps follow torch.optim.SGD with the same groups and scheduler, and the hypergradient after it
    (the stash records each tensor's current lr) matches finite differences."""
    problem = Problem(seed=2)
    cfg = GROUP_CONFIGS["momentum"]
    model = copy.deepcopy(problem.model)
    twin = copy.deepcopy(problem.model)
    opt = t1t2.T1T2(model, [], backend=backend, **cfg)
    ref = torch.optim.SGD([{"params": list(twin[0].parameters()), "lr": 0.1, "momentum": 0.5},
                           {"params": list(twin[2].parameters())}], lr=0.3, momentum=0.9)
    lam = [lambda e: 0.5 ** e, lambda e: 1.0]
    sched, ref_sched = torch.optim.lr_scheduler.LambdaLR(opt, lam), torch.optim.lr_scheduler.LambdaLR(ref, lam)
    for _ in range(4):
        opt.step(problem.train_closure(model))
        ref.zero_grad()
        problem.train_closure(twin)().backward()
        ref.step()
        sched.step()
        ref_sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.1 * 0.5 ** 4, 0.3]
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
    # and the hypergradient at the scheduled lr
    penalties = [t1t2.L2(0.05, per="network", decoupled=True, params=lambda n, p: True), t1t2.L1(0.02)]
    opt2 = t1t2.T1T2(model, penalties, backend=backend, **cfg)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    for _ in range(2):
        opt2.step(problem.train_closure(model))
        sched2.step()
    assert [g["lr"] for g in opt2.param_groups] == [0.025, 0.075]
    # the oracle deep-copies the optimizer, whose step() the scheduler has wrapped around the original:
    # a fresh T1T2 with the scheduled state (lrs included) stands in for it
    opt3 = t1t2.T1T2(model, penalties, backend=backend, **cfg)
    opt3.load_state_dict(opt2.state_dict())
    assert [g["lr"] for g in opt3.param_groups] == [0.025, 0.075]
    h = analytic_hypergrad(problem, model, opt3)
    fd = fd_hypergrad(problem, model, opt3, penalties)
    assert relative_error(h, fd) <= TOL


def _run(model, opt, problem, steps, start=0):
    for _ in range(steps):
        opt.step(problem.train_closure(model))
        if opt.hyper_due:
            opt.hyper_step(problem.val_closure(model))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", ["nesterov", "adam"])
def test_state_dict_round_trip_continues_bit_identically(opt_name, backend):
    problem = Problem(seed=3)
    pens = lambda: [t1t2.L2(0.05), t1t2.L2(0.02, per="network", decoupled=True, params=lambda n, p: True)]
    kw = dict(backend=backend, hyper_every=2, hyper_lr=0.05, **GROUP_CONFIGS[opt_name])
    model = copy.deepcopy(problem.model)
    opt = t1t2.T1T2(model, pens(), **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(4):
        _run(model, opt, problem, 1)
        sched.step()
    opt.step(problem.train_closure(model))
    opt.step(problem.train_closure(model))  # step 6: a stash is pending
    assert opt.hyper_due
    sd, msd, schd = opt.state_dict(), copy.deepcopy(model.state_dict()), sched.state_dict()
    assert "param_groups" in sd and "param_group" not in sd
    assert [g["params"] for g in sd["param_groups"]] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    assert sd["stash"]["lrs"] == {"0.weight": opt.param_groups[0]["lr"], "0.bias": opt.param_groups[0]["lr"],
                                  "2.weight": opt.param_groups[1]["lr"], "2.bias": opt.param_groups[1]["lr"]}
    sd = copy.deepcopy(sd)

    model2 = copy.deepcopy(problem.model)
    opt2 = t1t2.T1T2(model2, pens(), **kw)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    model2.load_state_dict(msd)
    opt2.load_state_dict(sd)
    sched2.load_state_dict(schd)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        o.hyper_step(problem.val_closure(m))
        for _ in range(5):
            _run(m, o, problem, 1)
            s.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    for n, r in opt.raw_hyperparameters().items():
        assert torch.equal(r, opt2.raw_hyperparameters()[n])
    for p, q in zip(opt.params, opt2.params):
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], opt2.state[q][k])


def test_state_dict_layouts_must_match_the_groups():
    problem = Problem(seed=3)
    two = t1t2.T1T2(copy.deepcopy(problem.model), [t1t2.L2(0.05)], **GROUP_CONFIGS["sgd"])
    one = t1t2.T1T2(copy.deepcopy(problem.model), [t1t2.L2(0.05)], optimizer="sgd", lr=0.3)
    assert "param_group" in one.state_dict() and "param_groups" not in one.state_dict()
    with pytest.raises(ValueError, match=r"saved with 1 parameter group.*this T1T2 has 2"):
        two.load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match=r"saved with 2 parameter group.*this T1T2 has 1"):
        one.load_state_dict(two.state_dict())
    other = t1t2.T1T2(copy.deepcopy(problem.model), [t1t2.L2(0.05)], optimizer="sgd", lr=0.3,
                      param_groups=[{"params": r"^2\.", "lr": 0.1}])
    with pytest.raises(ValueError, match="same param_groups"):
        other.load_state_dict(two.state_dict())
    # a group selecting every parameter is the single-group layout, which loads either way
    single = t1t2.T1T2(copy.deepcopy(problem.model), [t1t2.L2(0.05)], optimizer="sgd", lr=0.3,
                       param_groups=[{"params": lambda n, p: True}])
    single.load_state_dict(one.state_dict())
    one.load_state_dict(single.state_dict())


@pytest.mark.parametrize("bad, message", [
    ([{"params": r"^0\."}, {"params": ["0.weight", "2.weight"]}],
     r"'0\.weight' is selected by param_groups\[0\] and param_groups\[1\]"),
    ([{"params": r"^0\.", "weight_decay": 0.1}], r"param_groups\[0\] has unknown keys \['weight_decay'\]"),
    ([{"params": r"^9\."}], r"param_groups\[0\] selects no trainable parameter"),
    ([{"params": ["0.weight", "nope"]}], r"param_groups\[0\] names unknown parameters \['nope'\]"),
    ([{"lr": 0.1}], r"param_groups\[0\] must be a dict with a 'params' entry"),
    ([{"params": r"^0\.", "lr": -1.0}], r"param_groups\[0\]: lr must be a finite number >= 0"),
    ([{"params": r"^0\.", "nesterov": True}], r"param_groups\[0\]: nesterov=True needs optimizer='sgd' and "
                                              r"momentum > 0"),
])
def test_group_errors(bad, message):
    problem = Problem(seed=0)
    with pytest.raises(ValueError, match=message):
        t1t2.T1T2(copy.deepcopy(problem.model), [t1t2.L2(0.05)], optimizer="sgd", lr=0.3, param_groups=bad)


def test_group_params_must_be_names():
    problem = Problem(seed=0)
    model = copy.deepcopy(problem.model)
    with pytest.raises(TypeError, match="must hold parameter names"):
        t1t2.T1T2(model, [], param_groups=[{"params": list(model[0].parameters())}])


def _trajectory(backend, opt_name, param_groups, steps=6):
    problem = Problem(seed=4, sizes=(3, 5, 2))
    model = copy.deepcopy(problem.model)
    base = {k: v for k, v in GROUP_CONFIGS[opt_name].items() if k != "param_groups"}
    pens = [t1t2.L2(0.05), t1t2.L1(0.01, per="unit", params="bias"),
            t1t2.L2(0.02, per="network", decoupled=True, params=lambda n, p: True)]
    opt = t1t2.T1T2(model, pens, backend=backend, hyper_lr=0.05, param_groups=param_groups, **base)
    _run(model, opt, problem, steps)
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", list(GROUP_CONFIGS))
def test_one_group_is_bit_identical_to_no_groups(opt_name, backend):
    theta0, opt0 = _trajectory(backend, opt_name, None)
    for groups in ([{"params": lambda n, p: True}], [{"params": ".*", "lr": opt0.param_groups[0]["lr"]}], []):
        theta, opt = _trajectory(backend, opt_name, groups)
        assert len(opt.param_groups) == 1
        assert all(torch.equal(a, b) for a, b in zip(theta0, theta))
        assert all(torch.equal(opt0.raw_hyperparameters()[n], r) for n, r in opt.raw_hyperparameters().items())
        sd0, sd = opt0.state_dict(), opt.state_dict()
        assert sd0.keys() == sd.keys() and sd0["param_group"] == sd["param_group"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [True, "grads"])
def test_nonfinite_gradient_in_one_group_skips_every_group(backend, mode):
    """"grads": a NaN gradient in one group's tensor (the scan); the lazy default: a step() after the
    user's backward with no loss to check (the scan, on the device, over every group first)."""
    problem = Problem(seed=0)
    model = copy.deepcopy(problem.model)
    opt = t1t2.T1T2(model, [t1t2.L2(0.05)], backend=backend, skip_nonfinite=mode, **GROUP_CONFIGS["momentum"])
    opt.step(problem.train_closure(model))
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}

    def bad():
        loss = problem.train_closure(model)()
        loss.backward()
        model[2].bias.grad[0] = float("nan")  # only the default group's tensor
        return None if mode is True else loss

    opt.step(bad)
    raw = {n: r.clone() for n, r in opt.raw_hyperparameters().items()}
    if mode is True:  # lazy: the stash was taken and holds nothing; its hyper step is skipped
        assert opt.hyper_due
        opt.hyper_step(problem.val_closure(model))
        assert all(torch.equal(raw[n], r) for n, r in opt.raw_hyperparameters().items())
    assert opt.skipped == {"t1": 1, "t2": 0} and not opt.hyper_due
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(state["momentum_buffer"], opt.state[model[0].weight]["momentum_buffer"])


# ---------------------------------------------------------------------------------------------
# optimizer="adamw"
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [False, True], ids=["one-group", "two-groups"])
def test_adamw_matches_torch_adamw(groups, backend):
    """hyper_lr=0: T1T2(optimizer="adamw", weight_decay=wd) is torch.optim.AdamW with weight_decay=wd on
    the dim >= 2 tensors and 0 on the others, to 1e-12 relative in float64."""
    problem = Problem(seed=5, sizes=(3, 5, 4, 2))
    model, twin = copy.deepcopy(problem.model), copy.deepcopy(problem.model)
    wd, betas = 0.1, (0.8, 0.95)
    pg = [{"params": r"^0\.", "lr": 0.02, "betas": (0.7, 0.9)}] if groups else None
    opt = t1t2.T1T2(model, optimizer="adamw", lr=0.05, betas=betas, weight_decay=wd, hyper_lr=0.0, backend=backend,
                    param_groups=pg)
    assert sorted(opt.hyperparameters()) == ["l2.0.weight", "l2.2.weight", "l2.4.weight"]
    assert all(abs(c - wd / 2) <= 1e-17 for c in opt.hyperparameters().values())
    first = lambda n: n.startswith("0.") if groups else False
    ref_groups = []
    for in_first in ((True, False) if groups else (False,)):
        for decays in (True, False):
            ps = [p for n, p in twin.named_parameters() if first(n) == in_first and (p.dim() >= 2) == decays]
            extra = {"lr": 0.02, "betas": (0.7, 0.9)} if in_first else {}
            ref_groups.append({"params": ps, "weight_decay": wd if decays else 0.0, **extra})
    ref = torch.optim.AdamW(ref_groups, lr=0.05, betas=betas)
    for _ in range(6):
        opt.step(problem.train_closure(model))
        opt.hyper_step(problem.val_closure(model))
        ref.zero_grad()
        problem.train_closure(twin)().backward()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
    assert all(abs(c - wd / 2) <= 1e-17 for c in opt.hyperparameters().values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [False, True], ids=["one-group", "two-groups"])
def test_adamw_hypergrad_matches_finite_differences(groups, backend):
    problem = Problem(seed=6)
    extra = [t1t2.L1(0.02, per="unit")]
    pg = [{"params": FIRST, "lr": 0.02, "betas": (0.7, 0.95)}] if groups else None
    model, opt = warmed_up(problem, extra, optimizer="adamw", lr=0.05, betas=(0.8, 0.9), weight_decay=0.2,
                           backend=backend, param_groups=pg)
    h = analytic_hypergrad(problem, model, opt)
    assert {"l2.0.weight", "l2.2.weight", "l1.0.weight", "l1.2.weight"} == set(h)
    fd = fd_hypergrad(problem, model, opt, extra)
    assert relative_error(h, fd) <= TOL, {k: (h[k], fd[k]) for k in h}


def test_adamw_weight_decay_params_and_errors():
    problem = Problem(seed=0)
    model = copy.deepcopy(problem.model)
    opt = t1t2.T1T2(model, optimizer="adamw", weight_decay_params=lambda n, p: True)
    assert sorted(opt.hyperparameters()) == ["l2.0.bias", "l2.0.weight", "l2.2.bias", "l2.2.weight"]
    assert opt.hyperparameters()["l2.0.bias"] == pytest.approx(5e-3)  # torch's default weight_decay 1e-2, halved
    with pytest.raises(ValueError, match=r"already applies its weight decay to \['0.weight', '2.weight'\]"):
        t1t2.T1T2(model, [t1t2.L2(0.1, decoupled=True)], optimizer="adamw")
    # a decoupled L2 on the tensors AdamW does not decay is fine
    t1t2.T1T2(model, [t1t2.L2(0.1, decoupled=True, params="bias")], optimizer="adamw")
    with pytest.raises(ValueError, match="weight_decay= and weight_decay_params= belong to optimizer='adamw'"):
        t1t2.T1T2(model, optimizer="adam", weight_decay=0.1)
    with pytest.raises(ValueError, match="needs weight_decay > 0"):
        t1t2.T1T2(model, optimizer="adamw", weight_decay=0.0)
