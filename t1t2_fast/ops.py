"""Public wrappers over the compiled ops ``torch.ops.t1t2.*``; each has a twin in ``reference``."""
from __future__ import annotations

import torch

from . import _extension

_OP = "t1t2::penalty_segment_dot"
_SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _require_extension(name: str) -> None:
    if not _extension.AVAILABLE:
        raise RuntimeError(f"t1t2_fast.ops.{name} needs the compiled extension, which did not load "
                           f"({_extension.LOAD_ERROR}); build it with `pip install --no-build-isolation -e .` "
                           f"or use t1t2_fast.reference.{name}")


def penalty_segment_dot(u: torch.Tensor, theta: torch.Tensor, num_groups: int, kind: str) -> torch.Tensor:
    """h_g = Σ_{i∈g} u_i m_i(θ_i) with m = 2θ ("l2") or sign θ ("l1") over ``num_groups`` equal
    contiguous groups of the flattened tensors; float64 out for float64 in, float32 otherwise.
    Deterministic: the same bits for any thread count."""
    _require_extension("penalty_segment_dot")
    return torch.ops.t1t2.penalty_segment_dot(u, theta, num_groups, kind)


def t1_step_(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer: str, lr: float,
             momentum: float, nesterov: bool, beta1: float, beta2: float, eps: float,
             bias_correction1, bias_correction2, grad_scale=None, found_inf=None, check_finite: bool = False) -> None:
    """Fused T1 step over a list of tensors, in place: adds the penalty gradients (coupled L2, L1),
    applies sgd (momentum, Nesterov) or adam with decoupled L2, and writes the stash (pre-step θ and
    adam's ∂θ⁺/∂ĝ) when those lists are given. ``grad_scale`` unscales the gradients in the same
    pass; nothing is written when ``found_inf`` > 0, or when ``check_finite`` finds an Inf/NaN
    gradient (then found_inf is set to 1). Argument contract: the schema in csrc/ops.cpp; twin:
    ``reference.t1_step_``."""
    _require_extension("t1_step_")
    torch.ops.t1t2.t1_step_(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer,
                            float(lr), float(momentum), bool(nesterov), float(beta1), float(beta2), float(eps),
                            [float(b) for b in bias_correction1], [float(b) for b in bias_correction2],
                            grad_scale, found_inf, bool(check_finite))


def penalty_hypergrad(v, theta, jac, jac_scalar, segment_tensor, segment_kind, segment_groups,
                      lr: float) -> torch.Tensor:
    """T2 penalty hypergradients (before dc/dλ) of many (hyperparameter, tensor) segments in one
    deterministic pass, u = J⊙v formed on the fly. Contract: the schema in csrc/ops.cpp; twin:
    ``reference.penalty_hypergrad``."""
    _require_extension("penalty_hypergrad")
    return torch.ops.t1t2.penalty_hypergrad(v, theta, jac, [float(j) for j in jac_scalar], list(segment_tensor),
                                            list(segment_kind), list(segment_groups), float(lr))


def perturb_(params, save, base, direction, scale: float) -> None:
    """θ ← base + scale·direction over many tensors in one call, first saving θ into ``save``
    (unless empty) so that ``restore_`` can put it back bit-exactly. Twin: ``reference.perturb_``."""
    _require_extension("perturb_")
    torch.ops.t1t2.perturb_(params, save, base, direction, float(scale))


def restore_(params, save) -> None:
    """θ ← save over many tensors, bit-exactly. Twin: ``reference.restore_``."""
    _require_extension("restore_")
    torch.ops.t1t2.restore_(params, save)


