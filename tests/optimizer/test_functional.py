"""The differentiable functional T1 step: its fused backward against autograd through plain torch
ops, against T1T2.hyper_step, and against finite differences in float64."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import t1t2_fast as t1t2
from t1t2_fast.functional import Hyper, t1_update, t1_update_reference
from conftest import backends
from oracle import OPTIMIZER_CONFIGS, Problem, warmed_up

BACKENDS = backends("reference", "cpp")



def val_loss(problem, model, new_params):
    names = [n for n, _ in model.named_parameters()]
    out = torch.func.functional_call(model, dict(zip(names, new_params)), (problem.xv,))
    return F.cross_entropy(out, problem.yv)


def setup(problem, opt_name):
    """Model, grads and state after warm-up, plus raw hyperparameters of every kind and granularity."""
    pens = [t1t2.L2(0.05, per="layer"), t1t2.L1(0.02, per="unit", transform="softplus"),
            t1t2.L2(0.03, per="network", decoupled=True, transform="linear", params=lambda n, p: n.endswith("bias"))]
    model, opt = warmed_up(problem, pens, **OPTIMIZER_CONFIGS[opt_name])
    model.zero_grad()
    problem.train_closure(model)().backward()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    raw = opt.raw_hyperparameters()
    hypers = [Hyper(raw["l2.0.weight"].clone().requires_grad_(), "l2", [0]),
              Hyper(raw["l2.2.weight"].clone().requires_grad_(), "l2", [2]),
              Hyper(raw["l1.0.weight"].clone().requires_grad_(), "l1", [0], transform="softplus"),
              Hyper(raw["l1.2.weight"].clone().requires_grad_(), "l1", [2], transform="softplus"),
              Hyper(raw["l2"].clone().requires_grad_(), "l2", [1, 3], transform="linear", decoupled=True)]
    return model, opt, params, grads, state, hypers


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZER_CONFIGS))
def test_fused_backward_matches_autograd_and_hyper_step(opt_name, backend):
    problem = Problem(seed=21)
    model, opt, params, grads, state, hypers = setup(problem, opt_name)
    cfg = {k: v for k, v in OPTIMIZER_CONFIGS[opt_name].items()}
    new = t1_update(params, grads, hypers, state=state, backend=backend, **cfg)
    val_loss(problem, model, new).backward()
    fused = [h.raw.grad.clone() for h in hypers]

    twins = [Hyper(h.raw.detach().clone().requires_grad_(), h.kind, h.targets, h.transform, h.decoupled)
             for h in hypers]
    new_ref = t1_update_reference(params, grads, twins, state=state, **cfg)
    for a, b in zip(new, new_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    val_loss(problem, model, new_ref).backward()
    for h, t in zip(fused, twins):
        torch.testing.assert_close(h, t.raw.grad, rtol=1e-9, atol=1e-14)

    # the optimizer's own hyper_step from the same state gives the same hypergradients
    opt.step(problem.train_closure(model))
    opt.hyper_step(problem.val_closure(model))
    names = ["l2.0.weight", "l2.2.weight", "l1.0.weight", "l1.2.weight", "l2"]
    for name, h in zip(names, fused):
        torch.testing.assert_close(opt.last_hypergrad[name], h, rtol=1e-9, atol=1e-14)


def test_matches_finite_differences():
    problem = Problem(seed=22)
    model, _, params, grads, state, hypers = setup(problem, "adam")
    cfg = OPTIMIZER_CONFIGS["adam"]
    val_loss(problem, model, t1_update(params, grads, hypers, state=state, **cfg)).backward()
    delta = 1e-4
    for k, h in enumerate(hypers):
        fd = torch.zeros_like(h.raw)
        for j in range(h.raw.numel()):
            vals = []
            for sign in (2, 1, -1, -2):
                shifted = [Hyper(x.raw.detach().clone(), x.kind, x.targets, x.transform, x.decoupled) for x in hypers]
                shifted[k].raw.view(-1)[j] += sign * delta
                with torch.no_grad():
                    vals.append(val_loss(problem, model, t1_update(params, grads, shifted, state=state, **cfg)).item())
            fd.view(-1)[j] = (-vals[0] + 8 * vals[1] - 8 * vals[2] + vals[3]) / (12 * delta)
        torch.testing.assert_close(h.raw.grad, fd, rtol=1e-6, atol=1e-10)


def test_state_is_not_modified_and_errors_are_clear():
    problem = Problem(seed=23)
    _, _, params, grads, state, hypers = setup(problem, "momentum")
    before = copy.deepcopy(state)
    t1_update(params, grads, hypers, state=state, **OPTIMIZER_CONFIGS["momentum"])
    assert all(torch.equal(a[k], b[k]) for a, b in zip(state, before) for k in a)
    with pytest.raises(ValueError, match="do not divide"):
        t1_update(params, grads, [Hyper(torch.zeros(5), "l2", [0])])
    with pytest.raises(ValueError, match="unknown kind 'l3'"):
        t1_update(params, grads, [Hyper(torch.zeros(()), "l3", [0])])
    with pytest.raises(ValueError, match="targets params\\[9\\]"):
        t1_update(params, grads, [Hyper(torch.tensor(math.log(0.1)), "l2", [9])])
