"""The non-finite guard: which T1 and T2 steps are skipped for Inf/NaN, the skip counters, and the
GradScaler plumbing of the T1 step's skip flag (docs/reliability.md).

A skipped T1 step leaves θ, the optimizer state (Adam's step count too) and the step counter as
they were; a skipped T2 step leaves λ, the hyper-optimizer state and ``last_hypergrad`` as they
were. ``max_consecutive_skips`` skips in a row raise ``NonFiniteError``.
"""
from __future__ import annotations

import math

import torch

STEP_KINDS = ("t1", "t2")


class NonFiniteError(RuntimeError):
    """Raised after ``max_consecutive_skips`` T1 or T2 steps in a row were skipped for non-finite
    values: the run is not recovering on its own."""


def all_finite(tensors) -> bool:
    """Whether every element of every tensor is finite: one fused max-abs pass (NaN propagates)."""
    tensors = [t for t in tensors if t.numel()]
    return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, math.inf))).all())


class SkipGuard:
    """Counts skipped steps per kind ("t1", "t2") and raises once too many come in a row.

    ``enabled``: whether steps are checked at all (``T1T2(skip_nonfinite=)``)."""

    def __init__(self, enabled: bool, max_consecutive_skips: int | None):
        if max_consecutive_skips is not None and (int(max_consecutive_skips) != max_consecutive_skips
                                                  or max_consecutive_skips < 1):
            raise ValueError(f"max_consecutive_skips must be a positive integer or None, got {max_consecutive_skips!r}")
        self.enabled = bool(enabled)
        self.max_consecutive_skips = None if max_consecutive_skips is None else int(max_consecutive_skips)
        self.skipped = {k: 0 for k in STEP_KINDS}             # steps skipped for Inf/NaN, in all
        self.consecutive_skips = {k: 0 for k in STEP_KINDS}
        self.last_skip: str | None = None                      # why the latest step was skipped (None: taken)

    def skip(self, kind: str, reason: str, steps: int) -> None:
        """Record a skipped step of ``kind``; ``steps`` (T1 steps taken so far) goes into the error."""
        self.skipped[kind] += 1
        self.consecutive_skips[kind] += 1
        self.last_skip = reason
        n, limit = self.consecutive_skips[kind], self.max_consecutive_skips
        if limit is not None and n >= limit:
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
                 device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(found, check) for the fused T1 op: ``found`` is the flag it reads (skip if > 0) and, with
        ``check``, sets when it finds an Inf/NaN gradient. A GradScaler's ``found_inf`` has already
        scanned the gradients: it is only read, never written. A non-finite loss sets the flag."""
        if not self.enabled:
            return found_inf, False
        found = torch.zeros((), dtype=torch.float32, device=device) if found_inf is None else found_inf
        if loss is not None:
            found = torch.maximum(found, (~torch.isfinite(loss)).to(torch.float32).reshape(()))
        return found, found_inf is None

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
