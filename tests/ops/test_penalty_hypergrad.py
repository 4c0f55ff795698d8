"""The one-call T2 op, penalty_hypergrad, of every backend (torch.ops.t1t2 on CPU and CUDA,
torch.ops.t1t2_triton on a GPU or in the interpreter) against its reference twin and the CPU op:
parity per dtype with tensor and scalar J, every kind and granularity, exact sums on integers, many
tensors in one call, determinism, opcheck and input errors."""
import math

import pytest
import torch

from t1t2_fast import ops, reference

from conftest import HAS_EXT, TOL, dtype_id, needs_ext, op_backends, op_namespace

IMPLS = op_backends("cpp", "triton")
ULP32 = 2.0 ** -23
# Every kernel path: on CPU groups of several blocks; on a GPU one thread per group (inner < 32,
# and 0), one warp per group (≤ 2048), one tile, several tiles with a ragged last one; in the
# interpreter fewer programs.
SHAPES = {("cpp", "cpu"): [(0,), (1,), (7,), (1023,), (1025,), (65537,), (33, 31), (3, 40000)],
          ("cpp", "cuda"): [(0,), (1,), (7,), (1023,), (1025,), (65537,), (33, 31), (5, 2048), (3, 8192),
                            (3, 16385), (2, 65537), (1000, 7), (4, 0)],
          "triton": [(0,), (1,), (7,), (1023,), (1025,), (65537,), (33, 31), (3, 20000)]}


def table(d, impl):
    return d["triton"] if impl[0] == "triton" else d[impl]


def groupings(impl, shape):
    """num_groups per network/layer (1), unit (rows) and element (numel). An empty tensor: 0 groups on
    CPU; 0 or 1 for Triton; on CUDA also one (empty) group per row."""
    numel = math.prod(shape)
    if numel == 0:
        return [0] if impl == ("cpp", "cpu") else sorted({0, 1} | ({shape[0]} if impl == ("cpp", "cuda") else set()))
    return sorted({1, shape[0], numel})


def make_args(impl, shapes, dtype, jac_tensors=True, seed=0, lr=0.05, all_kinds_below=math.inf):
    """v, θ, J (a tensor for every other parameter, else the scalar) and segments: every kind at every
    granularity, except that tensors of ``all_kinds_below`` elements or more get one kind per
    granularity, rotating (the interpreter is slow)."""
    g = torch.Generator().manual_seed(seed)
    device = impl[1]
    randn = lambda s: torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    v = [randn(s) for s in shapes]
    theta = [randn(s) for s in shapes]
    jac = [randn(s) * 0.01 if k % 2 == 0 else torch.empty(0, dtype=dtype, device=device)
           for k, s in enumerate(shapes)]
    jac_scalar = [-lr * (1 + 0.1 * k) for k in range(len(shapes))]
    seg_tensor, seg_kind, seg_groups = [], [], []
    for t, s in enumerate(shapes):
        for j, groups in enumerate(groupings(impl, s)):
            kinds = (0, 1, 2) if math.prod(s) < all_kinds_below else ((t + j) % 3,)
            for kind in kinds:
                seg_tensor.append(t)
                seg_kind.append(kind)
                seg_groups.append(groups)
    return [v, theta, jac if jac_tensors else [], jac_scalar, seg_tensor, seg_kind, seg_groups, lr, []]


