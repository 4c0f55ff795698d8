"""GPU parity of the CUDA ops (csrc/cuda) with their reference twins and the CPU ops, determinism,
opcheck and input errors. Skips without a CUDA device; fails if a GPU is present but the extension
was built without its CUDA kernels."""
import pytest
import torch

from t1t2_fast import _extension, reference

if not torch.cuda.is_available():
    pytest.skip("no CUDA device (torch.cuda.is_available() is False); the CUDA sources are compile-checked "
                "in tests/test_cuda_compile.py", allow_module_level=True)
if not _extension.AVAILABLE:
    pytest.skip(f"compiled extension not available ({_extension.LOAD_ERROR}); build it with "
                f"`T1T2_CUDA=1 pip install --no-build-isolation -e .`", allow_module_level=True)

from t1t2_fast import ops  # noqa: E402
from problems import MUTATED, OPTIMIZERS, make_problem  # noqa: E402

CUDA = torch.device("cuda")
OPS = ("penalty_segment_dot", "t1_step_", "penalty_hypergrad", "perturb_", "restore_")


def has_cuda_kernel(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"t1t2::{op}", "CUDA")


needs_cuda_kernels = pytest.mark.skipif(not all(has_cuda_kernel(op) for op in OPS),
                                        reason="extension built without CUDA kernels (see test_cuda_kernels_built)")


def test_cuda_kernels_built():
    missing = [op for op in OPS if not has_cuda_kernel(op)]
    assert not missing, (f"torch.ops.t1t2 has no CUDA kernel for {missing}: rebuild with "
                         f"`T1T2_CUDA=1 pip install --no-build-isolation -e .` (needs nvcc and a CUDA torch)")


# ------------------------------------------------------------------------------------------------
# penalty_segment_dot
# ------------------------------------------------------------------------------------------------

KINDS = ["l2", "l1"]
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
# 1-D sizes of DESIGN.md §5, then shapes whose rows give per-unit groups on every kernel path: warp
# per group (inner ≤ 2048), one tile per group (≤ 8192), several tiles with a ragged last one.
SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (65537,), (0, 5), (33, 31), (5, 2048), (5, 2049), (4, 8192),
          (3, 8193), (3, 16385), (2, 65537), (1000, 7)]


def groupings(shape):
    numel = torch.Size(shape).numel()
    return [0, 1] if numel == 0 else sorted({1, shape[0], numel})


def inputs(shape, dtype, seed=0, device=CUDA):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    theta = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return u.to(device), theta.to(device)


@needs_cuda_kernels
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, *LOW_PRECISION], ids=lambda d: str(d).removeprefix("torch."))
def test_segment_dot_matches_reference(dtype, shape, kind):
    """Both accumulate in double: the CUDA result is within reordering error of the float64 sum of
    the same (rounded) inputs, plus one float32 ulp of the output for low-precision inputs."""
    u, theta = inputs(shape, dtype)
    for num_groups in groupings(shape):
        got = ops.penalty_segment_dot(u, theta, num_groups, kind)
        exact = reference.penalty_segment_dot(u.cpu().double(), theta.cpu().double(), num_groups, kind)
        assert got.device == u.device and got.shape == (num_groups,)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        inner = u.numel() // num_groups if num_groups else 0
        magnitude = reference.penalty_segment_dot(u.cpu().double().abs(), theta.cpu().double().abs(), num_groups,
                                                  kind) if num_groups else exact
        ulp = 0.0 if dtype == torch.float64 else 2.0 ** -23
        err = (got.cpu().double() - exact).abs()
        bound = 1e-13 * magnitude + ulp * exact.abs()
        assert bool((err <= bound).all()), (num_groups, inner, (err - bound).max().item())
        if inner == 1:  # one product per output: the same double product and cast as the CPU op
            assert torch.equal(got.cpu(), ops.penalty_segment_dot(u.cpu(), theta.cpu(), num_groups, kind))


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_segment_dot_matches_the_cpu_op(dtype):
    u, theta = inputs((7, 30001), dtype, seed=5)
    for kind in KINDS:
        for g in (1, 7, 7 * 30001):
            torch.testing.assert_close(ops.penalty_segment_dot(u, theta, g, kind).cpu(),
                                       ops.penalty_segment_dot(u.cpu(), theta.cpu(), g, kind),
                                       rtol=1e-12 if dtype == torch.float64 else 2.0 ** -22, atol=1e-12)


