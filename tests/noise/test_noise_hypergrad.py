"""Noise hyperparameters in T1T2 against the float64 finite-difference oracle (docs/design.md).

J(λ) = C2(θ⁺(λ)) is differentiated by a fourth-order central stencil, each point running the real
T1 step with the same noise sample ε (same seed, step and call index), so it is the exact
one-step hypergradient that ``noise_hypergrad="exact"`` must match to 1e-6. "fd" and
"fd-central" approximate the mixed derivative by differences of ∇σL along u; their error must
shrink with fd_eps down to the float64 rounding floor.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2
from conftest import backends, needs_ext, needs_triton
from oracle import OPTIMIZER_CONFIGS, fd_hypergrad, relative_error

BACKENDS = backends("reference", "cpp")


class NoiseProblem:
    """A tiny tanh MLP with input noise (per layer) and hidden noise (per unit), fixed data."""

    def __init__(self, seed=0, dtype=torch.float64, n=12, mode="additive", penalty=True):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = nn.Sequential(
            t1t2.GaussianNoise(0.3, mode=mode), nn.Linear(3, 5), nn.Tanh(),
            t1t2.GaussianNoise(0.2, per="unit", num_features=5, mode=mode), nn.Linear(5, 2)).to(dtype)
        self.penalties = [t1t2.L2(1e-2)] if penalty else []
        self.x = torch.randn(n, 3, generator=g, dtype=dtype)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.xv = torch.randn(n, 3, generator=g, dtype=dtype)
        self.yv = torch.randint(0, 2, (n,), generator=g)

    def train_closure(self, model):
        return lambda: F.cross_entropy(model(self.x), self.y)

    def val_closure(self, model):
        return lambda: F.cross_entropy(model(self.xv), self.yv)

    def val_loss(self, model):
        with torch.no_grad(), t1t2.no_noise():
            return self.val_closure(model)().item()


def warmed_up(problem, steps=3, **kwargs):
    model = copy.deepcopy(problem.model)
    opt = t1t2.T1T2(model, problem.penalties, hyper_every=1, **kwargs)
    for _ in range(steps):
        opt.step(problem.train_closure(model))
        opt.hyper_step(problem.val_closure(model))
    return model, opt


def hypergrad_of_next_step(problem, model, opt):
    model, opt = copy.deepcopy((model, opt))
    opt.step(problem.train_closure(model))
    opt.hyper_step(problem.val_closure(model))
    return {k: v.clone() for k, v in opt.last_hypergrad.items()}, model, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", ["sgd", "momentum", "nesterov", "adam"])
@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_exact_matches_the_oracle(backend, opt_name, mode):
    problem = NoiseProblem(mode=mode)
    kwargs = dict(OPTIMIZER_CONFIGS[opt_name], hyper_lr=1e-3, noise_hypergrad="exact", backend=backend)
    model, opt = warmed_up(problem, **kwargs)
    ours, _, _ = hypergrad_of_next_step(problem, model, opt)
    fd = fd_hypergrad(problem, model, opt, problem.penalties)
    assert set(ours) == {"l2.1.weight", "l2.4.weight", "noise.0", "noise.3"}
    assert ours["noise.3"].shape == (5,)
    assert relative_error(ours, fd) < 1e-6, (ours, fd)
    for name in ("noise.0", "noise.3"):  # each noise hyperparameter on its own, not only the total
        assert relative_error({name: ours[name]}, {name: fd[name]}) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise_mode", ["fd", "fd-central"])
def test_finite_difference_modes_converge_to_exact(backend, noise_mode):
    """The error of fd (O(r)) and fd-central (O(r²)) against exact falls as fd_eps falls, until
    float64 rounding (≈1e-16/fd_eps relative) takes over; at the best fd_eps it is tiny."""
    problem = NoiseProblem()
    kwargs = dict(OPTIMIZER_CONFIGS["momentum"], backend=backend)
    model, opt = warmed_up(problem, noise_hypergrad="exact", **kwargs)
    exact, _, _ = hypergrad_of_next_step(problem, model, opt)
    noise = lambda d: {k: v for k, v in d.items() if k.startswith("noise.")}  # noqa: E731
    errors = []
    steps = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    for eps in steps:
        opt.noise_hypergrad_mode, opt.fd_eps = noise_mode, eps
        opt._prepare_noise()
        ours, _, _ = hypergrad_of_next_step(problem, model, opt)
        errors.append(relative_error(noise(ours), noise(exact)))
        penalties = {k: v for k, v in ours.items() if not k.startswith("noise.")}
        assert relative_error(penalties, {k: exact[k] for k in penalties}) < 1e-12  # untouched by the mode
    if noise_mode == "fd":  # first order: 10x per decade of fd_eps, measured 6e-2 ... 6e-7
        for a, b in zip(errors[:5], errors[1:]):
            assert 5 < a / b < 20, errors
        assert errors[-1] < 1e-6, errors
    else:  # second order: ~100x per decade until float64 rounding (≈1e-16 / fd_eps) takes over
        assert errors[0] / errors[1] > 50 and errors[1] / errors[2] > 50, errors
        assert min(errors) < 1e-8, errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", ["momentum", "nesterov", "adam"])
def test_sgd_hypergrad_mode_matches_its_oracle(backend, opt_name):
    """hypergrad="sgd" (the paper's approximation) against its own finite-difference oracle, derived
    without the code under test: J̃(λ) = C2(θ⁺_real + θ⁺_sgd(λ) − θ⁺_sgd(λ₀)), θ⁺_sgd from a plain
    SGD step at the same lr with the same noise sample (oracle.fd_hypergrad(sgd_step=True)). Its
    derivative is ∂σ[(−η v)ᵀ∇θL(θ; σ, ε)] with v at the real θ⁺, which "exact" noise mode must give
    for every optimizer; the penalties likewise."""
    problem = NoiseProblem()
    kwargs = dict(OPTIMIZER_CONFIGS[opt_name], hyper_lr=1e-3, hypergrad="sgd", noise_hypergrad="exact",
                  backend=backend)
    model, opt = warmed_up(problem, **kwargs)
    ours, _, _ = hypergrad_of_next_step(problem, model, opt)
    fd = fd_hypergrad(problem, model, opt, problem.penalties, sgd_step=True)
    assert set(ours) == {"l2.1.weight", "l2.4.weight", "noise.0", "noise.3"}
    assert relative_error(ours, fd) < 1e-6, (ours, fd)
    for name in ("noise.0", "noise.3"):
        assert relative_error({name: ours[name]}, {name: fd[name]}) < 1e-6, name
    if opt_name != "momentum":  # and it is not the exact hypergradient (the oracle tells them apart)
        exact = fd_hypergrad(problem, model, opt, problem.penalties)
        assert relative_error({"noise.3": ours["noise.3"]}, {"noise.3": exact["noise.3"]}) > 1e-3


@needs_ext
@pytest.mark.parametrize("noise_mode", ["fd", "exact"])
def test_reference_and_cpp_agree_on_a_mixed_run(noise_mode):
    """Penalty and noise hyperparameters tuned together for 5 iterations: both backends follow the
    same trajectory (float64, where they differ only by operation order in the fused kernels)."""
    results = []
    for backend in ("reference", "cpp"):
        problem = NoiseProblem()
        model, opt = warmed_up(problem, steps=0, backend=backend, noise_hypergrad=noise_mode,
                               **OPTIMIZER_CONFIGS["adam"])
        for _ in range(5):
            opt.step(problem.train_closure(model))
            opt.hyper_step(problem.val_closure(model))
        results.append((model, opt))
    (m1, o1), (m2, o2) = results
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for name, raw in o1.raw_hyperparameters().items():
        torch.testing.assert_close(raw, o2.raw_hyperparameters()[name], rtol=1e-9, atol=1e-12)


def test_hyper_step_restores_theta_plus_bit_exactly():
    problem = NoiseProblem(dtype=torch.float32)
    for mode in ("fd", "fd-central", "exact"):
        model, opt = warmed_up(problem, steps=1, noise_hypergrad=mode, **OPTIMIZER_CONFIGS["momentum"])
        opt.step(problem.train_closure(model))
        theta_plus = [p.detach().clone() for p in model.parameters()]
        opt.hyper_step(problem.val_closure(model))
        assert all(torch.equal(a, b) for a, b in zip(theta_plus, model.parameters())), mode


def test_replay_leaves_the_training_rng_and_buffers_alone():
    """The extra passes of a noise hypergradient must not change what training does next: the
    global generator (dropout) ends as the validation pass alone leaves it, and the BatchNorm
    statistics as the T1 step left them (hyper_step restores them: t1t2_fast/batchnorm.py)."""
    torch.manual_seed(0)
    model = nn.Sequential(t1t2.GaussianNoise(0.3), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Dropout(0.3), nn.Linear(6, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    xv = torch.randn(16, 4, dtype=torch.float64)
    opt = t1t2.T1T2(model, [t1t2.L2(1e-3)], noise_hypergrad="fd-central")
    opt.step(lambda: F.cross_entropy(model(x), y))
    rng = torch.random.get_rng_state()
    alone, t1_state = copy.deepcopy(model), copy.deepcopy(model)
    opt.hyper_step(lambda: F.cross_entropy(model(xv), y))
    after = torch.random.get_rng_state()
    torch.random.set_rng_state(rng)
    with t1t2.no_noise():
        alone(xv)  # the validation forward by itself: its dropout draws
    assert torch.equal(torch.random.get_rng_state(), after)
    kept = dict(t1_state.named_buffers())
    for name, b in model.named_buffers():
        if name != "0.raw":
            assert torch.equal(b, kept[name]), name


def test_step_without_closure_needs_train_in_hyper_step():
    problem = NoiseProblem()
    model = copy.deepcopy(problem.model)
    opt = t1t2.T1T2(model, [], noise_hypergrad="fd")
    loss = problem.train_closure(model)()
    loss.backward()
    opt.step()
    with pytest.raises(RuntimeError, match="hyper_step\\(val_closure, train=train_closure\\)"):
        opt.hyper_step(problem.val_closure(model))


def test_step_without_closure_matches_step_with_closure():
    """The user's own forward/backward before step() draws the same noise as step(closure) does,
    and hyper_step(val, train=closure) gives the same hypergradient."""
    problem = NoiseProblem()
    outs = []
    for with_closure in (True, False):
        model = copy.deepcopy(problem.model)
        opt = t1t2.T1T2(model, problem.penalties, noise_hypergrad="fd", **OPTIMIZER_CONFIGS["sgd"])
        for _ in range(3):
            if with_closure:
                opt.step(problem.train_closure(model))
                opt.hyper_step(problem.val_closure(model))
            else:
                opt.zero_grad()
                problem.train_closure(model)().backward()
                opt.step()
                opt.hyper_step(problem.val_closure(model), train=problem.train_closure(model))
        outs.append(({k: v.clone() for k, v in opt.last_hypergrad.items()}, [p.clone() for p in model.parameters()]))
    (h1, p1), (h2, p2) = outs
    assert h1.keys() == h2.keys()
    for k in h1:
        torch.testing.assert_close(h1[k], h2[k], rtol=1e-10, atol=1e-14)
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)


def test_noise_hyperparameters_are_named_and_bounded():
    problem = NoiseProblem(penalty=False)
    model = copy.deepcopy(problem.model)
    opt = t1t2.T1T2(model, [], hyper_optimizer="sgd", hyper_lr=1e6)  # a huge step must be projected to σ >= 0
    assert set(opt.hyperparameters()) == {"noise.0", "noise.3"}
    assert "noise" in repr(opt)
    for _ in range(3):
        opt.step(problem.train_closure(model))
        opt.hyper_step(problem.val_closure(model))
    for name, raw in opt.raw_hyperparameters().items():
        assert bool((raw >= 0).all()), (name, raw)
    # the raw tensors are the modules' own: writes reach the model
    opt.raw_hyperparameters()["noise.0"].fill_(0.7)
    assert float(model[0].value()) == pytest.approx(0.7)


def test_state_dict_resume_gives_the_same_trajectory():
    problem = NoiseProblem()
    def run(split):
        model = copy.deepcopy(problem.model)
        opt = t1t2.T1T2(model, problem.penalties, noise_hypergrad="fd", **OPTIMIZER_CONFIGS["adam"])
        for k in range(6):
            if k == split:
                sd_model, sd_opt = copy.deepcopy(model.state_dict()), opt.state_dict()
                model = copy.deepcopy(problem.model)
                opt = t1t2.T1T2(model, problem.penalties, noise_hypergrad="fd", **OPTIMIZER_CONFIGS["adam"])
                model.load_state_dict(sd_model)
                opt.load_state_dict(sd_opt)
            opt.step(problem.train_closure(model))
            opt.hyper_step(problem.val_closure(model))
        return [p.clone() for p in model.parameters()], {k: v.clone() for k, v in opt.raw_hyperparameters().items()}
    (p1, r1), (p2, r2) = run(split=None), run(split=3)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert all(torch.equal(r1[k], r2[k]) for k in r1)


def test_bad_noise_mode_is_refused():
    problem = NoiseProblem()
    with pytest.raises(ValueError, match="noise_hypergrad"):
        t1t2.T1T2(problem.model, [], noise_hypergrad="central")
    with pytest.raises(ValueError, match="fd_eps"):
        t1t2.T1T2(problem.model, [], fd_eps=0.0)


@needs_triton
def test_noise_hypergrad_matches_finite_differences_through_triton():
    """The exact noise hypergradient through backend="triton" (momentum) against the oracle."""
    problem = NoiseProblem()
    model, opt = warmed_up(problem, steps=1, backend="triton", noise_hypergrad="exact",
                           **OPTIMIZER_CONFIGS["momentum"])
    assert all(m.backend == "triton" for m in model.modules() if isinstance(m, t1t2.GaussianNoise))
    ours, _, _ = hypergrad_of_next_step(problem, model, opt)
    fd = fd_hypergrad(problem, model, opt, problem.penalties)
    assert relative_error(ours, fd) <= 1e-6, (ours, fd)
    assert torch.isfinite(torch.cat([v.reshape(-1) for v in ours.values()])).all()
