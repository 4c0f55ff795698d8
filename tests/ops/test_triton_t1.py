"""The Triton T1 step and perturb / restore (torch.ops.t1t2_triton) against the reference and the C++
ops. Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set
here before triton is imported); sizes stay small because the interpreter is slow."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import t1t2_fast.triton_kernels as triton_kernels  # noqa: E402
from t1t2_fast import _extension, reference  # noqa: E402

if not triton_kernels.available():
    pytest.skip(f"triton is not importable ({triton_kernels.unavailable_reason()})", allow_module_level=True)

from problems import OPTIMIZERS, assert_t1_parity, make_problem, moved  # noqa: E402
from runner import run_python  # noqa: E402

from t1t2_fast.triton_kernels import _common, perturb, t1_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU the kernels contract into FMA where the reference rounds every step (as tests/test_cuda.py).
COMPUTE_ULPS = 32 if DEVICE == "cuda" else 4
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (7,), (1023,), (1025,), (65537,), (33, 31), (0,), (4, 0)]
ROOT = Path(__file__).resolve().parents[1]
# Masked-off lanes of adam's Jacobian divide 0 by 0 before the select drops them; numpy says so.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
needs_cpp = pytest.mark.skipif(not _extension.AVAILABLE, reason=f"C++ extension not built ({_extension.LOAD_ERROR})")


def triton_t1_step(*args):
    torch.ops.t1t2_triton.t1_step_(*args)


def t1_parity(args, dtype, baseline=reference.t1_step_, fused=triton_t1_step):
    return assert_t1_parity(fused, args, dtype, DEVICE, baseline=baseline, compute_ulps=COMPUTE_ULPS)


class LaunchCounter:
    """Stands in for a kernel object and counts launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


# ------------------------------------------------------------------------------------------------
# t1_step_
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stash", [False, True])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_t1_step_matches_reference(dtype, opt_name, stash):
    t1_parity(make_problem(SHAPES, dtype, OPTIMIZERS[opt_name], stash), dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_t1_step_matches_the_cpp_op(dtype):
    from t1t2_fast import ops
    for opt in OPTIMIZERS.values():
        t1_parity(make_problem(SHAPES[:4], dtype, opt, True, seed=7), dtype, baseline=ops.t1_step_)


@pytest.mark.parametrize("l2, l1, decay", [(None, None, None), ("layer", None, None), (None, "element", None),
                                           (None, None, "unit"), ("unit", "layer", "layer"),
                                           ("element", "unit", "layer")])
def test_t1_step_penalty_granularities(l2, l1, decay):
    for opt in OPTIMIZERS.values():
        t1_parity(make_problem([(16, 9), (9,), (3, 4, 5), (5000, 3)], torch.float64, opt, True, l2=l2, l1=l1,
                               decay=decay), torch.float64)


@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
def test_t1_step_hundreds_of_small_tensors_in_one_launch(opt_name, monkeypatch):
    g = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 300, (200,), generator=g)] + [(0,), (9000,)]
    args = make_problem(shapes, torch.float32, OPTIMIZERS[opt_name], True, seed=4)
    triton_t1_step(*moved(args, DEVICE))  # on a GPU: tune first, so that only the call below is counted
    counter = LaunchCounter(t1_step.KERNELS.table_kernel)
    monkeypatch.setattr(t1_step.KERNELS, "table_kernel", counter)
    t1_parity(args, torch.float32)
    assert counter.launches == 1


def test_t1_step_unaligned_tensors():
    """Views 4 bytes past an aligned address: the kernel must not promise aligned pointers then."""
    args = make_problem([(1000,), (37,)], torch.float32, OPTIMIZERS["adam"], True)
    for k in (0, 1, 2, 3):
        args[k] = [torch.cat([t.new_zeros(1), t])[1:] for t in args[k]]
    assert args[0][0].data_ptr() % 16 != 0
    t1_parity(args, torch.float32)


