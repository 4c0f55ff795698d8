"""Gaussian noise: the fused ops against their reference twins, the regenerating backward against
autograd through a stored ε, finite differences, double backward, replay, and the GaussianNoise
module (no_noise, eval mode, σ-gradient recording, keys)."""
import copy
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import t1t2_fast as t1t2
from t1t2_fast import ops, reference, rng
from t1t2_fast.noise import gaussian_noise

from conftest import DTYPES, backends, needs_cuda_kernels

BACKENDS = backends("reference", "cpp")
MODES = ["additive", "multiplicative"]

# (shape, per): the 1-D sizes of docs/design.md with one σ; per-unit (N, F) and (N, C, H, W) layouts,
# among them rows wider than a reduction tile (1024 columns) and channels that straddle tiles.
LAYOUTS = [((0,), "layer"), ((1,), "layer"), ((7,), "layer"), ((1023,), "layer"), ((1025,), "layer"),
           ((65537,), "layer"), ((0, 5), "unit"), ((7, 3), "unit"), ((33, 31), "unit"), ((40, 2000), "unit"),
           ((2, 3, 4, 5), "unit"), ((3, 4, 17, 19), "unit"), ((2, 3, 1000), "unit"), ((1, 5, 64, 64), "unit")]


def layout(shape, per):
    if per == "layer":
        return 1, 1
    inner = 1
    for s in shape[2:]:
        inner *= s
    return shape[1], inner


