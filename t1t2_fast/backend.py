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


def _compiled_available() -> tuple[bool, str | None]:
    from . import _extension
    return _extension.AVAILABLE, _extension.LOAD_ERROR


def resolve_backend(name: str, device: torch.device) -> Backend:
    """Map a user's backend choice and the parameters' device to the implementation to run."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend={name!r}; expected one of {BACKENDS}")
    if name == "triton":
        raise NotImplementedError("backend='triton' is not part of this version yet; "
                                  "use backend='auto', 'cpp' or 'reference'")
    if name == "reference":
        return Backend("reference", reference.penalty_segment_dot, reference.t1_step_, reference.penalty_hypergrad)
    available, error = _compiled_available()
    compiled_ok = available and device.type == "cpu"
    if name == "cpp":
        if not available:
            raise RuntimeError(f"backend='cpp' needs the compiled extension, which did not load ({error}). "
                               f"Build it with `pip install --no-build-isolation -e .`, or use backend='reference'")
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpp' has kernels for CPU tensors only in this version; the parameters "
                               f"are on {device}. Use backend='auto' or 'reference'")
    if compiled_ok:
        from . import ops
        return Backend("cpp", ops.penalty_segment_dot, ops.t1_step_, ops.penalty_hypergrad)
    if device.type == "cpu":
        from ._extension import warn_if_missing
        warn_if_missing()
    return Backend("reference", reference.penalty_segment_dot, reference.t1_step_, reference.penalty_hypergrad)
