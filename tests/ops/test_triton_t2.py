"""The Triton T2 ops (t1t2_fast/triton_kernels/hypergrad.py) against their reference twins and the C++
ops: parity per dtype, DESIGN.md §5 sizes, every granularity, tensor and scalar J, many tensors in
one call, determinism, opcheck, errors. Without a GPU the kernels run on CPU tensors under
TRITON_INTERPRET=1 (sizes kept small: the interpreter's cost grows with the number of programs)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors through the interpreter
pytest.importorskip("triton", reason="triton is not installed (pip install t1t2_fast[triton])")

from t1t2_fast import _extension, reference  # noqa: E402
from t1t2_fast.triton_kernels import hypergrad  # noqa: E402
from runner import run_without_interpreter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = torch.ops.t1t2_triton
needs_ext = pytest.mark.skipif(not _extension.AVAILABLE, reason=f"compiled extension not built ({_extension.LOAD_ERROR})")
ULP32 = 2.0 ** -23
# Against the twin, which sums float32 in float32 (test_ops.py / test_penalty_hypergrad.py bounds).
REF_TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=2e-4, rtol=2e-5)}


def cpp_ops():
    from t1t2_fast import ops
    return ops


def groupings(shape):
    numel = torch.Size(shape).numel()
    return [0, 1] if numel == 0 else sorted({1, shape[0], numel})


def rand(shape, dtype, g):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def assert_matches_cpp(got, want):
    """Both sum in float64 (in different orders) and round once: float64 to summation error, float32
    to one ulp."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(got, want, rtol=ULP32, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# penalty_segment_dot
# ---------------------------------------------------------------------------------------------
SD_SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (65537,), (0, 5), (33, 31), (7, 1025), (2, 20000)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_segment_dot_matches_reference_and_cpp(dtype):
    g = torch.Generator().manual_seed(0)
    for shape in SD_SHAPES:
        u, theta = rand(shape, dtype, g).to(DEVICE), rand(shape, dtype, g).to(DEVICE)
        for num_groups in groupings(shape):
            for kind in ("l2", "l1"):
                got = T.penalty_segment_dot(u, theta, num_groups, kind)
                want = reference.penalty_segment_dot(u, theta, num_groups, kind)
                assert got.dtype == want.dtype and got.shape == (num_groups,) and got.device == u.device
                inner = u.numel() // num_groups if num_groups else 0
                atol, rtol = (1e-12, 1e-12) if dtype == torch.float64 else (1e-5, 1e-5)
                torch.testing.assert_close(got, want, atol=atol * max(1, inner) ** 0.5, rtol=rtol)
                if _extension.AVAILABLE:
                    assert_matches_cpp(got.cpu(), cpp_ops().penalty_segment_dot(u.cpu(), theta.cpu(), num_groups, kind))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_segment_dot_low_precision_accumulates_in_double(dtype):
    """Within one float32 ulp of the float64 sum of the same (upcast) inputs; a float32 accumulator
    misses by many."""
    g = torch.Generator().manual_seed(2)
    u, theta = rand((2, 40000), dtype, g).to(DEVICE), rand((2, 40000), dtype, g).to(DEVICE)
    for kind in ("l2", "l1"):
        exact = reference.penalty_segment_dot(u.double(), theta.double(), 2, kind)
        torch.testing.assert_close(T.penalty_segment_dot(u, theta, 2, kind).double(), exact, rtol=ULP32, atol=0.0)


def test_segment_dot_special_values_and_layouts():
    """sign(±0) = sign(NaN) = 0, NaN and inf propagate; non-contiguous and expanded inputs are read
    as their logical values."""
    special = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-300, -2.5]
    theta = torch.tensor(special * len(special), dtype=torch.float64, device=DEVICE)
    u = torch.tensor(special, dtype=torch.float64, device=DEVICE).repeat_interleave(len(special))
    for kind in ("l2", "l1"):
        for num_groups in (len(special), len(special) ** 2):
            torch.testing.assert_close(T.penalty_segment_dot(u, theta, num_groups, kind),
                                       reference.penalty_segment_dot(u, theta, num_groups, kind), equal_nan=True)
    u = torch.randn(24, 16, dtype=torch.float64, device=DEVICE).t()
    theta = torch.randn(16, 48, dtype=torch.float64, device=DEVICE)[:, ::2]
    e = torch.randn(16, 1, dtype=torch.float64, device=DEVICE).expand(16, 24)
    for a, b in ((u, theta), (e, theta)):
        for num_groups in (1, 16, 16 * 24):
            torch.testing.assert_close(T.penalty_segment_dot(a, b, num_groups, "l2"),
                                       reference.penalty_segment_dot(a, b, num_groups, "l2"), rtol=1e-12, atol=1e-12)


