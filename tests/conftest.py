"""Test-session setup shared by every test folder.

- Triton: without a GPU, Triton kernels can only run in Triton's interpreter, which must be switched
  on before any kernel is defined (``triton.jit`` reads TRITON_INTERPRET when it decorates), so it is
  set here, before any test module imports t1t2_fast.triton_kernels.
- ``tests/support`` (oracle.py, problems.py, ddp_cases.py, resume_cases.py, runner.py) goes on
  sys.path, so test modules import those helpers by their bare names.
- One definition of each skip marker (compiled extension, CUDA kernels, GPU, Triton, nvcc, gloo).
- ``T1T2_EXPECT_EXT=1`` (set by .ci/run) says the compiled extension must have loaded: without it the
  session stops with an error naming the load error, instead of skipping every C++ parity test.
- One tolerance table (``TOL``), keyed by the comparison and the dtype.
- Backend and device parametrization: ``backends(...)`` / ``op_backends(...)`` give pytest params
  over the backends that exist ("reference", "cpp", "triton") with the marker that skips each one
  where it cannot run, ``DEVICES`` the devices ("cpu", and "cuda" skipped without a GPU); the
  ``backend`` and ``device`` fixtures take every value.

Test modules read these names with ``from conftest import ...`` (tests/ has no __init__.py, so pytest
imports this file as the top-level module ``conftest``)."""
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SUPPORT = TESTS / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

import torch.distributed as dist  # noqa: E402

from t1t2_fast import _extension, triton_kernels  # noqa: E402  (after TRITON_INTERPRET is set)

# ------------------------------------------------------------------------------------------------
# What this machine has, and one skip marker for each
# ------------------------------------------------------------------------------------------------
HAS_EXT = _extension.AVAILABLE
HAS_GPU = torch.cuda.is_available()
# The compiled ops with a CUDA kernel when the extension is built with T1T2_CUDA=1.
CUDA_OPS = ("penalty_segment_dot", "t1_step_", "penalty_hypergrad", "perturb_", "restore_", "gaussian_noise",
            "gaussian_noise_backward")


def has_cuda_kernel(op: str) -> bool:
    return HAS_EXT and torch._C._dispatch_has_kernel_for_dispatch_key(f"t1t2::{op}", "CUDA")


HAS_CUDA_KERNELS = HAS_GPU and all(has_cuda_kernel(op) for op in CUDA_OPS)
# Triton runs compiled on a GPU, and in its interpreter on CPU tensors (TRITON_INTERPRET=1, set above).
TRITON_DEVICE = "cuda" if HAS_GPU else "cpu"
CAN_TRITON = triton_kernels.available() and (HAS_GPU or triton_kernels.interpreting())
NVCC = shutil.which("nvcc")
HAS_GLOO = dist.is_available() and dist.is_gloo_available()


def _triton_reason() -> str:
    if not triton_kernels.available():
        return f"triton is not importable ({triton_kernels.unavailable_reason()})"
    return "no GPU and TRITON_INTERPRET is not 1: Triton kernels cannot run on CPU tensors"


needs_ext = pytest.mark.skipif(not HAS_EXT, reason=f"compiled extension not built ({_extension.LOAD_ERROR}); "
                                                  f"build it with `pip install --no-build-isolation -e .`")


def pytest_configure(config):
    """Fail, not skip, when the compiled backend is expected (T1T2_EXPECT_EXT=1, set by .ci/run) and
    did not load: a broken build would otherwise pass CI as a run of skipped C++ parity tests."""
    if os.environ.get("T1T2_EXPECT_EXT") == "1" and not HAS_EXT:
        raise pytest.UsageError(f"T1T2_EXPECT_EXT=1 but the compiled extension did not load "
                                f"({_extension.LOAD_ERROR}); build it with `pip install --no-build-isolation -e .`")


needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device (torch.cuda.is_available() is False)")
needs_cuda_kernels = pytest.mark.skipif(
    not HAS_CUDA_KERNELS,
    reason="no CUDA device (torch.cuda.is_available() is False)" if not HAS_GPU else
    "extension built without CUDA kernels: rebuild with `T1T2_CUDA=1 pip install --no-build-isolation -e .`")
needs_triton = pytest.mark.skipif(not CAN_TRITON, reason=_triton_reason())
# T1T2(backend="triton") on the CPU models of the optimizer tests: only through the interpreter.
CAN_TRITON_ON_CPU = triton_kernels.available() and triton_kernels.interpreting()
needs_triton_on_cpu = pytest.mark.skipif(
    not CAN_TRITON_ON_CPU,
    reason=_triton_reason() if not triton_kernels.available() else
    "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (set by conftest.py without a GPU)")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
