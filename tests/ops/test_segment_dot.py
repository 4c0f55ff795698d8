"""Parity of the compiled ops with their reference twins, determinism, opcheck and input errors."""
import pytest
import torch

from t1t2_fast import _extension, reference

if not _extension.AVAILABLE:
    pytest.skip(f"compiled extension not available ({_extension.LOAD_ERROR}); "
                f"build it with `pip install --no-build-isolation -e .`", allow_module_level=True)

from t1t2_fast import ops  # noqa: E402

# (dtype, atol, rtol): low precision is compared with the reference computed in float32 on the
# same (rounded) inputs, so the only difference is the order and precision of the accumulation.
# atol is per sqrt(term): the reference's float32 rounding error grows with the group size.
TOLERANCES = [
    (torch.float64, 1e-12, 1e-12),
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 1e-5, 1e-5),
    (torch.float16, 1e-5, 1e-5),
]
# 1-D sizes from DESIGN.md §5, and 2-D shapes whose rows give per-unit groups; (3, 16385) and
# (2, 65537) have groups of several reduction blocks with a ragged last block.
SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (65537,), (0, 5), (33, 31), (41, 25), (7, 1025), (3, 16385),
          (2, 65537)]
KINDS = ["l2", "l1"]


def groupings(shape):
    """num_groups for per network/layer (1), per unit (rows) and per element (numel)."""
    numel = torch.Size(shape).numel()
    if numel == 0:
        return [0, 1]
    return sorted({1, shape[0], numel})


def inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    theta = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return u, theta


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES, ids=lambda x: str(x).removeprefix("torch."))
def test_matches_reference(dtype, atol, rtol, shape, kind):
    u, theta = inputs(shape, dtype)
    for num_groups in groupings(shape):
        got = ops.penalty_segment_dot(u, theta, num_groups, kind)
        want = reference.penalty_segment_dot(u, theta, num_groups, kind)
        assert got.dtype == want.dtype and got.shape == (num_groups,)
        inner = u.numel() // num_groups if num_groups else 0
        torch.testing.assert_close(got, want, atol=atol * max(1, inner) ** 0.5, rtol=rtol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_accumulates_in_double(dtype, kind):
    """The kernel's only rounding is the final cast to float32: it is within one float32 ulp of the
    float64 sum of the same inputs (a float32 accumulator, as in the reference, can miss by ~15)."""
    u, theta = inputs((3, 65537), dtype, seed=2)
    got = ops.penalty_segment_dot(u, theta, 3, kind)
    exact = reference.penalty_segment_dot(u.double(), theta.double(), 3, kind)
    torch.testing.assert_close(got.double(), exact, rtol=2.0 ** -23, atol=0.0)


def test_float64_accumulation_is_exact_on_integers():
    """Integer-valued inputs have exact sums in double: the kernel must hit them bit for bit."""
    u = torch.arange(-500, 525, dtype=torch.float64)
    theta = torch.full((1025,), 3.0, dtype=torch.float64)
    assert ops.penalty_segment_dot(u, theta, 1, "l2").item() == 6.0 * float(u.sum())
    assert ops.penalty_segment_dot(u, theta, 1, "l1").item() == float(u.sum())


@pytest.mark.parametrize("kind", KINDS)
def test_special_values_follow_the_reference(kind):
    """sign(±0) = 0 and sign(NaN) = 0 as in torch.sign; NaN and inf propagate through the products."""
    special = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-300, -2.5]
    theta = torch.tensor(special * len(special), dtype=torch.float64)
    u = torch.tensor(special, dtype=torch.float64).repeat_interleave(len(special))
    for num_groups in (len(special), len(special) ** 2):
        torch.testing.assert_close(ops.penalty_segment_dot(u, theta, num_groups, kind),
                                   reference.penalty_segment_dot(u, theta, num_groups, kind), equal_nan=True)


