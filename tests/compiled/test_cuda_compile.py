"""Compile checks of the CUDA sources with nvcc alone: no GPU and no CUDA build of torch needed.

- the shared math header in device code (tests/cpp/math_header_kernel.cu);
- every pure CUDA source in csrc/cuda (all but the torch bindings, the files named *ops_cuda.cu),
  for nvcc's default architecture and for sm_90, with the flags torch's extension build adds (no
  implicit half/bfloat16 conversions);
- the kernels' own test program (tests/cpp/test_cuda_kernels.cu) is built and run: without a GPU it
  checks the host side only (the multi-tensor table) and exits 77;
- every torch binding (*ops_cuda.cu) against this torch's headers, where they include c10/cuda (the
  CPU wheels ship them); nothing is linked, since a CPU torch has no CUDA libraries.
"""
import subprocess
import sysconfig
from pathlib import Path

import pytest

from conftest import NVCC, ROOT, needs_nvcc

CUDA_DIR = ROOT / "csrc" / "cuda"
# Torch bindings (TORCH_LIBRARY_IMPL blocks, compiled against torch's headers) are the files named
# *ops_cuda.cu; every other .cu file is a pure CUDA source.
BINDINGS = sorted(CUDA_DIR.glob("*ops_cuda.cu"))
PURE_SOURCES = sorted(p for p in CUDA_DIR.glob("*.cu") if p not in BINDINGS)
# What torch.utils.cpp_extension passes to nvcc for every extension (COMMON_NVCC_FLAGS).
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr"]
INCLUDES = ["-I", str(ROOT / "csrc" / "include"), "-I", str(ROOT / "csrc")]
SKIP_DEVICE_PART = 77  # exit status of test_cuda_kernels without a GPU: host checks passed



def run_nvcc(args, cwd=None):
    result = subprocess.run([NVCC, *args], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, f"nvcc {' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


def our_warnings(result):
    """Warnings about this project's sources (not nvcc's notes on deprecated default architectures)."""
    return [line for line in result.stderr.splitlines() if "warning" in line.lower() and str(ROOT) in line]


@needs_nvcc
def test_math_header_compiles_with_nvcc(tmp_path):
    source = ROOT / "tests" / "cpp" / "math_header_kernel.cu"
    obj = tmp_path / "math_header_kernel.o"
    run_nvcc(["-std=c++17", "-c", str(source), "-I", str(ROOT / "csrc" / "include"), "-o", str(obj)])
    assert obj.stat().st_size > 0


def test_the_pure_sources_are_found():
    names = {p.name for p in PURE_SOURCES}
    want = {"t1_step_kernel.cu", "segment_dot_kernel.cu", "penalty_hypergrad_kernel.cu", "perturb_kernel.cu",
            "noise_kernel.cu"}
    assert want <= names, names
    assert {"ops_cuda.cu", "noise_ops_cuda.cu"} <= {p.name for p in BINDINGS}


@needs_nvcc
@pytest.mark.parametrize("arch", [None, "sm_90"], ids=["default-arch", "sm_90"])
@pytest.mark.parametrize("source", PURE_SOURCES, ids=lambda p: p.name)
def test_pure_cuda_source_compiles(source, arch, tmp_path):
    """The kernels and launchers compile without torch: raw pointers, a stream, t1t2/math.h."""
    obj = tmp_path / (source.stem + ".o")
    arch_flags = [f"-arch={arch}"] if arch else []
    result = run_nvcc(["-std=c++17", *arch_flags, *TORCH_NVCC_FLAGS, "-Xcompiler", "-Wall,-Wextra", "-c",
                       str(source), *INCLUDES, "-o", str(obj)])
    assert obj.stat().st_size > 0
    assert not our_warnings(result), result.stderr


@needs_nvcc
def test_kernel_test_program_builds_and_runs(tmp_path):
    """Links the pure sources with cudart into tests/cpp/test_cuda_kernels.cu and runs it: every check
    on a GPU, the host-side table checks without one."""
    exe = tmp_path / "test_cuda_kernels"
    run_nvcc(["-std=c++17", "-O2", *TORCH_NVCC_FLAGS, str(ROOT / "tests" / "cpp" / "test_cuda_kernels.cu"),
              *map(str, PURE_SOURCES), *INCLUDES, "-o", str(exe)])
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, SKIP_DEVICE_PART), result.stdout + result.stderr
    assert "FAIL" not in result.stdout, result.stdout


def torch_include_dirs():
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    dirs = include_paths()
    if not any((Path(d) / "c10" / "cuda" / "CUDAGuard.h").exists() for d in dirs):
        return None
    return dirs


@needs_nvcc
@pytest.mark.parametrize("binding", BINDINGS, ids=lambda p: p.name)
def test_torch_binding_compiles_against_torch_headers(binding, tmp_path):
    """Each *ops_cuda.cu type-checks against this torch's ATen/c10 headers in C++20 (what torch 2.13's
    BuildExtension uses). A CPU wheel lacks the build-time c10/cuda config header; it only selects
    export macros, so the check tells the headers not to look for it."""
    dirs = torch_include_dirs()
    if dirs is None:
        pytest.skip("this torch ships no c10/cuda headers")
    system_includes = [arg for d in dirs for arg in ("-isystem", d)]
    python_include = ["-isystem", sysconfig.get_paths()["include"]]
    obj = tmp_path / (binding.stem + ".o")
    result = run_nvcc(["-std=c++20", *TORCH_NVCC_FLAGS, "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-Xcompiler",
                       "-Wall,-Wextra", "-c", str(binding), *INCLUDES, *system_includes,
                       *python_include, "-o", str(obj)])
    assert obj.stat().st_size > 0
    assert not our_warnings(result), result.stderr
