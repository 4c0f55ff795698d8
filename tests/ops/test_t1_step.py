"""The fused T1 step (t1_step_) of every backend against its reference twin: torch.ops.t1t2 on CPU
("cpp-cpu") and its CUDA kernels ("cpp-cuda", skipped without a GPU), and torch.ops.t1t2_triton
("triton-cuda" on a GPU, "triton-cpu" under TRITON_INTERPRET=1 without one, sizes kept small: the
interpreter is slow). Parity per dtype, optimizer, stash and penalty granularity, many tensors in one
call, determinism, opcheck and input errors."""
import pytest
import torch

from t1t2_fast import ops, reference

from conftest import (CAN_TRITON, DTYPES, HAS_GPU, T1_COMPUTE_ULPS, TOL, dtype_id, needs_cuda_kernels, needs_ext,
                      op_backends, op_namespace)
from launches import LaunchCounter
from problems import MUTATED, OPTIMIZERS, assert_t1_parity, make_problem, moved

if CAN_TRITON:
    from t1t2_fast.triton_kernels import t1_step as triton_t1_step

# Masked-off lanes of adam's Jacobian divide 0 by 0 before the select drops them; numpy says so.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

IMPLS = op_backends("cpp", "triton")
# 1-D sizes of docs/design.md, a 2-D shape, and empty tensors.
SHAPES = [(1,), (7,), (1023,), (1025,), (65537,), (33, 31), (0,), (4, 0)]


def step_op(impl):
    return op_namespace(impl[0]).t1_step_


def check(impl, args, dtype, baseline=reference.t1_step_):
    """assert_t1_parity with the bounds of this implementation: float64 to rounding on CPU and for
    Triton; the CUDA op's float64 results (FMA contraction) by the low-precision rule with 32 ulps."""
    backend, device = impl
    cuda_op = impl == ("cpp", "cuda")
    return assert_t1_parity(step_op(impl), args, dtype, device, baseline=baseline,
                            compute_ulps=T1_COMPUTE_ULPS[device],
                            float64_tol=None if cuda_op else TOL["t1_step"][torch.float64])


@pytest.mark.parametrize("stash", [False, True])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(impl, dtype, opt_name, stash):
    """Every in-place result (θ, optimizer state, stash) within the bounds of check(); the stash holds
    the pre-step θ exactly."""
    check(impl, make_problem(SHAPES, dtype, OPTIMIZERS[opt_name], stash), dtype)


# The CUDA op against the CPU op in float64; the Triton op against the CPU op in every dtype.
AGAINST_CPU = [pytest.param(p.values[0], d, id=f"{p.id}-{dtype_id(d)}", marks=[*p.marks, needs_ext])
               for p in op_backends("cpp", "triton") if p.values[0] != ("cpp", "cpu")
               for d in ((torch.float64,) if p.values[0][0] == "cpp" else DTYPES)]


@pytest.mark.parametrize("impl, dtype", AGAINST_CPU)
def test_matches_the_cpu_op(impl, dtype):
    shapes = SHAPES if impl[0] == "cpp" else SHAPES[:4]
    for opt in OPTIMIZERS.values():
        args = make_problem(shapes, dtype, opt, True, seed=7)
        if impl[0] == "cpp":  # the CUDA op: float64 to rounding
            assert_t1_parity(step_op(impl), args, dtype, impl[1], baseline=ops.t1_step_,
                             float64_tol=TOL["t1_step"][torch.float64])
        else:
            check(impl, args, dtype, baseline=ops.t1_step_)


# One big tensor per implementation on top of the small ones: above a tile on CPU and in the
# interpreter, several blocks' worth on a GPU.
BIG = {("cpp", "cpu"): (5000, 3), ("cpp", "cuda"): (40000, 3), ("triton", "cpu"): (5000, 3),
       ("triton", "cuda"): (5000, 3)}


@pytest.mark.parametrize("l2, l1, decay", [(None, None, None), ("layer", None, None), (None, "element", None),
                                           (None, None, "unit"), ("unit", "layer", "layer"),
                                           ("element", "unit", "layer")])
@pytest.mark.parametrize("impl", IMPLS)
def test_penalty_granularities(impl, l2, l1, decay):
    for opt in OPTIMIZERS.values():
        check(impl, make_problem([(16, 9), (9,), (3, 4, 5), BIG[impl]], torch.float64, opt, True, l2=l2, l1=l1,
                                 decay=decay), torch.float64)


def _many_shapes(count, high, extra):
    g = torch.Generator().manual_seed(3)
    return [(int(n),) for n in torch.randint(1, high, (count,), generator=g)] + extra


