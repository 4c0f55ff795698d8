"""What every Triton kernel of t1t2_fast shares: whether Triton can run here, how one launch walks
many tensors (a pointer table), launch configurations, input-kind checks and small jit helpers.

Pointer table (docs/design.md, "Architecture"; as torch's multi-tensor apply does it): one int64 tensor per call,
copied to the device in one transfer, laid out as

    [ scalars (NUM_SCALARS) | rows (num_tensors × ROW_WIDTH) | work items (one per chunk) ]

- scalars: the call's float arguments as float64 bit patterns (a Python float passed to a Triton
  kernel becomes float32, which would spoil float64 math);
- a row per tensor: data_ptr()s of its buffers (0 where absent), then integers (numel, group sizes)
  and floats (as float64 bits), in the column order the op's kernel reads;
- a work item per chunk of CHUNK elements: (row index << 32) | chunk index within its tensor.
Program p reads work item p, then its row, casts the int64 addresses to typed pointers and updates
one chunk. Empty tensors get no work item. One launch serves any number of tensors of one dtype.
"""
from __future__ import annotations

import os
import struct
from typing import Sequence

import torch

from .._dtypes import SUPPORTED_DTYPES, compute_dtype

try:
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a broken install that fails while importing
    triton = tl = None
    _IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None

NUM_SCALARS = 8
CHUNK = 4096  # elements per work item (a multiple of every BLOCK below)


def available() -> bool:
    """Whether Triton imported, so the t1t2_triton ops exist."""
    return _IMPORT_ERROR is None


def unavailable_reason() -> str | None:
    """Why Triton is not usable (the import error), or None."""
    return _IMPORT_ERROR


def require(what: str) -> None:
    """Raise a clear error naming what needed Triton and how to get it."""
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"{what} needs Triton, which did not import ({_IMPORT_ERROR}); install it with "
                           f"`pip install t1t2_fast[triton]` (GPU), or use backend='cpp' or 'reference'")


# Read once, when the kernel modules import this one and just before @triton.jit reads the same
# variable to decide whether their kernels are interpreted: setting it later changes neither.
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    """Whether the kernels run in Triton's numpy interpreter (TRITON_INTERPRET=1 when they were
    defined; CPU tensors only)."""
    return _INTERPRETING


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch dtype."""
    return {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}[dtype]


# ---- what kind of tensors an op body sees --------------------------------------------------------

def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor) or t.device.type == "meta"


def _is_functional(t: torch.Tensor) -> bool:
    from torch._subclasses.functional_tensor import FunctionalTensor
    return isinstance(t, FunctionalTensor)


def call_kind(*tensors: torch.Tensor) -> str:
    """What an op body is given: "real" tensors (launch the kernels), "fake" ones (FakeTensor or
    meta: checks and output metadata only, no launch) or "functional" ones (torch.compile's
    functionalization, decomposing the triton_op).

    A triton_op's body is also its fake impl. On a GPU, wrap_triton turns a launch on FakeTensors into
    a no-op; in the interpreter it hands back the bare kernel, which would read the FakeTensors'
    storage. So fake inputs skip the launch, after the same checks a real call makes."""
    if any(_is_functional(t) for t in tensors):
        return "functional"
    if any(_is_fake(t) for t in tensors):
        return "fake"
    return "real"


def tensor_kind(op: str, tensors: Sequence[torch.Tensor]) -> str:
    """``call_kind`` for the pointer-table ops (t1_step_, perturb_, restore_): "functional" calls
    launch one kernel per tensor through wrap_triton so that the graph records what each kernel
    writes, which the interpreter cannot trace."""
    kind = call_kind(*tensors)
    if kind == "functional" and interpreting():
        raise RuntimeError(f"{op}: torch.compile / AOT tracing of the Triton ops needs a GPU: under "
                           f"TRITON_INTERPRET=1, wrap_triton returns the interpreted kernel, which cannot "
                           f"be traced")
    return kind


# ---- input checks (the C++ ops' checks and messages, csrc/checks.cpp) ------------------------------------

def check_params(op: str, params: Sequence[torch.Tensor]) -> None:
    """A supported dtype, one dtype and one device for all, contiguous (they are written in place)."""
    dtype, device = params[0].dtype, params[0].device
    if dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"{op}: params must be float64, float32, bfloat16 or float16, got {dtype}")
    for i, p in enumerate(params):
        if p.dtype != dtype:
            raise RuntimeError(f"{op}: params[{i}] has dtype {p.dtype} but params[0] has {dtype}; one dtype per call")
        if p.device != device:
            raise RuntimeError(f"{op}: params[{i}] is on {p.device} but params[0] on {device}; one device per call")
        if not p.is_contiguous():
            raise RuntimeError(f"{op}: params[{i}] must be contiguous (it is written in place)")


def check_buffer(op: str, t: torch.Tensor, p: torch.Tensor, dtype: torch.dtype, name: str, i: int,
                 size: str | None = "shape") -> None:
    """A buffer that goes with params[i] (p): the same shape (size="shape") or number of elements
    ("numel"), the expected dtype, p's device, contiguous."""
    if size == "shape" and t.shape != p.shape:
        raise RuntimeError(f"{op}: {name}[{i}] has shape {list(t.shape)} but params[{i}] has {list(p.shape)}")
    if size == "numel" and t.numel() != p.numel():
        raise RuntimeError(f"{op}: {name}[{i}] must have {p.numel()} elements like params[{i}], got {t.numel()}")
    if t.dtype != dtype:
        raise RuntimeError(f"{op}: {name}[{i}] has dtype {t.dtype}, expected {dtype}")
    if t.device != p.device:
        raise RuntimeError(f"{op}: {name}[{i}] is on {t.device}, expected {p.device} like params[{i}]")
    if not t.is_contiguous():
        raise RuntimeError(f"{op}: {name}[{i}] must be contiguous")


