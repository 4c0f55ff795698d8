"""The Gaussian-noise ops (gaussian_noise, gaussian_noise_backward) of every backend against their
reference twins: torch.ops.t1t2 on CPU, torch.ops.t1t2_triton on a GPU or in the interpreter (sizes
kept small there). y and ∂L/∂x bit for bit, ∂L/∂σ to float64 summation order, the need flags,
determinism, opcheck and input errors. The CUDA op against the CPU op's bits is in test_noise.py."""
import pytest
import torch

from t1t2_fast import ops, reference, rng

from conftest import DTYPES, HAS_EXT, dtype_id, op_backends, op_namespace

IMPLS = op_backends("cpp", "triton", cuda=False)
MODES = ["additive", "multiplicative"]
# (shape, per): the 1-D sizes of docs/design.md with one σ; per-unit (N, F) and (N, C, H, W) layouts,
# among them rows wider than a reduction tile (1024 columns) and channels that straddle tiles.
LAYOUTS = [((0,), "layer"), ((1,), "layer"), ((7,), "layer"), ((1023,), "layer"), ((1025,), "layer"),
           ((65537,), "layer"), ((0, 5), "unit"), ((7, 3), "unit"), ((33, 31), "unit"), ((40, 2000), "unit"),
           ((2, 3, 4, 5), "unit"), ((3, 4, 17, 19), "unit"), ((2, 3, 1000), "unit"), ((1, 5, 64, 64), "unit")]
# The interpreter runs every layout in float32, the small ones in the other dtypes.
SMALL_LAYOUTS = [lay for lay in LAYOUTS if torch.Size(lay[0]).numel() <= 5000]


def layout(shape, per):
    if per == "layer":
        return 1, 1
    return shape[1], torch.Size(shape[2:]).numel()


def make(shape, per, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    channels, inner = layout(shape, per)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    grad_y = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    sigma = (torch.rand(channels, generator=g, dtype=torch.float64) + 0.1).to(reference.accumulate_dtype(dtype))
    return x.to(device), grad_y.to(device), sigma.to(device), channels, inner


def sigma_terms(grad_y, x, mode):
    """Σ|terms| of ∂L/∂σ per channel's scale (|ε| < 6): the size float64 summation error is relative to."""
    g = grad_y.double().abs()
    return 6 * (g if mode == "additive" else g * x.double().abs()).sum().item()


def assert_low_precision_parity(ours, twin, gold):
    """The project's error-bound rule: the fused error against a float64 run of the reference is at
    most twice the error of the reference run in the low precision, plus a few ulps of the result's
    scale."""
    err_ours = (ours.double() - gold).abs().max().item()
    err_twin = (twin.double() - gold).abs().max().item()
    ulps = 4 * torch.finfo(ours.dtype).eps * gold.abs().max().item()
    assert err_ours <= 2 * err_twin + ulps, (err_ours, err_twin, ulps)


def _parity_params():
    out = []
    for p in IMPLS:
        for dtype in DTYPES:
            layouts = SMALL_LAYOUTS if p.values[0][0] == "triton" and dtype != torch.float32 else LAYOUTS
            out += [pytest.param(p.values[0], dtype, shape, per, id=f"{p.id}-{dtype_id(dtype)}-{shape}-{per}",
                                 marks=p.marks) for shape, per in layouts]
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl, dtype, shape, per", _parity_params())
def test_op_matches_reference(impl, dtype, shape, per, mode):
    """y and ∂L/∂x: the same ε and the same roundings in the same order → the twin's bits in every
    dtype. ∂L/∂σ sums in double in another order: the CPU op within float64 summation error, or the
    low-precision error-bound rule; the Triton op within 1e-6 of the twin (1e-12 in float64) and
    within one float32 ulp of the CPU op (float64: summation error)."""
    backend, device = impl
    T = op_namespace(backend)
    x, grad_y, sigma, channels, inner = make(shape, per, dtype, device=device)
    key = rng.noise_key(11, len(shape))
    y = T.gaussian_noise(x, sigma, key, channels, inner, mode)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y, reference.gaussian_noise(x, sigma, key, channels, inner, mode))
    gx, gs = T.gaussian_noise_backward(grad_y, x, sigma, key, channels, inner, mode, True, True)
    rx, rs = reference.gaussian_noise_backward(grad_y, x, sigma, key, channels, inner, mode, True, True)
    assert gx.dtype == dtype and torch.equal(gx, rx)
    assert gs.dtype == sigma.dtype and gs.shape == sigma.shape
    if backend == "cpp":
        if dtype == torch.float64:
            terms = grad_y.abs().sum() * 6  # |ε| < 6: a bound on Σ|g ε x| / |x| scale
            torch.testing.assert_close(gs, rs, rtol=1e-12, atol=1e-14 * max(1.0, terms.item()))
        else:
            gold = reference.gaussian_noise_backward(grad_y.double(), x.double(), sigma.double(), key, channels,
                                                     inner, mode, False, True)[1]
            if gold.numel():
                assert_low_precision_parity(gs, rs, gold)
        return
    scale = sigma_terms(grad_y, x, mode)
    torch.testing.assert_close(gs.double(), rs.double(), rtol=1e-6 if dtype != torch.float64 else 1e-12,
                               atol=1e-14 * max(1.0, scale))
    if HAS_EXT:
        cpu = [t.cpu() for t in (x, grad_y, sigma)]
        assert torch.equal(y.cpu(), ops.gaussian_noise(cpu[0], cpu[2], key, channels, inner, mode))
        cx, cs = ops.gaussian_noise_backward(cpu[1], cpu[0], cpu[2], key, channels, inner, mode, True, True)
        assert torch.equal(gx.cpu(), cx)
        if dtype == torch.float64:
            torch.testing.assert_close(gs.cpu(), cs, rtol=1e-12, atol=1e-15 * max(1.0, scale))
        else:
            torch.testing.assert_close(gs.cpu(), cs, rtol=2.0 ** -23, atol=1e-12 * max(1.0, scale))


