"""Finite-difference probes in Triton: ``torch.ops.t1t2_triton.perturb_`` (θ ← base + scale·direction,
saving θ first) and ``restore_`` (θ ← save, bit-exactly), twins of ``reference.perturb_`` /
``restore_`` and of the compiled ``torch.ops.t1t2`` ops (contract in csrc/ops.cpp). One kernel
serves both; one call = one launch over a pointer table (``_common``)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import load, row_pointer, store, table_float, to_storage, upcast, work_item

PERTURB_OP = "t1t2_triton::perturb_"
RESTORE_OP = "t1t2_triton::restore_"

# Columns of one tensor's row (layout: _common's docstring); the only scalar is scale.
_PARAM, _SAVE, _BASE, _DIRECTION, _NUMEL = (tl.constexpr(c) for c in range(5))
_NUM_SCALARS = tl.constexpr(_common.NUM_SCALARS)
_ROW_WIDTH = tl.constexpr(5)


@triton.jit
def _perturb_block(param, save, base, direction, offs, mask, scale, FP64: tl.constexpr, SAVE: tl.constexpr,
                   RESTORE: tl.constexpr, MASKED: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """RESTORE: θ ← save. Else θ ← base + scale·direction in the compute dtype, rounded once to θ's
    dtype, after copying θ to save when SAVE. Copies are loads and stores of the storage dtype with no
    arithmetic in between, so they move the bits unchanged."""
    if RESTORE:
        store(param + offs, load(save + offs, mask, MASKED), mask, MASKED)
    else:
        if SAVE:
            store(save + offs, load(param + offs, mask, MASKED), mask, MASKED)
        value = upcast(load(base + offs, mask, MASKED), FP64) + scale * upcast(load(direction + offs, mask, MASKED),
                                                                             FP64)
        store(param + offs, to_storage(value, param.dtype.element_ty, EMULATE_RTNE), mask, MASKED)


@triton.jit
def _perturb_chunk(param, save, base, direction, row, start, table, FP64: tl.constexpr, SAVE: tl.constexpr,
                   RESTORE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """One chunk of one tensor: whole blocks unmasked, then a masked tail (as t1_step._t1_step_chunk)."""
    end = tl.minimum(start + CHUNK, tl.load(row + _NUMEL))
    whole_end = start + (end - start) // BLOCK * BLOCK
    scale = table_float(table, 0, FP64)
    for block_start in range(start, whole_end, BLOCK):
        offs = block_start + tl.arange(0, BLOCK)
        _perturb_block(param, save, base, direction, offs, offs < end, scale, FP64, SAVE, RESTORE, False,
                       EMULATE_RTNE)
    if whole_end < end:
        offs = whole_end + tl.arange(0, BLOCK)
        _perturb_block(param, save, base, direction, offs, offs < end, scale, FP64, SAVE, RESTORE, True,
                       EMULATE_RTNE)


@triton.jit
def _perturb_table_kernel(table, work_at, P: tl.constexpr, ALIGNED: tl.constexpr, FP64: tl.constexpr,
                          SAVE: tl.constexpr, RESTORE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                          EMULATE_RTNE: tl.constexpr):
    t, start = work_item(table, work_at, CHUNK)
    row = table + _NUM_SCALARS + t * _ROW_WIDTH
    T: tl.constexpr = tl.float64 if FP64 else tl.float32
    _perturb_chunk(row_pointer(row, _PARAM, P, ALIGNED), row_pointer(row, _SAVE, P, ALIGNED),
                   row_pointer(row, _BASE, T, ALIGNED), row_pointer(row, _DIRECTION, T, ALIGNED), row, start, table,
                   FP64, SAVE, RESTORE, CHUNK, BLOCK, EMULATE_RTNE)


@triton.jit
def _perturb_tensor_kernel(param, save, base, direction, table, t, FP64: tl.constexpr, SAVE: tl.constexpr,
                           RESTORE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                           EMULATE_RTNE: tl.constexpr):
    """One tensor, its buffers as arguments (the traced path, see t1_step._run)."""
    row = table + _NUM_SCALARS + t * _ROW_WIDTH
    start = tl.program_id(0).to(tl.int64) * CHUNK
    _perturb_chunk(param, save, base, direction, row, start, table, FP64, SAVE, RESTORE, CHUNK, BLOCK,
                   EMULATE_RTNE)


# ---- host side -------------------------------------------------------------------------------------

KERNELS = _common.MultiTensorKernels(_perturb_table_kernel, _perturb_tensor_kernel,
                                     compute_columns=(False, False, True, True), row_width=_ROW_WIDTH.value)


def _run(params, save, base, direction, scale: float, kind: str) -> None:
    """Body of both ops (restore_ passes base = direction = None), after their checks; kind as in
    t1_step._run."""
    if not params or kind == "fake":
        return
    restore = base is None
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    buffers = [(params[i], save[i] if save else None, None if restore else base[i],
                None if restore else direction[i]) for i in live]
    flags = dict(FP64=params[0].dtype == torch.float64, SAVE=bool(save), RESTORE=restore)
    KERNELS.launch(kind, params[0].dtype, params[0].device, [scale], buffers, [[params[i].numel()] for i in live],
                   flags)


@torch.library.triton_op(PERTURB_OP, mutates_args=("params", "save"))
def perturb_(params: list[torch.Tensor], save: list[torch.Tensor], base: list[torch.Tensor],
             direction: list[torch.Tensor], scale: float) -> None:
    """θ ← base + scale·direction over many tensors (base, direction in the compute dtype), first
    saving θ into ``save`` (unless empty) so that ``restore_`` puts it back bit-exactly."""
    n = len(params)
    if len(base) != n or len(direction) != n:
        raise RuntimeError(f"{PERTURB_OP}: got {n} params, {len(base)} base and {len(direction)} direction tensors")
    if save and len(save) != n:
        raise RuntimeError(f"{PERTURB_OP}: save must be empty or have one tensor per parameter ({n}), got {len(save)}")
    if params:
        _common.check_params(PERTURB_OP, params)
        compute = _common.compute_dtype(params[0].dtype)
        for i, p in enumerate(params):
            _common.check_buffer(PERTURB_OP, base[i], p, compute, "base", i)
            _common.check_buffer(PERTURB_OP, direction[i], p, compute, "direction", i)
            if save:
                _common.check_buffer(PERTURB_OP, save[i], p, p.dtype, "save", i)
    kind = _common.tensor_kind(PERTURB_OP, [*params, *base])
    _run(params, save, base, direction, scale, kind)


@torch.library.triton_op(RESTORE_OP, mutates_args=("params",))
def restore_(params: list[torch.Tensor], save: list[torch.Tensor]) -> None:
    """θ ← save over many tensors, bit-exactly."""
    if len(save) != len(params):
        raise RuntimeError(f"{RESTORE_OP}: got {len(params)} params but {len(save)} saved")
    if params:
        _common.check_params(RESTORE_OP, params)
        for i, p in enumerate(params):
            _common.check_buffer(RESTORE_OP, save[i], p, p.dtype, "save", i)
    kind = _common.tensor_kind(RESTORE_OP, [*params, *save])
    _run(params, save, None, None, 0.0, kind)
