"""What only the Triton backend has: the per-tensor launches torch.compile traces (run eagerly), GPU
autotuning on scratch buffers, the flat-buffer addressing of penalty_hypergrad, tracing and
compiling the kernels without the interpreter (no GPU needed), and importing the package without
triton. The ops' parity, opcheck and errors are in test_t1_step.py, test_perturb.py,
test_segment_dot.py and test_penalty_hypergrad.py, parametrized over every backend."""
import pytest
import torch

from t1t2_fast import reference

from conftest import CAN_TRITON, TOL, TRITON_DEVICE as DEVICE, T1_COMPUTE_ULPS, needs_triton
from problems import OPTIMIZERS, assert_t1_parity, make_problem
from runner import run_python, run_without_interpreter

if CAN_TRITON:
    from t1t2_fast.triton_kernels import _common, hypergrad, perturb, t1_step

pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
T = torch.ops.t1t2_triton


def triton_t1_step(*args):
    T.t1_step_(*args)


def t1_parity(args, dtype, fused=triton_t1_step):
    return assert_t1_parity(fused, args, dtype, DEVICE, compute_ulps=T1_COMPUTE_ULPS[DEVICE],
                            float64_tol=TOL["t1_step"][torch.float64])


def make_perturb(dtype, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = reference.accumulate_dtype(dtype)
    randn = lambda s, dt: torch.randn(s, generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    params = [randn(s, dtype) for s in shapes]
    return params, [torch.empty_like(p) for p in params], [randn(s, acc) for s in shapes], \
        [randn(s, acc) for s in shapes]


def on_device(tensors):
    return [t.to(DEVICE, copy=True) for t in tensors]


def assert_perturbed(ours, want, dtype):
    """The interpreter rounds exactly as torch does; a GPU may contract into an FMA (one ulp)."""
    for a, b in zip(ours, want):
        if DEVICE == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.cpu(), b, atol=0, rtol=torch.finfo(dtype).eps)


def make_args(shapes, dtype, seed=0, lr=0.05):
    """penalty_hypergrad's arguments: every kind at every granularity (lr's θ⁺ = θ + a small step), J a
    tensor on every other one."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda s: torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)  # noqa: E731
    v = [randn(s) for s in shapes]
    theta = [randn(s) for s in shapes]
    jac = [randn(s) * 0.01 if k % 2 == 0 else torch.empty(0, dtype=dtype, device=DEVICE)
           for k, s in enumerate(shapes)]
    seg_tensor, seg_kind, seg_groups = [], [], []
    for t, s in enumerate(shapes):
        numel = torch.Size(s).numel()
        for j, groups in enumerate([0, 1] if numel == 0 else sorted({1, s[0], numel})):
            for kind in ((0, 1, 2, 3) if numel < 2000 else ((t + j) % 4,)):
                seg_tensor.append(t)
                seg_kind.append(kind)
                seg_groups.append(groups)
    params = [th + 0.01 * randn(th.shape) for th in theta]
    return [v, theta, jac, [-lr * (1 + 0.1 * k) for k in range(len(shapes))], seg_tensor, seg_kind, seg_groups, lr,
            params]


def test_t1_step_per_tensor_path_of_torch_compile():
    """The launches torch.compile traces (one kernel per tensor, buffers as arguments), run eagerly."""
    def per_tensor(*args):
        t1_step._run(*args, kind="functional")
    for dtype in (torch.float64, torch.bfloat16):
        for opt in OPTIMIZERS.values():
            t1_parity(make_problem([(7,), (33, 31), (5000,), (0,)], dtype, opt, True), dtype, fused=per_tensor)


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


def test_perturb_and_restore_per_tensor_path_of_torch_compile():
    params, save, base, direction = make_perturb(torch.bfloat16, [(7,), (0,), (5000,)])
    ours, save = on_device(params), on_device(save)
    perturb._run(ours, save, on_device(base), on_device(direction), 1e-2, kind="functional")
    want = [p.clone() for p in params]
    reference.perturb_(want, [], base, direction, 1e-2)
    assert_perturbed(ours, want, torch.bfloat16)
    perturb._run(ours, save, None, None, 0.0, kind="functional")
    assert all(torch.equal(a.cpu(), p) for a, p in zip(ours, params))


def test_hypergrad_flat_addressing_gives_the_same_bits(monkeypatch):
    """The flat-buffer addressing (what a torch.compile trace records) and the data-pointer table
    run the same tiles: identical results."""
    args = make_args([(7, 3), (1025,), (2, 20000), (5,)], torch.float32, seed=3)
    table = T.penalty_hypergrad(*args)
    monkeypatch.setattr(hypergrad, "FORCE_FLAT", True)
    assert torch.equal(T.penalty_hypergrad(*args), table)


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
    return (T.penalty_hypergrad([v0, v1], [t0, t1], [], [0.5, 0.5], [0, 0, 1], [0, 1, 2], [1, 7, 1], 0.1, []),
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
           "upd_base": "*" + dtype, "out_ptr": "*" + out, "part_ptr": "*fp64", "segs": "i32", "tens": "i32", "size_key": "i32"}
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
                                   HAS_LR_SCALE=guard, **common)
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