@needs_cuda_kernels
def test_segment_dot_float64_is_exact_on_integers():
    u = torch.arange(-500, 525, dtype=torch.float64, device=CUDA).repeat(40)
    theta = torch.full_like(u, 3.0)
    assert ops.penalty_segment_dot(u, theta, 1, "l2").item() == 6.0 * float(u.sum())
    assert ops.penalty_segment_dot(u, theta, 1, "l1").item() == float(u.sum())


@needs_cuda_kernels
@pytest.mark.parametrize("kind", KINDS)
def test_segment_dot_special_values(kind):
    special = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-300, -2.5]
    theta = torch.tensor(special * len(special), dtype=torch.float64)
    u = torch.tensor(special, dtype=torch.float64).repeat_interleave(len(special))
    for num_groups in (len(special), len(special) ** 2):
        torch.testing.assert_close(ops.penalty_segment_dot(u.to(CUDA), theta.to(CUDA), num_groups, kind).cpu(),
                                   reference.penalty_segment_dot(u, theta, num_groups, kind), equal_nan=True)


@needs_cuda_kernels
def test_segment_dot_non_contiguous_inputs():
    u = torch.randn(96, 64, dtype=torch.float64, device=CUDA).t()
    theta = torch.randn(64, 192, dtype=torch.float64, device=CUDA)[:, ::2]
    assert not u.is_contiguous() and not theta.is_contiguous()
    for kind in KINDS:
        for g in (1, 64, 64 * 96):
            torch.testing.assert_close(ops.penalty_segment_dot(u, theta, g, kind).cpu(),
                                       reference.penalty_segment_dot(u.cpu(), theta.cpu(), g, kind),
                                       rtol=1e-12, atol=1e-12)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_segment_dot_is_deterministic(dtype):
    """The same bits on every run, also from another stream while the GPU is busy with other work
    (the partition of the sum does not depend on how many blocks run at once)."""
    u, theta = inputs((3 * 200_003,), dtype, seed=1)
    a, b = torch.randn(4096, 4096, device=CUDA), torch.randn(4096, 4096, device=CUDA)
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


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_segment_dot_opcheck(dtype):
    for shape, g in [((0,), 0), ((0,), 1), ((7,), 7), ((1025,), 5), ((4096,), 1), ((3, 16385), 3)]:
        u, theta = inputs(shape, dtype)
        for kind in KINDS:
            torch.library.opcheck(torch.ops.t1t2.penalty_segment_dot.default, (u, theta, g, kind))


@needs_cuda_kernels
@pytest.mark.parametrize("make_args, match", [
    (lambda: (torch.randn(4), torch.randn(4, device=CUDA), 1, "l2"), "u is on cpu but theta is on cuda"),
    (lambda: (torch.randn(4, device=CUDA), torch.randn(4, device=CUDA, dtype=torch.float64), 1, "l2"),
     "u has dtype Float but theta has dtype Double"),
    (lambda: (torch.randn(6, device=CUDA), torch.randn(6, device=CUDA), 4, "l2"),
     "num_groups=4 does not divide numel=6"),
    (lambda: (torch.randn(6, device=CUDA), torch.randn(6, device=CUDA), 1, "l3"), "unknown kind 'l3'"),
], ids=["device", "dtype", "groups", "kind"])
def test_segment_dot_clear_errors(make_args, match):
    with pytest.raises(RuntimeError, match=match):
        ops.penalty_segment_dot(*make_args())


# ------------------------------------------------------------------------------------------------
# t1_step_ (argument list: the schema in csrc/ops.cpp)
# ------------------------------------------------------------------------------------------------

