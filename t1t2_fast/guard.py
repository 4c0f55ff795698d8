"""The non-finite guard: which T1 and T2 steps are skipped for Inf/NaN, the skip counters, and the
GradScaler plumbing of the T1 step's skip flag (docs/reliability.md).

Two modes (``T1T2(skip_nonfinite=)``):

- ``True`` (default, lazy): the T1 step's skip flag is computed on the device (the training loss's
  isfinite, a GradScaler's found_inf; the gradients are scanned only when the step has neither), the
  fused op reads it there and writes nothing when it is set, and the host never reads it during
  ``step()``. A skipped step leaves θ and the optimizer's buffers (momentum, Adam's moments) as they
  were, and still counts as a step (``steps``, Adam's bias-correction count, the noise keys and the
  hyper schedule move on). The skip counters live on the device and are read when asked for
  (``skipped``, ``consecutive_skips``, ``last_skip``, ``state_dict``) and by each hyper step, whose
  one host read also raises ``NonFiniteError``.
- ``"grads"``: every step's gradients are scanned in the op, and the flag is read back after it (one
  host sync per step): a skipped step is as if it were not there (``steps``, Adam's count and the
  noise keys stay too), and ``NonFiniteError`` comes from the step itself.

A skipped T2 step leaves λ, the hyper-optimizer state and ``last_hypergrad`` as they were.
``max_consecutive_skips`` skips in a row raise ``NonFiniteError``.
"""
from __future__ import annotations

import math

import torch

STEP_KINDS = ("t1", "t2")


class NonFiniteError(RuntimeError):
    """Raised after ``max_consecutive_skips`` T1 or T2 steps in a row were skipped for non-finite
    values: the run is not recovering on its own."""


# Host reads of device values made through ``host_list`` (the sync-count tests add them to the
# ``aten._local_scalar_dense`` calls they count, as ``Tensor.tolist`` does not dispatch)
HOST_READS = [0]


def host_list(t: torch.Tensor) -> list:
    """The values of a small tensor on the host: one synchronization, counted in ``HOST_READS``."""
    HOST_READS[0] += 1
    return t.tolist()


def finite_flag(tensors) -> torch.Tensor | None:
    """A 0-d bool tensor on the tensors' device: whether every element is finite (no host sync);
    None for no elements."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return None
    return torch.isfinite(_extremes(tensors)).all()


def all_finite(tensors) -> bool:
    """Whether every element of every tensor is finite: one pass (NaN and Inf propagate), one host read."""
    tensors = [t for t in tensors if t.numel()]
    return not tensors or bool(torch.isfinite(_extremes(tensors)).all())


def _extremes(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A small tensor that is all finite exactly when every element of ``tensors`` is (NaN and ±Inf
    propagate into it), in one pass over them. On CUDA, the max |x| of each tensor (one foreach
    launch). On the CPU, each tensor's min and max (``aminmax``, in float64 so that no value
    overflows): torch's CPU inf-norm is a slow path, 7x aminmax's time at 25M float32 values (90 vs
    13 ms on one thread, 49 vs 7 ms on two), and it is what every hyper step paid to check v."""
    if tensors[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(tensors, math.inf))
    return torch.stack([torch.stack(torch.aminmax(t)).to(torch.float64) for t in tensors])