if _extension.AVAILABLE:
    @torch.library.register_fake("t1t2::perturb_")
    def _perturb_fake(params, save, base, direction, scale):
        torch._check(len(base) == len(params) and len(direction) == len(params),
                     lambda: f"t1t2::perturb_: got {len(params)} params, {len(base)} base and "
                             f"{len(direction)} direction tensors")
        return None

    @torch.library.register_fake("t1t2::restore_")
    def _restore_fake(params, save):
        torch._check(len(save) == len(params),
                     lambda: f"t1t2::restore_: got {len(params)} params but {len(save)} saved")
        return None

    @torch.library.register_fake("t1t2::penalty_hypergrad")
    def _penalty_hypergrad_fake(v, theta, jac, jac_scalar, segment_tensor, segment_kind, segment_groups, lr):
        torch._check(len(v) == len(theta), lambda: f"t1t2::penalty_hypergrad: got {len(theta)} theta but {len(v)} v")
        dtype = theta[0].dtype if theta else torch.float32
        device = theta[0].device if theta else torch.device("cpu")
        return torch.empty((sum(segment_groups),), dtype=dtype, device=device)

    @torch.library.register_fake("t1t2::t1_step_")
    def _t1_step_fake(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer, lr,
                      momentum, nesterov, beta1, beta2, eps, bias_correction1, bias_correction2, grad_scale=None,
                      found_inf=None, check_finite=False):
        torch._check(len(grads) == len(params),
                     lambda: f"t1t2::t1_step_: got {len(params)} params but {len(grads)} grads")
        torch._check(optimizer in ("sgd", "adam"),
                     lambda: f"t1t2::t1_step_: unknown optimizer '{optimizer}'; expected 'sgd' or 'adam'")
        torch._check(not check_finite or found_inf is not None,
                     lambda: "t1t2::t1_step_: check_finite=True needs a found_inf tensor to report a non-finite "
                             "gradient in")
        return None

    # Shape/dtype propagation for meta tensors, FakeTensor and torch.compile; the same checks and
    # messages as the C++ kernel.
    @torch.library.register_fake(_OP)
    def _penalty_segment_dot_fake(u, theta, num_groups, kind):
        torch._check(u.device == theta.device,
                     lambda: f"{_OP}: u is on {u.device} but theta is on {theta.device}; move both to one device")
        torch._check(u.dtype == theta.dtype,
                     lambda: f"{_OP}: u has dtype {u.dtype} but theta has dtype {theta.dtype}; cast them to one dtype")
        torch._check(theta.dtype in _SUPPORTED_DTYPES,
                     lambda: f"{_OP}: expected floating-point u and theta (float64, float32, bfloat16 or "
                             f"float16), got {theta.dtype}")
        torch._check(u.shape == theta.shape,
                     lambda: f"{_OP}: u has shape {list(u.shape)} but theta has shape {list(theta.shape)}")
        torch._check(kind in ("l2", "l1"), lambda: f"{_OP}: unknown kind {kind!r}; expected 'l2' or 'l1'")
        torch._check(num_groups >= 0, lambda: f"{_OP}: num_groups must be >= 0, got {num_groups}")
        numel = theta.numel()
        torch._check(numel == 0 if num_groups == 0 else numel % num_groups == 0,
                     lambda: f"{_OP}: num_groups={num_groups} does not divide numel={numel} "
                             f"(groups are equal contiguous slices of the flattened tensors)")
        out = torch.float64 if theta.dtype == torch.float64 else torch.float32
        return theta.new_empty((num_groups,), dtype=out)


# ---------------------------------------------------------------------------------------------
# Gaussian noise (DESIGN.md §2 "Noise modules"); the differentiable entry point with backend
# choice is t1t2_fast.noise.gaussian_noise.
# ---------------------------------------------------------------------------------------------
_NOISE_OP = "t1t2::gaussian_noise"
_NOISE_BACKWARD_OP = "t1t2::gaussian_noise_backward"


def gaussian_noise(x: torch.Tensor, sigma: torch.Tensor, key: int, channels: int, inner: int,
                   mode: str) -> torch.Tensor:
    """y = x + σ_c ε (mode "additive") or x·(1 + σ_c ε) ("multiplicative"), ε_i = randn(key, i)
    (t1t2_fast.rng), c = (i // inner) % channels over the contiguous x. Differentiable (the backward
    regenerates ε). Contract: the schema in csrc/ops.cpp; twin: ``reference.gaussian_noise``."""
    _require_extension("gaussian_noise")
    return torch.ops.t1t2.gaussian_noise(x, sigma, int(key), int(channels), int(inner), mode)