# (shapes, dtypes) per implementation: the interpreter gets fewer tensors.
MANY = {("cpp", "cpu"): (_many_shapes(500, 300, []), (torch.float32,)),
        ("cpp", "cuda"): (_many_shapes(500, 300, [(70000,)]), (torch.float32, torch.bfloat16)),
        ("triton", "cpu"): (_many_shapes(200, 300, [(0,), (9000,)]), (torch.float32,)),
        ("triton", "cuda"): (_many_shapes(200, 300, [(0,), (9000,)]), (torch.float32,))}
MANY_PARAMS = [pytest.param(p.values[0], d, id=f"{p.id}-{dtype_id(d)}", marks=p.marks)
               for p in IMPLS for d in MANY[p.values[0]][1]]


@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
@pytest.mark.parametrize("impl, dtype", MANY_PARAMS)
def test_hundreds_of_small_tensors_in_one_call(impl, dtype, opt_name, monkeypatch):
    """Parity on hundreds of tensors in one call; the Triton op also launches its kernel once."""
    args = make_problem(MANY[impl][0], dtype, OPTIMIZERS[opt_name], True, seed=4)
    if impl[0] != "triton":
        check(impl, args, dtype)
        return
    step_op(impl)(*moved(args, impl[1]))  # on a GPU: tune first, so that only the call below is counted
    counter = LaunchCounter(triton_t1_step.KERNELS.table_kernel)
    monkeypatch.setattr(triton_t1_step.KERNELS, "table_kernel", counter)
    check(impl, args, dtype)
    assert counter.launches == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_unaligned_tensors(impl):
    """Views 4 bytes past an aligned address: the kernel must not promise aligned pointers then."""
    args = make_problem([(1000,), (37,)], torch.float32, OPTIMIZERS["adam"], True)
    for k in (0, 1, 2, 3):
        args[k] = [torch.cat([t.new_zeros(1), t])[1:] for t in args[k]]
    assert args[0][0].data_ptr() % 16 != 0
    check(impl, args, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_adam_jacobian_limit_where_s_is_zero(impl):
    """ĝ = 0 on zero moments gives ŝ = 0: the second term of D is taken as its limit 0, not NaN."""
    args = make_problem([(5,)], torch.float32, OPTIMIZERS["adam"], True, l2=None, l1=None, decay=None)
    for k in (1, 2, 3):
        args[k][0].zero_()
    ours = moved(args, impl[1])
    step_op(impl)(*ours)
    jac = ours[8][0].cpu()
    assert torch.isfinite(jac).all()
    torch.testing.assert_close(jac, torch.full_like(jac, -0.05 * (1 - 0.9) / args[16][0] / 1e-8), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
def test_without_tensors_is_a_no_op(impl, opt_name, monkeypatch):
    """No tensors (a parameter group with nothing in it): the op returns nothing, launches no kernel,
    and its guard, asked to scan, finds nothing non-finite: found_inf stays 0 and the GradScaler's
    scale is untouched (a set flag would make T1T2 skip the step)."""
    opt = OPTIMIZERS[opt_name]
    found_inf = torch.zeros(1, device=impl[1])
    scale = torch.full((1,), 1024.0, device=impl[1])
    counters = []
    if impl[0] == "triton":
        for kernels in (triton_t1_step.KERNELS, triton_t1_step.SCAN):
            counters.append(LaunchCounter(kernels.table_kernel))
            monkeypatch.setattr(kernels, "table_kernel", counters[-1])
    out = step_op(impl)([], [], [], [], [], [], [], [], [], opt["optimizer"], 0.1, opt.get("momentum", 0.0), False,
                        0.9, 0.999, 1e-8, [], [], scale, found_inf, True)
    assert out is None
    assert float(found_inf) == 0.0 and float(scale) == 1024.0
    assert all(c.launches == 0 for c in counters)


@pytest.mark.parametrize("impl", [p for p in IMPLS if p.values[0][0] == "cpp"])
def test_deterministic(impl):
    """The same bits on every run: on CPU for any thread count, on a GPU run after run."""
    args = make_problem([(300_001,), (1000, 70)], torch.float32, OPTIMIZERS["adam"], True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            a = moved(args, impl[1])
            ops.t1_step_(*a)
            results.append(a)
    finally:
        torch.set_num_threads(before)
    for k in MUTATED:
        assert all(torch.equal(x, y) for x, y in zip(results[0][k], results[1][k]))


@needs_cuda_kernels
def test_cuda_op_runs_on_the_current_stream():
    """Enqueued on the caller's stream: on a side stream held up by a sleep kernel, the step must
    wait for the copy that fills its parameters (on any other stream it would run first and the
    copy would then overwrite its result)."""
    args = make_problem([(1 << 20,)], torch.float32, OPTIMIZERS["momentum"], False)
    want = moved(args, "cuda")
    ops.t1_step_(*want)
    ours = moved(args, "cuda")
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


# What opcheck runs per backend. Triton: the interpreter cannot trace (wrap_triton hands back the
# interpreted kernel), so AOT dispatch is checked on a GPU only; test_faketensor runs the op body on
# FakeTensors, which skips the launch.
OPCHECK = {"cpp": (("test_schema", "test_faketensor"), (True,)),
           "triton": (("test_schema", "test_autograd_registration", "test_faketensor")
                      + (("test_aot_dispatch_dynamic",) if HAS_GPU else ()), (False, True))}


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    utils, stashes = OPCHECK[impl[0]]
    for opt in OPTIMIZERS.values():
        for stash in stashes:
            args = moved(make_problem([(7, 3), (5,)], torch.float32, opt, stash), impl[1])
            torch.library.opcheck(step_op(impl).default, tuple(args), test_utils=utils)


def _set(k, make):
    return lambda a: a.__setitem__(k, make(a))


# (mutation of a momentum problem on [(4, 3), (3,)], message) per implementation: the compiled op
# names dtypes as c10 does (Double), the Triton op as torch does (torch.float64) after its op name.
ERRORS = {
    ("cpp", "cpu"): [
        (_set(0, lambda a: [a[0][0].t(), *a[0][1:]]), "must be contiguous"),
        (_set(1, lambda a: a[1][:-1]), "but 1 grads"),
        (_set(2, lambda a: [a[2][0].double(), *a[2][1:]]), r"state1\[0\] has dtype Double, expected Float"),
        (_set(4, lambda a: [torch.ones(5), torch.ones(2)]), r"l2\[0\] has 5 coefficients"),
        (_set(9, lambda a: "rmsprop"), "unknown optimizer 'rmsprop'"),
    ],
    ("cpp", "cuda"): [
        (_set(0, lambda a: [a[0][0].t(), *a[0][1:]]), "must be contiguous"),
        (_set(1, lambda a: a[1][:-1]), "but 1 grads"),
        (_set(2, lambda a: [a[2][0].double(), *a[2][1:]]), r"state1\[0\] has dtype Double, expected Float"),
        (_set(4, lambda a: [torch.ones(5, device="cuda"), torch.ones(2, device="cuda")]),
         r"l2\[0\] has 5 coefficients"),
        (_set(1, lambda a: [a[1][0].cpu(), *a[1][1:]]), r"grads\[0\] is Float on cpu, expected Float on cuda"),
        (_set(0, lambda a: [a[0][0], a[0][1].cpu()]), r"params\[1\] is on cpu but params\[0\] on cuda"),
        (_set(2, lambda a: [a[2][0], a[2][1].cpu()]), r"state1\[1\] is on cpu but params\[1\] on cuda"),
        (_set(9, lambda a: "rmsprop"), "unknown optimizer 'rmsprop'"),
    ],
    "triton": [
        (_set(0, lambda a: [a[0][0].t(), *a[0][1:]]), r"params\[0\] must be contiguous"),
        (_set(1, lambda a: a[1][:-1]), "got 2 params but 1 grads"),
        (_set(2, lambda a: [a[2][0].double(), *a[2][1:]]),
         r"state1\[0\] has dtype torch.float64, expected torch.float32"),
        (_set(4, lambda a: [torch.ones(5), torch.ones(2)]), r"l2\[0\] has 5 coefficients"),
        (_set(9, lambda a: "rmsprop"), "unknown optimizer 'rmsprop'"),
        (_set(0, lambda a: [a[0][0], a[0][1].double()]), r"params\[1\] has dtype torch.float64"),
        (_set(0, lambda a: [a[0][0], a[0][1].to("meta")]), r"params\[1\] is on meta"),
        (_set(8, lambda a: [torch.empty(12), torch.empty(3)]), "stash_jac is only written by adam"),
    ],
}
ERROR_PARAMS = [pytest.param(p.values[0], mutate, match, id=f"{p.id}-{k}", marks=p.marks)
                for p in IMPLS
                for k, (mutate, match) in enumerate(ERRORS["triton" if p.values[0][0] == "triton" else p.values[0]])]


@pytest.mark.parametrize("impl, mutate, match", ERROR_PARAMS)
def test_clear_errors(impl, mutate, match):
    """A bad argument raises a RuntimeError that names it; the Triton op prefixes its name and checks
    everything before it writes anything."""
    args = make_problem([(4, 3), (3,)], torch.float32, OPTIMIZERS["momentum"], False)
    if impl == ("cpp", "cuda"):
        args = moved(args, "cuda")
    params, before = list(args[0]), [p.clone() for p in args[0]]
    mutate(args)
    prefix = "t1t2_triton::t1_step_: " if impl[0] == "triton" else ""
    with pytest.raises(RuntimeError, match=prefix + match):
        step_op(impl)(*args)
    if impl[0] == "triton":
        assert all(torch.equal(p, b) for p, b in zip(params, before))

