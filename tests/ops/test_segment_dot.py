"""penalty_segment_dot of every backend (torch.ops.t1t2 on CPU and CUDA, torch.ops.t1t2_triton on a
GPU or in the interpreter) against its reference twin: every dtype, size and grouping, accumulation
in double, special values, strided and expanded inputs, determinism, meta tensors, opcheck and input
errors."""
import pytest
import torch

from t1t2_fast import ops, reference

from conftest import (DTYPES, HAS_EXT, LOW_PRECISION, TOL, dtype_id, needs_cuda_kernels, op_backends,
                      op_namespace)

IMPLS = op_backends("cpp", "triton")
KINDS = ["l2", "l1"]
# 1-D sizes from docs/design.md, and 2-D shapes whose rows give per-unit groups: on CPU (3, 16385)
# and (2, 65537) have groups of several reduction blocks with a ragged last block; on a GPU every
# kernel path: warp per group (inner ≤ 2048), one tile per group (≤ 8192), several tiles with a
# ragged last one; in the interpreter fewer programs.
SHAPES = {("cpp", "cpu"): [(0,), (1,), (7,), (1023,), (1025,), (65537,), (0, 5), (33, 31), (41, 25), (7, 1025),
                           (3, 16385), (2, 65537)],
          ("cpp", "cuda"): [(0,), (1,), (7,), (1023,), (1025,), (65537,), (0, 5), (33, 31), (5, 2048), (5, 2049),
                            (4, 8192), (3, 8193), (3, 16385), (2, 65537), (1000, 7)],
          "triton": [(0,), (1,), (7,), (1023,), (1025,), (65537,), (0, 5), (33, 31), (7, 1025), (2, 20000)]}
ULP32 = 2.0 ** -23


def table(d, impl):
    return d["triton"] if impl[0] == "triton" else d[impl]


def groupings(shape):
    """num_groups for per network/layer (1), per unit (rows) and per element (numel)."""
    numel = torch.Size(shape).numel()
    if numel == 0:
        return [0, 1]
    return sorted({1, shape[0], numel})


def inputs(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    theta = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return u.to(device), theta.to(device)


def segment_dot(impl):
    return op_namespace(impl[0]).penalty_segment_dot


def assert_matches_cpu_op(got, want):
    """Both sum in float64 (in different orders) and round once: float64 to summation error, float32
    to one ulp."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(got, want, rtol=ULP32, atol=1e-12)


def _shape_params():
    return [pytest.param(p.values[0], d, s, k, id=f"{p.id}-{dtype_id(d)}-{s}-{k}", marks=p.marks)
            for p in IMPLS for d in DTYPES for s in table(SHAPES, p.values[0]) for k in KINDS]


@pytest.mark.parametrize("impl, dtype, shape, kind", _shape_params())
def test_matches_reference(impl, dtype, shape, kind):
    """CPU and Triton: against the twin in the same dtype (low precision: the twin accumulates in
    float32, atol per sqrt(term)); Triton also against the CPU op. CUDA: within reordering error of
    the float64 sum of the same (rounded) inputs, plus one float32 ulp of the output for low-precision
    inputs, and where a group is one product, the CPU op's bits."""
    backend, device = impl
    u, theta = inputs(shape, dtype, device=device)
    tol = TOL["segment_dot"][dtype]
    for num_groups in groupings(shape):
        got = segment_dot(impl)(u, theta, num_groups, kind)
        assert got.device == u.device and got.shape == (num_groups,)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        inner = u.numel() // num_groups if num_groups else 0
        if impl == ("cpp", "cuda"):
            exact = reference.penalty_segment_dot(u.cpu().double(), theta.cpu().double(), num_groups, kind)
            magnitude = reference.penalty_segment_dot(u.cpu().double().abs(), theta.cpu().double().abs(), num_groups,
                                                      kind) if num_groups else exact
            err = (got.cpu().double() - exact).abs()
            bound = 1e-13 * magnitude + TOL["exact_sum_rtol"][dtype] * exact.abs()
            assert bool((err <= bound).all()), (num_groups, inner, (err - bound).max().item())
            if inner == 1:  # one product per output: the same double product and cast as the CPU op
                assert torch.equal(got.cpu(), ops.penalty_segment_dot(u.cpu(), theta.cpu(), num_groups, kind))
            continue
        want = reference.penalty_segment_dot(u, theta, num_groups, kind)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=tol["atol"] * max(1, inner) ** 0.5, rtol=tol["rtol"])
        if backend == "triton" and HAS_EXT:
            assert_matches_cpu_op(got.cpu(), ops.penalty_segment_dot(u.cpu(), theta.cpu(), num_groups, kind))


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_cuda_matches_the_cpu_op(dtype):
    u, theta = inputs((7, 30001), dtype, seed=5, device="cuda")
    for kind in KINDS:
        for g in (1, 7, 7 * 30001):
            torch.testing.assert_close(ops.penalty_segment_dot(u, theta, g, kind).cpu(),
                                       ops.penalty_segment_dot(u.cpu(), theta.cpu(), g, kind),
                                       rtol=1e-12 if dtype == torch.float64 else 2.0 ** -22, atol=1e-12)