def test_t1_step_per_tensor_path_of_torch_compile():
    """The launches torch.compile traces (one kernel per tensor, buffers as arguments), run eagerly."""
    def per_tensor(*args):
        t1_step._run(*args, kind="functional")
    for dtype in (torch.float64, torch.bfloat16):
        for opt in OPTIMIZERS.values():
            t1_parity(make_problem([(7,), (33, 31), (5000,), (0,)], dtype, opt, True), dtype, fused=per_tensor)


def test_t1_step_adam_jacobian_limit_where_s_is_zero():
    """ĝ = 0 on zero moments gives ŝ = 0: the second term of D is taken as its limit 0, not NaN."""
    args = make_problem([(5,)], torch.float32, OPTIMIZERS["adam"], True, l2=None, l1=None, decay=None)
    for k in (1, 2, 3):
        args[k][0].zero_()
    ours = moved(args, DEVICE)
    triton_t1_step(*ours)
    jac = ours[8][0].cpu()
    assert torch.isfinite(jac).all()
    torch.testing.assert_close(jac, torch.full_like(jac, -0.05 * (1 - 0.9) / args[16][0] / 1e-8), rtol=1e-6, atol=0)


class FakeAutotune:
    """Stands in for triton.autotune in the interpreter: runs the kernel several times per tuning, as
    the real one does, then "chooses" the first config."""

    def __init__(self):
        self.tunings = self.kernel_runs = 0

    def __call__(self, configs, key):
        def decorate(kernel):
            tuner = self

            class Tuner:
                def __getitem__(self, grid):
                    def run(*args, **kwargs):
                        tuner.tunings += 1
                        for config in configs[:3]:
                            tuner.kernel_runs += 1
                            kernel[grid](*args, **kwargs, **config.all_kwargs())
                        self.best_config = configs[0]
                    return run
            return Tuner()
        return decorate


@pytest.mark.skipif(DEVICE == "cuda", reason="the real autotuner runs on a GPU")
def test_gpu_tuning_runs_on_scratch_buffers_only(monkeypatch):
    """The GPU launch path, with a stand-in autotuner: tuning re-runs the kernel, so it must happen on
    scratch buffers, once per kernel variant; the caller's tensors are updated exactly once per call."""
    fake = FakeAutotune()
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common.triton, "autotune", fake)
    monkeypatch.setattr(t1_step.KERNELS, "_tuner", None)
    monkeypatch.setattr(t1_step.KERNELS, "_configs", {})
    monkeypatch.setattr(t1_step.KERNELS, "scratch_numel", 5000)
    for _ in range(2):
        t1_parity(make_problem([(7,), (3000,)], torch.float32, OPTIMIZERS["adam"], True), torch.float32)
    assert (fake.tunings, fake.kernel_runs) == (1, 3)
    t1_parity(make_problem([(7,)], torch.float32, OPTIMIZERS["nesterov"], False), torch.float32)
    assert fake.tunings == 2


def test_t1_step_without_tensors_is_a_no_op():
    triton_t1_step([], [], [], [], [], [], [], [], [], "sgd", 0.1, 0.0, False, 0.9, 0.999, 1e-8, [], [])


# The interpreter cannot trace (wrap_triton hands back the interpreted kernel), so AOT dispatch is
# checked on a GPU only; test_faketensor runs the op body on FakeTensors, which skips the launch.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor") + \
    (("test_aot_dispatch_dynamic",) if DEVICE == "cuda" else ())


