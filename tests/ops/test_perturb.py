"""The multi-tensor perturb_ / restore_ ops of every backend (torch.ops.t1t2 on CPU and CUDA,
torch.ops.t1t2_triton on a GPU or in the interpreter) against their reference twins: θ + r·d with
the twin's roundings, save and restore bit-exact (NaN payloads, signed zeros, subnormals), many
tensors in one call, opcheck and input errors."""
import pytest
import torch

from t1t2_fast import ops, reference

from conftest import CAN_TRITON, DTYPES, HAS_GPU, TOL, dtype_id, needs_cuda_kernels, needs_ext, op_backends, \
    op_namespace
from launches import LaunchCounter

if CAN_TRITON:
    from t1t2_fast.triton_kernels import perturb as triton_perturb

IMPLS = op_backends("cpp", "triton")
# 1-D sizes of docs/design.md, a 2-D shape, empty tensors; on a GPU also rows of several blocks.
SHAPES = {("cpp", "cpu"): [(0,), (1,), (7,), (1023,), (1025,), (65537,), (33, 31)],
          ("cpp", "cuda"): [(0,), (1,), (7,), (1023,), (1025,), (65537,), (33, 31), (3, 16384)],
          ("triton", "cpu"): [(1,), (7,), (1023,), (1025,), (65537,), (33, 31), (0,), (4, 0)],
          ("triton", "cuda"): [(1,), (7,), (1023,), (1025,), (65537,), (33, 31), (0,), (4, 0)]}


def make(dtype, shapes, seed=0, device="cpu"):
    """params, save buffers, base and direction (in the compute dtype), on device."""
    g = torch.Generator().manual_seed(seed)
    acc = reference.accumulate_dtype(dtype)
    randn = lambda s, dt: torch.randn(s, generator=g, dtype=torch.float64).to(dt).to(device)  # noqa: E731
    params = [randn(s, dtype) for s in shapes]
    return params, [torch.empty_like(p) for p in params], [randn(s, acc) for s in shapes], \
        [randn(s, acc) for s in shapes]


def on(device, tensors):
    return [t.to(device, copy=True) for t in tensors]


def assert_perturbed(impl, ours, want, dtype):
    """Both compute base + r·d in the compute dtype and round once to the storage dtype. The CUDA op
    and the interpreted Triton op give the twin's bits (the twin run on the same device); the CPU op
    and Triton on a GPU may contract into an FMA: within one ulp of the storage dtype."""
    for a, b in zip(ours, want):
        if impl in (("cpp", "cuda"), ("triton", "cpu")):
            assert torch.equal(a, b.to(a.device))
        elif impl == ("cpp", "cpu"):
            torch.testing.assert_close(a, b, atol=0, rtol=TOL["perturb_rtol"][dtype])
        else:
            torch.testing.assert_close(a.cpu(), b.cpu(), atol=0, rtol=torch.finfo(dtype).eps)


def twin(impl, params, base, direction, r):
    """The reference's result: on the op's device for the CUDA op (same bits there), else on CPU."""
    device = impl[1] if impl == ("cpp", "cuda") else "cpu"
    want = on(device, params)
    reference.perturb_(want, [], on(device, base), on(device, direction), r)
    return want


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_perturb_matches_reference_and_restore_is_exact(impl, dtype):
    backend, device = impl
    T = op_namespace(backend)
    params, save, base, direction = make(dtype, SHAPES[impl])
    ours, save = on(device, params), on(device, save)
    T.perturb_(ours, save, on(device, base), on(device, direction), 1e-3)
    assert_perturbed(impl, ours, twin(impl, params, base, direction, 1e-3), dtype)
    assert all(torch.equal(s.cpu(), p) for s, p in zip(save, params))
    T.restore_(ours, save)
    assert all(torch.equal(a.cpu(), p) for a, p in zip(ours, params))


# The CUDA op and the Triton op against the CPU op, with their own inputs.
AGAINST_CPU = [pytest.param(p.values[0], d, id=f"{p.id}-{dtype_id(d)}", marks=[*p.marks, needs_ext])
               for p in IMPLS if p.values[0] != ("cpp", "cpu") for d in DTYPES]