class SkipGuard:
    """Counts skipped steps per kind ("t1", "t2") and raises once too many come in a row.

    ``mode``: ``T1T2(skip_nonfinite=)``, True (lazy), "grads" (scan and read back every step) or
    False; ``enabled``: whether steps are checked at all."""

    MODES = (True, False, "grads")

    def __init__(self, mode, max_consecutive_skips: int | None):
        if not any(mode is m or (isinstance(m, str) and mode == m) for m in self.MODES):
            raise ValueError(f"skip_nonfinite must be True (lazy: the loss or GradScaler's found_inf, read on the "
                             f"device), 'grads' (scan every step's gradients, exact bookkeeping) or False, got {mode!r}")
        if max_consecutive_skips is not None and (int(max_consecutive_skips) != max_consecutive_skips
                                                  or max_consecutive_skips < 1):
            raise ValueError(f"max_consecutive_skips must be a positive integer or None, got {max_consecutive_skips!r}")
        self.mode = mode
        self.max_consecutive_skips = None if max_consecutive_skips is None else int(max_consecutive_skips)
        self.skipped = {k: 0 for k in STEP_KINDS}             # steps skipped for Inf/NaN, in all
        self.consecutive_skips = {k: 0 for k in STEP_KINDS}
        self.last_skip: str | None = None                      # why the latest step was skipped (None: taken)
        # lazy mode: per kind [skips, consecutive, peak consecutive, step of the last skip, reason code]
        # on the device since the last ``materialize``
        self._pending: dict[str, torch.Tensor] = {}
        self._tripped: tuple | None = None  # a run of skips over the limit, found by a read that does not raise
        self._seq, self._recorded = 0, {}

    @property
    def enabled(self) -> bool:
        return self.mode is not False

    @enabled.setter
    def enabled(self, value) -> None:
        self.mode = value if isinstance(value, str) else bool(value)

    @property
    def lazy(self) -> bool:
        return self.mode is True

    # reason codes of lazily recorded T1 skips
    REASONS = {1: "non-finite training loss", 2: "GradScaler found Inf/NaN gradients",
               3: "non-finite training gradient", 4: "non-finite validation loss or gradient",
               5: "non-finite hypergradient"}

    # lazy mode: per kind, a device log of the steps since the last read, one float64 a step: 0 for a
    # step taken, 8·step + code for a skipped one (exact up to step 2^49); LOG_STEPS steps are folded
    # on the device into a summary [skips, consecutive, peak consecutive, 8·step + code of the last]
    LOG_STEPS = 1024

    def record(self, kind: str, found: torch.Tensor, step: int, code: torch.Tensor | int) -> None:
        """Lazy mode: log a step of ``kind`` whose skip flag ``found`` (> 0: skipped) stays on the
        device; ``code`` (a key of ``REASONS``, may be a device tensor) says why, if it was. Two to four
        one-element device ops, no host read."""
        self._seq += 1
        self._recorded[kind] = self._seq  # which kind's latest step is the latest (for last_skip)
        log = self._pending.get(kind)
        if log is None:  # [buffer, steps logged, summary of folded steps or None, consecutive before]
            log = self._pending[kind] = [torch.empty(self.LOG_STEPS, dtype=torch.float64, device=found.device),
                                         0, None, self.consecutive_skips[kind]]
        flag = found.reshape(()).to(torch.float64)
        if isinstance(code, int):
            value = (flag > 0).to(torch.float64) * float(8 * step + code) if code != 1 else flag * float(8 * step + 1)
        else:
            value = (flag > 0).to(torch.float64) * (code.to(torch.float64) + float(8 * step))
        log[0].select(0, log[1]).copy_(value)
        log[1] += 1
        if log[1] == self.LOG_STEPS:
            self._fold(log)

    @staticmethod
    def _fold(log: list) -> None:
        """Fold a full log into its device summary (vectorized, no host read)."""
        buf, n, summary, before = log
        v = buf[:n]
        skipped = v > 0
        idx = torch.arange(n, device=v.device, dtype=torch.float64)
        c_in = summary[1] if summary is not None else torch.tensor(float(before), dtype=torch.float64,
                                                                     device=v.device)
        last_taken = torch.cummax(torch.where(skipped, -1.0, idx), 0).values
        run = torch.where(skipped, torch.where(last_taken >= 0, idx - last_taken, idx + 1 + c_in), 0.0)
        last = v.gather(0, torch.where(skipped, idx, -1.0).argmax().reshape(1)).reshape(())  # the last skipped
        parts = [skipped.sum().to(torch.float64), run[-1], run.max(), torch.where(skipped.any(), last, 0.0)]
        if summary is not None:
            parts = [parts[0] + summary[0], parts[1], torch.maximum(parts[2], summary[2]),
                     torch.where(parts[3] > 0, parts[3], summary[3])]
        log[2], log[1] = torch.stack(parts), 0

    def pending(self) -> list[torch.Tensor]:
        """The device values ``materialize`` reads, flat (to be read together with other values)."""
        out = []
        for k in STEP_KINDS:
            log = self._pending.get(k)
            if log is not None:
                out += ([log[2]] if log[2] is not None else []) + [log[0][:log[1]]]
        return out

    def materialize(self, values: list | None = None, steps: int = 0, raise_error: bool = True) -> None:
        """Fold the device logs into the host counters (``values``: the ``pending()`` tensors' contents
        concatenated, already read with others; else read here, one sync) and raise ``NonFiniteError``
        if a run of skips reached the limit."""
        kinds = [k for k in STEP_KINDS if k in self._pending]
        if kinds:
            if values is None:
                values = host_list(torch.cat(self.pending()))
            pos, parsed = 0, []
            for kind in kinds:
                _, n, summary, before = self._pending.pop(kind)
                total, consec, peak, last = 0, before, 0, 0.0
                if summary is not None:
                    total, consec, peak, last = values[pos:pos + 4]
                    pos += 4
                for v in values[pos:pos + n]:
                    if v > 0:
                        total, consec, last = total + 1, consec + 1, v
                        peak = max(peak, consec)
                    else:
                        consec = 0
                pos += n
                parsed.append((kind, int(total), int(consec), int(peak), int(last)))
            # in the order of each kind's latest recorded step: last_skip is about the latest one
            for kind, total, consec, peak, last in sorted(parsed, key=lambda p: self._recorded[p[0]]):
                reason = (f"{'T1' if kind == 't1' else 'T2'} step {last // 8}: "
                          f"{self.REASONS.get(last % 8, '?')}")
                self.skipped[kind] += total
                self.consecutive_skips[kind] = consec
                self.last_skip = reason if consec > 0 else None  # the latest recorded step of this kind
                limit = self.max_consecutive_skips
                if limit is not None and peak >= limit:
                    self._tripped = (kind, peak, reason, steps)
        if raise_error and self._tripped is not None:
            tripped, self._tripped = self._tripped, None
            self._raise(*tripped)

    def skip(self, kind: str, reason: str, steps: int) -> None:
        """Record a skipped step of ``kind``; ``steps`` (T1 steps taken so far) goes into the error."""
        self.skipped[kind] += 1
        self.consecutive_skips[kind] += 1
        self.last_skip = reason
        n, limit = self.consecutive_skips[kind], self.max_consecutive_skips
        if limit is not None and n >= limit:
            self._raise(kind, n, reason, steps)

    def _raise(self, kind: str, n: int, reason: str, steps: int) -> None:
        what = "T1 (training)" if kind == "t1" else "T2 (hyperparameter)"
        raise NonFiniteError(
            f"{n} consecutive {what} steps were skipped for non-finite values (the latest: {reason}); "
            f"{self.skipped[kind]} skipped in all after {steps} T1 steps. The run is not recovering: "
            f"lower the learning rate{' or hyper_lr' if kind == 't2' else ''}, check the data and the loss "
            f"for Inf/NaN, or raise max_consecutive_skips (None never stops)")

    def took(self, kind: str) -> None:
        """Record a step of ``kind`` that was taken."""
        self.consecutive_skips[kind] = 0
        self.last_skip = None

    def t1_flags(self, loss: torch.Tensor | None, found_inf: torch.Tensor | None,
                 device: torch.device, distributed: bool = False) -> tuple[torch.Tensor | None, bool]:
        """(found, check) for the fused T1 op: ``found`` is the flag it reads (skip if > 0) and, with
        ``check``, sets when it finds an Inf/NaN gradient. A GradScaler's ``found_inf`` has already
        scanned the gradients: it is only read, never written. A non-finite loss sets the flag. The lazy
        mode scans the gradients only when there is neither a loss nor a found_inf to go by, or across
        processes (``distributed``): there the loss is the rank's own and the gradients all ranks'."""
        if not self.enabled:
            return found_inf, False
        if self.lazy and found_inf is None and loss is not None and not distributed:  # the common case
            return (loss - loss != 0).to(torch.float32).reshape(()), False  # Inf/NaN: inf - inf, NaN - NaN are NaN
        found = torch.zeros((), dtype=torch.float32, device=device) if found_inf is None else found_inf
        if loss is not None:
            found = torch.maximum(found, (~torch.isfinite(loss)).to(torch.float32).reshape(()))
        scan = found_inf is None and (not self.lazy or loss is None or distributed)
        return found, scan

    @staticmethod
    def t1_code(loss: torch.Tensor | None, found_inf: torch.Tensor | None, scanned: bool) -> torch.Tensor | int:
        """The ``REASONS`` code a lazily recorded T1 skip gets (on the device when it depends on the loss)."""
        other = 2 if found_inf is not None else 3
        if loss is None:
            return other
        if not scanned and found_inf is None:  # the loss is all that was checked
            return 1
        return torch.where(torch.isfinite(loss).reshape(()), float(other), 1.0)

    @staticmethod
    def t1_reason(loss: torch.Tensor | None, found_inf: torch.Tensor | None,
                  grad_scale: torch.Tensor | None) -> str:
        """Why a T1 step was skipped."""
        if loss is not None and not bool(torch.isfinite(loss)):
            return f"non-finite training loss ({float(loss)})"
        if found_inf is not None:
            return "GradScaler found Inf/NaN gradients" + (
                f" (scale {float(grad_scale):g})" if grad_scale is not None else "")
        return "non-finite training gradient"