def gaussian_noise_backward(grad_y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, key: int, channels: int,
                            inner: int, mode: str, need_x_grad: bool, need_sigma_grad: bool):
    """(∂L/∂x, ∂L/∂σ) of ``gaussian_noise`` with ε regenerated, ∂L/∂σ summed in double in a fixed
    order; empty tensors for the gradients not asked for. Twin: ``reference.gaussian_noise_backward``."""
    _require_extension("gaussian_noise_backward")
    return torch.ops.t1t2.gaussian_noise_backward(grad_y, x, sigma, int(key), int(channels), int(inner), mode,
                                                  bool(need_x_grad), bool(need_sigma_grad))


def _check_noise_fake(op, x, sigma, channels, inner, mode):
    torch._check(mode in ("additive", "multiplicative"),
                 lambda: f"{op}: unknown mode '{mode}'; expected 'additive' or 'multiplicative'")
    torch._check(x.dtype in _SUPPORTED_DTYPES,
                 lambda: f"{op}: x must be float64, float32, bfloat16 or float16, got {x.dtype}")
    torch._check(channels >= 1 and inner >= 1,
                 lambda: f"{op}: channels and inner must be >= 1, got {channels} and {inner}")
    torch._check(x.numel() % (channels * inner) == 0,
                 lambda: f"{op}: channels·inner = {channels}·{inner} does not divide the {x.numel()} elements of x")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    torch._check(sigma.dtype == compute, lambda: f"{op}: sigma has dtype {sigma.dtype}, expected {compute}")
    torch._check(sigma.device == x.device, lambda: f"{op}: sigma is on {sigma.device} but x is on {x.device}")
    torch._check(sigma.numel() == channels,
                 lambda: f"{op}: sigma has {sigma.numel()} elements, expected channels = {channels}")


if _extension.AVAILABLE:
    @torch.library.register_fake(_NOISE_OP)
    def _gaussian_noise_fake(x, sigma, key, channels, inner, mode):
        _check_noise_fake(_NOISE_OP, x, sigma, channels, inner, mode)
        return torch.empty_like(x)

    @torch.library.register_fake(_NOISE_BACKWARD_OP)
    def _gaussian_noise_backward_fake(grad_y, x, sigma, key, channels, inner, mode, need_x_grad, need_sigma_grad):
        _check_noise_fake(_NOISE_BACKWARD_OP, x, sigma, channels, inner, mode)
        torch._check(grad_y.shape == x.shape and grad_y.dtype == x.dtype,
                     lambda: f"{_NOISE_BACKWARD_OP}: grad_y is {grad_y.dtype} {list(grad_y.shape)} but x is "
                             f"{x.dtype} {list(x.shape)}")
        grad_x = torch.empty_like(x) if need_x_grad else x.new_empty((0,))
        grad_sigma = torch.empty_like(sigma) if need_sigma_grad else sigma.new_empty((0,))
        return grad_x, grad_sigma

    def _gaussian_noise_setup_context(ctx, inputs, output):
        x, sigma, key, channels, inner, mode = inputs
        ctx.noise_args = (key, channels, inner, mode)
        # x is needed only for the multiplicative ∂L/∂σ; σ is tiny
        keep_x = mode == "multiplicative" and ctx.needs_input_grad[1]
        ctx.save_for_backward(x if keep_x else None, sigma)

    def _gaussian_noise_backward_formula(ctx, grad_y):
        from .noise import noise_backward
        x, sigma = ctx.saved_tensors
        grad_x, grad_sigma = noise_backward(grad_y, x, sigma, *ctx.noise_args, ctx.needs_input_grad[0],
                                            ctx.needs_input_grad[1], impl="cpp")
        return grad_x, grad_sigma, None, None, None, None

    torch.library.register_autograd(_NOISE_OP, _gaussian_noise_backward_formula,
                                    setup_context=_gaussian_noise_setup_context)