# ---- pointer table ---------------------------------------------------------------------------------

def float_bits(x: float) -> int:
    """The float64 bit pattern of x as a signed int64 (how floats travel in the table)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def address(t: torch.Tensor | None) -> int:
    """data_ptr() of a buffer the kernel reads or writes; 0 for an absent (None or empty) one."""
    return t.data_ptr() if t is not None and t.numel() > 0 else 0


def pointer_table(scalars: Sequence[float], rows: Sequence[Sequence[int]], numels: Sequence[int], row_width: int,
                  device: torch.device, with_work: bool = True) -> tuple[torch.Tensor, int, int]:
    """Build the table described in the module docstring. Returns (table on device, index of the
    first work item, number of work items = the grid size)."""
    assert len(scalars) <= NUM_SCALARS and len(rows) == len(numels)
    header = [float_bits(s) for s in scalars] + [0] * (NUM_SCALARS - len(scalars))
    body = []
    for row in rows:
        assert len(row) <= row_width
        body.extend(row)
        body.extend([0] * (row_width - len(row)))
    values = torch.tensor(header + body, dtype=torch.int64)
    work_at = values.numel()
    num_work = 0
    if with_work and rows:
        counts = torch.tensor([(n + CHUNK - 1) // CHUNK for n in numels], dtype=torch.int64)
        num_work = int(counts.sum())
        row_of = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int64), counts)
        first = torch.cumsum(counts, 0) - counts
        local = torch.arange(num_work, dtype=torch.int64) - torch.repeat_interleave(first, counts)
        values = torch.cat([values, (row_of << 32) | local])
    return values.to(device), work_at, num_work


def aligned(rows: Sequence[Sequence[int]], num_addresses: int) -> bool:
    """Whether the first num_addresses columns of every row (the buffer addresses; 0 = absent) are
    multiples of 16 bytes, so the kernels may promise aligned pointers to the compiler."""
    return all(a % 16 == 0 for row in rows for a in row[:num_addresses])


# ---- launching ----------------------------------------------------------------------------------------

def gpu_configs():
    """Autotuning candidates on a GPU: memory-bound element-wise kernels, so block size and warps."""
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))]


# While interpreting, the cost grows with the number of block iterations (each is many numpy calls),
# so blocks are large; two per chunk keep the in-chunk loop exercised.
_INTERPRET_CONFIG = {"BLOCK": 2048, "num_warps": 1}
_TRACED_CONFIG = {"BLOCK": 1024, "num_warps": 4}  # no tuning inside a trace


class MultiTensorKernels:
    """The two kernels of one multi-tensor op and how to launch them.

    - ``table_kernel(table, work_at, P, ALIGNED, **flags, CHUNK, BLOCK, EMULATE_RTNE)``: one launch,
      one program per work item of the pointer table (eager calls);
    - ``tensor_kernel(*buffers, table, t, **flags, CHUNK, BLOCK, EMULATE_RTNE)``: one launch per tensor
      with its buffers as arguments (torch.compile's functional tracing, where no data_ptr() exists
      and the graph must see which tensors a kernel writes); the table then holds no addresses.
    ``compute_columns[k]``: whether buffer column k holds the compute dtype (else the storage dtype).
    """

    scratch_numel = 1 << 22  # elements of the scratch buffers the GPU autotuner runs on

    def __init__(self, table_kernel, tensor_kernel, compute_columns: Sequence[bool], row_width: int):
        self.table_kernel, self.tensor_kernel = table_kernel, tensor_kernel
        self.compute_columns, self.row_width = tuple(compute_columns), row_width
        self._tuner = None
        self._configs: dict = {}

    def launch(self, kind: str, dtype: torch.dtype, device: torch.device, scalars: Sequence[float],
               buffers: Sequence[Sequence[torch.Tensor | None]], extras: Sequence[Sequence[int]], flags: dict) -> None:
        """Run the op on the non-empty tensors: buffers[i] in column order (None: absent), extras[i]
        the integers of its row after the addresses, numel first. kind: see tensor_kind."""
        if not buffers:
            return
        if kind == "functional":
            table = pointer_table(scalars, [[0] * len(b) + list(e) for b, e in zip(buffers, extras)],
                                  [0] * len(buffers), self.row_width, device, with_work=False)[0]
            config = _INTERPRET_CONFIG if interpreting() else _TRACED_CONFIG
            for t, (bufs, extra) in enumerate(zip(buffers, extras)):
                args = [b if b is not None else self._placeholder(k, dtype, device) for k, b in enumerate(bufs)]
                grid = (triton.cdiv(extra[0], CHUNK),)
                torch.library.wrap_triton(self.tensor_kernel)[grid](
                    *args, table, t, CHUNK=CHUNK, EMULATE_RTNE=interpreting(), **flags, **config)
            return
        rows = [[address(b) for b in bufs] + list(extra) for bufs, extra in zip(buffers, extras)]
        table, work_at, num_work = pointer_table(scalars, rows, [e[0] for e in extras], self.row_width, device)
        flags = dict(P=tl_dtype(dtype), ALIGNED=aligned(rows, len(self.compute_columns)), **flags)
        config = self._config(flags, dtype, device, len(scalars))
        # The plain kernel, never wrap_triton: this path reads data_ptr()s, which no trace may record.
        self.table_kernel[(num_work,)](table, work_at, CHUNK=CHUNK, EMULATE_RTNE=interpreting(), **flags, **config)

    def _placeholder(self, column: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An empty tensor for an absent buffer (a flag or a zero group size keeps the kernel off it)."""
        return torch.empty(0, dtype=compute_dtype(dtype) if self.compute_columns[column] else dtype, device=device)

    def _config(self, flags: dict, dtype: torch.dtype, device: torch.device, num_scalars: int) -> dict:
        """BLOCK, num_warps (and num_stages) for a variant of the table kernel.

        Interpreting: a fixed config (@triton.autotune does not run there). On a GPU: @triton.autotune
        picks, but it re-runs a kernel many times, and these kernels update in place memory that only
        the pointer table names, out of reach of autotune's restore_value. So the tuner runs once per
        variant on scratch buffers, and real calls launch the plain kernel with the config it chose."""
        if interpreting():
            return _INTERPRET_CONFIG
        key = tuple(flags.values())
        if key not in self._configs:
            if self._tuner is None:
                self._tuner = triton.autotune(configs=gpu_configs(), key=list(flags))(self.table_kernel)
            numel = self.scratch_numel
            scratch = [torch.zeros(numel, dtype=compute_dtype(dtype) if c else dtype, device=device)
                       for c in self.compute_columns]
            row = [address(b) for b in scratch] + [numel]
            table, work_at, num_work = pointer_table([0.0] * num_scalars, [row], [numel], self.row_width, device)
            self._tuner[(num_work,)](table, work_at, CHUNK=CHUNK, EMULATE_RTNE=False, **flags)
            best = self._tuner.best_config
            self._configs[key] = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
        return self._configs[key]


