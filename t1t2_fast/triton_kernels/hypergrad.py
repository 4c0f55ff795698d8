"""Triton twins of ``t1t2::penalty_hypergrad`` and ``t1t2::penalty_segment_dot`` (docs/design.md, "T2 step"):
``torch.ops.t1t2_triton.penalty_hypergrad`` / ``penalty_segment_dot`` take the same arguments as the
C++ ops and their ``reference`` twins and return the same values.

Layout of the work. Segment s reduces tensor t = segment_tensor[s], viewed as groups × inner
(inner = numel / groups), into `groups` sums. A segment is processed in 2-D tiles of
``BLOCK`` = R × C elements, R whole groups (rows) by C columns, C = the power of two ≥ inner, capped
at ``BLOCK`` (so every row of a tile is one group, and at least half of a tile's lanes are live).
The work list has one item per (segment, block of R rows, chunk of ``CHUNK`` columns); a stage-1
program loads J, v and θ of its item (through a table of data pointers: many tensors, one launch),
forms u = J⊙v on the fly in the compute dtype, and adds u·m(θ) in float64 column step after column
step. Groups of at most ``CHUNK`` elements are finished there and written to the output; longer
groups (per-layer penalties of big tensors) leave one float64 partial per chunk, and a stage-2
launch adds each group's partials in chunk order. No atomics: every output is a fixed function of
(inputs, BLOCK, CHUNK), the same bits on every run.

Accumulation: float64 for every input dtype, as the C++ op. u = J⊙v is rounded to the compute
dtype first (as the C++ op does); its products with m(θ) are exact in float64 for float32 (and upcast
bf16/fp16) data, so the only roundings are the float64 additions and the final cast. Against the
C++ op (which adds in another fixed order), measured on tests/test_triton_t2.py's data: float32,
bf16 and fp16 results are the same bits; float64 results differ by summation error, at most
5e-14 on unit-scale data (the tests allow 1 float32 ulp and 1e-12).

Launches per call: one host-to-device copy of the int64 work list (items, segment table, pointer
table) and the stage-1 kernel; the stage-2 kernel only when some group exceeds CHUNK elements.

This file also holds the launch helpers noise.py uses (interpreter detection, bf16 bit loads and
stores, and how a call with FakeTensor / traced inputs is handled).
"""
from __future__ import annotations


import numpy as np
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .. import reference
from .._dtypes import PENALTY_KINDS, SEGMENT_KINDS, SUPPORTED_DTYPES
from ._common import (INTERPRET, NO_FMA, as_kernel_arg, autotuned, call_kind, check_device, compute_dtype, load_ct,
                      size_bucket, store_cast, tl_dtype, tl_load_dtype)

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
BLOCK = 1024       # elements of one stage-1 tile (R rows × C columns)
LOG_CMAX = 10      # C ∈ {1, 2, 4, …, 2**LOG_CMAX}; 2**LOG_CMAX == BLOCK
CHUNK = 16 * BLOCK  # columns one stage-1 item covers; longer groups get partials and stage 2
FINISH_ROWS, FINISH_COLS = 8, 128  # stage-2 tile: groups × partials
SEG_FIELDS = 11    # t, kind, inner, groups, out_off, partial_base, chunks, cls, has_jac, js bits, scale bits
TEN_FIELDS = 4     # v, theta, jac, θ⁺ (lr segments): data pointers (or element offsets into flat buffers)
FORCE_FLAT = False  # tests set it to run the flat (traced) addressing on real tensors