@pytest.mark.parametrize("impl, dtype", AGAINST_CPU)
def test_perturb_matches_the_cpu_op(impl, dtype):
    """Triton: the CPU op's bits in the interpreter, one ulp on a GPU. CUDA: within one ulp (the CPU
    op's compiler may contract into an FMA)."""
    backend, device = impl
    seed, r = (0, 1e-3) if backend == "cpp" else (2, -0.25)
    params, save, base, direction = make(dtype, SHAPES[impl], seed=seed)
    ours = on(device, params)
    op_namespace(backend).perturb_(ours, on(device, save), on(device, base), on(device, direction), r)
    theirs = [p.clone() for p in params]
    ops.perturb_(theirs, [] if backend == "cpp" else save, base, direction, r)
    if backend == "cpp":
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.cpu(), b, atol=0, rtol=TOL["perturb_rtol"][dtype])
    else:
        assert_perturbed(impl, ours, theirs, dtype)


BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
        torch.float64: torch.int64}
# NaN payloads (quiet and signalling), −0, the smallest subnormal, inf-like patterns, all-ones.
SPECIAL = {torch.float32: [0x7FC00001, 0x7F800001, -0x80000000, 1, 0x7F800000, -1, 0x7FC00123],
           torch.bfloat16: [0x7FC1, 0x7F81, -0x8000, 1, 0x7F80, -1],
           torch.float16: [0x7FC1, 0x7F81, -0x8000, 1, 0x7F80, -1, 0x7E01, 0x7C00],
           torch.float64: [0x7FF8000000000001, 0x7FF0000000000001, -0x8000000000000000, 1, 0x7FF0000000000000, -1]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_save_and_restore_move_bits_unchanged(impl, dtype):
    """NaN payloads, signed zeros, subnormals and infinities survive save and restore bit for bit."""
    backend, device = impl
    T = op_namespace(backend)
    bits = BITS[dtype]
    original = torch.tensor(SPECIAL[dtype] * 700, dtype=bits).view(dtype)
    params, save = on(device, [original]), on(device, [torch.empty_like(original)])
    zeros = on(device, [torch.zeros(original.shape, dtype=reference.accumulate_dtype(dtype))])
    T.perturb_(params, save, zeros, zeros, 1.0)
    assert torch.equal(save[0].cpu().view(bits), original.view(bits))
    assert not params[0].cpu().view(bits).equal(original.view(bits))
    T.restore_(params, save)
    assert torch.equal(params[0].cpu().view(bits), original.view(bits))


def _many(count, high, extra=()):
    g = torch.Generator().manual_seed(1)
    return [(int(n),) for n in torch.randint(1, high, (count,), generator=g)] + list(extra)


# (shapes, dtype) per implementation: the interpreter gets fewer tensors.
MANY = {("cpp", "cpu"): (_many(500, 100), torch.float32),
        ("cpp", "cuda"): (_many(500, 100, [(40000,)]), torch.bfloat16),
        ("triton", "cpu"): (_many(200, 100), torch.float32),
        ("triton", "cuda"): (_many(200, 100), torch.float32)}


@pytest.mark.parametrize("impl", IMPLS)
def test_hundreds_of_small_tensors_and_no_save(impl, monkeypatch):
    """Without save buffers, on hundreds of tensors in one call: the twin's result (the CPU and CUDA
    ops bit for bit); the Triton op launches one kernel for perturb_ and one for restore_."""
    backend, device = impl
    T = op_namespace(backend)
    shapes, dtype = MANY[impl]
    params, _, base, direction = make(dtype, shapes)
    ours = on(device, params)
    if backend == "triton":
        T.perturb_(on(device, params), [], on(device, base), on(device, direction), 0.5)  # tunes on a GPU
        counter = LaunchCounter(triton_perturb.KERNELS.table_kernel)
        monkeypatch.setattr(triton_perturb.KERNELS, "table_kernel", counter)
    T.perturb_(ours, [], on(device, base), on(device, direction), -0.5)
    want = twin(impl, params, base, direction, -0.5)
    if backend == "cpp":
        assert all(torch.equal(a, b) for a, b in zip(ours, want))
    else:
        assert_perturbed(impl, ours, want, dtype)
        T.restore_(ours, on(device, params))
        assert counter.launches == 2


@needs_cuda_kernels
def test_cuda_perturb_runs_on_the_current_stream():
    params, save, base, direction = make(torch.float32, [(1 << 20,)], device="cuda")
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


# Triton: the interpreter cannot trace (wrap_triton hands back the interpreted kernel), so AOT
# dispatch is checked on a GPU only; test_faketensor runs the op body on FakeTensors.
TRITON_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor") + \
    (("test_aot_dispatch_dynamic",) if HAS_GPU else ())


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    backend, device = impl
    T = op_namespace(backend)
    utils = {} if backend == "cpp" else dict(test_utils=TRITON_OPCHECK)
    params, save, base, direction = make(torch.float32, [(7, 3), (5,)], device=device)
    torch.library.opcheck(T.perturb_.default, (params, save, base, direction, 0.25), **utils)
    if backend == "triton":
        torch.library.opcheck(T.perturb_.default, (params, [], base, direction, 0.25), **utils)
    torch.library.opcheck(T.restore_.default, (params, save), **utils)


def _set(k, make_value):
    return lambda a: a.__setitem__(k, make_value(a))


# (mutation of perturb_'s arguments on [(4, 3), (3,)], message) per implementation.
PERTURB_ERRORS = {
    ("cpp", "cpu"): [
        (_set(2, lambda a: a[2][:-1]), "base and"),
        (_set(2, lambda a: [a[2][0].double(), a[2][1]]), r"base\[0\] has dtype Double, expected Float"),
        (_set(0, lambda a: [a[0][0].t(), a[0][1]]), "must be contiguous"),
        (_set(1, lambda a: [a[1][0][:2], a[1][1]]), r"save\[0\] has shape"),
    ],
    ("cpp", "cuda"): [
        (_set(2, lambda a: a[2][:-1]), "base and"),
        (_set(2, lambda a: [a[2][0].double(), a[2][1]]), r"base\[0\] has dtype Double, expected Float"),
        (_set(0, lambda a: [a[0][0].t(), a[0][1]]), "must be contiguous"),
        (_set(1, lambda a: [a[1][0][:2], a[1][1]]), r"save\[0\] has shape"),
        (_set(3, lambda a: [a[3][0].cpu(), a[3][1]]), r"direction\[0\] is on cpu, expected cuda:0"),
        (_set(0, lambda a: [a[0][0], a[0][1].half()]), r"params\[1\] has dtype Half but params\[0\] has Float"),
    ],
    "triton": [
        (_set(2, lambda a: a[2][:-1]), "got 2 params, 1 base and 2 direction tensors"),
        (_set(2, lambda a: [a[2][0].double(), a[2][1]]), r"base\[0\] has dtype torch.float64, expected torch.float32"),
        (_set(0, lambda a: [a[0][0].t(), a[0][1]]), r"params\[0\] must be contiguous"),
        (_set(1, lambda a: [a[1][0][:2], a[1][1]]), r"save\[0\] has shape \[2, 3\] but params\[0\] has \[4, 3\]"),
        (_set(3, lambda a: [a[3][0], a[3][1].to("meta")]), r"direction\[1\] is on meta, expected cpu like params\[1\]"),
    ],
}


def _error_params(table):
    return [pytest.param(p.values[0], mutate, match, id=f"{p.id}-{k}", marks=p.marks)
            for p in IMPLS for k, (mutate, match) in enumerate(table["triton" if p.values[0][0] == "triton"
                                                                    else p.values[0]])]


@pytest.mark.parametrize("impl, mutate, match", _error_params(PERTURB_ERRORS))
def test_perturb_clear_errors(impl, mutate, match):
    """The Triton op's messages start with its name; its tests pass CPU tensors (checked before launch)."""
    args = list(make(torch.float32, [(4, 3), (3,)], device="cuda" if impl == ("cpp", "cuda") else "cpu")) + [0.1]
    mutate(args)
    prefix = "t1t2_triton::perturb_: " if impl[0] == "triton" else ""
    with pytest.raises(RuntimeError, match=prefix + match):
        op_namespace(impl[0]).perturb_(*args)


RESTORE_ERRORS = {
    "cpp": ["got 2 params but 1 saved", r"save\[1\] has dtype Double, expected Float"],
    "triton": [r"t1t2_triton::restore_: got 2 params but 1 saved", r"t1t2_triton::restore_: save\[1\] has dtype torch.float64"],
}


@pytest.mark.parametrize("impl", IMPLS)
def test_restore_clear_errors(impl):
    params, save, _, _ = make(torch.float32, [(4, 3), (3,)], device="cuda" if impl == ("cpp", "cuda") else "cpu")
    count, dtype = RESTORE_ERRORS[impl[0]]
    T = op_namespace(impl[0])
    with pytest.raises(RuntimeError, match=count):
        T.restore_(params, save[:1])
    with pytest.raises(RuntimeError, match=dtype):
        T.restore_(params, [save[0], save[1].double()])
