"""Backend selection: which implementation runs the fused ops."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference

BACKENDS = ("auto", "reference", "cpp", "triton")


@dataclass(frozen=True)
class Backend:
    name: str
    penalty_segment_dot: Callable
    t1_step_: Callable
    penalty_hypergrad: Callable
    perturb_: Callable
    restore_: Callable

    # Immutable and made of module-level functions or registered ops (a triton_op cannot be copied):
    # copies of an optimizer share it.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def _compiled_available() -> tuple[bool, str | None]:
    from . import _extension
    return _extension.AVAILABLE, _extension.LOAD_ERROR


def resolve_backend(name: str, device: torch.device) -> Backend:
    """Map a user's backend choice and the parameters' device to the implementation to run."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend={name!r}; expected one of {BACKENDS}")
    if name == "triton":
        return _triton(device)
    if name == "reference":
        return _reference()
    available, error = _compiled_available()
    # CUDA tensors: the extension's CUDA kernels (csrc/cuda), registered only when it was built with
    # them; every op the Backend holds must have one.
    cuda_ok = available and device.type == "cuda" and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"t1t2::{op}", "CUDA")
        for op in ("penalty_segment_dot", "t1_step_", "penalty_hypergrad", "perturb_", "restore_"))
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
        from . import triton_kernels
        if triton_kernels.available():  # no CUDA kernels in this build: Triton is the GPU path
            return _triton(device)
    if compiled_ok:
        from . import ops
        return Backend("cpp", ops.penalty_segment_dot, ops.t1_step_, ops.penalty_hypergrad, ops.perturb_,
                       ops.restore_)
    if device.type == "cpu":
        from ._extension import warn_if_missing
        warn_if_missing()
    return _reference()


def _reference() -> Backend:
    return Backend("reference", reference.penalty_segment_dot, reference.t1_step_, reference.penalty_hypergrad,
                   reference.perturb_, reference.restore_)


def _triton(device: torch.device) -> Backend:
    """The Triton kernels (t1t2_fast.triton_kernels): CUDA tensors, or CPU tensors in Triton's
    interpreter (TRITON_INTERPRET=1, for tests: slow)."""
    from . import triton_kernels
    triton_kernels.require("backend='triton'")
    if device.type != "cuda" and not (device.type == "cpu" and triton_kernels.interpreting()):
        raise RuntimeError(f"backend='triton' runs on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, "
                           f"Triton's slow interpreter, for testing); the parameters are on {device}. Use "
                           f"backend='auto', 'cpp' or 'reference'")
    from .triton_kernels import hypergrad, perturb, t1_step
    return Backend("triton", hypergrad.penalty_segment_dot, t1_step.t1_step_, hypergrad.penalty_hypergrad,
                   perturb.perturb_, perturb.restore_)