def test_segment_dot_meta_and_errors():
    for dtype, out in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        m = torch.empty(6, 4, device="meta", dtype=dtype)
        r = T.penalty_segment_dot(m, m, 6, "l1")
        assert r.device.type == "meta" and r.shape == (6,) and r.dtype == out
    x = torch.randn(6, device=DEVICE)
    for args, match in [((torch.randn(4, device=DEVICE), x, 1, "l2"), r"u has shape \[4\] but theta has shape \[6\]"),
                        ((x.double(), x, 1, "l2"), "u has dtype torch.float64 but theta has dtype torch.float32"),
                        ((x.int(), x.int(), 1, "l2"), "expected floating-point u and theta"),
                        ((x, x, 4, "l2"), "num_groups=4 does not divide numel=6"),
                        ((x, x, -1, "l2"), "num_groups must be >= 0, got -1"),
                        ((x, x, 1, "l3"), "unknown kind 'l3'; expected 'l2' or 'l1'")]:
        with pytest.raises(RuntimeError, match=match):
            T.penalty_segment_dot(*args)


# ---------------------------------------------------------------------------------------------
# penalty_hypergrad
# ---------------------------------------------------------------------------------------------
HG_SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (65537,), (33, 31), (3, 20000)]


def make_args(shapes, dtype, jac_tensors=True, seed=0, lr=0.05, all_kinds_below=2000):
    """v, θ, J (a tensor for every other parameter, else the scalar) and segments: every kind at
    every granularity (network/layer = 1 group, unit = rows, element = numel) for the small tensors;
    for the big ones each granularity with one kind, rotating (the interpreter is slow)."""
    g = torch.Generator().manual_seed(seed)
    v = [rand(s, dtype, g).to(DEVICE) for s in shapes]
    theta = [rand(s, dtype, g).to(DEVICE) for s in shapes]
    jac = [(rand(s, dtype, g) * 0.01).to(DEVICE) if k % 2 == 0 else torch.empty(0, dtype=dtype, device=DEVICE)
           for k, s in enumerate(shapes)]
    jac_scalar = [-lr * (1 + 0.1 * k) for k in range(len(shapes))]
    seg_tensor, seg_kind, seg_groups = [], [], []
    for t, s in enumerate(shapes):
        for j, groups in enumerate(groupings(s)):
            kinds = (0, 1, 2) if torch.Size(s).numel() < all_kinds_below else ((t + j) % 3,)
            for kind in kinds:
                seg_tensor.append(t)
                seg_kind.append(kind)
                seg_groups.append(groups)
    return [v, theta, jac if jac_tensors else [], jac_scalar, seg_tensor, seg_kind, seg_groups, lr]