@pytest.mark.parametrize("impl", IMPLS)
def test_need_flags_and_empty_results(impl):
    T = op_namespace(impl[0])
    x, grad_y, sigma, channels, inner = make((6, 4, 3), "unit", torch.float32, device=impl[1])
    full = {mode: T.gaussian_noise_backward(grad_y, x, sigma, 5, channels, inner, mode, True, True) for mode in MODES}
    for mode in MODES:
        for need_x in (False, True):
            for need_sigma in (False, True):
                gx, gs = T.gaussian_noise_backward(grad_y, x, sigma, 5, channels, inner, mode, need_x, need_sigma)
                assert gx.shape == (x.shape if need_x else (0,)) and gs.shape == (sigma.shape if need_sigma else (0,))
                # the multiplicative ∂L/∂x alone equals the one fused into the ∂L/∂σ pass
                assert not need_x or torch.equal(gx, full[mode][0])
                assert not need_sigma or torch.equal(gs, full[mode][1])
    # additive mode reads x only for its shape: grad_y in its place gives the same gradients
    a = T.gaussian_noise_backward(grad_y, x, sigma, 5, channels, inner, "additive", True, True)
    b = T.gaussian_noise_backward(grad_y, grad_y, sigma, 5, channels, inner, "additive", True, True)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    e = torch.empty(0, 3, 2, device=impl[1])
    gx, gs = T.gaussian_noise_backward(e, e, sigma[:3], 5, 3, 2, "multiplicative", True, True)
    assert gx.shape == e.shape and torch.equal(gs, torch.zeros(3, device=impl[1]))


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic(impl, monkeypatch):
    """The same bits on every run, ∂L/∂σ included: the CPU op for any thread count and both compiled
    copies of its inner loops; the Triton op (fixed tiles and order) run after run."""
    T = op_namespace(impl[0])
    if impl[0] == "triton":
        for shape, per in (((64, 8, 5, 7), "unit"), ((40000,), "layer")):
            x, grad_y, sigma, channels, inner = make(shape, per, torch.float32, seed=3, device=impl[1])
            runs = [T.gaussian_noise_backward(grad_y, x, sigma, 9, channels, inner, "multiplicative", True, True)
                    for _ in range(2)]
            assert all(torch.equal(a, b) for a, b in zip(*runs))
        return
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
                    out.append((mode, T.gaussian_noise(x, sigma, 9, channels, inner, mode),
                                *T.gaussian_noise_backward(grad_y, x, sigma, 9, channels, inner, mode, True, True)))
    finally:
        torch.set_num_threads(before)
    for mode in MODES:
        runs = [r[1:] for r in out if r[0] == mode]
        assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


# (dtypes, layouts, backward flags) that opcheck runs per backend (fewer in the interpreter).
OPCHECK = {"cpp": ((torch.float64, torch.float32, torch.bfloat16), [((5, 3, 2), "unit"), ((7,), "layer")],
                   ((True, True), (False, True), (True, False))),
           "triton": ((torch.float32, torch.bfloat16), [((5, 3, 2), "unit")], ((True, True), (True, False)))}