def on_cpu(args):
    return [[t.cpu() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a for a in args]


def hypergrad(impl):
    return op_namespace(impl[0]).penalty_hypergrad


def assert_matches_cpu_op(got, want, dtype):
    """Both sum in float64 (in different orders) and round once: float64 to summation error, float32
    to one ulp (two for the CUDA op)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12 if dtype == torch.float64 else ULP32, atol=1e-12)


def exact_hypergrad(args):
    """float64 sums of the kernels' terms: u = J·v rounded to the compute dtype (one torch multiply,
    as the kernels form it), then u·m(θ) summed in float64; also Σ|terms| per group."""
    v, theta, jac, jac_scalar, seg_tensor, seg_kind, seg_groups, lr, _ = on_cpu(args)
    sums, magnitudes = [], []
    for t, kind, groups in zip(seg_tensor, seg_kind, seg_groups):
        if kind == 2:
            u, name, scale = v[t].double(), "l2", -lr
        else:
            j = jac[t] if jac and jac[t].numel() > 0 else torch.tensor(jac_scalar[t], dtype=v[t].dtype)
            u, name, scale = (j * v[t]).double(), ("l2", "l1")[kind], 1.0
        th = theta[t].double()
        sums.append(scale * reference.penalty_segment_dot(u, th, groups, name))
        magnitudes.append(abs(scale) * reference.penalty_segment_dot(u.abs(), th.abs(), groups, name))
    return torch.cat(sums), torch.cat(magnitudes)


@pytest.mark.parametrize("jac_tensors", [True, False], ids=["J-tensor", "J-scalar"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(impl, dtype, jac_tensors):
    """Close to the twin (which sums float32 in float32: TOL["hypergrad"]); Triton also to the CPU op;
    CUDA also within reordering error (plus one float32 ulp) of the float64 sum of the same terms,
    and to the CPU op within two float32 ulps."""
    args = make_args(impl, table(SHAPES, impl), dtype, jac_tensors,
                     all_kinds_below=2000 if impl[0] == "triton" else math.inf)
    got = hypergrad(impl)(*args)
    assert got.dtype == dtype and got.shape == (sum(args[6]),) and got.device.type == impl[1]
    torch.testing.assert_close(got.cpu(), reference.penalty_hypergrad(*on_cpu(args)), **TOL["hypergrad"][dtype])
    if impl == ("cpp", "cuda"):
        exact, magnitude = exact_hypergrad(args)
        err = (got.cpu().double() - exact).abs()
        bound = 1e-12 * magnitude + TOL["exact_sum_rtol"][dtype] * exact.abs()
        assert bool((err <= bound).all()), (err - bound).max().item()
        torch.testing.assert_close(got.cpu(), ops.penalty_hypergrad(*on_cpu(args)),
                                   rtol=1e-12 if dtype == torch.float64 else 2.0 ** -21, atol=1e-12)
    elif impl[0] == "triton" and HAS_EXT:
        assert_matches_cpu_op(got.cpu(), ops.penalty_hypergrad(*on_cpu(args)), dtype)


@pytest.mark.parametrize("impl", [pytest.param(p.values[0], id=p.id, marks=[*p.marks, needs_ext]) for p in IMPLS])
def test_float64_exact_on_integers(impl):
    """Integer data have exact double sums: the op agrees bit for bit with the CPU op's per-tensor
    sums (penalty_segment_dot on CPU; the one-call CPU op for the CUDA and Triton ops)."""
    if impl == ("cpp", "cpu"):
        v = [torch.arange(-600.0, 600.0, dtype=torch.float64).reshape(40, 30)]
        theta = [torch.full((40, 30), 3.0, dtype=torch.float64)]
        got = ops.penalty_hypergrad(v, theta, [], [-2.0], [0, 0, 0], [0, 1, 0], [1, 40, 1200], 0.5)
        want = torch.cat([ops.penalty_segment_dot(-2.0 * v[0], theta[0], 1, "l2"),
                          ops.penalty_segment_dot(-2.0 * v[0], theta[0], 40, "l1"),
                          ops.penalty_segment_dot(-2.0 * v[0], theta[0], 1200, "l2")])
        assert torch.equal(got, want)
        return
    if impl == ("cpp", "cuda"):
        v = [torch.arange(-600.0, 600.0, dtype=torch.float64).reshape(40, 30).repeat(30, 1)]
        theta = [torch.full((1200, 30), 3.0, dtype=torch.float64)]
        segments = [[0, 0, 0, 0], [0, 1, 2, 0], [1, 40, 1, 36000]]
    else:
        v = [torch.arange(-600.0, 600.0, dtype=torch.float64).reshape(40, 30)]
        theta = [torch.full((40, 30), 3.0, dtype=torch.float64)]
        segments = [[0, 0, 0, 0], [0, 1, 0, 2], [1, 40, 1200, 40]]
    want = ops.penalty_hypergrad(v, theta, [], [-2.0], *segments, 0.5)
    got = hypergrad(impl)([v[0].to(impl[1])], [theta[0].to(impl[1])], [], [-2.0], *segments, 0.5, [])
    assert torch.equal(got.cpu(), want)


def _many(count, high, seed, extra=()):
    g = torch.Generator().manual_seed(seed)
    return [(int(n),) for n in torch.randint(1, high, (count,), generator=g)] + list(extra)


# (shapes, args seed, dtypes, all_kinds_below) per implementation.
MANY = {("cpp", "cpu"): (_many(500, 200, 5), 6, (torch.float32,), math.inf),
        ("cpp", "cuda"): (_many(500, 300, 3, [(70000,)]), 4, (torch.float32, torch.float64), math.inf),
        "triton": (_many(200, 200, 5), 6, (torch.float32,), 0)}
MANY_PARAMS = [pytest.param(p.values[0], d, id=f"{p.id}-{dtype_id(d)}", marks=p.marks)
               for p in IMPLS for d in table(MANY, p.values[0])[2]]


@pytest.mark.parametrize("impl, dtype", MANY_PARAMS)
def test_hundreds_of_small_tensors(impl, dtype):
    """CPU and Triton: close to the twin (Triton also to the CPU op); CUDA: to the CPU op."""
    shapes, seed, _, all_kinds_below = table(MANY, impl)
    args = make_args(impl, shapes, dtype, seed=seed, all_kinds_below=all_kinds_below)
    got = hypergrad(impl)(*args)
    if impl == ("cpp", "cuda"):
        torch.testing.assert_close(got.cpu(), ops.penalty_hypergrad(*on_cpu(args)),
                                   rtol=1e-12 if dtype == torch.float64 else 2.0 ** -21, atol=1e-12)
        return
    torch.testing.assert_close(got, reference.penalty_hypergrad(*args), **TOL["hypergrad"][dtype])
    if impl[0] == "triton" and HAS_EXT:
        assert_matches_cpu_op(got.cpu(), ops.penalty_hypergrad(*on_cpu(args)), dtype)


DETERMINISM = [pytest.param(p.values[0], d, id=f"{p.id}-{dtype_id(d)}", marks=p.marks) for p in IMPLS
               for d in ((torch.float32, torch.float64) if p.values[0] == ("cpp", "cuda") else (torch.float32,))]


@pytest.mark.parametrize("impl, dtype", DETERMINISM)
def test_deterministic(impl, dtype):
    """The same bits on every run. CPU: for any thread count. Triton: fixed tiles, no atomics (stage 2
    included: groups > CHUNK), penalty_segment_dot too. CUDA: also from another stream while the GPU
    is busy with other work."""
    if impl == ("cpp", "cpu"):
        args = make_args(impl, [(500_003,), (70, 9000)], dtype, seed=7)
        before = torch.get_num_threads()
        try:
            out = []
            for threads in (1, 2, 1):
                torch.set_num_threads(threads)
                out.append(ops.penalty_hypergrad(*args))
        finally:
            torch.set_num_threads(before)
        assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    elif impl[0] == "triton":
        T = op_namespace("triton")
        args = make_args(impl, [(65537,), (3, 20000), (33, 31)], dtype, seed=7, all_kinds_below=0)
        first = T.penalty_hypergrad(*args)
        assert torch.equal(first, T.penalty_hypergrad(*args))
        u, theta = args[0][0], args[1][0]
        a = T.penalty_segment_dot(u, theta, 1, "l2")
        assert torch.equal(a, T.penalty_segment_dot(u, theta, 1, "l2"))
    else:
        args = make_args(impl, [(3 * 200_003,), (1000, 70), (7,)], dtype, seed=1)
        a, b = torch.randn(4096, 4096, device="cuda"), torch.randn(4096, 4096, device="cuda")
        side = torch.cuda.Stream()
        runs = [ops.penalty_hypergrad(*args) for _ in range(3)]
        side.wait_stream(torch.cuda.current_stream())
        busy = a @ b
        with torch.cuda.stream(side):
            runs.append(ops.penalty_hypergrad(*args))
        torch.cuda.synchronize()
        del busy
        assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    op = hypergrad(impl).default
    if impl == ("cpp", "cpu"):
        torch.library.opcheck(op, tuple(make_args(impl, [(7, 3), (5,)], torch.float64)))
        return
    shapes = [(7, 3), (5,), (3, 8193)] if impl[1] == "cuda" and impl[0] == "cpp" else [(7, 3), (5,)]
    for dtype in (torch.float64, torch.float32):
        torch.library.opcheck(op, tuple(make_args(impl, shapes, dtype)))
    if impl[0] == "triton":
        torch.library.opcheck(op, ([], [], [], [], [], [], [], 0.1, []))


def _set(k, make_value):
    return lambda a: a.__setitem__(k, make_value(a))


# (dtype of the [(7, 3), (5,)] problem or the [(4, 3), (3,)] one on CUDA, mutation, message).
ERRORS = {
    ("cpp", "cpu"): [
        (_set(0, lambda a: a[0][:-1]), "but 1 v"),
        (_set(3, lambda a: [1.0]), "jac_scalar must have one value per theta"),
        (_set(4, lambda a: [0, 5] + a[4][2:]), "names tensor 5 of 2"),
        (_set(5, lambda a: [7] + a[5][1:]), "has kind 7"),
        (_set(6, lambda a: [4] + a[6][1:]), "4 groups do not divide the 21 elements"),
        (_set(1, lambda a: [a[1][0].float(), a[1][1]]), "must both be"),
        (_set(0, lambda a: [a[0][0].t().contiguous().t(), a[0][1]]), "must be contiguous"),
    ],
    ("cpp", "cuda"): [
        (_set(0, lambda a: a[0][:-1]), "got 2 theta but 1 v"),
        (_set(1, lambda a: [a[1][0], a[1][1].cpu()]), r"the CUDA kernel got v\[1\] on cuda:0 and theta\[1\] on cpu"),
        (_set(0, lambda a: [a[0][0].double(), a[0][1]]), r"v\[0\] and theta\[0\] must both be Float"),
        (_set(1, lambda a: [a[1][0].t().contiguous().t(), a[1][1]]), "must be contiguous"),
        (_set(5, lambda a: [7] * len(a[5])), "has kind 7"),
        (_set(6, lambda a: [5] * len(a[6])), "5 groups do not divide the 12 elements"),
        (_set(2, lambda a: [a[2][0][:2], a[2][1]]), r"jac\[0\] must be a contiguous Float tensor"),
    ],
    "triton": [
        (_set(0, lambda a: a[0][:-1]), "but 1 v"),
        (_set(2, lambda a: a[2][:1]), "jac must be empty or have one tensor per theta"),
        (_set(3, lambda a: [1.0]), "jac_scalar must have one value per theta"),
        (_set(4, lambda a: [0, 5] + a[4][2:]), "names tensor 5 of 2"),
        (_set(5, lambda a: [7] + a[5][1:]), "has kind 7"),
        (_set(6, lambda a: [4] + a[6][1:]), "4 groups do not divide the 21 elements"),
        (_set(6, lambda a: a[6][:-1]), "must have one entry per segment"),
        (_set(1, lambda a: [a[1][0].float(), a[1][1]]), "must both be"),
        (_set(0, lambda a: [a[0][0].t().contiguous().t(), a[0][1]]), "must be contiguous"),
        (_set(2, lambda a: [a[2][0][:, :2], a[2][1]]), r"jac\[0\] must be a contiguous"),
        (_set(1, lambda a: [t.half() for t in a[1]]), "compute dtype"),
    ],
}
ERROR_PARAMS = [pytest.param(p.values[0], mutate, match, id=f"{p.id}-{k}", marks=p.marks)
                for p in IMPLS for k, (mutate, match) in enumerate(table(ERRORS, p.values[0]))]


@pytest.mark.parametrize("impl, mutate, match", ERROR_PARAMS)
def test_clear_errors(impl, mutate, match):
    if impl == ("cpp", "cuda"):
        args = make_args(impl, [(4, 3), (3,)], torch.float32)
    else:
        args = make_args(impl, [(7, 3), (5,)], torch.float64)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        hypergrad(impl)(*args)