needs_gloo = pytest.mark.skipif(not HAS_GLOO, reason="torch.distributed with the gloo backend is not available")

# ------------------------------------------------------------------------------------------------
# Tolerances: every comparison's bound, by dtype, in one place
# ------------------------------------------------------------------------------------------------
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = (torch.float64, *LOW_PRECISION)
TOL = {
    # The T1 step against its reference twin, float64: equal to rounding. Lower precision is bounded
    # relative to the reference's own error (problems.assert_t1_parity, with T1_COMPUTE_ULPS).
    "t1_step": {torch.float64: dict(atol=1e-13, rtol=1e-12)},
    # penalty_segment_dot against its reference twin computed in the same dtype (low precision: the
    # twin accumulates in float32); atol is per sqrt(term), the twin's rounding error grows with the
    # group size.
    "segment_dot": {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-5, rtol=1e-5),
                    torch.bfloat16: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-5, rtol=1e-5)},
    # penalty_hypergrad against its twin: the op accumulates in double in fixed blocks, the twin in
    # the compute dtype with torch.sum, so float32 differs by the twin's summation error (≈ √n ulps).
    "hypergrad": {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=2e-4, rtol=2e-5)},
    # Sums accumulated in double against the float64 sum of the same terms: the only rounding of a
    # low-precision result is the final cast to float32 (one float32 ulp).
    "exact_sum_rtol": {torch.float64: 0.0, torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -23,
                       torch.float16: 2.0 ** -23},
    # Fuzzed sums (penalty_segment_dot, penalty_hypergrad, ∂L/∂σ) against the float64 sum of the same
    # terms: rtol by the result's dtype, atol 1e-14·Σ|terms| (tests/fuzz/test_fuzz.py).
    "fuzz_sum_rtol": {torch.float64: 1e-12, torch.float32: 2.0 ** -23},
    "fuzz_sum_atol_per_magnitude": 1e-14,
    # perturb_ of two backends that may contract base + r·d into an FMA: one ulp of the storage dtype.
    "perturb_rtol": {torch.float64: 1e-15, torch.float32: torch.finfo(torch.float32).eps,
                     torch.bfloat16: torch.finfo(torch.bfloat16).eps, torch.float16: torch.finfo(torch.float16).eps},
}
# ulps of the result's scale allowed on top of twice the reference's error in the T1 step's float32
# state and stash: on a GPU the kernels contract into FMA where the reference rounds every step.
T1_COMPUTE_ULPS = {"cpu": 4, "cuda": 32}


def dtype_id(d) -> str:
    return str(d).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------
# Backends and devices
# ------------------------------------------------------------------------------------------------
BACKENDS = ("reference", "cpp", "triton")
# The T1T2 backends run on CPU models in the tests: "triton" needs the interpreter there.
BACKEND_MARKS = {"reference": (), "cpp": (needs_ext,), "triton": (needs_triton_on_cpu,)}
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_gpu)]


def backends(*names):
    """pytest params over the named T1T2 backends (all three by default) on CPU tensors, each skipped
    where it cannot run: "cpp" without the compiled extension, "triton" without Triton's interpreter."""
    return [pytest.param(n, id=n, marks=BACKEND_MARKS[n]) for n in (names or BACKENDS)]


def op_backends(*names, cuda=True):
    """pytest params (backend, device) over the fused ops' implementations: "cpp" is torch.ops.t1t2 on
    CPU and, with cuda=True, its CUDA kernels on a GPU; "triton" is torch.ops.t1t2_triton on the GPU,
    or on CPU tensors in the interpreter without one."""
    out = []
    for name in names or ("cpp", "triton"):
        if name == "cpp":
            out.append(pytest.param(("cpp", "cpu"), id="cpp-cpu", marks=needs_ext))
            if cuda:
                out.append(pytest.param(("cpp", "cuda"), id="cpp-cuda", marks=needs_cuda_kernels))
        elif name == "triton":
            out.append(pytest.param(("triton", TRITON_DEVICE), id=f"triton-{TRITON_DEVICE}", marks=needs_triton))
        else:
            raise ValueError(name)
    return out


def op_namespace(backend: str):
    """torch.ops namespace of a backend's fused ops."""
    return torch.ops.t1t2 if backend == "cpp" else torch.ops.t1t2_triton


@pytest.fixture(params=backends())
def backend(request):
    return request.param


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