def to_cpu(args):
    return [[t.cpu() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a for a in args]


@pytest.mark.parametrize("jac_tensors", [True, False], ids=["J-tensor", "J-scalar"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_hypergrad_matches_reference_and_cpp(dtype, jac_tensors):
    args = make_args(HG_SHAPES, dtype, jac_tensors)
    got = T.penalty_hypergrad(*args)
    assert got.dtype == dtype and got.shape == (sum(args[6]),) and got.device.type == DEVICE
    torch.testing.assert_close(got, reference.penalty_hypergrad(*args), **REF_TOL[dtype])
    if _extension.AVAILABLE:
        assert_matches_cpp(got.cpu(), cpp_ops().penalty_hypergrad(*to_cpu(args)))


def test_hypergrad_flat_addressing_gives_the_same_bits(monkeypatch):
    """The flat-buffer addressing (what a torch.compile trace records) and the data-pointer table
    run the same tiles: identical results."""
    args = make_args([(7, 3), (1025,), (2, 20000), (5,)], torch.float32, seed=3)
    table = T.penalty_hypergrad(*args)
    monkeypatch.setattr(hypergrad, "FORCE_FLAT", True)
    assert torch.equal(T.penalty_hypergrad(*args), table)


@needs_ext
def test_hypergrad_float64_exact_on_integers():
    """Integer data have exact double sums: the Triton op and the C++ op agree bit for bit."""
    v = [torch.arange(-600.0, 600.0, dtype=torch.float64).reshape(40, 30)]
    theta = [torch.full((40, 30), 3.0, dtype=torch.float64)]
    segments = [[0, 0, 0, 0], [0, 1, 0, 2], [1, 40, 1200, 40]]
    want = cpp_ops().penalty_hypergrad(v, theta, [], [-2.0], *segments, 0.5)
    got = T.penalty_hypergrad([v[0].to(DEVICE)], [theta[0].to(DEVICE)], [], [-2.0], *segments, 0.5)
    assert torch.equal(got.cpu(), want)


def test_hundreds_of_small_tensors():
    g = torch.Generator().manual_seed(5)
    shapes = [(int(n),) for n in torch.randint(1, 200, (200,), generator=g)]
    args = make_args(shapes, torch.float32, seed=6, all_kinds_below=0)
    got = T.penalty_hypergrad(*args)
    torch.testing.assert_close(got, reference.penalty_hypergrad(*args), **REF_TOL[torch.float32])
    if _extension.AVAILABLE:
        assert_matches_cpp(got.cpu(), cpp_ops().penalty_hypergrad(*to_cpu(args)))


def test_deterministic():
    """Fixed tiles, no atomics: two runs give the same bits (stage 2 included: groups > CHUNK)."""
    args = make_args([(65537,), (3, 20000), (33, 31)], torch.float32, seed=7, all_kinds_below=0)
    first = T.penalty_hypergrad(*args)
    assert torch.equal(first, T.penalty_hypergrad(*args))
    u, theta = args[0][0], args[1][0]
    a = T.penalty_segment_dot(u, theta, 1, "l2")
    assert torch.equal(a, T.penalty_segment_dot(u, theta, 1, "l2"))


def test_opcheck():
    for dtype in (torch.float64, torch.float32):
        torch.library.opcheck(T.penalty_hypergrad.default, tuple(make_args([(7, 3), (5,)], dtype)))
    torch.library.opcheck(T.penalty_hypergrad.default, ([], [], [], [], [], [], [], 0.1))
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        u, theta = rand((8, 6), dtype, g).to(DEVICE), rand((8, 6), dtype, g).to(DEVICE)
        for num_groups, kind in ((8, "l1"), (1, "l2"), (48, "l2")):
            torch.library.opcheck(T.penalty_segment_dot.default, (u, theta, num_groups, kind))
        torch.library.opcheck(T.penalty_segment_dot.default, (u.t(), theta.t(), 6, "l2"))
    empty = torch.empty(0, device=DEVICE)
    torch.library.opcheck(T.penalty_segment_dot.default, (empty, empty, 0, "l2"))


def test_compiled_call_gives_the_eager_values():
    """torch.compile decomposes the triton_op (on a GPU into the Triton kernel, through the flat
    buffers; under the interpreter into the reference's torch ops, as wrap_triton cannot capture an
    interpreted kernel)."""
    args = make_args([(7, 3), (5,)], torch.float64)
    fn = torch.compile(lambda *a: T.penalty_hypergrad(*a), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(*args), T.penalty_hypergrad(*args), rtol=1e-12, atol=1e-12)


TRACE_PROBE = r"""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from t1t2_fast.triton_kernels import hypergrad
assert not hypergrad.INTERPRET
T = torch.ops.t1t2_triton

def f(v0, v1, t0, t1):
    return (T.penalty_hypergrad([v0, v1], [t0, t1], [], [0.5, 0.5], [0, 0, 1], [0, 1, 2], [1, 7, 1], 0.1),
            T.penalty_segment_dot(v0, t0, 7, "l1"))

with FakeTensorMode(allow_non_fake_inputs=True):
    args = [torch.empty(7, 3, device="cuda"), torch.empty(40000, device="cuda"),
            torch.empty(7, 3, device="cuda"), torch.empty(40000, device="cuda")]
code = make_fx(dispatch_functionalize(f), tracing_mode="fake")(*args).code
print(code.count("triton_kernel_wrapper_functional("), code.count("'FLAT': True"))
"""


def test_traced_call_records_the_triton_kernels():
    """Without the interpreter (no GPU needed: fake CUDA tensors), the functional decomposition
    torch.compile runs records the kernels themselves: stage 1 (flat addressing, no data pointers)
    and stage 2 of penalty_hypergrad, and penalty_segment_dot's stage 1."""
    assert run_without_interpreter(TRACE_PROBE).split()[-2:] == ["3", "2"]


COMPILE_PROBE = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from t1t2_fast.triton_kernels import hypergrad as hg
assert not hg.INTERPRET
target = GPUTarget("cuda", 90, 32)
for dtype, out, ct, flat in (("fp32", "fp32", tl.float32, False), ("fp64", "fp64", tl.float64, True),
                             ("i16", "fp32", tl.float32, True), ("fp16", "fp32", tl.float32, True)):
    sig = {"meta": "*i64", "v_base": "*" + dtype, "theta_base": "*" + dtype, "jac_base": "*" + dtype,
           "out_ptr": "*" + out, "part_ptr": "*fp64", "segs": "i32", "tens": "i32", "size_key": "i32"}
    consts = {"DTYPE": getattr(tl, {"fp32": "float32", "fp64": "float64", "i16": "int16", "fp16": "float16"}[dtype]),
              "CT": ct, "BF16": dtype == "i16", "FLAT": flat, "BLOCK": hg.BLOCK, "LOG_CMAX": hg.LOG_CMAX,
              "CHUNK": hg.CHUNK}
    sig.update({k: "constexpr" for k in consts})
    triton.compile(ASTSource(fn=hg._hypergrad_stage1, signature=sig, constexprs=consts), target=target,
                   options=hg.NO_FMA)
sig = {"meta": "*i64", "out_ptr": "*fp32", "part_ptr": "*fp64", "items": "i32", "segs": "i32", "ROWS": "constexpr",
       "COLS": "constexpr"}
triton.compile(ASTSource(fn=hg._hypergrad_stage2, signature=sig, constexprs={"ROWS": 8, "COLS": 128}), target=target,
               options=hg.NO_FMA)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """Triton's frontend and NVIDIA backend (no GPU needed) accept both stages for every dtype and
    both addressings: the pointer-table casts, the per-class tile branches, the int64 tables (the
    interpreter is more lenient than the compiler)."""
    assert run_without_interpreter(COMPILE_PROBE).strip().endswith("compiled")


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.__setitem__(0, a[0][:-1]), "but 1 v"),
    (lambda a: a.__setitem__(2, a[2][:1]), "jac must be empty or have one tensor per theta"),
    (lambda a: a.__setitem__(3, [1.0]), "jac_scalar must have one value per theta"),
    (lambda a: a.__setitem__(4, [0, 5] + a[4][2:]), "names tensor 5 of 2"),
    (lambda a: a.__setitem__(5, [7] + a[5][1:]), "has kind 7"),
    (lambda a: a.__setitem__(6, [4] + a[6][1:]), "4 groups do not divide the 21 elements"),
    (lambda a: a.__setitem__(6, a[6][:-1]), "must have one entry per segment"),
    (lambda a: a.__setitem__(1, [a[1][0].float(), a[1][1]]), "must both be"),
    (lambda a: a.__setitem__(0, [a[0][0].t().contiguous().t(), a[0][1]]), "must be contiguous"),
    (lambda a: a.__setitem__(2, [a[2][0][:, :2], a[2][1]]), r"jac\[0\] must be a contiguous"),
    (lambda a: a.__setitem__(1, [t.half() for t in a[1]]), "compute dtype"),
], ids=["v-count", "jac-count", "jac-scalar", "tensor", "kind", "groups", "segments", "dtype", "contiguous", "jac",
        "half"])
def test_hypergrad_clear_errors(mutate, match):
    args = make_args([(7, 3), (5,)], torch.float64)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        T.penalty_hypergrad(*args)
