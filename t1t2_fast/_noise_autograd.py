"""The one backward formula of the Gaussian noise op, for every implementation: ``GaussianNoise``'s
autograd function (``t1t2_fast.noise``) and the autograd registrations of the fused ops
``t1t2::gaussian_noise`` (``ops``) and ``t1t2_triton::gaussian_noise`` (``triton_kernels.noise``).

The backward regenerates ε instead of storing it: only x (multiplicative ∂L/∂σ) and σ are saved.
Under ``create_graph`` (grad mode on in the backward and an input that requires grad) it runs the
reference formula, built from differentiable torch ops, so that ∂L/∂σ and ∂L/∂x can be
differentiated again (the exact noise hypergradient); otherwise the fused backward op.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import reference


def save_for_backward(ctx, x: torch.Tensor, sigma: torch.Tensor, key: int, channels: int, inner: int,
                      mode: str) -> None:
    """What the backward needs: the op's arguments, x only for the multiplicative ∂L/∂σ, σ (tiny)."""
    ctx.noise_args = (key, channels, inner, mode)
    keep_x = mode == "multiplicative" and ctx.needs_input_grad[1]
    ctx.save_for_backward(x if keep_x else None, sigma)


def noise_backward(grad_y, x, sigma, key, channels, inner, mode, need_x_grad: bool, need_sigma_grad: bool,
                   fused_backward: Callable | None):
    """(∂L/∂x or None, ∂L/∂σ or None) of ``gaussian_noise``. ``x`` may be None unless the
    multiplicative ∂L/∂σ is needed. ``fused_backward``: the implementation's
    ``gaussian_noise_backward`` (None: the reference twin)."""
    grad_y = grad_y.contiguous()
    x = grad_y if x is None else x  # additive mode reads only its shape and dtype
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (grad_y, x, sigma))
    op_x_grad = need_x_grad and mode == "multiplicative"  # additive ∂L/∂x is g itself: no kernel, no copy
    grad_x = grad_sigma = None
    if op_x_grad or need_sigma_grad:
        if fused_backward is not None and not differentiable:
            grad_x, grad_sigma = fused_backward(grad_y, x.contiguous(), sigma.contiguous(), key, channels, inner,
                                                mode, op_x_grad, need_sigma_grad)
        else:
            grad_x, grad_sigma = reference.gaussian_noise_backward(grad_y, x, sigma, key, channels, inner, mode,
                                                                   op_x_grad, need_sigma_grad)
    if need_x_grad and not op_x_grad:
        grad_x = grad_y
    return (grad_x if need_x_grad else None), (grad_sigma if need_sigma_grad else None)


def backward_from_context(ctx, grad_y, fused_backward: Callable | None):
    """``noise_backward`` for a context filled by ``save_for_backward``."""
    x, sigma = ctx.saved_tensors
    return noise_backward(grad_y, x, sigma, *ctx.noise_args, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                          fused_backward)


def register_autograd(op, fused_backward: Callable) -> None:
    """Make the fused op ``op`` (a name or a custom-op object) differentiable with this formula."""

    def setup_context(ctx, inputs, output):
        save_for_backward(ctx, *inputs)

    def backward(ctx, grad_y):
        return (*backward_from_context(ctx, grad_y, fused_backward), None, None, None, None)

    torch.library.register_autograd(op, backward, setup_context=setup_context)