def test_t1_step_opcheck():
    for opt in OPTIMIZERS.values():
        for stash in (False, True):
            args = moved(make_problem([(7, 3), (5,)], torch.float32, opt, stash), DEVICE)
            torch.library.opcheck(torch.ops.t1t2_triton.t1_step_.default, tuple(args), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.__setitem__(0, [a[0][0].t(), *a[0][1:]]), r"params\[0\] must be contiguous"),
    (lambda a: a.__setitem__(1, a[1][:-1]), "got 2 params but 1 grads"),
    (lambda a: a.__setitem__(2, [a[2][0].double(), *a[2][1:]]),
     r"state1\[0\] has dtype torch.float64, expected torch.float32"),
    (lambda a: a.__setitem__(4, [torch.ones(5), torch.ones(2)]), r"l2\[0\] has 5 coefficients"),
    (lambda a: a.__setitem__(9, "rmsprop"), "unknown optimizer 'rmsprop'"),
    (lambda a: a.__setitem__(0, [a[0][0], a[0][1].double()]), r"params\[1\] has dtype torch.float64"),
    (lambda a: a.__setitem__(0, [a[0][0], a[0][1].to("meta")]), r"params\[1\] is on meta"),
    (lambda a: a.__setitem__(8, [torch.empty(12), torch.empty(3)]), "stash_jac is only written by adam"),
])
def test_t1_step_clear_errors(mutate, match):
    args = make_problem([(4, 3), (3,)], torch.float32, OPTIMIZERS["momentum"], False)
    params, before = list(args[0]), [p.clone() for p in args[0]]
    mutate(args)
    with pytest.raises(RuntimeError, match="t1t2_triton::t1_step_: " + match):
        triton_t1_step(*args)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # checked before anything is written


# ------------------------------------------------------------------------------------------------
# perturb_ / restore_
# ------------------------------------------------------------------------------------------------