T1_SHAPES = [(1,), (7,), (1023,), (1025,), (65537,), (33, 31), (0,), (4, 0)]


def is_tensor_list(a):
    return isinstance(a, list) and a and isinstance(a[0], torch.Tensor)


def moved(args, device=None, dtype=None):
    """Copies of the tensor arguments (on device, in dtype): t1_step_ updates its arguments in place."""
    return [[t.to(device=device or t.device, dtype=dtype or t.dtype, copy=True) for t in a] if is_tensor_list(a)
            else a for a in args]


def assert_parity(args, dtype):
    """As in STYLE.md and tests/test_t1_step.py: the CUDA error against a float64 run of the reference
    is at most twice the error of the reference itself run in the same dtype (zero for float64), plus
    a few ulps of the array's scale. Compute-type arrays (state, stash; float32 or float64) get 32
    ulps: adam's Jacobian a/(√ŝ+ε) − second term cancels, and the kernel contracts into FMA where the
    reference rounds every step; storage arrays in bfloat16/float16 only see rounding flips."""
    ours = moved(args, CUDA)
    ops.t1_step_(*ours)
    gold = moved(args, dtype=torch.float64)
    reference.t1_step_(*gold)
    same = moved(args)
    reference.t1_step_(*same)
    for k in MUTATED:
        for i, (a, b, want) in enumerate(zip(ours[k], same[k], gold[k])):
            if want.numel() == 0:
                continue
            a = a.cpu()
            err_ours = (a.double() - want).abs().max().item()
            err_ref = (b.double() - want).abs().max().item()
            ulps = 32 if a.dtype in (torch.float32, torch.float64) else 4
            bound = 2 * err_ref + ulps * torch.finfo(a.dtype).eps * want.abs().max().item()
            assert err_ours <= bound, (k, i, err_ours, err_ref, bound)
    return ours


@needs_cuda_kernels
@pytest.mark.parametrize("stash", [False, True])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float64, *LOW_PRECISION], ids=lambda d: str(d).removeprefix("torch."))
def test_t1_step_matches_reference(dtype, opt_name, stash):
    args = make_problem(T1_SHAPES, dtype, OPTIMIZERS[opt_name], stash)
    ours = assert_parity(args, dtype)
    if stash:  # the stash holds the pre-step θ exactly
        for before, stashed in zip(args[0], ours[7]):
            assert torch.equal(stashed.cpu(), before.to(stashed.dtype))


@needs_cuda_kernels
@pytest.mark.parametrize("l2, l1, decay", [(None, None, None), ("layer", None, None), (None, "element", None),
                                           (None, None, "unit"), ("unit", "layer", "layer")])
def test_t1_step_penalty_granularities(l2, l1, decay):
    for opt in OPTIMIZERS.values():
        assert_parity(make_problem([(16, 9), (9,), (3, 4, 5), (40000, 3)], torch.float64, opt, True, l2=l2, l1=l1,
                                   decay=decay), torch.float64)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_t1_step_hundreds_of_small_tensors_in_one_call(dtype):
    g = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 300, (500,), generator=g)] + [(70000,)]
    for opt in ("momentum", "adam"):
        assert_parity(make_problem(shapes, dtype, OPTIMIZERS[opt], True, seed=4), dtype)


@needs_cuda_kernels
def test_t1_step_matches_the_cpu_op():
    for opt in OPTIMIZERS.values():
        args = make_problem(T1_SHAPES, torch.float64, opt, True, seed=7)
        ours, cpu = moved(args, CUDA), moved(args)
        ops.t1_step_(*ours)
        ops.t1_step_(*cpu)
        for k in MUTATED:
            for a, b in zip(ours[k], cpu[k]):
                torch.testing.assert_close(a.cpu(), b, atol=1e-13, rtol=1e-12)