@triton.jit
def _tile_rows(vp, tp, jp, up, out_ptr, part_ptr, kind, inner, groups, out_off, pbase, nch, has_jac, js, scale,
               rb, cc, CT: tl.constexpr, BF16: tl.constexpr, CHUNK: tl.constexpr, R: tl.constexpr,
               C: tl.constexpr):
    rows = rb * R + tl.arange(0, R).to(tl.int64)
    rmask = rows < groups
    col_lo = cc * CHUNK
    col_hi = tl.minimum(inner, col_lo + CHUNK)
    acc = tl.zeros([R, C], dtype=tl.float64)
    for c0 in range(col_lo, col_hi, C):
        cols = c0 + tl.arange(0, C).to(tl.int64)
        mask = rmask[:, None] & (cols < col_hi)[None, :]
        offs = rows[:, None] * inner + cols[None, :]
        v = load_ct(vp + offs, mask, CT, BF16)
        theta_ct = load_ct(tp + offs, mask, CT, BF16)
        theta = theta_ct.to(tl.float64)
        j = load_ct(jp + offs, tl.where(has_jac, mask, False), CT, BF16)  # (mask & scalar fails interpreted)
        u = tl.where(has_jac, j, js.to(CT)) * v          # J⊙v in the compute dtype, as the C++ op (lr: J = 1)
        sign = (theta > 0).to(tl.float64) - (theta < 0).to(tl.float64)   # sign(NaN) = sign(±0) = 0
        m = tl.where(kind == 1, sign, theta + theta)      # l1: sign θ; l2 and decoupled l2: 2θ
        upd = load_ct(up + offs, tl.where(kind == 3, mask, False), CT, BF16)
        m = tl.where(kind == 3, (upd - theta_ct).to(tl.float64), m)  # lr: θ⁺ − θ rounded in the compute dtype
        # masked-off lanes load v = θ = 0, but J·v = inf·0 = NaN when jac_scalar is ±inf: drop them
        acc += tl.where(mask, u.to(tl.float64) * m, 0.0)
    total = tl.sum(acc, axis=1) * scale
    if nch == 1:
        tl.store(out_ptr + out_off + rows, total.to(out_ptr.dtype.element_ty), mask=rmask)
    else:
        tl.store(part_ptr + pbase + rows * nch + cc, total, mask=rmask)