OPCHECK_PARAMS = [pytest.param(p.values[0], d, id=f"{p.id}-{dtype_id(d)}", marks=p.marks)
                  for p in IMPLS for d in OPCHECK[p.values[0][0]][0]]


@pytest.mark.parametrize("impl, dtype", OPCHECK_PARAMS)
def test_opcheck(impl, dtype):
    T = op_namespace(impl[0])
    _, layouts, flag_sets = OPCHECK[impl[0]]
    for shape, per in layouts:
        x, grad_y, sigma, channels, inner = make(shape, per, dtype, device=impl[1])
        for mode in MODES:
            torch.library.opcheck(T.gaussian_noise.default, (x, sigma, 3, channels, inner, mode))
            if dtype in (torch.float64, torch.float32):  # autograd registration, with inputs that require grad
                args = (x.clone().requires_grad_(), sigma.clone().requires_grad_(), 3, channels, inner, mode)
                torch.library.opcheck(T.gaussian_noise.default, args)
            for flags in flag_sets:
                torch.library.opcheck(T.gaussian_noise_backward.default,
                                      (grad_y, x, sigma, 3, channels, inner, mode, *flags))


# (make (x, σ, channels, inner, mode) from x (6, 4) and σ (4,), message) per backend: the compiled op
# names dtypes as c10 does (Double), the Triton op as torch does (torch.float64).
ERRORS = {
    "cpp": [
        (lambda x, s: (x.t(), s, 4, 1, "additive"), "must be contiguous"),
        (lambda x, s: (x, s.double(), 4, 1, "additive"), "sigma has dtype Double, expected Float"),
        (lambda x, s: (x, s[:2], 4, 1, "additive"), "sigma has 2 elements"),
        (lambda x, s: (x, torch.rand(5), 5, 1, "additive"), r"channels·inner = 5·1 = 5 does not divide the 24 elements"),
        (lambda x, s: (x, s, 4, 0, "additive"), "inner must be >= 1"),
        (lambda x, s: (x, s, 4, 1, "gaussian"), "unknown mode 'gaussian'"),
        (lambda x, s: (x.int(), s, 4, 1, "additive"), "x must be float64, float32, bfloat16 or float16, got Int"),
    ],
    "triton": [
        (lambda x, s: (x.t(), s, 4, 1, "additive"), "must be contiguous"),
        (lambda x, s: (x, s.double(), 4, 1, "additive"), "sigma has dtype torch.float64, expected torch.float32"),
        (lambda x, s: (x, s[:2], 4, 1, "additive"), "sigma has 2 elements"),
        (lambda x, s: (x, torch.rand(5, device=x.device), 5, 1, "additive"),
         r"channels·inner = 5·1 = 5 does not divide the 24 elements"),
        (lambda x, s: (x, s, 4, 0, "additive"), "inner must be >= 1"),
        (lambda x, s: (x, s, 0, 1, "additive"), "channels must be >= 1"),
        (lambda x, s: (x, s, 4, 1, "gaussian"), "unknown mode 'gaussian'"),
        (lambda x, s: (x.int(), s, 4, 1, "additive"), "x must be float64, float32, bfloat16 or float16, got torch.int32"),
    ],
}
ERROR_PARAMS = [pytest.param(p.values[0], call, match, id=f"{p.id}-{k}", marks=p.marks)
                for p in IMPLS for k, (call, match) in enumerate(ERRORS[p.values[0][0]])]


@pytest.mark.parametrize("impl, call, match", ERROR_PARAMS)
def test_clear_errors(impl, call, match):
    x, s = torch.randn(6, 4, device=impl[1]), torch.rand(4, device=impl[1])
    xs, ss, channels, inner, mode = call(x, s)
    with pytest.raises(RuntimeError, match=match):
        op_namespace(impl[0]).gaussian_noise(xs, ss, 0, channels, inner, mode)


BACKWARD_ERRORS = {"cpp": "grad_y has dtype Double but x has dtype Float",
                   "triton": "grad_y has dtype torch.float64 but x has dtype torch.float32"}


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_errors(impl):
    T = op_namespace(impl[0])
    x, s = torch.randn(6, 4, device=impl[1]), torch.rand(4, device=impl[1])
    with pytest.raises(RuntimeError, match=r"grad_y has shape \[6, 3\] but x has shape \[6, 4\]"):
        T.gaussian_noise_backward(torch.randn(6, 3, device=impl[1]), x, s, 0, 4, 1, "additive", True, True)
    with pytest.raises(RuntimeError, match=BACKWARD_ERRORS[impl[0]]):
        T.gaussian_noise_backward(x.double(), x, s, 0, 4, 1, "additive", True, True)
