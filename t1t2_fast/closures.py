"""The contract of the closures ``T1T2`` calls: what a training or validation closure must return,
and which of the training-closure conventions a closure follows (docs/guide.md, "Closures").

A training closure given to ``step(closure)`` may

- return a differentiable loss and leave the backward to ``T1T2`` (``FORWARD``),
- run its own backward (torch.optim's ``opt.zero_grad(); loss.backward(); return loss``, or a
  closure that returns a detached loss or None after its backward, as PyTorch Lightning passes in
  automatic optimization) (``BACKWARD``),
- return None without touching the gradients, which were computed before ``step`` was called (the
  closure Lightning passes in manual optimization after ``manual_backward``) (``NONE``).

``T1T2`` tells them apart itself: the parameters' ``.grad`` are set aside (set to None) before the
closure runs; a parameter with a ``.grad`` afterwards means the closure ran a backward.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

FORWARD, BACKWARD, NONE = "forward", "backward", "none"


def scalar_loss(loss, where: str) -> torch.Tensor:
    """The closure's loss as a 0-d tensor that requires grad, or a clear error saying what is wrong
    with it; ``where`` names the closure ("training", "validation")."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the {where} closure must return a scalar loss tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"the {where} closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
                         f"reduce it (e.g. .mean()) inside the closure")
    if not loss.requires_grad:
        raise ValueError(f"the {where} closure returned a loss that does not require grad; is it computed from "
                         f"the model's parameters outside torch.no_grad()?")
    return loss.reshape(())


def reported_loss(loss) -> torch.Tensor | None:
    """What ``step`` returns for a closure that ran its own backward: its loss detached, or None."""
    if loss is None:
        return None
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the training closure must return a scalar loss tensor or None, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"the training closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
    return loss.detach().reshape(())


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


def call_training(closure: Callable, params: list[torch.Tensor]) -> tuple[str, object, list]:
    """Run the training closure of a T1 step with the parameters' grads set to None; returns its
    convention (FORWARD, BACKWARD, NONE), what it returned, and the grads from before the call (the
    caller puts them back for NONE). The grads are left as the closure left them."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    out = closure()
    if any(p.grad is not None for p in params):
        return BACKWARD, out, saved
    if out is None:
        if all(g is None for g in saved):
            raise RuntimeError("the training closure returned None and no parameter has a gradient: return the "
                               "loss (T1T2 runs the backward), or run the backward inside the closure or before "
                               "step()")
        return NONE, out, saved
    return FORWARD, out, saved


def backward_closure_error(what: str) -> RuntimeError:
    """The error for a noise-hypergradient replay that needs the training loss itself (``what``)
    while the training closure runs its own backward or returns nothing."""
    return RuntimeError(
        f"{what} needs the training loss as a differentiable tensor, and the training closure runs its own "
        f"backward or returns None: pass a closure that only computes and returns the loss, as "
        f"opt.step(train_closure) or opt.hyper_step(val_closure, train=train_closure)")


__all__ = ["BACKWARD", "FORWARD", "NONE", "backward_closure_error", "call_training", "grads_set_aside",
           "reported_loss", "scalar_loss"]
