"""Parity of the one-call T2 op (torch.ops.t1t2.penalty_hypergrad) with its reference twin."""
import pytest
import torch

from t1t2_fast import _extension, reference

if not _extension.AVAILABLE:
    pytest.skip(f"compiled extension not built ({_extension.LOAD_ERROR})", allow_module_level=True)

from t1t2_fast import ops  # noqa: E402

SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (65537,), (33, 31), (3, 40000)]
# The op accumulates in double in fixed blocks, the twin in the compute dtype with torch.sum: for
# float32 they differ by the twin's float32 summation error (≈ √n ulps), hence the looser bound.
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=2e-4, rtol=2e-5)}


def groupings(shape):
    numel = 1
    for s in shape:
        numel *= s
    if numel == 0:
        return [0]
    return sorted({1, shape[0], numel})


def make_args(shapes, dtype, jac_tensors=True, seed=0, lr=0.05):
    g = torch.Generator().manual_seed(seed)
    randn = lambda s: torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
    v = [randn(s) for s in shapes]
    theta = [randn(s) for s in shapes]
    jac = [randn(s) * 0.01 if k % 2 == 0 else torch.empty(0, dtype=dtype) for k, s in enumerate(shapes)]
    jac_scalar = [-lr * (1 + 0.1 * k) for k in range(len(shapes))]
    seg_tensor, seg_kind, seg_groups = [], [], []
    for t, s in enumerate(shapes):
        for kind in (0, 1, 2):
            for groups in groupings(s):
                seg_tensor.append(t)
                seg_kind.append(kind)
                seg_groups.append(groups)
    return [v, theta, jac if jac_tensors else [], jac_scalar, seg_tensor, seg_kind, seg_groups, lr]


@pytest.mark.parametrize("jac_tensors", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(dtype, jac_tensors):
    args = make_args(SHAPES, dtype, jac_tensors)
    got = ops.penalty_hypergrad(*args)
    want = reference.penalty_hypergrad(*args)
    assert got.dtype == dtype and got.shape == want.shape == (sum(args[6]),)
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_float64_matches_segment_dot_exactly_on_integers():
    """Integer data have exact double sums: the one-call op and the per-tensor op must agree bit for bit."""
    v = [torch.arange(-600.0, 600.0, dtype=torch.float64).reshape(40, 30)]
    theta = [torch.full((40, 30), 3.0, dtype=torch.float64)]
    got = ops.penalty_hypergrad(v, theta, [], [-2.0], [0, 0, 0], [0, 1, 0], [1, 40, 1200], 0.5)
    want = torch.cat([ops.penalty_segment_dot(-2.0 * v[0], theta[0], 1, "l2"),
                      ops.penalty_segment_dot(-2.0 * v[0], theta[0], 40, "l1"),
                      ops.penalty_segment_dot(-2.0 * v[0], theta[0], 1200, "l2")])
    assert torch.equal(got, want)


def test_hundreds_of_small_tensors():
    g = torch.Generator().manual_seed(5)
    shapes = [(int(n),) for n in torch.randint(1, 200, (500,), generator=g)]
    args = make_args(shapes, torch.float32, seed=6)
    torch.testing.assert_close(ops.penalty_hypergrad(*args), reference.penalty_hypergrad(*args),
                               **TOL[torch.float32])


def test_deterministic_for_any_thread_count():
    args = make_args([(500_003,), (70, 9000)], torch.float32, seed=7)
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            out.append(ops.penalty_hypergrad(*args))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_opcheck():
    args = make_args([(7, 3), (5,)], torch.float64)
    torch.library.opcheck(torch.ops.t1t2.penalty_hypergrad.default, tuple(args))


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.__setitem__(0, a[0][:-1]), "but 1 v"),
    (lambda a: a.__setitem__(3, [1.0]), "jac_scalar must have one value per theta"),
    (lambda a: a.__setitem__(4, [0, 5] + a[4][2:]), "names tensor 5 of 2"),
    (lambda a: a.__setitem__(5, [7] + a[5][1:]), "has kind 7"),
    (lambda a: a.__setitem__(6, [4] + a[6][1:]), "4 groups do not divide the 21 elements"),
    (lambda a: a.__setitem__(1, [a[1][0].float(), a[1][1]]), "must both be"),
    (lambda a: a.__setitem__(0, [a[0][0].t().contiguous().t(), a[0][1]]), "must be contiguous"),
])
def test_clear_errors(mutate, match):
    args = make_args([(7, 3), (5,)], torch.float64)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.penalty_hypergrad(*args)