# (shape, groups) of a long reduction per implementation (the interpreter gets a shorter one).
LONG = {("cpp", "cpu"): ((3, 65537), 3), "triton": ((2, 40000), 2)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
@pytest.mark.parametrize("impl", op_backends("cpp", "triton", cuda=False))
def test_low_precision_accumulates_in_double(impl, dtype, kind):
    """The kernel's only rounding is the final cast to float32: it is within one float32 ulp of the
    float64 sum of the same inputs (a float32 accumulator, as in the reference, can miss by ~15).
    (On CUDA this is test_matches_reference's bound.)"""
    shape, groups = table(LONG, impl)
    u, theta = inputs(shape, dtype, seed=2, device=impl[1])
    got = segment_dot(impl)(u, theta, groups, kind)
    exact = reference.penalty_segment_dot(u.double(), theta.double(), groups, kind)
    torch.testing.assert_close(got.double(), exact, rtol=TOL["exact_sum_rtol"][dtype], atol=0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_accumulation_is_exact_on_integers(impl):
    """Integer-valued inputs have exact sums in double: the kernel must hit them bit for bit."""
    u = torch.arange(-500, 525, dtype=torch.float64, device=impl[1])
    if impl == ("cpp", "cuda"):
        u = u.repeat(40)
    theta = torch.full_like(u, 3.0)
    assert segment_dot(impl)(u, theta, 1, "l2").item() == 6.0 * float(u.sum())
    assert segment_dot(impl)(u, theta, 1, "l1").item() == float(u.sum())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_special_values_follow_the_reference(impl, kind):
    """sign(±0) = 0 and sign(NaN) = 0 as in torch.sign; NaN and inf propagate through the products."""
    special = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-300, -2.5]
    theta = torch.tensor(special * len(special), dtype=torch.float64)
    u = torch.tensor(special, dtype=torch.float64).repeat_interleave(len(special))
    for num_groups in (len(special), len(special) ** 2):
        torch.testing.assert_close(segment_dot(impl)(u.to(impl[1]), theta.to(impl[1]), num_groups, kind).cpu(),
                                   reference.penalty_segment_dot(u, theta, num_groups, kind), equal_nan=True)


# (rows, cols) of the transposed input per implementation.
STRIDED = {("cpp", "cpu"): (96, 64), ("cpp", "cuda"): (96, 64), "triton": (24, 16)}


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    rows, cols = table(STRIDED, impl)
    u = torch.randn(rows, cols, dtype=torch.float64, device=impl[1]).t()
    theta = torch.randn(cols, 2 * rows, dtype=torch.float64, device=impl[1])[:, ::2]
    assert not u.is_contiguous() and not theta.is_contiguous()
    for kind in KINDS:
        for g in (1, cols, cols * rows):
            torch.testing.assert_close(segment_dot(impl)(u, theta, g, kind).cpu(),
                                       reference.penalty_segment_dot(u.cpu(), theta.cpu(), g, kind),
                                       rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", op_backends("cpp", "triton", cuda=False))
def test_expanded_input(impl):
    """A stride-0 view is read as its logical (flattened) values."""
    rows, cols, groups = (5, 4, (5,)) if impl[0] == "cpp" else (16, 24, (1, 16, 16 * 24))
    u = torch.randn(rows, 1, dtype=torch.float64, device=impl[1]).expand(rows, cols)
    theta = torch.randn(rows, cols, dtype=torch.float64, device=impl[1])
    if impl[0] == "triton":  # with a strided θ
        theta = torch.randn(rows, 2 * cols, dtype=torch.float64, device=impl[1])[:, ::2]
    for g in groups:
        torch.testing.assert_close(segment_dot(impl)(u, theta, g, "l2"),
                                   reference.penalty_segment_dot(u, theta, g, "l2"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("impl", op_backends("cpp"))
def test_deterministic(impl, dtype):
    """The same bits on every run: on CPU across runs and thread counts; on a GPU also from another
    stream while the GPU is busy with other work (the partition of the sum does not depend on how
    many blocks run at once). (Triton: test_penalty_hypergrad.py's test_deterministic.)"""
    u, theta = inputs((3 * 200_003,), dtype, seed=1, device=impl[1])
    if impl[1] == "cuda":
        a, b = torch.randn(4096, 4096, device="cuda"), torch.randn(4096, 4096, device="cuda")
        side = torch.cuda.Stream()
        for g in (1, 3, 3 * 200_003):
            for kind in KINDS:
                runs = [ops.penalty_segment_dot(u, theta, g, kind) for _ in range(3)]
                side.wait_stream(torch.cuda.current_stream())
                busy = a @ b  # on the current stream, concurrent with the run below
                with torch.cuda.stream(side):
                    runs.append(ops.penalty_segment_dot(u, theta, g, kind))
                torch.cuda.synchronize()
                del busy
                assert all(torch.equal(runs[0], r) for r in runs[1:]), (g, kind)
        return
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            for g in (1, 3, 3 * 200_003):
                for kind in KINDS:
                    results.setdefault((g, kind), []).append(ops.penalty_segment_dot(u, theta, g, kind))
    finally:
        torch.set_num_threads(before)
    for (g, kind), runs in results.items():
        assert all(torch.equal(runs[0], r) for r in runs[1:]), f"num_groups={g} kind={kind}"


@pytest.mark.parametrize("impl", op_backends("cpp", "triton", cuda=False))
def test_meta_tensors_give_shape_and_dtype(impl):
    for dtype, out in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                       (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        u = torch.empty(6, 4, device="meta", dtype=dtype)
        r = segment_dot(impl)(u, u, 6, "l1")
        assert r.device.type == "meta" and r.shape == (6,) and r.dtype == out


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl, dtype):
    op = segment_dot(impl).default
    device = impl[1]
    if impl[0] == "triton":
        g = torch.Generator().manual_seed(1)
        u, theta = (torch.randn((8, 6), generator=g, dtype=torch.float64).to(dtype).to(device) for _ in range(2))
        for num_groups, kind in ((8, "l1"), (1, "l2"), (48, "l2")):
            torch.library.opcheck(op, (u, theta, num_groups, kind))
        torch.library.opcheck(op, (u.t(), theta.t(), 6, "l2"))
        empty = torch.empty(0, device=device, dtype=dtype)
        torch.library.opcheck(op, (empty, empty, 0, "l2"))
        return
    for shape, g in [((0,), 0), ((0,), 1), ((7,), 7), ((1025,), 5), ((4096,), 1), ((3, 16385), 3)]:
        u, theta = inputs(shape, dtype, device=device)
        for kind in KINDS:
            torch.library.opcheck(op, (u, theta, g, kind))
    if device == "cpu":
        u, theta = inputs((8, 6), dtype)
        torch.library.opcheck(op, (u.t(), theta.t(), 6, "l2"))


def _x(n=6, device="cpu", **kw):
    return torch.randn(n, device=device, **kw)


# (make the arguments, message) per implementation.
ERRORS = {
    ("cpp", "cpu"): [
        (lambda: (_x(4), _x(5), 1, "l2"), r"u has shape \[4\] but theta has shape \[5\]"),
        (lambda: (torch.randn(2, 3), torch.randn(3, 2), 1, "l2"), r"u has shape \[2, 3\] but theta has shape \[3, 2\]"),
        (lambda: (_x(4), _x(4, dtype=torch.float64), 1, "l2"),
         "u has dtype Float but theta has dtype Double; cast them to one dtype"),
        (lambda: (torch.ones(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64), 1, "l2"),
         r"expected floating-point u and theta \(Double, Float, BFloat16 or Half\), got Long"),
        (lambda: (torch.ones(4, dtype=torch.complex64), torch.ones(4, dtype=torch.complex64), 1, "l2"),
         "got ComplexFloat"),
        (lambda: (_x(4), _x(4, device="meta"), 1, "l2"), "u is on cpu but theta is on meta; move both to one device"),
        (lambda: (_x(), _x(), 4, "l2"), "num_groups=4 does not divide numel=6"),
        (lambda: (_x(), _x(), 0, "l2"), "num_groups=0 does not divide numel=6"),
        (lambda: (_x(), _x(), -1, "l2"), "num_groups must be >= 0, got -1"),
        (lambda: (_x(), _x(), 1, "l3"), "unknown kind 'l3'; expected 'l2' or 'l1'"),
        (lambda: (_x(device="meta"), _x(device="meta"), 4, "l2"), "num_groups=4 does not divide numel=6"),
    ],
    ("cpp", "cuda"): [
        (lambda: (_x(4), _x(4, device="cuda"), 1, "l2"), "u is on cpu but theta is on cuda"),
        (lambda: (_x(4, device="cuda"), _x(4, device="cuda", dtype=torch.float64), 1, "l2"),
         "u has dtype Float but theta has dtype Double"),
        (lambda: (_x(device="cuda"), _x(device="cuda"), 4, "l2"), "num_groups=4 does not divide numel=6"),
        (lambda: (_x(device="cuda"), _x(device="cuda"), 1, "l3"), "unknown kind 'l3'"),
    ],
    "triton": [
        (lambda d: (_x(4, d), _x(6, d), 1, "l2"), r"u has shape \[4\] but theta has shape \[6\]"),
        (lambda d: (_x(6, d, dtype=torch.float64), _x(6, d), 1, "l2"),
         "u has dtype torch.float64 but theta has dtype torch.float32"),
        (lambda d: (_x(6, d).int(), _x(6, d).int(), 1, "l2"), "expected floating-point u and theta"),
        (lambda d: (_x(6, d), _x(6, d), 4, "l2"), "num_groups=4 does not divide numel=6"),
        (lambda d: (_x(6, d), _x(6, d), -1, "l2"), "num_groups must be >= 0, got -1"),
        (lambda d: (_x(6, d), _x(6, d), 1, "l3"), "unknown kind 'l3'; expected 'l2' or 'l1'"),
    ],
}
ERROR_PARAMS = [pytest.param(p.values[0], make, match, id=f"{p.id}-{k}", marks=p.marks)
                for p in IMPLS for k, (make, match) in enumerate(table(ERRORS, p.values[0]))]


@pytest.mark.parametrize("impl, make_args, match", ERROR_PARAMS)
def test_clear_errors(impl, make_args, match):
    args = make_args(impl[1]) if impl[0] == "triton" else make_args()
    with pytest.raises(RuntimeError, match=match):
        segment_dot(impl)(*args)


@pytest.mark.parametrize("impl", op_backends("cpp", cuda=False))
def test_backend_auto_picks_the_compiled_op(impl):
    import t1t2_fast as t1t2
    opt = t1t2.T1T2(torch.nn.Linear(3, 2), [t1t2.L2(1e-3)], backend="auto")
    assert opt.backend.name == "cpp"
