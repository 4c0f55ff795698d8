"""The float64 finite-difference oracle (docs/design.md) once through backend="triton": every
penalty kind and granularity and the noise hypergradient in one model, with sgd and adam. On a
machine without a GPU the Triton kernels run on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py)."""
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


def test_noise_hypergrad_matches_finite_differences_through_triton():
    from test_noise_hypergrad import NoiseProblem, hypergrad_of_next_step
    from test_noise_hypergrad import warmed_up as noise_warmed_up

    problem = NoiseProblem()
    model, opt = noise_warmed_up(problem, steps=1, backend="triton", noise_hypergrad="exact",
                                 **OPTIMIZER_CONFIGS["momentum"])
    assert all(m.backend == "triton" for m in model.modules() if isinstance(m, t1t2.GaussianNoise))
    ours, _, _ = hypergrad_of_next_step(problem, model, opt)
    fd = fd_hypergrad(problem, model, opt, problem.penalties)
    assert relative_error(ours, fd) <= 1e-6, (ours, fd)
    assert torch.isfinite(torch.cat([v.reshape(-1) for v in ours.values()])).all()
