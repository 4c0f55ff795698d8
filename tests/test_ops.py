"""Parity of the compiled ops with their reference twins, determinism, opcheck and input errors."""
import pytest
import torch

from t1t2_fast import _extension, reference

if not _extension.AVAILABLE:
    pytest.skip(f"compiled extension not built ({_extension.LOAD_ERROR})", allow_module_level=True)

from t1t2_fast import ops  # noqa: E402

# (dtype, atol, rtol): low precision is compared with the reference computed in float32 on the
# same (rounded) inputs, so the only difference is the order and precision of the accumulation.
TOLERANCES = [
    (torch.float64, 1e-12, 1e-12),
    (torch.float32, 1e-4, 1e-5),
    (torch.bfloat16, 1e-4, 1e-5),
    (torch.float16, 1e-4, 1e-5),
]
SIZES = [0, 1, 7, 1023, 1025, 65537]


def groupings(numel):
    if numel == 0:
        return [0, 1]
    return sorted({1, numel} | ({7} if numel % 7 == 0 else set()) | ({numel // 7} if numel % 7 == 0 else set()))


def inputs(numel, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)
    theta = torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)
    return u, theta


@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("numel", SIZES + [7 * 1025])
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_matches_reference(dtype, atol, rtol, numel, kind):
    u, theta = inputs(numel, dtype)
    for num_groups in groupings(numel):
        got = ops.penalty_segment_dot(u, theta, num_groups, kind)
        want = reference.penalty_segment_dot(u, theta, num_groups, kind)
        assert got.dtype == want.dtype and got.shape == (num_groups,)
        # scale atol with the group size: the sum's rounding error grows with the number of terms
        inner = numel // num_groups if num_groups else 0
        torch.testing.assert_close(got, want, atol=atol * max(1, inner) ** 0.5, rtol=rtol)


def test_float64_accumulation_is_exact_on_integers():
    """Integer-valued inputs have exact sums in double: the kernel must hit them bit for bit."""
    u = torch.arange(-500, 525, dtype=torch.float64)
    theta = torch.full((1025,), 3.0, dtype=torch.float64)
    assert ops.penalty_segment_dot(u, theta, 1, "l2").item() == 6.0 * float(u.sum())
    assert ops.penalty_segment_dot(u, theta, 1, "l1").item() == float(u.sum())


def test_non_contiguous_and_multi_dim_inputs():
    u = torch.randn(96, 64, dtype=torch.float64).t()
    theta = torch.randn(64, 192, dtype=torch.float64)[:, ::2]
    assert not u.is_contiguous() and not theta.is_contiguous()
    for g in (1, 64, 64 * 96):
        torch.testing.assert_close(ops.penalty_segment_dot(u, theta, g, "l2"),
                                   reference.penalty_segment_dot(u, theta, g, "l2"), rtol=1e-12, atol=1e-12)


def test_deterministic_across_runs_and_thread_counts():
    u, theta = inputs(3 * 200_003, torch.float32, seed=1)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            for g in (1, 3):
                results.append((g, ops.penalty_segment_dot(u, theta, g, "l2")))
    finally:
        torch.set_num_threads(before)
    for g in (1, 3):
        same = [r for gg, r in results if gg == g]
        assert all(torch.equal(same[0], r) for r in same[1:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    for numel, g in ((0, 0), (7, 7), (1025, 5), (4096, 1)):
        u, theta = inputs(numel, dtype)
        for kind in ("l2", "l1"):
            torch.library.opcheck(torch.ops.t1t2.penalty_segment_dot.default, (u, theta, g, kind))


@pytest.mark.parametrize("make_args, match", [
    (lambda: (torch.randn(4), torch.randn(5), 1, "l2"), r"u has shape \[4\] but theta has shape \[5\]"),
    (lambda: (torch.randn(4), torch.randn(4, dtype=torch.float64), 1, "l2"),
     "u has dtype Float but theta has dtype Double"),
    (lambda: (torch.ones(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64), 1, "l2"),
     r"expected floating-point u and theta \(Double, Float, BFloat16 or Half\), got Long"),
    (lambda: (torch.randn(6), torch.randn(6), 4, "l2"), "num_groups=4 does not divide numel=6"),
    (lambda: (torch.randn(6), torch.randn(6), -1, "l2"), "num_groups must be >= 0"),
    (lambda: (torch.randn(6), torch.randn(6), 1, "l3"), "unknown kind 'l3'"),
])
def test_clear_errors(make_args, match):
    with pytest.raises(RuntimeError, match=match):
        ops.penalty_segment_dot(*make_args())


def test_backend_auto_picks_the_compiled_op():
    import t1t2_fast as t1t2
    opt = t1t2.T1T2(torch.nn.Linear(3, 2), [t1t2.L2(1e-3)], backend="auto")
    assert opt.backend.name == "cpp"
