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
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, math.inf))).all()


def all_finite(tensors) -> bool:
    """Whether every element of every tensor is finite: one fused max-abs pass (NaN propagates)."""
    tensors = [t for t in tensors if t.numel()]
    return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, math.inf))).all())


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

    def record(self, kind: str, found: torch.Tensor, step: int, code: torch.Tensor | int) -> None:
        """Lazy mode: count a step of ``kind`` whose skip flag ``found`` (> 0: skipped) stays on the
        device; ``code`` (a key of ``REASONS``, may be a device tensor) says why, if it was."""
        f = (found > 0).reshape(())
        self._seq += 1
        self._recorded[kind] = self._seq  # which kind's latest step is the latest (for last_skip)
        acc = self._pending.get(kind)
        if acc is None:
            acc = self._pending[kind] = torch.zeros(5, dtype=torch.float64, device=found.device)
            acc[1] = self.consecutive_skips[kind]  # a run of skips continues across a read
        ff = f.to(torch.float64)
        consec = (acc[1] + 1) * ff
        code = torch.as_tensor(code, dtype=torch.float64, device=found.device)
        acc.copy_(torch.stack([acc[0] + ff, consec, torch.maximum(acc[2], consec),
                               torch.where(f, torch.full_like(acc[3], float(step)), acc[3]),
                               torch.where(f, code, acc[4])]))

    def pending(self) -> list[torch.Tensor]:
        """The device counters ``materialize`` reads (to be read together with other values)."""
        return [self._pending[k] for k in STEP_KINDS if k in self._pending]

    def materialize(self, values: list | None = None, steps: int = 0, raise_error: bool = True) -> None:
        """Fold the device counters into the host ones (``values``: their contents, already read with
        others; else read here, one sync) and raise ``NonFiniteError`` if a run of skips reached the
        limit."""
        kinds = [k for k in STEP_KINDS if k in self._pending]
        if not kinds:
            if raise_error and self._tripped is not None:
                tripped, self._tripped = self._tripped, None
                self._raise(*tripped)
            return
        if values is None:
            values = host_list(torch.stack(self.pending()))
        # in the order of each kind's latest recorded step: last_skip is about the latest one
        for kind, (n, consec, peak, at, code) in sorted(zip(kinds, values), key=lambda kv: self._recorded[kv[0]]):
            del self._pending[kind]
            reason = f"{'T1' if kind == 't1' else 'T2'} step {int(at)}: {self.REASONS.get(int(code), '?')}"
            self.skipped[kind] += int(n)
            self.consecutive_skips[kind] = int(consec)
            self.last_skip = reason if consec > 0 else None  # the latest recorded step of this kind
            limit = self.max_consecutive_skips
            if limit is not None and peak >= limit:
                self._tripped = (kind, int(peak), reason, steps)
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
        found = torch.zeros((), dtype=torch.float32, device=device) if found_inf is None else found_inf
        if loss is not None:
            found = torch.maximum(found, (~torch.isfinite(loss)).to(torch.float32).reshape(()))
        scan = found_inf is None and (not self.lazy or loss is None or distributed)
        return found, scan

    @staticmethod
    def t1_code(loss: torch.Tensor | None, found_inf: torch.Tensor | None) -> torch.Tensor | int:
        """The ``REASONS`` code a lazily recorded T1 skip gets (on the device when it depends on the loss)."""
        other = 2 if found_inf is not None else 3
        if loss is None:
            return other
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
