"""Gaussian noise: the fused ops against their reference twins."""

import pytest
import torch

from t1t2_fast import _extension, ops, reference, rng

MODES = ["additive", "multiplicative"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
needs_ext = pytest.mark.skipif(not _extension.AVAILABLE, reason=f"compiled extension not built ({_extension.LOAD_ERROR})")

# (shape, per): 1-D sizes of DESIGN.md §5 with one σ; per-unit (N, F) and (N, C, H, W) layouts,
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


def assert_low_precision_parity(ours, twin, gold):
    """STYLE.md: the fused error against a float64 run of the reference is at most twice the error of
    the reference run in the low precision, plus a few ulps of the result's scale."""
    err_ours = (ours.double() - gold).abs().max().item()
    err_twin = (twin.double() - gold).abs().max().item()
    ulps = 4 * torch.finfo(ours.dtype).eps * gold.abs().max().item()
    assert err_ours <= 2 * err_twin + ulps, (err_ours, err_twin, ulps)


# ---------------------------------------------------------------------------------------------
# The ops against their twins
# ---------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape, per", LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_op_matches_reference(dtype, shape, per, mode):
    x, grad_y, sigma, channels, inner = make(shape, per, dtype)
    key = rng.noise_key(11, len(shape))
    # forward and ∂L/∂x: the same roundings in the same order → the same bits in every dtype
    y = ops.gaussian_noise(x, sigma, key, channels, inner, mode)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, reference.gaussian_noise(x, sigma, key, channels, inner, mode))
    gx, gs = ops.gaussian_noise_backward(grad_y, x, sigma, key, channels, inner, mode, True, True)
    rx, rs = reference.gaussian_noise_backward(grad_y, x, sigma, key, channels, inner, mode, True, True)
    assert gx.dtype == dtype and torch.equal(gx, rx)
    # ∂L/∂σ: both sum in double, in different orders
    assert gs.dtype == sigma.dtype and gs.shape == sigma.shape
    if dtype == torch.float64:
        terms = grad_y.abs().sum() * 6  # |ε| < 6: a bound on Σ|g ε x| / |x| scale
        torch.testing.assert_close(gs, rs, rtol=1e-12, atol=1e-14 * max(1.0, terms.item()))
    else:
        gold = reference.gaussian_noise_backward(grad_y.double(), x.double(), sigma.double(), key, channels, inner,
                                                 mode, False, True)[1]
        if gold.numel():
            assert_low_precision_parity(gs, rs, gold)


@needs_ext
def test_need_flags_and_empty_results():
    x, grad_y, sigma, channels, inner = make((6, 4, 3), "unit", torch.float32)
    for mode in MODES:
        for need_x in (False, True):
            for need_sigma in (False, True):
                gx, gs = ops.gaussian_noise_backward(grad_y, x, sigma, 5, channels, inner, mode, need_x,
                                                          need_sigma)
                assert gx.shape == (x.shape if need_x else (0,))
                assert gs.shape == (sigma.shape if need_sigma else (0,))
    # additive mode reads x only for its shape: grad_y in its place gives the same gradients
    a = ops.gaussian_noise_backward(grad_y, x, sigma, 5, channels, inner, "additive", True, True)
    b = ops.gaussian_noise_backward(grad_y, grad_y, sigma, 5, channels, inner, "additive", True, True)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    for shape, per in [((5, 3, 2), "unit"), ((7,), "layer")]:
        x, grad_y, sigma, channels, inner = make(shape, per, dtype)
        for mode in MODES:
            torch.library.opcheck(torch.ops.t1t2.gaussian_noise.default, (x, sigma, 3, channels, inner, mode))
            for flags in ((True, True), (False, True), (True, False)):
                torch.library.opcheck(torch.ops.t1t2.gaussian_noise_backward.default,
                                      (grad_y, x, sigma, 3, channels, inner, mode, *flags))


@needs_ext
@pytest.mark.parametrize("call, match", [
    (lambda x, s: (x.t(), s, 4, 1, "additive"), "must be contiguous"),
    (lambda x, s: (x, s.double(), 4, 1, "additive"), "sigma has dtype Double, expected Float"),
    (lambda x, s: (x, s[:2], 4, 1, "additive"), "sigma has 2 elements"),
    (lambda x, s: (x, torch.rand(5), 5, 1, "additive"), r"channels·inner = 5·1 = 5 does not divide the 24 elements"),
    (lambda x, s: (x, s, 4, 0, "additive"), "inner must be >= 1"),
    (lambda x, s: (x, s, 4, 1, "gaussian"), "unknown mode 'gaussian'"),
    (lambda x, s: (x.int(), s, 4, 1, "additive"), "x must be float64, float32, bfloat16 or float16, got Int"),
])
def test_clear_errors(call, match):
    x, s = torch.randn(6, 4), torch.rand(4)
    xs, ss, channels, inner, mode = call(x, s)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.t1t2.gaussian_noise(xs, ss, 0, channels, inner, mode)


@needs_ext
def test_backward_errors():
    x, s = torch.randn(6, 4), torch.rand(4)
    with pytest.raises(RuntimeError, match=r"grad_y has shape \[6, 3\] but x has shape \[6, 4\]"):
        torch.ops.t1t2.gaussian_noise_backward(torch.randn(6, 3), x, s, 0, 4, 1, "additive", True, True)
    with pytest.raises(RuntimeError, match="grad_y has dtype Double but x has dtype Float"):
        torch.ops.t1t2.gaussian_noise_backward(x.double(), x, s, 0, 4, 1, "additive", True, True)


@needs_ext
def test_deterministic_for_any_thread_count_and_both_cpu_copies(monkeypatch):
    x, grad_y, sigma, channels, inner = make((64, 8, 33, 31), "unit", torch.float32, seed=3)
    before = torch.get_num_threads()
    capabilities = ["default", "avx2"] if torch.ops.t1t2.cpu_capability() == "avx2" else ["default"]
    out = []
    try:
        for capability in capabilities:
            monkeypatch.setenv("T1T2_CPU_CAPABILITY", capability)
            for threads in (1, 2, 1):
                torch.set_num_threads(threads)
                for mode in MODES:
                    out.append((mode, ops.gaussian_noise(x, sigma, 9, channels, inner, mode),
                                *ops.gaussian_noise_backward(grad_y, x, sigma, 9, channels, inner, mode, True,
                                                                  True)))
    finally:
        torch.set_num_threads(before)
    for mode in MODES:
        runs = [r[1:] for r in out if r[0] == mode]
        assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