# ---- jit helpers shared by the kernels ----------------------------------------------------------------

if triton is not None:
    @triton.jit
    def work_item(table, work_at, CHUNK: tl.constexpr):
        """(row index, first element) of this program's chunk."""
        item = tl.load(table + work_at + tl.program_id(0))
        return item >> 32, (item & 0xFFFFFFFF) * CHUNK

    @triton.jit
    def table_float(table, k, FP64: tl.constexpr):
        """Entry k of the table, stored as float64 bits, in the compute dtype."""
        return upcast(tl.load(table + k).to(tl.float64, bitcast=True), FP64)

    @triton.jit
    def row_pointer(row, col, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
        """The buffer address in column col of a row, as a pointer to DTYPE. ALIGNED: the host checked
        that every address in the table is a multiple of 16 bytes; telling the compiler lets it use
        vector loads and stores (it knows nothing about an address read from memory)."""
        pointer = tl.load(row + col).to(tl.pointer_type(DTYPE), bitcast=True)
        if ALIGNED:
            pointer = tl.multiple_of(pointer, 16)
        return pointer

    @triton.jit
    def load(pointer, mask, MASKED: tl.constexpr):
        """A float load, masked only where the block runs past the end (0 there)."""
        if MASKED:
            return tl.load(pointer, mask=mask, other=0.0)
        else:
            return tl.load(pointer)

    @triton.jit
    def store(pointer, value, mask, MASKED: tl.constexpr):
        if MASKED:
            tl.store(pointer, value, mask=mask)
        else:
            tl.store(pointer, value)

    @triton.jit
    def upcast(x, FP64: tl.constexpr):
        """x in the compute dtype: float64 math for float64 storage, float32 for the rest (loaded
        bfloat16/float16 are converted before any arithmetic, which the interpreter gets wrong)."""
        if FP64:
            return x.to(tl.float64)
        else:
            return x.to(tl.float32)

    @triton.jit
    def divide(a, b):
        """a / b correctly rounded, as the C++ kernels divide (Triton's float32 `/` is approximate)."""
        if a.dtype == tl.float64:
            return a / b
        else:
            return tl.div_rn(a, b)

    @triton.jit
    def square_root(x):
        """Correctly rounded √x (Triton's float32 sqrt is approximate; sqrt_rn takes float32 only)."""
        if x.dtype == tl.float64:
            return tl.sqrt(x)
        else:
            return tl.sqrt_rn(x)

    @triton.jit
    def to_storage(x, P: tl.constexpr, EMULATE_RTNE: tl.constexpr):
        """Round float32/float64 x to the storage dtype P, to nearest even as torch and CUDA round.
        The interpreter truncates float32 → bfloat16, so there (EMULATE_RTNE) the rounding is done on
        the bits, with NaN → 0x7FC0 as torch gives."""
        if EMULATE_RTNE and P == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(x != x, 0x7FC0, rounded)
            return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(P)


# ---------------------------------------------------------------------------------------------
# Launch helpers of the kernel modules
# ---------------------------------------------------------------------------------------------
# Triton decides at decoration time whether @triton.jit gives a compiled or an interpreted
# (numpy, CPU tensors) kernel; this module reads the same switch once (interpreting()).
INTERPRET = interpreting()
# Launch option: every multiply and add rounded on its own, as in the C++ kernels. A GPU would
# otherwise fuse a*b + c into one FMA (Triton's default, which 3.10 means to change): the noise
# would lose the C++ op's bits, and float64 sums would depend on the Triton version.
NO_FMA = {} if INTERPRET else {"enable_fp_fusion": False}


def tl_load_dtype(dtype: torch.dtype):
    """The Triton dtype a kernel loads for a torch dtype; bf16 travels as int16 bits (see load_ct).
    (``tl_dtype`` above is the dtype a kernel computes on, bf16 as bf16.)"""
    return {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16,
            torch.bfloat16: tl.int16}[dtype]


def as_kernel_arg(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors are handed to kernels as int16 views (bits): the interpreter's bf16 loads flush
    subnormals and its float32→bf16 cast truncates instead of rounding to nearest even."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def check_device(op: str, t: torch.Tensor, what: str) -> None:
    if INTERPRET or t.device.type == "cuda":
        return
    raise RuntimeError(f"{op}: the Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), "
                       f"got {what} on {t.device}")


def autotuned(kernel, key):
    """@triton.autotune over num_warps on a GPU; the fixed default config while interpreting, where
    autotune does not work. Block sizes stay fixed: the host builds the work list from them."""
    if INTERPRET:
        return kernel
    configs = [triton.Config({}, num_warps=w) for w in (2, 4, 8)]
    return triton.autotune(configs=configs, key=key)(kernel)


def size_bucket(n: int) -> int:
    """Autotune key: retune per power of two of the work, not per exact size."""
    return max(int(n), 1).bit_length()


if triton is not None:
    @triton.jit
    def load_ct(ptr, mask, CT: tl.constexpr, BF16: tl.constexpr):
        """Load and upcast to the compute dtype CT. BF16: the tensor is an int16 view of bf16 bits,
        widened exactly by a shift (what a hardware bf16 load does)."""
        raw = tl.load(ptr, mask=mask, other=0)
        if BF16:
            return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            return raw.to(CT)


    @triton.jit
    def store_cast(ptr, value, mask, BF16: tl.constexpr):
        """Cast a float32/float64 value to the destination's dtype and store. BF16: round to nearest
        even on the float32 bits (as torch's .to(torch.bfloat16)), NaN → 0x7FC0, stored as int16 bits."""
        if BF16:
            bits = value.to(tl.int32, bitcast=True)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            rounded = tl.where(value != value, 0x7FC0, rounded)
            tl.store(ptr, rounded.to(tl.int16), mask=mask)
        else:
            tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)
