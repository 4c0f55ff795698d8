"""Fused T1 step in Triton: ``torch.ops.t1t2_triton.t1_step_``, the twin of ``reference.t1_step_``
and of the C++/CUDA ``torch.ops.t1t2.t1_step_`` (same signature, arguments and semantics; contract
in csrc/ops.cpp). The element math follows csrc/include/t1t2/math.h line by line.

One call = one launch over a pointer table (``_common``), whatever the number of tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dtypes import OPTIMIZERS
from . import _common
from ._common import divide, load, row_pointer, square_root, store, table_float, to_storage, upcast, work_item

OP = "t1t2_triton::t1_step_"

# Columns of one tensor's row in the pointer table (layout: _common's docstring), as _run writes them:
# 12 buffer addresses (the last three, grad_scale, found_inf and lr_scale, are the same tensors in
# every row), then numel, the three group sizes and the tensor's index in lr_scale, then four floats.
(_PARAM, _GRAD, _STATE1, _STATE2, _L2, _L1, _DECAY, _STASH_THETA, _STASH_JAC, _GRAD_SCALE, _FOUND_INF, _LR_SCALE,
 _NUMEL, _L2_INNER, _L1_INNER, _DECAY_INNER, _LR_INDEX, _INV_BC1, _BC2, _ADAM_A,
 _INV_BC2) = (tl.constexpr(c) for c in range(21))
# The call's scalars, in the order _run lists them.
_LR, _MOMENTUM, _BETA1, _ONE_MINUS_BETA1, _BETA2, _ONE_MINUS_BETA2, _EPS = (tl.constexpr(c) for c in range(7))
_NUM_SCALARS = tl.constexpr(_common.NUM_SCALARS)
_ROW_WIDTH = tl.constexpr(21)


@triton.jit
def _coefficient(c, inner, offs, mask, numel, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """c[i // inner] for the elements offs: one coefficient per tensor, per element or per group."""
    if inner >= numel:
        value = tl.broadcast_to(tl.load(c), [BLOCK])
    elif inner == 1:
        value = load(c + offs, mask, MASKED)
    else:
        value = load(c + offs // inner, mask, MASKED)
    return value


@triton.jit
def _l2_grad(c, theta):
    """2cθ, exactly 0 where c = 0 even for a non-finite θ (math.h's penalty_grad)."""
    return tl.where(c == 0, 0.0, 2.0 * c * theta).to(theta.dtype)


@triton.jit
def _sign(x):
    """sign(±0) = sign(NaN) = 0, as torch.sign."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)


@triton.jit
def _t1_step_block(param, grad, state1, state2, l2, l1, decay, stash_theta, stash_jac, offs, mask, numel,
                   l2_inner, l1_inner, decay_inner, lr, momentum, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                   inv_bc1, inv_bc2, bc2, adam_a, inv_scale, FP64: tl.constexpr, ADAM: tl.constexpr,
                   MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, STASH_THETA: tl.constexpr, STASH_JAC: tl.constexpr, BLOCK: tl.constexpr,
                   MASKED: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """The T1 update of the elements offs (csrc/include/t1t2/math.h in the same operation order)."""
    theta = upcast(load(param + offs, mask, MASKED), FP64)
    ghat = upcast(load(grad + offs, mask, MASKED), FP64) * inv_scale  # 1 without a GradScaler: exact
    if l2_inner > 0:
        ghat += _l2_grad(_coefficient(l2, l2_inner, offs, mask, numel, BLOCK, MASKED), theta)
    if l1_inner > 0:
        ghat += _coefficient(l1, l1_inner, offs, mask, numel, BLOCK, MASKED) * _sign(theta)
    if ADAM:
        exp_avg = load(state1 + offs, mask, MASKED) * beta1 + one_minus_beta1 * ghat
        exp_avg_sq = load(state2 + offs, mask, MASKED) * beta2 + one_minus_beta2 * ghat * ghat
        store(state1 + offs, exp_avg, mask, MASKED)
        store(state2 + offs, exp_avg_sq, mask, MASKED)
        m_hat = exp_avg * inv_bc1  # 1/bc1 and 1/bc2 from double: math.h's adam_direction
        sqrt_s = square_root(exp_avg_sq * inv_bc2)
        denom = sqrt_s + eps
        direction = divide(m_hat, denom)
        if STASH_JAC:
            # ∂θ⁺/∂ĝ = −η(a/(√ŝ+ε) − m̂(1−β2)ĝ/((1−β2ᵗ)√ŝ(√ŝ+ε)²)), the second term → 0 where ŝ = 0
            raw = divide(m_hat * one_minus_beta2 * ghat, bc2 * sqrt_s * denom * denom)
            second = tl.where(sqrt_s > 0, raw, 0.0)
            store(stash_jac + offs, -lr * (divide(adam_a, denom) - second), mask, MASKED)
    elif MOMENTUM:
        buf = momentum * load(state1 + offs, mask, MASKED) + ghat
        store(state1 + offs, buf, mask, MASKED)
        if NESTEROV:
            direction = ghat + momentum * buf
        else:
            direction = buf
    else:
        direction = ghat
    updated = theta - lr * direction
    if decay_inner > 0:
        updated = updated - lr * _l2_grad(_coefficient(decay, decay_inner, offs, mask, numel, BLOCK, MASKED), theta)
    if STASH_THETA:
        store(stash_theta + offs, theta, mask, MASKED)
    store(param + offs, to_storage(updated, param.dtype.element_ty, EMULATE_RTNE), mask, MASKED)


@triton.jit
def _inverse_scale(grad_scale, FP64: tl.constexpr, HAS_SCALE: tl.constexpr):
    """1/scale in float64, cast to the compute dtype (the C++ kernels' rounding); 1 without a scale."""
    if HAS_SCALE:
        inv = upcast(1.0 / tl.load(grad_scale).to(tl.float64), FP64)
    else:
        inv = upcast(tl.full([], 1.0, tl.float32), FP64)
    return inv


@triton.jit
def _t1_step_chunk(param, grad, state1, state2, l2, l1, decay, stash_theta, stash_jac, grad_scale, found_inf,
                   lr_scale, row, start, table, FP64: tl.constexpr, ADAM: tl.constexpr, MOMENTUM: tl.constexpr,
                   NESTEROV: tl.constexpr, STASH_THETA: tl.constexpr, STASH_JAC: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, HAS_LR_SCALE: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """One chunk [start, start + CHUNK) of one tensor; the buffers are typed pointers, the row holds
    its sizes and per-tensor floats, the table's head the call's scalars. Whole blocks go unmasked
    (a mask against a bound of unknown alignment keeps the GPU from vectorizing), then one masked tail."""
    numel = tl.load(row + _NUMEL)
    l2_inner = tl.load(row + _L2_INNER)
    l1_inner = tl.load(row + _L1_INNER)
    decay_inner = tl.load(row + _DECAY_INNER)
    lr = table_float(table, _LR, FP64)
    if HAS_LR_SCALE:  # η_i = T(lr)·lr_scale[i], rounded once in the compute dtype (read on the device)
        lr = lr * tl.load(lr_scale + tl.load(row + _LR_INDEX))
    momentum = table_float(table, _MOMENTUM, FP64)
    beta1 = table_float(table, _BETA1, FP64)
    one_minus_beta1 = table_float(table, _ONE_MINUS_BETA1, FP64)
    beta2 = table_float(table, _BETA2, FP64)
    one_minus_beta2 = table_float(table, _ONE_MINUS_BETA2, FP64)
    eps = table_float(table, _EPS, FP64)
    inv_bc1 = table_float(row, _INV_BC1, FP64)
    inv_bc2 = table_float(row, _INV_BC2, FP64)
    bc2 = table_float(row, _BC2, FP64)
    adam_a = table_float(row, _ADAM_A, FP64)
    inv_scale = _inverse_scale(grad_scale, FP64, HAS_SCALE)
    end = tl.minimum(start + CHUNK, numel)
    if HAS_FOUND:  # found_inf > 0 (a GradScaler's, or the scan's): nothing is written
        end = tl.where(tl.load(found_inf) > 0, start, end)
    whole_end = start + (end - start) // BLOCK * BLOCK
    for block_start in range(start, whole_end, BLOCK):
        offs = block_start + tl.arange(0, BLOCK)
        _t1_step_block(param, grad, state1, state2, l2, l1, decay, stash_theta, stash_jac, offs, offs < end, numel,
                       l2_inner, l1_inner, decay_inner, lr, momentum, beta1, one_minus_beta1, beta2,
                       one_minus_beta2, eps, inv_bc1, inv_bc2, bc2, adam_a, inv_scale, FP64, ADAM, MOMENTUM,
                       NESTEROV, STASH_THETA, STASH_JAC, BLOCK, False, EMULATE_RTNE)
    if whole_end < end:
        offs = whole_end + tl.arange(0, BLOCK)
        _t1_step_block(param, grad, state1, state2, l2, l1, decay, stash_theta, stash_jac, offs, offs < end, numel,
                       l2_inner, l1_inner, decay_inner, lr, momentum, beta1, one_minus_beta1, beta2,
                       one_minus_beta2, eps, inv_bc1, inv_bc2, bc2, adam_a, inv_scale, FP64, ADAM, MOMENTUM,
                       NESTEROV, STASH_THETA, STASH_JAC, BLOCK, True, EMULATE_RTNE)


@triton.jit
def _t1_step_table_kernel(table, work_at, P: tl.constexpr, ALIGNED: tl.constexpr, FP64: tl.constexpr,
                          ADAM: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                          STASH_THETA: tl.constexpr, STASH_JAC: tl.constexpr, HAS_SCALE: tl.constexpr,
                          HAS_FOUND: tl.constexpr, HAS_LR_SCALE: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """Program p updates work item p of the pointer table: any number of tensors in one launch."""
    t, start = work_item(table, work_at, CHUNK)
    row = table + _NUM_SCALARS + t * _ROW_WIDTH
    T: tl.constexpr = tl.float64 if FP64 else tl.float32
    _t1_step_chunk(row_pointer(row, _PARAM, P, ALIGNED), row_pointer(row, _GRAD, P, ALIGNED),
                   row_pointer(row, _STATE1, T, ALIGNED), row_pointer(row, _STATE2, T, ALIGNED),
                   row_pointer(row, _L2, T, ALIGNED), row_pointer(row, _L1, T, ALIGNED),
                   row_pointer(row, _DECAY, T, ALIGNED), row_pointer(row, _STASH_THETA, T, ALIGNED),
                   row_pointer(row, _STASH_JAC, T, ALIGNED), row_pointer(row, _GRAD_SCALE, tl.float32, False),
                   row_pointer(row, _FOUND_INF, tl.float32, False), row_pointer(row, _LR_SCALE, T, False),
                   row, start, table, FP64, ADAM, MOMENTUM, NESTEROV, STASH_THETA, STASH_JAC, HAS_SCALE, HAS_FOUND,
                   HAS_LR_SCALE, CHUNK, BLOCK, EMULATE_RTNE)


@triton.jit
def _t1_step_tensor_kernel(param, grad, state1, state2, l2, l1, decay, stash_theta, stash_jac, grad_scale, found_inf,
                           lr_scale, table, t, FP64: tl.constexpr, ADAM: tl.constexpr, MOMENTUM: tl.constexpr,
                           NESTEROV: tl.constexpr, STASH_THETA: tl.constexpr, STASH_JAC: tl.constexpr,
                           HAS_SCALE: tl.constexpr, HAS_FOUND: tl.constexpr, HAS_LR_SCALE: tl.constexpr,
                           CHUNK: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """One tensor, its buffers as arguments (the traced path: torch.compile sees what is written);
    the table holds the scalars and row t but no addresses."""
    row = table + _NUM_SCALARS + t * _ROW_WIDTH
    start = tl.program_id(0).to(tl.int64) * CHUNK
    _t1_step_chunk(param, grad, state1, state2, l2, l1, decay, stash_theta, stash_jac, grad_scale, found_inf,
                   lr_scale, row, start, table, FP64, ADAM, MOMENTUM, NESTEROV, STASH_THETA, STASH_JAC, HAS_SCALE,
                   HAS_FOUND, HAS_LR_SCALE, CHUNK, BLOCK, EMULATE_RTNE)


# ---- the non-finite scan of check_finite: found_inf = 1 if any g·(1/scale) is Inf or NaN ----------

@triton.jit
def _count_nonfinite(grad, offs, end, inv_scale, FP64: tl.constexpr, MASKED: tl.constexpr):
    x = upcast(load(grad + offs, offs < end, MASKED), FP64) * inv_scale
    return tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=0)


@triton.jit
def _scan_chunk(grad, grad_scale, found_inf, row, start, FP64: tl.constexpr, HAS_SCALE: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    numel = tl.load(row + _NUMEL)
    inv_scale = _inverse_scale(grad_scale, FP64, HAS_SCALE)
    end = tl.minimum(start + CHUNK, numel)
    whole_end = start + (end - start) // BLOCK * BLOCK  # unmasked whole blocks, then a masked tail
    bad = 0
    for block_start in range(start, whole_end, BLOCK):
        bad += _count_nonfinite(grad, block_start + tl.arange(0, BLOCK), end, inv_scale, FP64, False)
    if whole_end < end:
        bad += _count_nonfinite(grad, whole_end + tl.arange(0, BLOCK), end, inv_scale, FP64, True)
    if bad > 0:  # every writer stores 1: a benign race
        tl.store(found_inf, 1.0)


@triton.jit
def _scan_table_kernel(table, work_at, P: tl.constexpr, ALIGNED: tl.constexpr, FP64: tl.constexpr,
                       HAS_SCALE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    t, start = work_item(table, work_at, CHUNK)
    row = table + _NUM_SCALARS + t * _ROW_WIDTH
    _scan_chunk(row_pointer(row, _GRAD, P, ALIGNED), row_pointer(row, _GRAD_SCALE, tl.float32, False),
                row_pointer(row, _FOUND_INF, tl.float32, False), row, start, FP64, HAS_SCALE, CHUNK, BLOCK)


@triton.jit
def _scan_tensor_kernel(param, grad, state1, state2, l2, l1, decay, stash_theta, stash_jac, grad_scale, found_inf,
                        lr_scale, table, t, FP64: tl.constexpr, HAS_SCALE: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    row = table + _NUM_SCALARS + t * _ROW_WIDTH
    start = tl.program_id(0).to(tl.int64) * CHUNK
    _scan_chunk(grad, grad_scale, found_inf, row, start, FP64, HAS_SCALE, CHUNK, BLOCK)


# ---- host side -------------------------------------------------------------------------------------

def _fail(message: str):
    raise RuntimeError(f"{OP}: {message}")


def _check_list(lst, n: int, name: str) -> None:
    if lst and len(lst) != n:
        _fail(f"{name} must be empty or have one tensor per parameter ({n}), got {len(lst)}")


def _check_coef(lst, p: torch.Tensor, compute: torch.dtype, name: str, i: int) -> int:
    """Elements per coefficient of an optional penalty (0: none for this tensor)."""
    c = lst[i] if lst else None
    if c is None or c.numel() == 0:
        return 0
    _common.check_buffer(OP, c, p, compute, name, i, size=None)
    if p.numel() % c.numel() != 0:
        _fail(f"{name}[{i}] has {c.numel()} coefficients, which do not divide the {p.numel()} elements of "
              f"params[{i}]")
    return p.numel() // c.numel()


def _check_inputs(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer, momentum,
                  bias_correction1, bias_correction2):
    """The checks and messages of the C++ op (csrc/checks.cpp, check_t1_step_inputs); returns the
    contiguous grads and the group sizes of the three penalties per tensor."""
    n = len(params)
    if optimizer not in OPTIMIZERS:
        _fail(f"unknown optimizer '{optimizer}'; expected 'sgd' or 'adam'")
    adam = optimizer == "adam"
    uses_state1 = adam or momentum != 0
    if len(grads) != n:
        _fail(f"got {n} params but {len(grads)} grads")
    for lst, name in ((state1, "state1"), (state2, "state2"), (l2, "l2"), (l1, "l1"), (decay, "decay"),
                      (stash_theta, "stash_theta"), (stash_jac, "stash_jac")):
        _check_list(lst, n, name)
    if adam:
        if n and (not state1 or not state2):
            _fail("adam needs state1 (exp_avg) and state2 (exp_avg_sq)")
        if len(bias_correction1) != n or len(bias_correction2) != n:
            _fail(f"adam needs one bias correction per parameter, got {len(bias_correction1)} and "
                  f"{len(bias_correction2)} for {n} params")
    else:
        if momentum != 0 and n and not state1:
            _fail("sgd with momentum needs state1 (momentum buffers)")
        if stash_jac:
            _fail("stash_jac is only written by adam (sgd's Jacobian is a scalar)")
    if n == 0:
        return [], []
    _common.check_params(OP, params)
    dtype, device = params[0].dtype, params[0].device
    compute = _common.compute_dtype(dtype)
    contiguous_grads, inners = [], []
    for i, p in enumerate(params):
        g = grads[i]
        if g.shape != p.shape:
            _fail(f"grads[{i}] has shape {list(g.shape)} but params[{i}] has {list(p.shape)}")
        if g.dtype != dtype or g.device != device:
            _fail(f"grads[{i}] is {g.dtype} on {g.device}, expected {dtype} on {device}")
        contiguous_grads.append(g.contiguous())
        for lst, name, used in ((state1, "state1", uses_state1), (state2, "state2", adam),
                                (stash_theta, "stash_theta", True), (stash_jac, "stash_jac", True)):
            if lst and used:
                _common.check_buffer(OP, lst[i], p, compute, name, i, size="numel")
        inners.append(tuple(_check_coef(lst, p, compute, name, i) for lst, name in ((l2, "l2"), (l1, "l1"),
                                                                                     (decay, "decay"))))
    return contiguous_grads, inners


# grad_scale and found_inf are float32 whatever the dtypes; the column flag only picks the dtype of
# the placeholder an absent one gets, which no kernel reads.
_COMPUTE_COLUMNS = (False, False) + (True,) * 10
KERNELS = _common.MultiTensorKernels(_t1_step_table_kernel, _t1_step_tensor_kernel,
                                     compute_columns=_COMPUTE_COLUMNS, row_width=_ROW_WIDTH.value)
SCAN = _common.MultiTensorKernels(_scan_table_kernel, _scan_tensor_kernel, compute_columns=_COMPUTE_COLUMNS,
                                  row_width=_ROW_WIDTH.value)


@torch.library.triton_op(OP, mutates_args=("params", "state1", "state2", "stash_theta", "stash_jac", "found_inf"))
def t1_step_(params: list[torch.Tensor], grads: list[torch.Tensor], state1: list[torch.Tensor],
             state2: list[torch.Tensor], l2: list[torch.Tensor], l1: list[torch.Tensor], decay: list[torch.Tensor],
             stash_theta: list[torch.Tensor], stash_jac: list[torch.Tensor], optimizer: str, lr: float,
             momentum: float, nesterov: bool, beta1: float, beta2: float, eps: float,
             bias_correction1: list[float], bias_correction2: list[float], grad_scale: torch.Tensor | None = None,
             found_inf: torch.Tensor | None = None, check_finite: bool = False,
             lr_scale: torch.Tensor | None = None) -> None:
    """Fused T1 step over many tensors, in place: ĝ = g + coupled L2/L1 penalty gradients, the sgd
    (momentum, Nesterov) or adam update, decoupled L2, and the stash of the pre-step θ and adam's
    ∂θ⁺/∂ĝ; ``lr_scale`` (one value per tensor) multiplies each tensor's lr on the device.
    Arguments and semantics: ``reference.t1_step_`` / the schema in csrc/ops.cpp."""
    kind = _common.tensor_kind(OP, [*params, *grads])
    _run(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer, lr, momentum, nesterov,
         beta1, beta2, eps, bias_correction1, bias_correction2, kind, grad_scale, found_inf, check_finite, lr_scale)


def _check_guard(params, grad_scale, found_inf, check_finite) -> None:
    """The checks and messages of csrc/checks.cpp's check_t1_step_guard."""
    if check_finite and found_inf is None:
        _fail("check_finite=True needs a found_inf tensor to report a non-finite gradient in")
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is None:
            continue
        if t.numel() != 1 or t.dtype != torch.float32:
            _fail(f"{name} must be a one-element float32 tensor (as torch.amp.GradScaler makes), got {t.dtype} "
                  f"with {t.numel()} elements")
        if params and t.device != params[0].device:
            _fail(f"{name} is on {t.device} but the params are on {params[0].device}")


def _check_lr_scale(params, lr_scale) -> None:
    """The checks and messages of csrc/checks.cpp's check_t1_step_lr_scale."""
    if lr_scale is None:
        return
    n = len(params)
    if lr_scale.dim() != 1 or lr_scale.numel() != n:
        _fail(f"lr_scale must be a 1-D tensor with one value per parameter ({n}), got shape {list(lr_scale.shape)}")
    if not n:
        return
    compute = _common.compute_dtype(params[0].dtype)
    if lr_scale.dtype != compute:
        _fail(f"lr_scale has dtype {lr_scale.dtype}, expected {compute} (the compute dtype of {params[0].dtype} "
              f"parameters)")
    if lr_scale.device != params[0].device:
        _fail(f"lr_scale is on {lr_scale.device} but the params are on {params[0].device}")
    if not lr_scale.is_contiguous():
        _fail("lr_scale must be contiguous")


def _run(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer, lr, momentum, nesterov,
         beta1, beta2, eps, bias_correction1, bias_correction2, kind: str, grad_scale=None, found_inf=None,
         check_finite=False, lr_scale=None) -> None:
    """The op's body: checks, then launches (``MultiTensorKernels.launch``; kind from
    ``_common.tensor_kind``, tests force "functional" on real tensors)."""
    grads, inners = _check_inputs(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer,
                                  momentum, bias_correction1, bias_correction2)
    _check_guard(params, grad_scale, found_inf, check_finite)
    _check_lr_scale(params, lr_scale)
    if not params or kind == "fake":
        return
    adam = optimizer == "adam"
    sgd_momentum = not adam and momentum != 0
    flags = dict(FP64=params[0].dtype == torch.float64, ADAM=adam, MOMENTUM=sgd_momentum,
                 NESTEROV=sgd_momentum and bool(nesterov), STASH_THETA=bool(stash_theta), STASH_JAC=bool(stash_jac))
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    buffers = [(params[i], grads[i], state1[i] if adam or sgd_momentum else None, state2[i] if adam else None,
                l2[i] if inners[i][0] else None, l1[i] if inners[i][1] else None, decay[i] if inners[i][2] else None,
                stash_theta[i] if stash_theta else None, stash_jac[i] if stash_jac else None, grad_scale, found_inf,
                lr_scale)
               for i in live]
    extras = []
    for i in live:
        bc1, bc2 = (bias_correction1[i], bias_correction2[i]) if adam else (1.0, 1.0)
        extras.append([params[i].numel(), *inners[i], i, *map(_common.float_bits, (
            1.0 / bc1, bc2, (1.0 - beta1) / bc1, 1.0 / bc2))])
    scalars = [lr, momentum, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps]  # 1 − β in double, as math.h asks
    # The guard reads found_inf on the device (no host sync): the scan, queued first on the same stream,
    # sets it, and every program of the update then finds it set and writes nothing.
    guard = dict(HAS_SCALE=grad_scale is not None, HAS_FOUND=found_inf is not None,
                 HAS_LR_SCALE=lr_scale is not None)
    if check_finite:
        SCAN.launch(kind, params[0].dtype, params[0].device, scalars, buffers, extras,
                    dict(FP64=flags["FP64"], HAS_SCALE=guard["HAS_SCALE"]))
    KERNELS.launch(kind, params[0].dtype, params[0].device, scalars, buffers, extras, {**flags, **guard})