def make_perturb(dtype, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = reference.accumulate_dtype(dtype)
    randn = lambda s, dt: torch.randn(s, generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    params = [randn(s, dtype) for s in shapes]
    return params, [torch.empty_like(p) for p in params], [randn(s, acc) for s in shapes], \
        [randn(s, acc) for s in shapes]


def on_device(tensors):
    return [t.to(DEVICE, copy=True) for t in tensors]


def assert_perturbed(ours, want, dtype):
    """Both compute base + r·d in the compute dtype and round once to the storage dtype; the
    interpreter does it exactly as torch does, a GPU may contract into an FMA (one rounding less)."""
    for a, b in zip(ours, want):
        if DEVICE == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.cpu(), b, atol=0, rtol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_perturb_matches_reference_and_restore_is_exact(dtype):
    params, save, base, direction = make_perturb(dtype)
    ours, save = on_device(params), on_device(save)
    torch.ops.t1t2_triton.perturb_(ours, save, on_device(base), on_device(direction), 1e-3)
    want = [p.clone() for p in params]
    reference.perturb_(want, [], base, direction, 1e-3)
    assert_perturbed(ours, want, dtype)
    assert all(torch.equal(s.cpu(), p) for s, p in zip(save, params))
    torch.ops.t1t2_triton.restore_(ours, save)
    assert all(torch.equal(a.cpu(), p) for a, p in zip(ours, params))


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_perturb_matches_the_cpp_op(dtype):
    from t1t2_fast import ops
    params, save, base, direction = make_perturb(dtype, seed=2)
    ours = on_device(params)
    torch.ops.t1t2_triton.perturb_(ours, on_device(save), on_device(base), on_device(direction), -0.25)
    theirs = [p.clone() for p in params]
    ops.perturb_(theirs, save, base, direction, -0.25)
    assert_perturbed(ours, theirs, dtype)


@pytest.mark.parametrize("dtype, bits", [(torch.float32, torch.int32), (torch.bfloat16, torch.int16),
                                         (torch.float64, torch.int64)], ids=str)
def test_save_and_restore_move_bits_unchanged(dtype, bits):
    """NaN payloads, signed zeros, subnormals and infinities survive save and restore bit for bit."""
    n_bits = torch.finfo(dtype).bits
    special = {32: [0x7FC00001, 0x7F800001, -0x80000000, 1, 0x7F800000, -1], 16: [0x7FC1, 0x7F81, -0x8000, 1, 0x7F80, -1],
               64: [0x7FF8000000000001, 0x7FF0000000000001, -0x8000000000000000, 1, 0x7FF0000000000000, -1]}[n_bits]
    original = torch.tensor(special * 700, dtype=bits).view(dtype)
    params, save = on_device([original]), on_device([torch.empty_like(original)])
    zeros = on_device([torch.zeros(original.shape, dtype=reference.accumulate_dtype(dtype))])
    torch.ops.t1t2_triton.perturb_(params, save, zeros, zeros, 1.0)
    assert torch.equal(save[0].cpu().view(bits), original.view(bits))
    assert not params[0].cpu().view(bits).equal(original.view(bits))
    torch.ops.t1t2_triton.restore_(params, save)
    assert torch.equal(params[0].cpu().view(bits), original.view(bits))


def test_perturb_hundreds_of_small_tensors_in_one_launch_and_no_save(monkeypatch):
    g = torch.Generator().manual_seed(1)
    shapes = [(int(n),) for n in torch.randint(1, 100, (200,), generator=g)]
    params, _, base, direction = make_perturb(torch.float32, shapes)
    ours = on_device(params)
    torch.ops.t1t2_triton.perturb_(on_device(params), [], on_device(base), on_device(direction), 0.5)  # tunes
    counter = LaunchCounter(perturb.KERNELS.table_kernel)
    monkeypatch.setattr(perturb.KERNELS, "table_kernel", counter)
    torch.ops.t1t2_triton.perturb_(ours, [], on_device(base), on_device(direction), -0.5)
    reference.perturb_(params, [], base, direction, -0.5)
    assert_perturbed(ours, params, torch.float32)
    torch.ops.t1t2_triton.restore_(ours, on_device(params))
    assert counter.launches == 2


def test_perturb_and_restore_per_tensor_path_of_torch_compile():
    params, save, base, direction = make_perturb(torch.bfloat16, [(7,), (0,), (5000,)])
    ours, save = on_device(params), on_device(save)
    perturb._run(ours, save, on_device(base), on_device(direction), 1e-2, kind="functional")
    want = [p.clone() for p in params]
    reference.perturb_(want, [], base, direction, 1e-2)
    assert_perturbed(ours, want, torch.bfloat16)
    perturb._run(ours, save, None, None, 0.0, kind="functional")
    assert all(torch.equal(a.cpu(), p) for a, p in zip(ours, params))


def test_perturb_and_restore_opcheck():
    params, save, base, direction = (on_device(t) for t in make_perturb(torch.float32, [(7, 3), (5,)]))
    torch.library.opcheck(torch.ops.t1t2_triton.perturb_.default, (params, save, base, direction, 0.25),
                          test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.t1t2_triton.perturb_.default, (params, [], base, direction, 0.25),
                          test_utils=OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.t1t2_triton.restore_.default, (params, save), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.__setitem__(2, a[2][:-1]), "got 2 params, 1 base and 2 direction tensors"),
    (lambda a: a.__setitem__(2, [a[2][0].double(), a[2][1]]), r"base\[0\] has dtype torch.float64, expected torch.float32"),
    (lambda a: a.__setitem__(0, [a[0][0].t(), a[0][1]]), r"params\[0\] must be contiguous"),
    (lambda a: a.__setitem__(1, [a[1][0][:2], a[1][1]]), r"save\[0\] has shape \[2, 3\] but params\[0\] has \[4, 3\]"),
    (lambda a: a.__setitem__(3, [a[3][0], a[3][1].to("meta")]), r"direction\[1\] is on meta, expected cpu like params\[1\]"),
])
def test_perturb_clear_errors(mutate, match):
    args = list(make_perturb(torch.float32, [(4, 3), (3,)])) + [0.1]
    mutate(args)
    with pytest.raises(RuntimeError, match="t1t2_triton::perturb_: " + match):
        torch.ops.t1t2_triton.perturb_(*args)


def test_restore_clear_errors():
    params, save, _, _ = make_perturb(torch.float32, [(4, 3), (3,)])
    with pytest.raises(RuntimeError, match=r"t1t2_triton::restore_: got 2 params but 1 saved"):
        torch.ops.t1t2_triton.restore_(params, save[:1])
    with pytest.raises(RuntimeError, match=r"t1t2_triton::restore_: save\[1\] has dtype torch.float64"):
        torch.ops.t1t2_triton.restore_(params, [save[0], save[1].double()])


# ------------------------------------------------------------------------------------------------
# What the interpreter cannot show: tracing for torch.compile, compiling for a GPU, no triton
# ------------------------------------------------------------------------------------------------

