"""The CUDA side of the shared math header must compile with nvcc alone (no GPU, no CUDA torch)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_math_header_compiles_with_nvcc(tmp_path):
    source = ROOT / "tests" / "cpp" / "math_header_kernel.cu"
    result = subprocess.run([NVCC, "-std=c++17", "-c", str(source), "-I", str(ROOT / "csrc" / "include"),
                             "-o", str(tmp_path / "math_header_kernel.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "math_header_kernel.o").stat().st_size > 0