def make(shape, per, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    channels, inner = layout(shape, per)
    acc = reference.accumulate_dtype(dtype)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    grad_y = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    sigma = (torch.rand(channels, generator=g, dtype=torch.float64) + 0.1).to(acc)
    return x, grad_y, sigma, channels, inner



# ---------------------------------------------------------------------------------------------
# The differentiable op: regenerated ε against a stored ε
# ---------------------------------------------------------------------------------------------
def stored_eps_reference(x, sigma, key, channels, inner, mode):
    """y with ε materialized: what plain autograd differentiates (it saves ε)."""
    eps = rng.philox_randn(key, torch.arange(x.numel())).to(x.dtype).reshape(-1, channels, inner)
    s = sigma.reshape(1, channels, 1)
    xr = x.reshape(eps.shape)
    y = xr + s * eps if mode == "additive" else xr * (1 + s * eps)
    return y.reshape(x.shape)


def loss_of(y, w):
    return (torch.tanh(y) * w).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape, per", [((9, 4, 5, 3), "unit"), ((37, 6), "unit"), ((300,), "layer")], ids=str)
def test_backward_matches_autograd_through_stored_eps(shape, per, mode, backend):
    x, _, sigma, channels, inner = make(shape, per, torch.float64, seed=4)
    w = torch.randn(shape, dtype=torch.float64)
    key = rng.noise_key(1, 2, 3)
    x1, s1 = x.clone().requires_grad_(), sigma.clone().requires_grad_()
    ours = torch.autograd.grad(loss_of(gaussian_noise(x1, s1, key, channels, inner, mode, backend), w), (x1, s1))
    x2, s2 = x.clone().requires_grad_(), sigma.clone().requires_grad_()
    want = torch.autograd.grad(loss_of(stored_eps_reference(x2, s2, key, channels, inner, mode), w), (x2, s2))
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_sigma_gradient_matches_finite_differences(mode, backend):
    x, _, sigma, channels, inner = make((5, 3, 7), "unit", torch.float64, seed=5)
    w = torch.randn(x.shape, dtype=torch.float64)

    def loss(s):
        return loss_of(gaussian_noise(x, s, 77, channels, inner, mode, backend), w)

    s = sigma.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(s), s)
    delta = 1e-6
    for c in range(channels):
        e = torch.zeros_like(sigma)
        e[c] = delta
        fd = (loss(sigma + e) - loss(sigma - e)) / (2 * delta)
        assert abs(grad[c].item() - fd.item()) <= 1e-7 * max(1.0, abs(fd.item())), (c, grad[c].item(), fd.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_double_backward_matches_stored_eps(mode, backend):
    """∂L/∂σ and ∂L/∂x built with create_graph are differentiable again (w.r.t. x, σ and upstream
    parameters), and agree with plain autograd through a stored ε."""
    x, _, sigma, channels, inner = make((6, 4, 5), "unit", torch.float64, seed=6)
    w = torch.randn(x.shape, dtype=torch.float64)
    v = torch.randn(channels, dtype=torch.float64)
    key = 1234

    def second_order(fn):
        xl, sl = x.clone().requires_grad_(), sigma.clone().requires_grad_()
        gx, gs = torch.autograd.grad(loss_of(fn(xl * 1.5, sl), w), (xl, sl), create_graph=True)
        return torch.autograd.grad((gs * v).sum() + (gx * w).sum(), (xl, sl))

    ours = second_order(lambda xi, s: gaussian_noise(xi, s, key, channels, inner, mode, backend))
    want = second_order(lambda xi, s: stored_eps_reference(xi, s, key, channels, inner, mode))
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype, backend):
    x, grad_y, sigma, channels, inner = make((8, 3, 4, 4), "unit", dtype, seed=7)
    xl, sl = x.clone().requires_grad_(), sigma.clone().requires_grad_()
    y = gaussian_noise(xl, sl, 5, channels, inner, "multiplicative", backend)
    assert y.dtype == dtype
    y.backward(grad_y)
    assert xl.grad.dtype == dtype and sl.grad.dtype == torch.float32
    gold = reference.gaussian_noise_backward(grad_y.double(), x.double(), sigma.double(), 5, channels, inner,
                                             "multiplicative", True, True)
    torch.testing.assert_close(sl.grad.double(), gold[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xl.grad.double(), gold[0], rtol=2 * torch.finfo(dtype).eps, atol=0)


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------
def test_module_basics():
    m = t1t2.GaussianNoise(0.25, per="unit", num_features=3, mode="multiplicative")
    assert isinstance(m.raw, torch.Tensor) and m.raw.shape == (3,) and not m.raw.requires_grad
    assert list(m.parameters()) == [] and "raw" in m.state_dict()
    torch.testing.assert_close(m.value(), torch.full((3,), 0.25))
    layer = t1t2.GaussianNoise(0.1, transform="log")
    assert layer.raw.shape == () and abs(layer.value().item() - 0.1) < 1e-7
    assert "per='unit', num_features=3" in repr(m)
    net = nn.Sequential(nn.Linear(3, 3), m).half()
    assert m.raw.dtype == torch.float32 and net[0].weight.dtype == torch.float16  # λ is not rounded
    m.raw.fill_(-1.0)
    m.project()
    assert torch.equal(m.raw, torch.zeros(3))  # bounds (0, inf) for the linear transform


@pytest.mark.parametrize("kwargs, match", [
    (dict(std=0.1, per="unit"), "needs num_features"),
    (dict(std=0.1, per="channel"), "unknown per='channel'"),
    (dict(std=0.1, mode="dropout"), "unknown mode='dropout'"),
    (dict(std=-0.1), "outside bounds"),
    (dict(std=0.0, transform="log"), "positive finite initial value"),
    (dict(std=[0.1, 0.2], per="unit", num_features=3), "3 values"),
    (dict(std=0.1, num_features=3), "only used with per='unit'"),
])
def test_module_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        t1t2.GaussianNoise(**kwargs)


def test_unit_noise_checks_the_feature_dim():
    m = t1t2.GaussianNoise(0.1, per="unit", num_features=4)
    with pytest.raises(ValueError, match=r"needs an input of shape \(N, 4, \.\.\.\), got \(2, 5\)"):
        m(torch.randn(2, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_in_eval_mode_inside_no_noise_and_at_zero_std(backend):
    m = t1t2.GaussianNoise(0.5, backend=backend)
    x = torch.randn(4, 5)
    assert not torch.equal(m(x), x)
    assert m.eval()(x) is x
    m.train()
    with t1t2.no_noise():
        assert m(x) is x
        with t1t2.no_noise():
            assert m(x) is x
        assert m(x) is x
    assert t1t2.noise_enabled()

    @t1t2.no_noise
    def bare(inp):
        return m(inp)

    @t1t2.no_noise()
    def called(inp):
        return m(inp)

    assert bare(x) is x and called(x) is x and t1t2.noise_enabled()
    seen = []
    with t1t2.no_noise():  # thread-local: another thread still draws noise
        worker = threading.Thread(target=lambda: seen.append(m(x) is x))
        worker.start()
        worker.join()
    assert seen == [False]
    zero = t1t2.GaussianNoise(0.0, backend=backend)
    assert zero(x) is x


@pytest.mark.parametrize("backend", BACKENDS)
def test_replay_with_seed_and_step(backend):
    m = t1t2.GaussianNoise(0.3, per="unit", num_features=6, backend=backend)
    x = torch.randn(5, 6, 4)
    m.seed, m.step = 123, 7
    first, second = m(x), m(x)
    assert not torch.equal(first, second)  # the call index moved on
    m.reset_calls()
    assert torch.equal(m(x), first) and torch.equal(m(x), second)  # same ε replayed
    m.reset_calls()
    m.step = 8
    assert not torch.equal(m(x), first)
    m.reset_calls()
    m.step, m.seed = 7, 124
    assert not torch.equal(m(x), first)
    # the key is noise_key(seed, step, call): the draw can be rebuilt from the op alone
    m.seed = 123
    m.reset_calls()
    sigma = m.value()
    want = reference.gaussian_noise(x, sigma, rng.noise_key(123, 7, 0), 6, 4, "additive")
    assert torch.equal(m(x), want)


def test_seedless_noise_follows_torch_manual_seed():
    m = t1t2.GaussianNoise(0.3)
    x = torch.randn(100)
    torch.manual_seed(5)
    a, b = m(x), m(x)
    torch.manual_seed(5)
    assert torch.equal(m(x), a) and torch.equal(m(x), b) and not torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_recorded_sigma_grad_sums_the_forwards_since_reset(mode, backend):
    torch.manual_seed(0)
    m = t1t2.GaussianNoise([0.2, 0.3, 0.4], per="unit", num_features=3, mode=mode, backend=backend).double()
    lin = nn.Linear(3, 3).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    m.seed, m.step = 9, 1
    m.record_grad(True)
    m.reset_calls()
    loss = lin(m(x)).pow(2).sum() + m(lin(x)).sum()  # two forwards
    loss.backward()
    assert m.sigma_grad.shape == (3,) and m.sigma_grad.dtype == torch.float64 and len(m.sigma_leaves) == 2
    # the same σ-gradient by plain autograd through stored ε with the replayed keys
    s = m.value().clone().requires_grad_()
    y0 = stored_eps_reference(x, s, rng.noise_key(9, 1, 0), 3, 1, mode)
    y1 = stored_eps_reference(lin(x), s, rng.noise_key(9, 1, 1), 3, 1, mode)
    (want,) = torch.autograd.grad(lin(y0).pow(2).sum() + y1.sum(), s)
    torch.testing.assert_close(m.sigma_grad, want, rtol=1e-12, atol=1e-12)
    m.reset_calls()
    assert torch.equal(m.sigma_grad, torch.zeros(3, dtype=torch.float64)) and m.sigma_leaves == []
    m.record_grad(False)
    assert m.sigma_grad is None
    m(x.clone().requires_grad_()).sum().backward()
    assert m.sigma_grad is None


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_recorded_sigma_grad_is_differentiable_wrt_parameters(mode, backend):
    """loss.backward(create_graph=True) leaves ∂L/∂σ differentiable: autograd.grad of (∂L/∂σ · u)
    w.r.t. the model's parameters works and matches the stored-ε autograd reference (the mixed
    second derivative the exact noise hypergradient needs)."""
    torch.manual_seed(1)
    noise = t1t2.GaussianNoise(0.2, per="unit", num_features=5, mode=mode, backend=backend).double()
    model = nn.Sequential(nn.Linear(4, 5), noise, nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    u = torch.randn(5, dtype=torch.float64)
    noise.seed, noise.step = 3, 4
    noise.record_grad(True)
    noise.reset_calls()
    model(x).pow(2).sum().backward(create_graph=True)
    assert noise.sigma_grad.requires_grad
    params = list(model.parameters())
    ours = torch.autograd.grad((noise.sigma_grad * u).sum(), params)

    s = noise.value().clone().requires_grad_()
    h = model[0](x)
    y = model[3](torch.tanh(stored_eps_reference(h, s, rng.noise_key(3, 4, 0), 5, 1, mode)))
    (gs,) = torch.autograd.grad(y.pow(2).sum(), s, create_graph=True)
    want = torch.autograd.grad((gs * u).sum(), params, allow_unused=True)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-10, atol=1e-12)
    copy.deepcopy(model)  # the graph left in sigma_grad does not block deepcopy
    for p in params:
        p.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_on_low_precision_and_empty_inputs(backend):
    m = t1t2.GaussianNoise(0.1, per="unit", num_features=3, backend=backend).record_grad(True)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(4, 3, 5, 5).to(dtype).requires_grad_()
        y = m(x)
        assert y.dtype == dtype and y.shape == x.shape
        y.float().sum().backward()
        assert x.grad.dtype == dtype
    assert m.sigma_grad.dtype == torch.float32 and torch.isfinite(m.sigma_grad).all()
    empty = torch.empty(0, 3, 2)
    assert m(empty).shape == (0, 3, 2)


def test_backend_choice():
    m = t1t2.GaussianNoise(0.1, backend="reference")
    assert m(torch.randn(3)).shape == (3,)
    with pytest.raises(ValueError, match="unknown backend='cuda'"):
        t1t2.GaussianNoise(0.1, backend="cuda")


def test_reference_fallback_without_the_extension():
    """With the extension disabled the module still works on the reference path, and the op
    wrappers say how to build it."""
    code = (
        "import torch, warnings, t1t2_fast as t, t1t2_fast.ops\n"
        "warnings.simplefilter('ignore')\n"
        "m = t.GaussianNoise(0.2, per='unit', num_features=3, mode='multiplicative').record_grad(True)\n"
        "x = torch.randn(4, 3, requires_grad=True)\n"
        "m(x).sum().backward()\n"
        "assert x.grad is not None and m.sigma_grad.shape == (3,)\n"
        "try:\n"
        "    t.ops.gaussian_noise(x, torch.ones(3), 0, 3, 1, 'additive')\n"
        "except RuntimeError as e:\n"
        "    assert 'needs the compiled extension' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "try:\n"
        "    t.GaussianNoise(0.2, backend='cpp')(x)\n"
        "except RuntimeError as e:\n"
        "    assert \"backend='cpp'\" in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n")
    env = dict(os.environ, T1T2_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; the sources are compile-checked in test_cuda_compile.py)
# ---------------------------------------------------------------------------------------------


@needs_cuda_kernels
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_op_gives_the_cpu_bits(dtype, mode):
    """Same ε, same roundings, same reduction order (t1t2/noise.h): the CUDA op's y, ∂L/∂x and ∂L/∂σ
    are the CPU op's bit for bit, and the twin on CUDA tensors draws the same ε."""
    for shape, per in LAYOUTS:
        x, grad_y, sigma, channels, inner = make(shape, per, dtype, seed=8)
        key = rng.noise_key(8, len(shape))
        cpu = [ops.gaussian_noise(x, sigma, key, channels, inner, mode),
               *ops.gaussian_noise_backward(grad_y, x, sigma, key, channels, inner, mode, True, True)]
        xd, gd, sd = x.cuda(), grad_y.cuda(), sigma.cuda()
        gpu = [ops.gaussian_noise(xd, sd, key, channels, inner, mode),
               *ops.gaussian_noise_backward(gd, xd, sd, key, channels, inner, mode, True, True)]
        for a, b in zip(cpu, gpu):
            assert torch.equal(a, b.cpu()), (shape, per)
        assert torch.equal(reference.gaussian_noise(xd, sd, key, channels, inner, mode).cpu(), cpu[0])


@needs_cuda_kernels
def test_cuda_opcheck_and_module():
    x, grad_y, sigma, channels, inner = make((5, 3, 2), "unit", torch.float32)
    x, grad_y, sigma = x.cuda(), grad_y.cuda(), sigma.cuda()
    for mode in MODES:
        torch.library.opcheck(torch.ops.t1t2.gaussian_noise.default, (x, sigma, 3, channels, inner, mode))
        torch.library.opcheck(torch.ops.t1t2.gaussian_noise_backward.default,
                              (grad_y, x, sigma, 3, channels, inner, mode, True, True))
    m = t1t2.GaussianNoise(0.2, per="unit", num_features=3).cuda().record_grad(True)
    xs = x.clone().requires_grad_()
    m(xs).sum().backward()
    assert m.sigma_grad.device.type == "cuda" and xs.grad is not None
