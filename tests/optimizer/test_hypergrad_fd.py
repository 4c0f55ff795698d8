"""Hypergradients against central finite differences of J(λ) = C2(θ⁺(λ)) in float64.

θ⁺ comes from running the real T1 step at λ ± δ, so this checks the whole chain: penalty gradient,
the optimizer's Jacobian (including Adam's diagonal one), transforms and the fused reductions.
"""
import pytest
import torch

import t1t2_fast as t1t2
from conftest import backends
from oracle import (OPTIMIZER_CONFIGS, Problem, analytic_hypergrad, fd_hypergrad, relative_error,
                    warmed_up)

BACKENDS = backends("reference", "cpp")
TOL = 1e-6

PENALTIES = {
    "l2": lambda per, tr: [t1t2.L2(0.05, per=per, transform=tr)],
    "l2-decoupled": lambda per, tr: [t1t2.L2(0.05, per=per, transform=tr, decoupled=True)],
    "l1": lambda per, tr: [t1t2.L1(0.02, per=per, transform=tr)],
}



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hypergrad", ["exact", "sgd"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZER_CONFIGS))
@pytest.mark.parametrize("transform", ["log", "linear", "softplus"])
@pytest.mark.parametrize("per", ["network", "layer", "unit", "element"])
@pytest.mark.parametrize("penalty", list(PENALTIES))
def test_hypergrad_matches_finite_differences(penalty, per, transform, opt_name, hypergrad, backend):
    problem = Problem(seed=1)
    penalties = PENALTIES[penalty](per, transform)
    model, opt = warmed_up(problem, penalties, hypergrad=hypergrad, backend=backend,
                           **OPTIMIZER_CONFIGS[opt_name])
    h = analytic_hypergrad(problem, model, opt)
    fd = fd_hypergrad(problem, model, opt, penalties, sgd_step=(hypergrad == "sgd"))
    assert relative_error(h, fd) <= TOL, {k: (h[k], fd[k]) for k in h}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZER_CONFIGS))
def test_several_penalties_on_one_model(opt_name, backend):
    """L2 per layer, L1 per unit and a decoupled network-wide L2 share one T1 step."""
    problem = Problem(seed=2, sizes=(3, 5, 4, 2))
    penalties = [t1t2.L2(0.05, per="layer"), t1t2.L1(0.01, per="unit", transform="softplus"),
                 t1t2.L2(0.02, per="network", decoupled=True, params=lambda n, p: n.endswith("bias"))]
    model, opt = warmed_up(problem, penalties, backend=backend, **OPTIMIZER_CONFIGS[opt_name])
    h = analytic_hypergrad(problem, model, opt)
    assert set(h) == {"l2.0.weight", "l2.2.weight", "l2.4.weight", "l1.0.weight", "l1.2.weight",
                      "l1.4.weight", "l2"}
    fd = fd_hypergrad(problem, model, opt, penalties)
    assert relative_error(h, fd) <= TOL


FOLDED = {
    "l2": lambda per: [t1t2.L2(0.05, per="network"), t1t2.L2(0.02, per=per, transform="softplus")],
    "l1": lambda per: [t1t2.L1(0.02, per="network"), t1t2.L1(0.01, per=per, transform="softplus")],
    "l2-decoupled": lambda per: [t1t2.L2(0.05, per="network", decoupled=True),
                                 t1t2.L2(0.02, per=per, transform="softplus", decoupled=True)],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
@pytest.mark.parametrize("per", ["unit", "element"])
@pytest.mark.parametrize("kind", list(FOLDED))
def test_two_penalties_of_one_kind_on_one_tensor(kind, per, opt_name, backend):
    """A network-wide and a finer penalty of the same kind on the same weights are folded into one
    coefficient list for the T1 step (functional.coefficient_lists): both must reach θ⁺ and both
    hypergradients must match finite differences."""
    problem = Problem(seed=5)
    penalties = FOLDED[kind](per)
    model, opt = warmed_up(problem, penalties, backend=backend, **OPTIMIZER_CONFIGS[opt_name])
    h = analytic_hypergrad(problem, model, opt)
    prefix = kind[:2]
    assert set(h) == {prefix, f"{prefix}.0.weight", f"{prefix}.2.weight"}
    fd = fd_hypergrad(problem, model, opt, penalties)
    assert relative_error(h, fd) <= TOL, {k: (h[k], fd[k]) for k in h}
    for name in h:  # each penalty on its own, not only the total
        assert relative_error({name: h[name]}, {name: fd[name]}) <= TOL, name


def test_adam_exact_where_second_moment_is_zero():
    """Entries whose gradient has always been exactly 0 have ŝ = 0; the exact Jacobian takes the
    limit 0 for its second term there instead of autograd's NaN."""
    problem = Problem(seed=3)
    problem.x[:, 0] = 0.0
    problem.xv[:, 0] = 0.0
    with torch.no_grad():
        problem.model[0].weight[:, 0] = 0.0  # zero input column and zero weight: ĝ = 0 exactly
    penalties = [t1t2.L2(0.05, per="element")]
    model, opt = warmed_up(problem, penalties, **OPTIMIZER_CONFIGS["adam"])
    assert (opt.state[model[0].weight]["exp_avg_sq"][:, 0] == 0).all()
    h = analytic_hypergrad(problem, model, opt)
    assert all(torch.isfinite(v).all() for v in h.values())
    fd = fd_hypergrad(problem, model, opt, penalties)
    assert relative_error(h, fd) <= TOL


def test_sgd_mode_equals_exact_for_plain_sgd():
    problem = Problem(seed=4)
    pens = [t1t2.L2(0.05)]
    out = []
    for mode in ("exact", "sgd"):
        model, opt = warmed_up(problem, pens, hypergrad=mode, **OPTIMIZER_CONFIGS["sgd"])
        out.append(analytic_hypergrad(problem, model, opt))
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])