def test_torch_compile_traces_one_kernel_per_tensor_with_its_buffers():
    """AOT tracing on FakeTensors (no GPU needed, no kernel runs): the graph holds one Triton kernel
    per non-empty tensor, each with that tensor's buffers as arguments, and returns the updated params."""
    out = run_python("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch._functorch.aot_autograd import aot_export_module
        import t1t2_fast.triton_kernels
        from problems import OPTIMIZERS, make_problem

        args = make_problem([(7, 3), (0,), (5,)], torch.float32, OPTIMIZERS["adam"], True)

        class Step(torch.nn.Module):
            def forward(self, *tensors):
                lists = [list(tensors[3 * k:3 * k + 3]) for k in range(9)]
                torch.ops.t1t2_triton.t1_step_(*lists, *args[9:])
                torch.ops.t1t2_triton.perturb_(lists[0], lists[7][:0], lists[2], lists[3], 0.5)
                return tuple(p + 0 for p in lists[0])

        with FakeTensorMode() as mode:
            flat = [mode.from_tensor(t) for a in args[:9] for t in a]
            graph, _ = aot_export_module(Step(), flat, trace_joint=False)
        calls = [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        print(len(calls), sorted(calls[0].kwargs["kwargs"]))
    """)
    count, names = out.strip().split(" ", 1)
    assert count == "4"  # t1_step_ and perturb_ on the two non-empty tensors
    assert "param" in names and "stash_jac" in names and "table" in names


def test_kernels_compile_for_a_gpu():
    """Compile the pointer-table kernels for sm_90 with Triton's own ptxas (no GPU needed): catches
    what the lenient interpreter accepts but the compiler rejects, and checks that aligned tables give
    vector loads."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    out = run_python("""
        import re
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from t1t2_fast.triton_kernels import perturb, t1_step

        def compile(fn, **constants):
            names = fn.arg_names
            signature = {"table": "*i64", "work_at": "i32", **{k: "constexpr" for k in constants}}
            source = ASTSource(fn=fn, signature=signature,
                               constexprs={(names.index(k),): v for k, v in constants.items()})
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
            return len(re.findall(r"ld\\.global(\\.\\w+)*\\.v[24]", ptx))

        common = dict(CHUNK=4096, BLOCK=2048, EMULATE_RTNE=False)
        for P, opt, stash, aligned, guard in [(tl.float32, "adam", True, True, False),
                                              (tl.bfloat16, "nesterov", True, True, True),
                                              (tl.float16, "momentum", False, False, True),
                                              (tl.float64, "sgd", True, True, False),
                                              (tl.float64, "adam", False, True, True)]:
            adam = opt == "adam"
            vector_loads = compile(t1_step._t1_step_table_kernel, P=P, ALIGNED=aligned, FP64=P == tl.float64,
                                   ADAM=adam, MOMENTUM=not adam and opt != "sgd", NESTEROV=opt == "nesterov",
                                   STASH_THETA=stash, STASH_JAC=adam and stash, HAS_SCALE=guard, HAS_FOUND=guard,
                                   **common)
            assert (vector_loads > 0) == aligned, (P, opt, aligned, guard, vector_loads)
        for P in (tl.float16, tl.float32, tl.float64):  # the non-finite scan of check_finite
            assert compile(t1_step._scan_table_kernel, P=P, ALIGNED=True, FP64=P == tl.float64, HAS_SCALE=True,
                           **common) > 0
        for save, restore in [(True, False), (False, False), (True, True)]:
            assert compile(perturb._perturb_table_kernel, P=tl.bfloat16, ALIGNED=True, FP64=False, SAVE=save,
                           RESTORE=restore, **common) > 0
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_package_imports_without_triton():
    out = run_python("""
        import sys
        sys.modules["triton"] = None  # what an environment without triton looks like to an import
        import t1t2_fast.triton_kernels as tk
        assert not tk.available() and "triton" in tk.unavailable_reason()
        try:
            tk.require("backend='triton'")
        except RuntimeError as exc:
            print(exc)
    """)
    assert "needs Triton" in out and "pip install t1t2_fast[triton]" in out
