"""The float64 finite-difference oracle (docs/design.md) once through backend="triton": every
penalty kind and granularity in one model, with sgd and adam (the noise hypergradient through
Triton is in tests/noise/test_noise_hypergrad.py). On a machine without a GPU the Triton kernels run
on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""
import pytest
import torch

import t1t2_fast as t1t2
from oracle import OPTIMIZER_CONFIGS, Problem, analytic_hypergrad, fd_hypergrad, relative_error, warmed_up
from conftest import needs_triton

pytestmark = needs_triton


@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
def test_penalty_hypergrads_match_finite_differences_through_triton(opt_name):
    problem = Problem(seed=2, sizes=(3, 5, 2))
    penalties = [t1t2.L2(0.05, per="layer"), t1t2.L1(0.01, per="unit", transform="softplus"),
                 t1t2.L2(0.02, per="network", decoupled=True, params=lambda n, p: n.endswith("bias"))]
    model, opt = warmed_up(problem, penalties, backend="triton", **OPTIMIZER_CONFIGS[opt_name])
    assert opt.backend.name == "triton"
    h = analytic_hypergrad(problem, model, opt)
    fd = fd_hypergrad(problem, model, opt, penalties)
    assert relative_error(h, fd) <= 1e-6, {k: (h[k], fd[k]) for k in h}
