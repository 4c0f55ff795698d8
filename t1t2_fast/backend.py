"""Backend selection: which implementation runs the fused ops.

A ``Backend`` holds one implementation of every fused op (the T1 step, the T2 reductions, the
perturb/restore pair of the noise hypergradient, and the Gaussian noise op with its backward);
``resolve_backend`` is the one place that maps a user's choice and a device to it, for ``T1T2``,
``functional`` and ``GaussianNoise`` alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import _extension, ops, reference

BACKENDS = ("auto", "reference", "cpp", "triton")
# The fused ops every backend implements, in the order of Backend's fields; "t1t2::<op>" in the extension.
COMPILED_OPS = ("penalty_segment_dot", "t1_step_", "penalty_hypergrad", "perturb_", "restore_", "gaussian_noise",
                "gaussian_noise_backward")


@dataclass(frozen=True)
class Backend:
    name: str
    penalty_segment_dot: Callable
    t1_step_: Callable
    penalty_hypergrad: Callable
    perturb_: Callable
    restore_: Callable
    gaussian_noise: Callable
    gaussian_noise_backward: Callable

    # Immutable and made of module-level functions or registered ops (a triton_op cannot be copied):
    # copies of an optimizer share it.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def resolve_backend(name: str, device: torch.device) -> Backend:
    """Map a user's backend choice and the parameters' device to the implementation to run."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend={name!r}; expected one of {BACKENDS}")
    if name == "triton":
        return _triton(device)
    if name == "reference":
        return _reference()
    available, error = _extension.AVAILABLE, _extension.LOAD_ERROR
    # CUDA tensors: the extension's CUDA kernels (csrc/cuda), registered only when it was built with
    # them; every op the Backend holds must have one.
    cuda_ok = available and device.type == "cuda" and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"t1t2::{op}", "CUDA")
        for op in COMPILED_OPS)
    compiled_ok = available and (device.type == "cpu" or cuda_ok)
    if name == "cpp":
        if not available:
            raise RuntimeError(f"backend='cpp' needs the compiled extension, which did not load ({error}). "
                               f"Build it with `pip install --no-build-isolation -e .`, or use backend='reference'")
        if device.type == "cuda" and not cuda_ok:
            raise RuntimeError(f"backend='cpp' needs the extension's CUDA kernels for parameters on {device}, "
                               f"and this build has none. Rebuild it with `T1T2_CUDA=1 pip install "
                               f"--no-build-isolation -e .` (nvcc and a CUDA build of torch), or use "
                               f"backend='auto' or 'reference'")
        if not compiled_ok:
            raise RuntimeError(f"backend='cpp' has kernels for CPU and CUDA tensors only in this version; the "
                               f"parameters are on {device}. Use backend='auto' or 'reference'")
    if name == "auto" and device.type == "cuda" and not cuda_ok:
        from . import triton_kernels  # optional, and slow to import: only when asked for
        if triton_kernels.available():  # no CUDA kernels in this build: Triton is the GPU path
            return _triton(device)
    if compiled_ok:
        return _compiled()
    if device.type == "cpu":
        _extension.warn_if_missing()
    return _reference()


def _ops_of(name: str, module) -> Backend:
    return Backend(name, *(getattr(module, op) for op in COMPILED_OPS))


def _reference() -> Backend:
    return _ops_of("reference", reference)


def _compiled() -> Backend:
    return _ops_of("cpp", ops)


def _triton(device: torch.device) -> Backend:
    """The Triton kernels (t1t2_fast.triton_kernels): CUDA tensors, or CPU tensors in Triton's
    interpreter (TRITON_INTERPRET=1, for tests: slow)."""
    from . import triton_kernels  # optional, and slow to import: only when asked for
    triton_kernels.require("backend='triton'")
    if device.type != "cuda" and not (device.type == "cpu" and triton_kernels.interpreting()):
        raise RuntimeError(f"backend='triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, "
                           f"Triton's slow interpreter, for testing); the parameters are on {device}. Use "
                           f"backend='auto', 'cpp' or 'reference'")
    return _ops_of("triton", triton_kernels)
