"""Without the compiled extension the package falls back to the reference path with one warning.

Each case runs in a fresh interpreter: whether the extension loaded is decided once per process.
"""
import os
import subprocess
import sys
import textwrap

from conftest import CUDA_OPS, has_cuda_kernel, needs_gpu


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_disabled_extension_warns_once_and_ops_raise():
    result = run_python("""
        import warnings
        import torch
        from t1t2_fast import _extension, ops, reference
        assert _extension.AVAILABLE is False
        assert _extension.LOAD_ERROR == "disabled by T1T2_DISABLE_EXT=1", _extension.LOAD_ERROR
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _extension.load() is False
            assert _extension.load() is False
        assert len(caught) == 1, [str(w.message) for w in caught]
        w = caught[0]
        assert issubclass(w.category, _extension.CompiledBackendMissing)
        assert issubclass(w.category, RuntimeWarning)
        msg = str(w.message)
        for part in ("compiled backend is missing", "T1T2_DISABLE_EXT=1", "reference path",
                     "pip install --no-build-isolation -e .", "C++ compiler and ninja"):
            assert part in msg, (part, msg)
        try:
            ops.penalty_segment_dot(torch.ones(2), torch.ones(2), 1, "l2")
        except RuntimeError as exc:
            assert "needs the compiled extension" in str(exc) and "reference.penalty_segment_dot" in str(exc)
        else:
            raise AssertionError("ops without the extension must raise")
        assert reference.penalty_segment_dot(torch.ones(2), torch.ones(2), 1, "l2").item() == 4.0
        print("ok")
    """, T1T2_DISABLE_EXT="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_loaded_extension_registers_ops_without_warning():
    result = run_python("""
        import warnings
        import torch
        from t1t2_fast import _extension
        if not _extension.AVAILABLE:
            print("skip:", _extension.LOAD_ERROR)
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert _extension.load() is True and _extension.LOAD_ERROR is None
            assert not [w for w in caught if issubclass(w.category, _extension.CompiledBackendMissing)]
            assert hasattr(torch.ops.t1t2, "penalty_segment_dot")
            print("ok")
    """, T1T2_DISABLE_EXT="0")
    assert result.returncode == 0, result.stderr
    out = result.stdout.strip()
    if out.startswith("skip:"):
        import pytest
        pytest.skip(f"compiled extension not built ({out})")
    assert out == "ok"


@needs_gpu
def test_cuda_kernels_built():
    """On a machine with a GPU the extension must carry the CUDA kernels of every compiled op."""
    missing = [op for op in CUDA_OPS if not has_cuda_kernel(op)]
    assert not missing, (f"torch.ops.t1t2 has no CUDA kernel for {missing}: rebuild with "
                         f"`T1T2_CUDA=1 pip install --no-build-isolation -e .` (needs nvcc and a CUDA torch)")
