"""Run Python code in a fresh interpreter with Triton compiling, not interpreting (TRITON_INTERPRET
unset): what the interpreter cannot show (tracing for torch.compile with fake CUDA tensors,
compiling the kernels to PTX) needs no GPU. No skips here and no import of conftest, so the code it
runs sees a clean environment."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parent
ROOT = SUPPORT.parents[1]


def _env(with_support: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [str(ROOT), str(SUPPORT)] if with_support else [str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    return env


def run_python(code: str, timeout: int = 300) -> str:
    """Run (dedented) code with this checkout and tests/support importable; returns its stdout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(True), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def run_without_interpreter(code: str) -> str:
    """Run code with this checkout importable and return its stdout; skips where this triton install
    has no ptxas."""
    out = subprocess.run([sys.executable, "-c", code], env=_env(False), capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("this triton install has no ptxas")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