@needs_cuda_kernels
def test_t1_step_adam_jacobian_limit_where_s_is_zero():
    """ĝ = 0 on zero moments gives ŝ = 0: the second term of D is taken as its limit 0, not NaN."""
    args = make_problem([(5,)], torch.float32, OPTIMIZERS["adam"], True, l2=None, l1=None, decay=None)
    args[1][0].zero_()
    args[2][0].zero_()
    args[3][0].zero_()
    ours = moved(args, CUDA)
    ops.t1_step_(*ours)
    jac = ours[8][0].cpu()
    assert torch.isfinite(jac).all()
    torch.testing.assert_close(jac, torch.full_like(jac, -0.05 * (1 - 0.9) / args[16][0] / 1e-8), rtol=1e-6, atol=0)


@needs_cuda_kernels
def test_t1_step_is_deterministic():
    args = make_problem([(300_001,), (1000, 70)], torch.float32, OPTIMIZERS["adam"], True)
    results = []
    for _ in range(2):
        a = moved(args, CUDA)
        ops.t1_step_(*a)
        results.append(a)
    for k in MUTATED:
        assert all(torch.equal(x, y) for x, y in zip(results[0][k], results[1][k]))


@needs_cuda_kernels
def test_t1_step_runs_on_the_current_stream():
    """Enqueued on the caller's stream: on a side stream held up by a sleep kernel, the step must
    wait for the copy that fills its parameters (on any other stream it would run first and the
    copy would then overwrite its result)."""
    args = make_problem([(1 << 20,)], torch.float32, OPTIMIZERS["momentum"], False)
    want = moved(args, CUDA)
    ops.t1_step_(*want)
    ours = moved(args, CUDA)
    source = ours[0][0].clone()
    ours[0][0].fill_(float("nan"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # tens of milliseconds
        ours[0][0].copy_(source)
        ops.t1_step_(*ours)
    side.synchronize()
    assert torch.equal(ours[0][0], want[0][0])
    assert torch.equal(ours[2][0], want[2][0])


@needs_cuda_kernels
def test_t1_step_opcheck():
    for opt in OPTIMIZERS.values():
        args = moved(make_problem([(7, 3), (5,)], torch.float32, opt, True), CUDA)
        torch.library.opcheck(torch.ops.t1t2.t1_step_.default, tuple(args),
                              test_utils=("test_schema", "test_faketensor"))


@needs_cuda_kernels
@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.__setitem__(0, [a[0][0].t(), *a[0][1:]]), "must be contiguous"),
    (lambda a: a.__setitem__(1, a[1][:-1]), "but 1 grads"),
    (lambda a: a.__setitem__(2, [a[2][0].double(), *a[2][1:]]), r"state1\[0\] has dtype Double, expected Float"),
    (lambda a: a.__setitem__(4, [torch.ones(5, device=CUDA), torch.ones(2, device=CUDA)]),
     r"l2\[0\] has 5 coefficients"),
    (lambda a: a.__setitem__(1, [a[1][0].cpu(), *a[1][1:]]), r"grads\[0\] is Float on cpu, expected Float on cuda"),
    (lambda a: a.__setitem__(0, [a[0][0], a[0][1].cpu()]), r"params\[1\] is on cpu but params\[0\] on cuda"),
    (lambda a: a.__setitem__(2, [a[2][0], a[2][1].cpu()]), r"state1\[1\] is on cpu but params\[1\] on cuda"),
    (lambda a: a.__setitem__(9, "rmsprop"), "unknown optimizer 'rmsprop'"),
], ids=["contiguous", "grads", "state-dtype", "coefficients", "grad-device", "param-device", "state-device",
        "optimizer"])
def test_t1_step_clear_errors(mutate, match):
    args = moved(make_problem([(4, 3), (3,)], torch.float32, OPTIMIZERS["momentum"], False), CUDA)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.t1_step_(*args)


# ------------------------------------------------------------------------------------------------
# penalty_hypergrad (argument list: the schema in csrc/ops.cpp)
# ------------------------------------------------------------------------------------------------

# Every kernel path of penalty_hypergrad: one thread per group (inner < 32, and 0), one warp per group
# (≤ 2048), one tile, several tiles with a ragged last one.
HYPERGRAD_SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (65537,), (33, 31), (5, 2048), (3, 8192), (3, 16385),
                    (2, 65537), (1000, 7), (4, 0)]