@triton.jit(do_not_specialize=["segs", "tens"])
def _hypergrad_stage1(meta, v_base, theta_base, jac_base, upd_base, out_ptr, part_ptr, segs, tens, size_key,
                      DTYPE: tl.constexpr, CT: tl.constexpr, BF16: tl.constexpr, FLAT: tl.constexpr,
                      BLOCK: tl.constexpr, LOG_CMAX: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    s = tl.load(meta + 3 * pid)
    rb = tl.load(meta + 3 * pid + 1)
    cc = tl.load(meta + 3 * pid + 2)
    sp = meta + segs + 11 * s
    t = tl.load(sp)
    kind = tl.load(sp + 1)
    inner = tl.load(sp + 2)
    groups = tl.load(sp + 3)
    out_off = tl.load(sp + 4)
    pbase = tl.load(sp + 5)
    nch = tl.load(sp + 6)
    cls = tl.load(sp + 7)
    has_jac = tl.load(sp + 8) != 0
    js = tl.load(sp + 9).to(tl.float64, bitcast=True)
    scale = tl.load(sp + 10).to(tl.float64, bitcast=True)
    tp_ = meta + tens + 4 * t
    if FLAT:  # element offsets into one flat buffer per argument (traceable: no data_ptr)
        vp = v_base + tl.load(tp_)
        tp = theta_base + tl.load(tp_ + 1)
        jp = jac_base + tl.load(tp_ + 2)
        up = upd_base + tl.load(tp_ + 3)
    else:  # the tensors' own data pointers
        vp = tl.load(tp_).to(tl.pointer_type(DTYPE))
        tp = tl.load(tp_ + 1).to(tl.pointer_type(DTYPE))
        jp = tl.load(tp_ + 2).to(tl.pointer_type(DTYPE))
        up = tl.load(tp_ + 3).to(tl.pointer_type(DTYPE))
    # One tile shape per class: the branch is uniform within a program.
    for k in tl.static_range(LOG_CMAX + 1):
        if cls == k:
            _tile_rows(vp, tp, jp, up, out_ptr, part_ptr, kind, inner, groups, out_off, pbase, nch, has_jac, js, scale,
                       rb, cc, CT, BF16, CHUNK, BLOCK >> k, 1 << k)


@triton.jit(do_not_specialize=["items", "segs"])
def _hypergrad_stage2(meta, out_ptr, part_ptr, items, segs, ROWS: tl.constexpr, COLS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    s = tl.load(meta + items + 2 * pid)
    gb = tl.load(meta + items + 2 * pid + 1)
    sp = meta + segs + 11 * s
    groups = tl.load(sp + 3)
    out_off = tl.load(sp + 4)
    pbase = tl.load(sp + 5)
    nch = tl.load(sp + 6)
    rows = gb * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < groups
    acc = tl.zeros([ROWS, COLS], dtype=tl.float64)
    for k0 in range(0, nch, COLS):
        ks = k0 + tl.arange(0, COLS)
        mask = rmask[:, None] & (ks < nch)[None, :]
        acc += tl.load(part_ptr + pbase + rows[:, None] * nch + ks[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + out_off + rows, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=rmask)


_stage1 = autotuned(_hypergrad_stage1, key=["size_key", "DTYPE", "FLAT"])


# ---------------------------------------------------------------------------------------------
# Host side: checks (the C++ op's messages), work list, launches
# ---------------------------------------------------------------------------------------------
_HG = "t1t2_triton::penalty_hypergrad"
_SD = "t1t2_triton::penalty_segment_dot"


def _fail(msg: str):
    raise RuntimeError(msg)


def _check_hypergrad(v, theta, jac, jac_scalar, segment_tensor, segment_kind, segment_groups, params=()):
    """The checks of csrc/checks.cpp (check_penalty_hypergrad_inputs), same wording. Returns the
    dtype and the per-segment (tensor, kind, groups, inner)."""
    n = len(theta)
    if len(v) != n:
        _fail(f"{_HG}: got {n} theta but {len(v)} v")
    if jac and len(jac) != n:
        _fail(f"{_HG}: jac must be empty or have one tensor per theta ({n}), got {len(jac)}")
    if len(jac_scalar) != n:
        _fail(f"{_HG}: jac_scalar must have one value per theta ({n}), got {len(jac_scalar)}")
    ns = len(segment_tensor)
    if len(segment_kind) != ns or len(segment_groups) != ns:
        _fail(f"{_HG}: segment_tensor, segment_kind and segment_groups must have one entry per segment, got "
              f"{ns}, {len(segment_kind)} and {len(segment_groups)}")
    dtype = theta[0].dtype if n else torch.float32
    if dtype not in (torch.float64, torch.float32):
        _fail(f"{_HG}: theta must be in the compute dtype (Double or Float), got {dtype}")
    device = theta[0].device if n else None
    for i in range(n):
        if theta[i].dtype != dtype or v[i].dtype != dtype:
            _fail(f"{_HG}: v[{i}] and theta[{i}] must both be {dtype}, got {v[i].dtype} and {theta[i].dtype}")
        if theta[i].device != device or v[i].device != device:
            _fail(f"{_HG}: got v[{i}] on {v[i].device} and theta[{i}] on {theta[i].device}, expected {device}")
        if v[i].shape != theta[i].shape:
            _fail(f"{_HG}: v[{i}] has shape {list(v[i].shape)} but theta[{i}] has {list(theta[i].shape)}")
        if not (theta[i].is_contiguous() and v[i].is_contiguous()):
            _fail(f"{_HG}: v[{i}] and theta[{i}] must be contiguous")
        if jac and jac[i].numel() > 0:
            j = jac[i]
            if not (j.shape == theta[i].shape and j.dtype == dtype and j.is_contiguous() and j.device == device):
                _fail(f"{_HG}: jac[{i}] must be a contiguous {dtype} tensor on {device} of shape "
                      f"{list(theta[i].shape)} (or empty to use jac_scalar[{i}]), got {j.dtype} {list(j.shape)} "
                      f"on {j.device}")
    segments, total = [], 0
    for s in range(ns):
        t, kind, groups = int(segment_tensor[s]), int(segment_kind[s]), int(segment_groups[s])
        if not 0 <= t < n:
            _fail(f"{_HG}: segment {s} names tensor {t} of {n}")
        if not 0 <= kind < len(SEGMENT_KINDS):
            _fail(f"{_HG}: segment {s} has kind {kind}; expected 0 (l2), 1 (l1), 2 (decoupled l2) or 3 (lr)")
        numel = theta[t].numel()
        if not (groups >= 0 and ((groups == 0 and numel == 0) or (groups > 0 and numel % groups == 0))):
            _fail(f"{_HG}: segment {s}: {groups} groups do not divide the {numel} elements of tensor {t}")
        if total + groups >= 2**63:
            _fail(f"{_HG}: segment {s}: its {groups} groups after {total} in the segments before it overflow the "
                  f"result's int64 length")
        total += groups
        segments.append((t, kind, groups, numel // groups if groups else 0))
    if params and len(params) != n:
        _fail(f"{_HG}: params must be empty or have one tensor per theta ({n}), got {len(params)}")
    if any(k == 3 for _, k, _, _ in segments) and len(params) != n:
        _fail(f"{_HG}: lr segments (kind 3) need params, one tensor per theta ({n}), got {len(params)}")
    for i, p in enumerate(params):
        if p.shape != theta[i].shape:
            _fail(f"{_HG}: params[{i}] has shape {list(p.shape)} but theta[{i}] has {list(theta[i].shape)}")
        if p.dtype not in SUPPORTED_DTYPES or compute_dtype(p.dtype) != dtype:
            _fail(f"{_HG}: params[{i}] has dtype {p.dtype}, whose compute dtype is not theta's ({dtype})")
        if p.device != device:
            _fail(f"{_HG}: params[{i}] is on {p.device}, expected {device}")
    return dtype, segments


def _tile_class(inner: int) -> int:
    """log2 of the tile's column count C: the power of two ≥ inner, capped at 2**LOG_CMAX."""
    return min(LOG_CMAX, max(inner - 1, 0).bit_length())


def _expand(spans) -> np.ndarray:
    """[(s, a, b)] → the rows (s, i, j) for i < a, j < b, in that order (i outer), as an int64 array."""
    counts = np.array([a * b for _, a, b in spans], dtype=np.int64)
    seg = np.repeat(np.array([s for s, _, _ in spans], dtype=np.int64), counts)
    per = np.repeat(np.array([b for _, _, b in spans], dtype=np.int64), counts)
    local = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([seg, local // np.maximum(per, 1), local % np.maximum(per, 1)], 1).reshape(-1, 3)


def _launch(v, theta, jac, js, segments, scales, has_jac, out, flat: bool, load_dtype: torch.dtype, upd=None):
    """Run both stages for `segments` (tensor, kind, groups, inner) into `out` (one value per group,
    segments concatenated). js / scales: per segment; has_jac: per segment. flat: address the
    tensors through offsets into concatenated buffers instead of a data-pointer table (traced calls,
    where data pointers do not exist; also the one-tensor case, where the buffer is the tensor)."""
    device = out.device
    seg_rows, items, finish = [], [], []
    out_off = pbase = 0
    for s, (t, kind, groups, inner) in enumerate(segments):
        cls = _tile_class(inner)
        nch = max(1, -(-inner // CHUNK))
        rows_per_item = BLOCK >> cls
        seg_rows.append([t, kind, inner, groups, out_off, pbase, nch, cls, int(has_jac[s]), 0, 0])
        if groups:
            items.append((s, -(-groups // rows_per_item), nch))
        if nch > 1:
            finish.append((s, -(-groups // FINISH_ROWS)))
            pbase += groups * nch
        out_off += groups
    # Work lists in numpy, not torch: plain host arithmetic that tracing (FakeTensor) leaves alone.
    # Stage 1: (segment, row block, chunk) for every segment; stage 2: (segment, block of groups).
    work1 = _expand(items)
    work2 = _expand([(s, blocks, 1) for s, blocks in finish])[:, :2]
    seg = np.array(seg_rows, dtype=np.int64).reshape(-1, SEG_FIELDS)
    seg[:, 9] = np.array(js, dtype=np.float64).view(np.int64)
    seg[:, 10] = np.array(scales, dtype=np.float64).view(np.int64)

    if flat:
        sizes = [x.numel() for x in theta]
        starts = [0]
        for n in sizes[:-1]:
            starts.append(starts[-1] + n)
        jac_starts, jac_parts, pos = [], [], 0
        for i in range(len(theta)):
            if jac and jac[i].numel() > 0:
                jac_starts.append(pos)
                jac_parts.append(jac[i].reshape(-1))
                pos += sizes[i]
            else:
                jac_starts.append(0)  # never read: has_jac is 0 for every segment of this tensor
        cat = lambda parts: parts[0].reshape(-1) if len(parts) == 1 else torch.cat([p.reshape(-1) for p in parts])  # noqa: E731
        v_base, theta_base = cat(list(v)), cat(list(theta))
        jac_base = cat(jac_parts) if jac_parts else v_base
        upd_base = cat(list(upd)) if upd else v_base  # θ⁺ aligned with theta, or never read
        ten = np.array([[a, a, b, a if upd else 0] for a, b in zip(starts, jac_starts)],
                       dtype=np.int64).reshape(-1, TEN_FIELDS)
    else:
        ptr = lambda x: x.data_ptr()  # noqa: E731
        ten = np.array([[ptr(v[i]), ptr(theta[i]), ptr(jac[i]) if jac and jac[i].numel() > 0 else ptr(v[i]),
                         ptr(upd[i]) if upd else ptr(v[i])]
                        for i in range(len(theta))], dtype=np.int64).reshape(-1, TEN_FIELDS)
        v_base = theta_base = jac_base = upd_base = out  # unused (FLAT=False)
    items2 = work1.size
    segs = items2 + work2.size
    tens = segs + seg.size
    meta = torch.from_numpy(np.concatenate([work1.ravel(), work2.ravel(), seg.ravel(), ten.ravel()])).to(device)
    partial = torch.empty(max(pbase, 1), dtype=torch.float64, device=device)
    n1 = work1.shape[0]
    if flat:
        v_base, theta_base, jac_base = as_kernel_arg(v_base), as_kernel_arg(theta_base), as_kernel_arg(jac_base)
        upd_base = as_kernel_arg(upd_base)
    wrap_triton(_stage1)[(n1,)](
        meta, v_base, theta_base, jac_base, upd_base, out, partial, segs, tens, size_bucket(n1),
        DTYPE=tl_load_dtype(load_dtype), CT=tl_dtype(compute_dtype(load_dtype)),
        BF16=load_dtype == torch.bfloat16, FLAT=flat, BLOCK=BLOCK, LOG_CMAX=LOG_CMAX, CHUNK=CHUNK, **NO_FMA)
    if work2.shape[0]:
        wrap_triton(_hypergrad_stage2)[(work2.shape[0],)](meta, out, partial, items2, segs, ROWS=FINISH_ROWS,
                                                          COLS=FINISH_COLS, **NO_FMA)


@triton_op(_HG, mutates_args=())
def penalty_hypergrad(v: list[torch.Tensor], theta: list[torch.Tensor], jac: list[torch.Tensor],
                      jac_scalar: list[float], segment_tensor: list[int], segment_kind: list[int],
                      segment_groups: list[int], lr: float, params: list[torch.Tensor]) -> torch.Tensor:
    """T2 penalty hypergradients (before dc/dλ) of many (hyperparameter, tensor) segments: kind 0
    (l2) Σ_{i∈g} J_i v_i 2θ_i, 1 (l1) Σ J_i v_i sign θ_i, 2 (decoupled l2) Σ v_i (−2 lr θ_i), 3 (lr)
    Σ v_i (θ⁺_i − θ_i) with θ⁺ = params[t] in the compute dtype (a copy for bf16/fp16 parameters);
    J = jac[t] or, where jac is empty, jac_scalar[t]. Contract: ``t1t2::penalty_hypergrad`` (csrc/ops.cpp); twin:
    ``reference.penalty_hypergrad``. Two launches at most (one when no group exceeds CHUNK elements)."""
    params = list(params or [])
    dtype, segments = _check_hypergrad(v, theta, jac, jac_scalar, segment_tensor, segment_kind, segment_groups,
                                       params)
    device = theta[0].device if theta else torch.device("cpu")
    total = sum(s[2] for s in segments)
    out = torch.empty(total, dtype=dtype, device=device)
    tensors = [*v, *theta, *(jac or []), *params]
    kind = call_kind(*tensors)
    if kind == "fake" or total == 0:
        return out
    check_device(_HG, theta[0], "theta[0]")
    if kind == "functional" and INTERPRET:
        # wrap_triton cannot capture an interpreted kernel into a graph: the trace records the
        # reference's torch ops (on a GPU the Triton kernel is recorded through the flat path).
        return reference.penalty_hypergrad(v, theta, jac, jac_scalar, segment_tensor, segment_kind, segment_groups,
                                           lr, params).to(dtype)
    js, scales, has_jac = [], [], []
    for t, k, _, _ in segments:
        decoupled, lr_kind = k == 2, k == 3
        js.append(1.0 if decoupled or lr_kind else float(jac_scalar[t]))
        scales.append(-float(lr) if decoupled else 1.0)
        has_jac.append(not decoupled and not lr_kind and bool(jac) and jac[t].numel() > 0)
    upd = None
    if any(k == 3 for _, k, _, _ in segments):  # θ⁺ in the compute dtype (no copy for float32/float64)
        upd = [p.detach().to(dtype).contiguous() for p in params]
    flat = kind == "functional" or len(theta) == 1 or FORCE_FLAT
    _launch(v, theta, jac, js, segments, scales, has_jac, out, flat, dtype, upd)
    return out


@triton_op(_SD, mutates_args=())
def penalty_segment_dot(u: torch.Tensor, theta: torch.Tensor, num_groups: int, kind: str) -> torch.Tensor:
    """h_g = Σ_{i∈g} u_i m_i(θ_i), m = 2θ ("l2") or sign θ ("l1"), over num_groups equal contiguous
    groups of the flattened tensors; float64 out for float64 in, float32 otherwise (accumulated in
    float64). Contract: ``t1t2::penalty_segment_dot``; twin: ``reference.penalty_segment_dot``. One launch."""
    if u.device != theta.device:
        _fail(f"{_SD}: u is on {u.device} but theta is on {theta.device}; move both to one device")
    if u.dtype != theta.dtype:
        _fail(f"{_SD}: u has dtype {u.dtype} but theta has dtype {theta.dtype}; cast them to one dtype")
    if theta.dtype not in SUPPORTED_DTYPES:
        _fail(f"{_SD}: expected floating-point u and theta (Double, Float, BFloat16 or Half), got {theta.dtype}")
    if u.shape != theta.shape:
        _fail(f"{_SD}: u has shape {list(u.shape)} but theta has shape {list(theta.shape)}")
    numel = theta.numel()
    if num_groups < 0:
        _fail(f"{_SD}: num_groups must be >= 0, got {num_groups}")
    if not ((num_groups == 0 and numel == 0) or (num_groups > 0 and numel % num_groups == 0)):
        _fail(f"{_SD}: num_groups={num_groups} does not divide numel={numel} "
              f"(groups are equal contiguous slices of the flattened tensors)")
    if kind not in PENALTY_KINDS:
        _fail(f"{_SD}: unknown kind '{kind}'; expected 'l2' or 'l1'")
    acc = compute_dtype(theta.dtype)
    out = torch.empty(num_groups, dtype=acc, device=theta.device)
    call = call_kind(u, theta)
    if call == "fake" or num_groups == 0:
        return out
    check_device(_SD, theta, "u and theta")
    if call == "functional" and INTERPRET:  # see penalty_hypergrad
        return reference.penalty_segment_dot(u, theta, num_groups, kind)
    inner = numel // num_groups
    _launch([u.contiguous()], [theta.contiguous()], [], [1.0], [(0, SEGMENT_KINDS.index(kind), num_groups, inner)],
            [1.0], [False], out, True, theta.dtype)
    return out
