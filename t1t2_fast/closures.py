"""The contract of the closures ``T1T2`` calls: what a training or validation closure must return,
and which of the training-closure conventions a closure follows (docs/guide.md, "Closures").

A training closure given to ``step(closure)`` may

- return a differentiable loss and leave the backward to ``T1T2`` (``FORWARD``),
- run its own backward (torch.optim's ``opt.zero_grad(); loss.backward(); return loss``, or a
  closure that returns a detached loss or None after its backward, as PyTorch Lightning passes in
  automatic optimization) (``BACKWARD``),
- return None without touching the gradients, which were computed before ``step`` was called (the
  closure Lightning passes in manual optimization after ``manual_backward``) (``NONE``).

``T1T2`` tells them apart itself: it marks each parameter's ``.grad`` (the tensor and its version
counter) before the closure runs, and again after each ``opt.zero_grad()`` inside it; a ``.grad``
that is new or was written in place since means the closure ran a backward. The grads are then
exactly what the closure left, as with any torch.optim optimizer: a closure that backwards without
zeroing accumulates into the grads it found (Lightning's gradient accumulation). A closure that
zeroes grads in place (``set_to_none=False``) through something other than ``opt.zero_grad()`` and
then only returns the loss is taken as backward-done: zero them with ``opt.zero_grad()``, or not at
all (``T1T2`` zeroes them before its own backward).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

FORWARD, BACKWARD, NONE = "forward", "backward", "none"


def _one_value(loss, where: str, expected: str) -> torch.Tensor:
    """``loss`` as a 0-d tensor, or the error that says what the ``where`` closure returned instead."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the {where} closure must return {expected}, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"the {where} closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
                         f"reduce it (e.g. .mean()) inside the closure")
    return loss.reshape(())


def scalar_loss(loss, where: str) -> torch.Tensor:
    """The closure's loss as a 0-d tensor that requires grad, or a clear error saying what is wrong
    with it; ``where`` names the closure ("training", "validation")."""
    loss = _one_value(loss, where, "a scalar loss tensor")
    if not loss.requires_grad:
        raise ValueError(f"the {where} closure returned a loss that does not require grad; is it computed from "
                         f"the model's parameters outside torch.no_grad()?")
    return loss


def reported_loss(loss) -> torch.Tensor | None:
    """What ``step`` returns for a closure that ran its own backward: its loss detached, or None."""
    if loss is None:
        return None
    return _one_value(loss, "training", "a scalar loss tensor or None").detach()


@contextmanager
def grads_set_aside(params: list[torch.Tensor]):
    """Run a block with every parameter's ``.grad`` set to None, and put the previous ones back after."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield saved
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def grad_marks(params: list[torch.Tensor]) -> list[tuple | None]:
    """Each parameter's ``.grad`` and its version counter (None where there is no grad)."""
    return [None if p.grad is None else (p.grad, p.grad._version) for p in params]


def grads_written(params: list[torch.Tensor], marks: list[tuple | None]) -> bool:
    """Whether a backward wrote a ``.grad`` since ``marks``: a new grad tensor, or one changed in place."""
    for p, m in zip(params, marks):
        g = p.grad
        if g is not None and (m is None or g is not m[0] or g._version != m[1]):
            return True
    return False


class TrainingCall:
    """One call of a T1 step's training closure: ``marks`` are renewed by ``opt.zero_grad()`` inside it."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.marks = grad_marks(params)

    def zeroed(self) -> None:
        self.marks = grad_marks(self.params)

    def run(self, closure: Callable) -> tuple[str, object]:
        """Call the closure; returns its convention (FORWARD, BACKWARD, NONE) and what it returned.
        The grads are left as the closure left them."""
        out = closure()
        if grads_written(self.params, self.marks):
            return BACKWARD, out
        if out is None:
            if all(p.grad is None for p in self.params):
                raise RuntimeError("the training closure returned None and no parameter has a gradient: return "
                                   "the loss (T1T2 runs the backward), or run the backward inside the closure or "
                                   "before step()")
            return NONE, out
        return FORWARD, out


def backward_closure_error(what: str) -> RuntimeError:
    """The error for a noise-hypergradient replay that needs the training loss itself (``what``)
    while the training closure runs its own backward or returns nothing."""
    return RuntimeError(
        f"{what} needs the training loss as a differentiable tensor, and the training closure runs its own "
        f"backward or returns None: pass a closure that only computes and returns the loss, as "
        f"opt.step(train_closure) or opt.hyper_step(val_closure, train=train_closure)")


__all__ = ["BACKWARD", "FORWARD", "NONE", "TrainingCall", "backward_closure_error", "grad_marks",
           "grads_set_aside", "grads_written", "reported_loss", "scalar_loss"]