def test_non_contiguous_and_multi_dim_inputs():
    u = torch.randn(96, 64, dtype=torch.float64).t()
    theta = torch.randn(64, 192, dtype=torch.float64)[:, ::2]
    assert not u.is_contiguous() and not theta.is_contiguous()
    for kind in KINDS:
        for g in (1, 64, 64 * 96):
            torch.testing.assert_close(ops.penalty_segment_dot(u, theta, g, kind),
                                       reference.penalty_segment_dot(u, theta, g, kind), rtol=1e-12, atol=1e-12)


def test_expanded_input():
    """A stride-0 view is read as its logical (flattened) values."""
    u = torch.randn(5, 1, dtype=torch.float64).expand(5, 4)
    theta = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(ops.penalty_segment_dot(u, theta, 5, "l2"),
                               reference.penalty_segment_dot(u, theta, 5, "l2"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_deterministic_across_runs_and_thread_counts(dtype):
    u, theta = inputs((3 * 200_003,), dtype, seed=1)
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


def test_meta_tensors_give_shape_and_dtype():
    for dtype, out in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                       (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        u = torch.empty(6, 4, device="meta", dtype=dtype)
        r = ops.penalty_segment_dot(u, u, 6, "l1")
        assert r.device.type == "meta" and r.shape == (6,) and r.dtype == out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_opcheck(dtype):
    samples = [((0,), 0), ((0,), 1), ((7,), 7), ((1025,), 5), ((4096,), 1), ((3, 16385), 3)]
    for shape, g in samples:
        u, theta = inputs(shape, dtype)
        for kind in KINDS:
            torch.library.opcheck(torch.ops.t1t2.penalty_segment_dot.default, (u, theta, g, kind))
    u, theta = inputs((8, 6), dtype)
    torch.library.opcheck(torch.ops.t1t2.penalty_segment_dot.default, (u.t(), theta.t(), 6, "l2"))


@pytest.mark.parametrize("make_args, match", [
    (lambda: (torch.randn(4), torch.randn(5), 1, "l2"), r"u has shape \[4\] but theta has shape \[5\]"),
    (lambda: (torch.randn(2, 3), torch.randn(3, 2), 1, "l2"), r"u has shape \[2, 3\] but theta has shape \[3, 2\]"),
    (lambda: (torch.randn(4), torch.randn(4, dtype=torch.float64), 1, "l2"),
     "u has dtype Float but theta has dtype Double; cast them to one dtype"),
    (lambda: (torch.ones(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64), 1, "l2"),
     r"expected floating-point u and theta \(Double, Float, BFloat16 or Half\), got Long"),
    (lambda: (torch.ones(4, dtype=torch.complex64), torch.ones(4, dtype=torch.complex64), 1, "l2"),
     "got ComplexFloat"),
    (lambda: (torch.randn(4), torch.randn(4, device="meta"), 1, "l2"),
     "u is on cpu but theta is on meta; move both to one device"),
    (lambda: (torch.randn(6), torch.randn(6), 4, "l2"), "num_groups=4 does not divide numel=6"),
    (lambda: (torch.randn(6), torch.randn(6), 0, "l2"), "num_groups=0 does not divide numel=6"),
    (lambda: (torch.randn(6), torch.randn(6), -1, "l2"), "num_groups must be >= 0, got -1"),
    (lambda: (torch.randn(6), torch.randn(6), 1, "l3"), "unknown kind 'l3'; expected 'l2' or 'l1'"),
    (lambda: (torch.randn(6, device="meta"), torch.randn(6, device="meta"), 4, "l2"),
     "num_groups=4 does not divide numel=6"),
], ids=["shape", "shape-2d", "dtype", "int", "complex", "device", "groups", "zero-groups", "negative-groups",
        "kind", "meta-groups"])
def test_clear_errors(make_args, match):
    with pytest.raises(RuntimeError, match=match):
        ops.penalty_segment_dot(*make_args())


def test_backend_auto_picks_the_compiled_op():
    import t1t2_fast as t1t2
    opt = t1t2.T1T2(torch.nn.Linear(3, 2), [t1t2.L2(1e-3)], backend="auto")
    assert opt.backend.name == "cpp"
