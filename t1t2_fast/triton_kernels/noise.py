"""Triton twins of ``t1t2::gaussian_noise`` and ``t1t2::gaussian_noise_backward`` (docs/design.md,
"Noise modules"): ``torch.ops.t1t2_triton.gaussian_noise`` / ``gaussian_noise_backward``, same
arguments, same values, and the same noise: ε_i = randn(key, i) of csrc/include/t1t2/philox.h.

The draw. The Philox4x32-10 words come from ``tl.randint4x(key, i)`` (counter (i lo, i hi, 0, 0),
key (key lo, key hi)), which tests/noise/test_rng.py checks bit for bit against the twin
t1t2_fast/rng.py. The rest is philox.h's, operation for operation: the words → float32 uniforms,
u1 = max(u1, 1e-7), and Box–Muller with philox.h's float32 log and cos — double polynomials of
+, −, ×, ÷ only, each correctly rounded, then one rounding to float32 — instead of the backend's
log/cos (which tl.randn uses, and which differ by a few ulps between numpy and GPUs). So ε here has
the C++ op's bits wherever every operation is IEEE-rounded on its own: always under the
interpreter (numpy), and on a GPU with ``enable_fp_fusion=False`` (no fused multiply-add), which
the launches pass.

Forward and ∂L/∂x are element-wise (one launch). ∂L/∂σ_c = Σ_{i∈c} g_i ε_i (·x_i) is summed in
float64 in two stages: x viewed as rows × channels × inner; a stage-1 program owns a block of rows ×
a block of channels, adds its terms into a float64 [RR, CH, IC] tile (IC ≥ inner columns of a
channel per step, CH channels, RR rows; shape chosen on the host from (channels, inner)), reduces
it to one partial per channel; stage 2 adds each channel's partials in row-block order. Fixed
shapes and order: the same bits on every run. The order differs from the C++ op's; measured on
tests/noise/test_triton_noise.py's layouts, float32/bf16/fp16 ∂L/∂σ still has the C++ op's bits (both
round a float64 sum once), float64 differs by ≤ 1.4e-17·Σ|terms| (the tests allow one float32 ulp
and 1e-15·Σ|terms|). ε, y and ∂L/∂x: identical bits in every dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import reference
from .._noise_autograd import register_autograd as register_noise_autograd
from .._dtypes import SUPPORTED_DTYPES
from ._common import (INTERPRET, NO_FMA, as_kernel_arg, autotuned, call_kind, check_device, compute_dtype, load_ct,
                      size_bucket, store_cast, tl_dtype)

_FWD = "t1t2_triton::gaussian_noise"
_BWD = "t1t2_triton::gaussian_noise_backward"

# philox.h's double constants (fdlibm's two-part ln 2 and π/2).
_LN2_HI = tl.constexpr(float.fromhex("0x1.62e42feep-1"))
_LN2_LO = tl.constexpr(float.fromhex("0x1.a39ef35793c76p-33"))
_SQRT2 = tl.constexpr(float.fromhex("0x1.6a09e667f3bcdp+0"))
_TWO_OVER_PI = tl.constexpr(float.fromhex("0x1.45f306dc9c883p-1"))
_PIO2_HI = tl.constexpr(float.fromhex("0x1.921fb544p+0"))
_PIO2_LO = tl.constexpr(float.fromhex("0x1.0b4611a626331p-34"))


# ---------------------------------------------------------------------------------------------
# ε = randn(key, offset): philox.h in Triton
# ---------------------------------------------------------------------------------------------
@triton.jit
def _uniform(word):
    """philox::uniform: the word as int32, x < 0 → ~x, to float32, × float32(4.6566127342e-10)."""
    i = word.to(tl.int32, bitcast=True)
    i = tl.where(i < 0, ~i, i)
    return i.to(tl.float32) * 4.6566127342e-10


# philox.h's series, highest power first (the coefficients as C++ computes them, in double).
_LOG_SERIES = tl.constexpr(tuple(1.0 / n for n in (23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3)))
_SIN_SERIES = tl.constexpr((1.0 / 355687428096000.0, -1.0 / 1307674368000.0, 1.0 / 6227020800.0, -1.0 / 39916800.0,
                            1.0 / 362880.0, -1.0 / 5040.0, 1.0 / 120.0, -1.0 / 6.0))
_COS_SERIES = tl.constexpr((-1.0 / 6402373705728000.0, 1.0 / 20922789888000.0, -1.0 / 87178291200.0,
                            1.0 / 479001600.0, -1.0 / 3628800.0, 1.0 / 40320.0, -1.0 / 720.0, 1.0 / 24.0, -1.0 / 2.0))


@triton.jit
def _horner(z, C: tl.constexpr, N: tl.constexpr):
    """philox::horner over the N coefficients C: p = C[0], then p = C[k] + z·p, every step rounded."""
    p = C[1] + z * C[0]
    for k in tl.static_range(2, N):
        p = C[k] + z * p
    return p


@triton.jit
def _log_float(x):
    """philox::log_float: x = m·2^e, m in [√½, √2); log m = 2 atanh s, s = (m−1)/(m+1), in double."""
    bits = x.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True).to(tl.float64)
    halve = m > _SQRT2
    m = tl.where(halve, m * 0.5, m)
    e = e + halve.to(tl.int32)
    s = (m - 1.0) / (m + 1.0)  # float64 division is IEEE-rounded (div.rn.f64 on NVIDIA GPUs)
    z = s * s
    p = _horner(z, _LOG_SERIES, 11)
    two_s = s + s
    log_m = two_s + (two_s * z) * p
    ed = e.to(tl.float64)
    return (ed * _LN2_HI + (ed * _LN2_LO + log_m)).to(tl.float32)


@triton.jit
def _cos_float(t):
    """philox::cos_float for float32 t in [0, 8): k = ⌊t·2/π + ½⌋, r = t − kπ/2, Taylor series."""
    x = t.to(tl.float64)
    k = (x * _TWO_OVER_PI + 0.5).to(tl.int32)  # truncation = floor: the argument is ≥ 0.5
    kd = k.to(tl.float64)
    r = (x - kd * _PIO2_HI) - kd * _PIO2_LO
    z = r * r
    sin_r = r + (r * z) * _horner(z, _SIN_SERIES, 8)
    cos_r = 1.0 + z * _horner(z, _COS_SERIES, 9)
    quadrant = k & 3  # cos(r + kπ/2) = cos r, −sin r, −cos r, sin r
    even = tl.where(quadrant == 0, cos_r, -cos_r)
    odd = tl.where(quadrant == 3, sin_r, -sin_r)
    return tl.where((quadrant & 1) == 1, odd, even).to(tl.float32)


@triton.jit
def _randn(key, offsets):
    """philox::randn(key, offset) for int64 offsets: float32 standard normals."""
    w0, w1, _, _ = tl.randint4x(key, offsets)
    u1 = _uniform(w0)
    u2 = _uniform(w1)
    u1 = tl.where(u1 > 1.0e-7, u1, 1.0e-7)
    radius = tl.sqrt_rn(-2.0 * _log_float(u1))  # IEEE float32 sqrt (tl.sqrt is approximate on GPUs)
    return radius * _cos_float(6.283185307179586 * u2)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
APPLY_BLOCK = 1024   # elements per program of the element-wise kernel
TILE = 1024          # elements of one stage-1 step (RR × CH × IC)
PROGRAM_ELEMENTS = 16384  # elements a stage-1 program aims to cover (rows per program follow)
FINISH = 1024        # stage-2 tile: row blocks × channels


@triton.jit(do_not_specialize=["key", "numel", "channels", "inner"])
def _noise_apply(src, sigma, dst, key, numel, channels, inner, size_key, MULTIPLICATIVE: tl.constexpr,
                 CT: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr):
    """dst = src + σ_c ε (additive) or src·(1 + σ_c ε): the forward (src = x) and the multiplicative
    ∂L/∂x (src = g), in the compute dtype CT, each operation rounded on its own (noise::apply)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = load_ct(src + offs, mask, CT, BF16)
    s = tl.load(sigma + (offs // inner) % channels, mask=mask, other=0.0)
    scaled = s * _randn(key, offs).to(CT)
    if MULTIPLICATIVE:
        y = x * (1.0 + scaled)
    else:
        y = x + scaled
    store_cast(dst + offs, y, mask, BF16)


@triton.jit(do_not_specialize=["key", "rows", "channels", "inner", "rows_per_program", "channel_blocks"])
def _sigma_stage1(g_ptr, x_ptr, sigma, gx_ptr, part_ptr, key, rows, channels, inner, rows_per_program,
                  channel_blocks, size_key, MULTIPLICATIVE: tl.constexpr, FUSED_X_GRAD: tl.constexpr,
                  CT: tl.constexpr, BF16: tl.constexpr, RR: tl.constexpr, CH: tl.constexpr, IC: tl.constexpr):
    """One partial of ∂L/∂σ per (row block, channel) in float64; with FUSED_X_GRAD also the
    multiplicative ∂L/∂x = g·(1 + σε) from the same ε."""
    pid = tl.program_id(0).to(tl.int64)
    rt = pid // channel_blocks
    c = (pid % channel_blocks) * CH + tl.arange(0, CH).to(tl.int64)
    cmask = c < channels
    width = channels.to(tl.int64) * inner
    row_lo = rt * rows_per_program
    row_hi = tl.minimum(rows.to(tl.int64), row_lo + rows_per_program)
    if FUSED_X_GRAD:
        s = tl.load(sigma + c, mask=cmask, other=0.0)[None, :, None]
    acc = tl.zeros([RR, CH, IC], dtype=tl.float64)
    for r0 in range(row_lo, row_hi, RR):
        r = r0 + tl.arange(0, RR).to(tl.int64)
        for j0 in range(0, inner, IC):
            j = j0 + tl.arange(0, IC).to(tl.int64)
            offs = r[:, None, None] * width + c[None, :, None] * inner + j[None, None, :]
            mask = (r < row_hi)[:, None, None] & cmask[None, :, None] & (j < inner)[None, None, :]
            g = load_ct(g_ptr + offs, mask, CT, BF16)
            eps = _randn(key, offs)
            term = g.to(tl.float64)
            if MULTIPLICATIVE:
                term = term * load_ct(x_ptr + offs, mask, CT, BF16).to(tl.float64)
            acc += term * eps.to(tl.float64)  # masked lanes: g = 0, ε finite
            if FUSED_X_GRAD:
                store_cast(gx_ptr + offs, g * (1.0 + s * eps.to(CT)), mask, BF16)
    total = tl.sum(tl.sum(acc, axis=2), axis=0)
    tl.store(part_ptr + rt * channels + c, total, mask=cmask)


@triton.jit(do_not_specialize=["row_blocks", "channels"])
def _sigma_stage2(part_ptr, out_ptr, row_blocks, channels, RB: tl.constexpr, CB: tl.constexpr):
    """∂L/∂σ_c = the partials of channel c added in row-block order (fixed RB-wide tree per step)."""
    c = tl.program_id(0).to(tl.int64) * CB + tl.arange(0, CB).to(tl.int64)
    cmask = c < channels
    acc = tl.zeros([RB, CB], dtype=tl.float64)
    for r0 in range(0, row_blocks, RB):
        r = r0 + tl.arange(0, RB).to(tl.int64)
        mask = (r < row_blocks)[:, None] & cmask[None, :]
        acc += tl.load(part_ptr + r[:, None] * channels + c[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + c, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=cmask)


_apply = autotuned(_noise_apply, key=["size_key", "CT", "BF16"])
_stage1 = autotuned(_sigma_stage1, key=["size_key", "CT", "BF16", "RR", "CH", "IC"])


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def sigma_plan(numel: int, channels: int, inner: int) -> dict:
    """The fixed stage-1 shape of ∂L/∂σ for (numel, channels, inner): a tile of RR rows × CH channels ×
    IC columns (IC ≥ inner where inner ≤ TILE, so a step covers whole channel rows), programs of
    rows_per_program rows × CH channels, and the stage-2 tile. Depends on nothing else."""
    rows = numel // (channels * inner)
    ic = min(_pow2_at_least(inner), TILE)
    ch = min(_pow2_at_least(channels), TILE // ic)
    rr = TILE // (ic * ch)
    per_row = ch * inner
    rows_per_program = max(1, PROGRAM_ELEMENTS // per_row)
    rows_per_program = -(-rows_per_program // rr) * rr
    cb = min(_pow2_at_least(channels), FINISH)
    return dict(rows=rows, RR=rr, CH=ch, IC=ic, rows_per_program=rows_per_program,
                row_blocks=-(-rows // rows_per_program), channel_blocks=-(-channels // ch), CB=cb, RB=FINISH // cb)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def _check(op: str, x, grad_y, sigma, channels: int, inner: int, mode: str) -> None:
    """csrc/cpu/noise.cpp's check_noise_inputs, same wording."""
    if mode not in ("additive", "multiplicative"):
        raise RuntimeError(f"{op}: unknown mode '{mode}'; expected 'additive' or 'multiplicative'")
    if sigma.device != x.device:
        raise RuntimeError(f"{op}: sigma is on {sigma.device} but x is on {x.device}; move both to one device")
    if grad_y is not None and grad_y.device != x.device:
        raise RuntimeError(f"{op}: grad_y is on {grad_y.device} but x is on {x.device}; move both to one device")
    if x.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"{op}: x must be float64, float32, bfloat16 or float16, got {x.dtype}")
    if not x.is_contiguous():
        raise RuntimeError(f"{op}: x (shape {list(x.shape)}, strides {list(x.stride())}) must be contiguous: the "
                           f"noise of element i is drawn from its index in the contiguous layout; call .contiguous() "
                           f"first")
    if grad_y is not None:
        if grad_y.shape != x.shape:
            raise RuntimeError(f"{op}: grad_y has shape {list(grad_y.shape)} but x has shape {list(x.shape)}")
        if grad_y.dtype != x.dtype:
            raise RuntimeError(f"{op}: grad_y has dtype {grad_y.dtype} but x has dtype {x.dtype}")
        if not grad_y.is_contiguous():
            raise RuntimeError(f"{op}: grad_y must be contiguous; call .contiguous() first")
    if channels < 1:
        raise RuntimeError(f"{op}: channels must be >= 1, got {channels}")
    if inner < 1:
        raise RuntimeError(f"{op}: inner must be >= 1, got {inner}")
    if x.numel() % (channels * inner) != 0:
        raise RuntimeError(f"{op}: channels·inner = {channels}·{inner} = {channels * inner} does not divide the "
                           f"{x.numel()} elements of x (shape {list(x.shape)}); per-unit noise of an (N, F, ...) input "
                           f"has channels = F and inner = the product of the dims after F")
    compute = compute_dtype(x.dtype)
    if sigma.dtype != compute:
        raise RuntimeError(f"{op}: sigma has dtype {sigma.dtype}, expected {compute} (the compute dtype of {x.dtype} x)")
    if sigma.numel() != channels:
        raise RuntimeError(f"{op}: sigma has {sigma.numel()} elements (shape {list(sigma.shape)}), expected "
                           f"channels = {channels}")
    if not sigma.is_contiguous():
        raise RuntimeError(f"{op}: sigma must be contiguous")


def _ct(dtype: torch.dtype):
    """The Triton compute dtype of x's dtype."""
    return tl_dtype(compute_dtype(dtype))


def _apply_launch(src, sigma, dst, key, channels, inner, multiplicative):
    numel = src.numel()
    grid = (triton.cdiv(numel, APPLY_BLOCK),)
    wrap_triton(_apply)[grid](as_kernel_arg(src), sigma, as_kernel_arg(dst), key, numel, channels, inner,
                              size_bucket(numel), MULTIPLICATIVE=multiplicative, CT=_ct(src.dtype),
                              BF16=src.dtype == torch.bfloat16, BLOCK=APPLY_BLOCK, **NO_FMA)


@triton_op(_FWD, mutates_args=())
def gaussian_noise(x: torch.Tensor, sigma: torch.Tensor, key: int, channels: int, inner: int,
                   mode: str) -> torch.Tensor:
    """y = x + σ_c ε (additive) or x·(1 + σ_c ε) (multiplicative), ε_i = randn(key, i), c = (i // inner)
    % channels over the contiguous x. Contract: ``t1t2::gaussian_noise``; twin:
    ``reference.gaussian_noise``. One launch. Differentiable (the backward regenerates ε)."""
    _check(_FWD, x, None, sigma, channels, inner, mode)
    y = torch.empty_like(x)
    call = call_kind(x, sigma)
    if call == "fake" or x.numel() == 0:
        return y
    check_device(_FWD, x, "x")
    if call == "functional" and INTERPRET:  # wrap_triton cannot capture an interpreted kernel (see hypergrad.py)
        return reference.gaussian_noise(x, sigma, key, channels, inner, mode)
    _apply_launch(x, sigma, y, key, channels, inner, mode == "multiplicative")
    return y


@triton_op(_BWD, mutates_args=())
def gaussian_noise_backward(grad_y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, key: int, channels: int,
                            inner: int, mode: str, need_x_grad: bool,
                            need_sigma_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂x, ∂L/∂σ) of ``gaussian_noise`` with ε regenerated: ∂L/∂x = g or g·(1 + σ_c ε), ∂L/∂σ_c =
    Σ_{i∈c} g_i ε_i or Σ g_i x_i ε_i in float64 (two stages, fixed order), shaped like σ. Empty
    tensors for the gradients not asked for. Contract: ``t1t2::gaussian_noise_backward``; twin:
    ``reference.gaussian_noise_backward``. Launches: additive ∂L/∂x is a copy of g; the
    multiplicative one is fused into the ∂L/∂σ pass (2 launches) or alone (1 launch)."""
    _check(_BWD, x, grad_y, sigma, channels, inner, mode)
    multiplicative = mode == "multiplicative"
    fused_x_grad = need_x_grad and multiplicative
    if not need_x_grad:
        grad_x = x.new_empty((0,))
    elif fused_x_grad:
        grad_x = torch.empty_like(x)
    else:
        grad_x = grad_y.clone()  # additive: ∂L/∂x = g
    grad_sigma = torch.empty_like(sigma) if need_sigma_grad else sigma.new_empty((0,))
    call = call_kind(grad_y, x, sigma)
    if call == "fake" or not (fused_x_grad or need_sigma_grad):
        return grad_x, grad_sigma
    if x.numel() == 0:
        return grad_x, grad_sigma.zero_()
    check_device(_BWD, x, "x")
    if call == "functional" and INTERPRET:  # see gaussian_noise
        rx, rs = reference.gaussian_noise_backward(grad_y, x, sigma, key, channels, inner, mode, fused_x_grad,
                                                   need_sigma_grad)
        return (rx if fused_x_grad else grad_x), (rs if need_sigma_grad else grad_sigma)
    if not need_sigma_grad:
        _apply_launch(grad_y, sigma, grad_x, key, channels, inner, True)
        return grad_x, grad_sigma
    p = sigma_plan(x.numel(), channels, inner)
    partial = torch.empty(p["row_blocks"] * channels, dtype=torch.float64, device=x.device)
    bf16 = x.dtype == torch.bfloat16
    grid1 = p["row_blocks"] * p["channel_blocks"]
    wrap_triton(_stage1)[(grid1,)](
        as_kernel_arg(grad_y), as_kernel_arg(x), sigma, as_kernel_arg(grad_x if fused_x_grad else grad_y), partial,
        key, p["rows"], channels, inner, p["rows_per_program"], p["channel_blocks"], size_bucket(grid1),
        MULTIPLICATIVE=multiplicative, FUSED_X_GRAD=fused_x_grad, CT=_ct(x.dtype), BF16=bf16, RR=p["RR"],
        CH=p["CH"], IC=p["IC"], **NO_FMA)
    wrap_triton(_sigma_stage2)[(triton.cdiv(channels, p["CB"]),)](partial, grad_sigma, p["row_blocks"], channels,
                                                                   RB=p["RB"], CB=p["CB"], **NO_FMA)
    return grad_x, grad_sigma


# Autograd: the backward formula shared with the C++ op (t1t2_fast._noise_autograd)
register_noise_autograd(_FWD, gaussian_noise_backward)