def hypergrad_args(shapes, dtype, jac_tensors=True, seed=0, lr=0.05, device=CUDA):
    """One penalty_hypergrad call: every tensor with kinds l2, l1, decoupled l2, each per layer, per unit
    and per element; jac tensors on every other tensor (empty ones: jac_scalar)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda s: torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    v = [randn(s) for s in shapes]
    theta = [randn(s) for s in shapes]
    jac = [randn(s) * 0.01 if k % 2 == 0 else torch.empty(0, dtype=dtype, device=device)
           for k, s in enumerate(shapes)]
    jac_scalar = [-lr * (1 + 0.1 * k) for k in range(len(shapes))]
    seg_tensor, seg_kind, seg_groups = [], [], []
    for t, s in enumerate(shapes):
        for kind in (0, 1, 2):
            for groups in sorted(set(groupings(s)) | {s[0]}):  # (4, 0): also four empty groups
                seg_tensor.append(t)
                seg_kind.append(kind)
                seg_groups.append(groups)
    return [v, theta, jac if jac_tensors else [], jac_scalar, seg_tensor, seg_kind, seg_groups, lr]


def on_cpu(args):
    return [[t.cpu() for t in a] if is_tensor_list(a) else a for a in args]


def exact_hypergrad(args):
    """float64 sums of the kernels' terms: u = J·v rounded to the compute dtype (one torch multiply,
    as the kernels form it), then u·m(θ) summed in float64; also Σ|terms| per group."""
    v, theta, jac, jac_scalar, seg_tensor, seg_kind, seg_groups, lr = on_cpu(args)
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


@needs_cuda_kernels
@pytest.mark.parametrize("jac_tensors", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_penalty_hypergrad_matches_reference(dtype, jac_tensors):
    """Within reordering error (plus one float32 ulp of the output) of the float64 sum of the same
    terms, and close to the reference twin and the CPU op."""
    args = hypergrad_args(HYPERGRAD_SHAPES, dtype, jac_tensors)
    got = ops.penalty_hypergrad(*args)
    assert got.device.type == "cuda" and got.dtype == dtype and got.shape == (sum(args[6]),)
    exact, magnitude = exact_hypergrad(args)
    ulp = 0.0 if dtype == torch.float64 else 2.0 ** -23
    err = (got.cpu().double() - exact).abs()
    bound = 1e-12 * magnitude + ulp * exact.abs()
    assert bool((err <= bound).all()), (err - bound).max().item()
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-5)
    torch.testing.assert_close(got.cpu(), reference.penalty_hypergrad(*on_cpu(args)), **tol)
    torch.testing.assert_close(got.cpu(), ops.penalty_hypergrad(*on_cpu(args)),
                               rtol=1e-12 if dtype == torch.float64 else 2.0 ** -21, atol=1e-12)


@needs_cuda_kernels
def test_penalty_hypergrad_float64_is_exact_on_integers():
    v = [torch.arange(-600.0, 600.0, dtype=torch.float64, device=CUDA).reshape(40, 30).repeat(30, 1)]
    theta = [torch.full((1200, 30), 3.0, dtype=torch.float64, device=CUDA)]
    got = ops.penalty_hypergrad(v, theta, [], [-2.0], [0, 0, 0, 0], [0, 1, 2, 0], [1, 40, 1, 36000], 0.5)
    cpu = ops.penalty_hypergrad([v[0].cpu()], [theta[0].cpu()], [], [-2.0], [0, 0, 0, 0], [0, 1, 2, 0],
                                [1, 40, 1, 36000], 0.5)
    assert torch.equal(got.cpu(), cpu)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_penalty_hypergrad_hundreds_of_small_tensors(dtype):
    g = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 300, (500,), generator=g)] + [(70000,)]
    args = hypergrad_args(shapes, dtype, seed=4)
    torch.testing.assert_close(ops.penalty_hypergrad(*args).cpu(), ops.penalty_hypergrad(*on_cpu(args)),
                               rtol=1e-12 if dtype == torch.float64 else 2.0 ** -21, atol=1e-12)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_penalty_hypergrad_is_deterministic(dtype):
    args = hypergrad_args([(3 * 200_003,), (1000, 70), (7,)], dtype, seed=1)
    a, b = torch.randn(4096, 4096, device=CUDA), torch.randn(4096, 4096, device=CUDA)
    side = torch.cuda.Stream()
    runs = [ops.penalty_hypergrad(*args) for _ in range(3)]
    side.wait_stream(torch.cuda.current_stream())
    busy = a @ b
    with torch.cuda.stream(side):
        runs.append(ops.penalty_hypergrad(*args))
    torch.cuda.synchronize()
    del busy
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@needs_cuda_kernels
def test_penalty_hypergrad_opcheck():
    for dtype in (torch.float32, torch.float64):
        args = hypergrad_args([(7, 3), (5,), (3, 8193)], dtype)
        torch.library.opcheck(torch.ops.t1t2.penalty_hypergrad.default, tuple(args))


@needs_cuda_kernels
@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.__setitem__(0, a[0][:-1]), "got 2 theta but 1 v"),
    (lambda a: a.__setitem__(1, [a[1][0], a[1][1].cpu()]),
     r"the CUDA kernel got v\[1\] on cuda:0 and theta\[1\] on cpu"),
    (lambda a: a.__setitem__(0, [a[0][0].double(), a[0][1]]), r"v\[0\] and theta\[0\] must both be Float"),
    (lambda a: a.__setitem__(1, [a[1][0].t().contiguous().t(), a[1][1]]), "must be contiguous"),
    (lambda a: a.__setitem__(5, [7] * len(a[5])), "has kind 7"),
    (lambda a: a.__setitem__(6, [5] * len(a[6])), "5 groups do not divide the 12 elements"),
    (lambda a: a.__setitem__(2, [a[2][0][:2], a[2][1]]), r"jac\[0\] must be a contiguous Float tensor"),
], ids=["count", "device", "dtype", "contiguous", "kind", "groups", "jac"])
def test_penalty_hypergrad_clear_errors(mutate, match):
    args = hypergrad_args([(4, 3), (3,)], torch.float32)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.penalty_hypergrad(*args)


# ------------------------------------------------------------------------------------------------
# perturb_ / restore_
# ------------------------------------------------------------------------------------------------

PERTURB_SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (65537,), (33, 31), (3, 16384)]


def perturb_args(dtype, shapes=PERTURB_SHAPES, seed=0, device=CUDA):
    g = torch.Generator().manual_seed(seed)
    acc = reference.accumulate_dtype(dtype)
    randn = lambda s, dt: torch.randn(s, generator=g, dtype=torch.float64).to(dt).to(device)  # noqa: E731
    params = [randn(s, dtype) for s in shapes]
    return (params, [torch.empty_like(p) for p in params], [randn(s, acc) for s in shapes],
            [randn(s, acc) for s in shapes])


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float64, *LOW_PRECISION], ids=lambda d: str(d).removeprefix("torch."))
def test_perturb_matches_reference_and_restore_is_exact(dtype):
    """base + r·d with the product and the sum rounded in the compute dtype (as torch and the CPU
    kernel compute it), rounded once to θ's dtype: the reference's bits on the GPU; the CPU op
    within one ulp (its compiler may contract into an FMA). restore_ gives θ back bit for bit."""
    params, save, base, direction = perturb_args(dtype)
    original = [p.clone() for p in params]
    ours = [p.clone() for p in params]
    ops.perturb_(ours, save, base, direction, 1e-3)
    want = [p.clone() for p in params]
    reference.perturb_(want, [], base, direction, 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(ours, want))
    assert all(torch.equal(s, o) for s, o in zip(save, original))
    cpu = [p.cpu() for p in params]
    ops.perturb_(cpu, [], [b.cpu() for b in base], [d.cpu() for d in direction], 1e-3)
    for a, b in zip(ours, cpu):
        torch.testing.assert_close(a.cpu(), b, atol=0, rtol=torch.finfo(dtype).eps if dtype != torch.float64 else 1e-15)
    ops.restore_(ours, save)
    assert all(torch.equal(a, o) for a, o in zip(ours, original))


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_perturb_restore_keep_nan_payloads_and_signed_zeros(dtype):
    """save and restore copy bits, not values."""
    bits = torch.tensor([0x7E01, -0x8000, 0x0001, 0x7C00], dtype=torch.int16) if dtype == torch.float16 else \
        torch.tensor([0x7FC00123, -0x80000000, 0x00000001, 0x7F800000], dtype=torch.int32)
    p = bits.to(CUDA).view(dtype)
    original = p.clone()
    save = torch.empty_like(p)
    zeros = torch.zeros(4, device=CUDA)
    ops.perturb_([p], [save], [zeros], [zeros], 1.0)
    assert torch.equal(save.view(bits.dtype), original.view(bits.dtype))
    ops.restore_([p], [save])
    assert torch.equal(p.view(bits.dtype), original.view(bits.dtype))


@needs_cuda_kernels
def test_perturb_hundreds_of_small_tensors_and_no_save():
    g = torch.Generator().manual_seed(1)
    shapes = [(int(n),) for n in torch.randint(1, 100, (500,), generator=g)] + [(40000,)]
    params, _, base, direction = perturb_args(torch.bfloat16, shapes)
    ours = [p.clone() for p in params]
    ops.perturb_(ours, [], base, direction, -0.5)
    reference.perturb_(params, [], base, direction, -0.5)
    assert all(torch.equal(a, b) for a, b in zip(ours, params))


@needs_cuda_kernels
def test_perturb_runs_on_the_current_stream():
    params, save, base, direction = perturb_args(torch.float32, [(1 << 20,)])
    want = [params[0].clone()]
    reference.perturb_(want, [], base, direction, 0.25)
    source = base[0].clone()
    base[0].fill_(float("nan"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        base[0].copy_(source)
        ops.perturb_(params, save, base, direction, 0.25)
    side.synchronize()
    assert torch.equal(params[0], want[0])


@needs_cuda_kernels
def test_perturb_restore_opcheck():
    params, save, base, direction = perturb_args(torch.float32, [(7, 3), (5,)])
    torch.library.opcheck(torch.ops.t1t2.perturb_.default, (params, save, base, direction, 0.25))
    torch.library.opcheck(torch.ops.t1t2.restore_.default, (params, save))


@needs_cuda_kernels
@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.__setitem__(2, a[2][:-1]), "base and"),
    (lambda a: a.__setitem__(2, [a[2][0].double(), a[2][1]]), r"base\[0\] has dtype Double, expected Float"),
    (lambda a: a.__setitem__(0, [a[0][0].t(), a[0][1]]), "must be contiguous"),
    (lambda a: a.__setitem__(1, [a[1][0][:2], a[1][1]]), r"save\[0\] has shape"),
    (lambda a: a.__setitem__(3, [a[3][0].cpu(), a[3][1]]), r"direction\[0\] is on cpu, expected cuda:0"),
    (lambda a: a.__setitem__(0, [a[0][0], a[0][1].half()]), r"params\[1\] has dtype Half but params\[0\] has Float"),
], ids=["count", "dtype", "contiguous", "shape", "device", "param-dtype"])
def test_perturb_clear_errors(mutate, match):
    args = list(perturb_args(torch.float32, [(4, 3), (3,)])) + [0.1]
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.perturb_(*args)


@needs_cuda_kernels
def test_restore_clear_errors():
    params, save, _, _ = perturb_args(torch.float32, [(4, 3), (3,)])
    with pytest.raises(RuntimeError, match="got 2 params but 1 saved"):
        ops.restore_(params, save[:1])
    with pytest.raises(RuntimeError, match=r"save\[1\] has dtype Double, expected Float"):
        ops.restore_(params, [save[0], save[1].double()])
