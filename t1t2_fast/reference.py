"""Pure-PyTorch reference path: the oracle for every fused kernel.

Every fused op in ``t1t2_fast.ops`` has a twin here with the same signature and
the same semantics (docs/design.md).  These functions favour clarity over speed.
"""
from __future__ import annotations

import torch

from ._dtypes import (NOISE_MODES, OPTIMIZERS, PENALTY_KINDS, SEGMENT_DECOUPLED_L2, SEGMENT_KINDS, SEGMENT_LR,
                      compute_dtype)
from .rng import philox_randn

#: The compute-dtype rule under the name the reference path has always used for it.
accumulate_dtype = compute_dtype


def penalty_grad(theta: torch.Tensor, c: torch.Tensor, kind: str) -> torch.Tensor:
    """dΩ/dθ for Ω = Σ c θ² (l2) or Σ c |θ| (l1); ``c`` broadcasts against θ."""
    if kind == "l2":
        return 2.0 * c * theta
    if kind == "l1":
        return c * torch.sign(theta)
    raise ValueError(f"unknown penalty kind {kind!r}; expected one of {PENALTY_KINDS}")


def _step_penalty_grad(theta: torch.Tensor, c: torch.Tensor, kind: str) -> torch.Tensor:
    """``penalty_grad`` as the fused T1 ops apply it (csrc/include/t1t2/math.h): c = 0 contributes
    exactly 0, also where θ is ±inf or NaN (0·inf would be NaN). Not for autograd: at c = 0 its
    derivative in c would be 0, not 2θ."""
    grad = penalty_grad(theta, c, kind)
    return torch.where(c == 0, torch.zeros((), dtype=grad.dtype, device=grad.device), grad) if kind == "l2" else grad


def penalty_mixed(theta: torch.Tensor, kind: str) -> torch.Tensor:
    """Mixed derivative m = ∂²Ω/∂θ∂c: 2θ for l2, sign(θ) for l1."""
    if kind == "l2":
        return 2.0 * theta
    if kind == "l1":
        return torch.sign(theta)
    raise ValueError(f"unknown penalty kind {kind!r}; expected one of {PENALTY_KINDS}")


def penalty_segment_dot(u: torch.Tensor, theta: torch.Tensor, num_groups: int, kind: str) -> torch.Tensor:
    """Segmented dot product h_g = Σ_{i ∈ g} u_i m_i(θ_i) over ``num_groups`` equal, contiguous
    groups of the flattened tensors (group g holds elements [g·inner, (g+1)·inner)).

    Returns a 1-D tensor of length ``num_groups`` in float64 for float64 input, float32 otherwise.
    """
    if u.shape != theta.shape:
        raise ValueError(f"penalty_segment_dot: u has shape {tuple(u.shape)} but theta has {tuple(theta.shape)}")
    acc = accumulate_dtype(theta.dtype)
    numel = theta.numel()
    if num_groups < 0 or (num_groups == 0 and numel != 0) or (num_groups > 0 and numel % num_groups != 0):
        raise ValueError(f"penalty_segment_dot: num_groups={num_groups} does not divide numel={numel}")
    if num_groups == 0:
        return torch.zeros(0, dtype=acc, device=theta.device)
    prod = u.to(acc) * penalty_mixed(theta.to(acc), kind)
    return prod.reshape(num_groups, numel // num_groups).sum(dim=1)


def _per_group(coef: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Expand per-group coefficients (group of element i is i // (numel / len(coef))) to θ's shape."""
    groups = coef.numel()
    return coef.reshape(groups, 1).expand(groups, theta.numel() // groups).reshape(theta.shape)


def _entry(lst, i):
    return lst[i] if lst and lst[i].numel() > 0 else None


@torch.no_grad()
def t1_step_(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer: str, lr: float,
             momentum: float, nesterov: bool, beta1: float, beta2: float, eps: float,
             bias_correction1, bias_correction2, grad_scale=None, found_inf=None, check_finite: bool = False,
             lr_scale=None) -> None:
    """Reference twin of ``torch.ops.t1t2.t1_step_`` (schema and argument contract in csrc/ops.cpp):
    one T1 step per tensor, in place, with the penalty gradients added and the stash written.
    ``grad_scale``/``found_inf``/``check_finite``: GradScaler's unscale and the non-finite guard.
    ``lr_scale``: None, or one value per tensor in the compute dtype; tensor i then steps with
    η_i = T(lr)·lr_scale[i], rounded once in the compute dtype T (and so does adam's stashed J)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected 'sgd' or 'adam'")
    if check_finite and found_inf is None:
        raise RuntimeError("t1t2::t1_step_: check_finite=True needs a found_inf tensor to report a non-finite "
                           "gradient in")
    for name, flag in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if flag is not None and (flag.numel() != 1 or flag.dtype != torch.float32):
            raise RuntimeError(f"t1t2::t1_step_: {name} must be a one-element float32 tensor (as "
                               f"torch.amp.GradScaler makes), got {flag.dtype} with {flag.numel()} elements")
    if lr_scale is not None:
        compute = accumulate_dtype(params[0].dtype) if params else torch.float32
        if lr_scale.dim() != 1 or lr_scale.numel() != len(params) or lr_scale.dtype != compute:
            raise RuntimeError(f"t1t2::t1_step_: lr_scale must be a 1-D {compute} tensor with one value per "
                               f"parameter ({len(params)}), got {lr_scale.dtype} of shape {list(lr_scale.shape)}")
    if found_inf is not None and float(found_inf) > 0:
        return  # a GradScaler (or the caller) saw Inf/NaN: the step is skipped
    inv_scale = 1.0 / float(grad_scale) if grad_scale is not None else None  # in double, like the kernels

    def unscaled(i, acc):
        g = grads[i].detach().to(acc)
        return g * torch.tensor(inv_scale, dtype=acc) if inv_scale is not None else g

    if check_finite and any(not bool(torch.isfinite(unscaled(i, accumulate_dtype(p.dtype))).all())
                            for i, p in enumerate(params)):
        found_inf.fill_(1.0)
        return
    for i, p in enumerate(params):
        acc = accumulate_dtype(p.dtype)
        theta = p.detach().to(acc)
        if theta.data_ptr() == p.data_ptr():
            theta = theta.clone()  # p is overwritten below; θ must stay the pre-step value
        ghat = unscaled(i, acc)
        # η_i: the host float as is (torch rounds it to acc in the products), or T(lr)·s_i in acc
        lr_i = lr if lr_scale is None else torch.tensor(lr, dtype=acc, device=p.device) * lr_scale[i].detach()
        c2, c1, cd = _entry(l2, i), _entry(l1, i), _entry(decay, i)
        if c2 is not None:
            ghat = ghat + _step_penalty_grad(theta, _per_group(c2, theta), "l2")
        if c1 is not None:
            ghat = ghat + penalty_grad(theta, _per_group(c1, theta), "l1")
        if optimizer == "sgd":
            direction = ghat
            if momentum != 0:
                buf = state1[i].view_as(theta).mul_(momentum).add_(ghat)
                direction = ghat + momentum * buf if nesterov else buf
        else:
            bc1, bc2 = bias_correction1[i], bias_correction2[i]
            m = state1[i].view_as(theta).mul_(beta1).add_(ghat, alpha=1 - beta1)
            s = state2[i].view_as(theta).mul_(beta2).addcmul_(ghat, ghat, value=1 - beta2)
            m_hat = m * (1.0 / bc1)  # 1/bc1 and 1/bc2 in double, then the compute dtype (math.h)
            sqrt_s = (s * (1.0 / bc2)).sqrt()
            denom = sqrt_s + eps
            direction = m_hat / denom
            if stash_jac:
                second = m_hat * (1 - beta2) * ghat / (bc2 * sqrt_s * denom * denom)
                second = torch.where(sqrt_s > 0, second, torch.zeros_like(second))
                stash_jac[i].view_as(theta).copy_(-lr_i * ((1 - beta1) / bc1 / denom - second))
        updated = theta - lr_i * direction
        if cd is not None:
            updated = updated - lr_i * _step_penalty_grad(theta, _per_group(cd, theta), "l2")
        if stash_theta:
            stash_theta[i].view_as(theta).copy_(theta)
        p.copy_(updated)


def penalty_hypergrad(v, theta, jac, jac_scalar, segment_tensor, segment_kind, segment_groups,
                      lr: float, params=()) -> torch.Tensor:
    """Reference twin of ``torch.ops.t1t2.penalty_hypergrad`` (contract in csrc/ops.cpp): for each
    segment, coupled l2/l1 give Σ_{i∈g} J_i v_i m_i(θ_i) with J = jac[t] (or jac_scalar[t] where jac
    is empty), decoupled l2 gives Σ_{i∈g} v_i·(−2ηθ_i), lr gives Σ_{i∈g} v_i·(θ⁺_i − θ_i) with θ⁺ =
    params[t] cast to the compute dtype and the difference rounded there; the segments' results
    concatenated."""
    if any(k == SEGMENT_LR for k in segment_kind) and len(params) != len(theta):
        raise RuntimeError(f"t1t2::penalty_hypergrad: lr segments need params with one tensor per theta "
                           f"({len(theta)}), got {len(params)}")
    out = []
    for t, kind, groups in zip(segment_tensor, segment_kind, segment_groups):
        if kind == SEGMENT_LR:
            acc = accumulate_dtype(theta[t].dtype)
            step = params[t].detach().to(acc).reshape(theta[t].shape) - theta[t]  # rounded in acc
            prod = v[t].to(torch.float64) * step.to(torch.float64)
            out.append(prod.reshape(groups, -1).sum(dim=1).to(acc) if groups else prod.new_zeros(0, dtype=acc))
            continue
        if kind == SEGMENT_DECOUPLED_L2:
            out.append(-lr * penalty_segment_dot(v[t], theta[t], groups, "l2"))
            continue
        j = jac[t] if jac and jac[t].numel() > 0 else jac_scalar[t]
        out.append(penalty_segment_dot(j * v[t], theta[t], groups, SEGMENT_KINDS[kind]))
    if not out:
        return torch.zeros(0, dtype=theta[0].dtype if theta else torch.float32)
    return torch.cat(out)


@torch.no_grad()
def perturb_(params, save, base, direction, scale: float) -> None:
    """Reference twin of ``torch.ops.t1t2.perturb_``: save θ (if ``save`` is given), then
    θ ← base + scale·direction, computed in the compute dtype and rounded to θ's dtype."""
    for i, p in enumerate(params):
        if save:
            save[i].copy_(p)
        p.copy_(base[i] + scale * direction[i])


@torch.no_grad()
def restore_(params, save) -> None:
    """Reference twin of ``torch.ops.t1t2.restore_``: θ ← save, bit-exactly."""
    for p, s in zip(params, save):
        p.copy_(s)


# ---------------------------------------------------------------------------------------------
# Gaussian noise (docs/design.md, "Noise modules"): twins of torch.ops.t1t2.gaussian_noise and
# gaussian_noise_backward (contract in csrc/ops.cpp). Built from differentiable torch ops, so the
# backward twin also serves double backward (create_graph=True).
# ---------------------------------------------------------------------------------------------
def _noise_inputs(op: str, x: torch.Tensor, sigma: torch.Tensor, key: int, channels: int, inner: int, mode: str):
    """ε (float32, shaped (outer, channels, inner)) and σ shaped (1, channels, 1), after the op's checks.
    Element i is the i-th in row-major order, i.e. of the contiguous layout."""
    if mode not in NOISE_MODES:
        raise ValueError(f"{op}: unknown mode {mode!r}; expected one of {NOISE_MODES}")
    if channels < 1 or inner < 1:
        raise ValueError(f"{op}: channels and inner must be >= 1, got {channels} and {inner}")
    if x.numel() % (channels * inner) != 0:
        raise ValueError(f"{op}: channels·inner = {channels}·{inner} does not divide the {x.numel()} elements of x "
                         f"(shape {tuple(x.shape)})")
    if sigma.numel() != channels:
        raise ValueError(f"{op}: sigma has {sigma.numel()} elements (shape {tuple(sigma.shape)}), "
                         f"expected channels = {channels}")
    eps = philox_randn(key, torch.arange(x.numel(), device=x.device)).reshape(-1, channels, inner)
    return eps, sigma.reshape(1, channels, 1)


def gaussian_noise(x: torch.Tensor, sigma: torch.Tensor, key: int, channels: int, inner: int,
                   mode: str) -> torch.Tensor:
    """Reference twin of ``torch.ops.t1t2.gaussian_noise``: y = x + σ_c ε or x·(1 + σ_c ε) with
    ε_i = randn(key, i) and c = (i // inner) % channels, computed in the compute dtype (σ's) with
    each operation rounded as the kernels round it, then cast to x's dtype."""
    eps, s = _noise_inputs("gaussian_noise", x, sigma, key, channels, inner, mode)
    acc = accumulate_dtype(x.dtype)
    xa = x.reshape(eps.shape).to(acc)
    scaled = s * eps.to(acc)
    y = xa + scaled if mode == "additive" else xa * (scaled + 1)
    return y.to(x.dtype).reshape(x.shape)


def gaussian_noise_backward(grad_y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, key: int, channels: int,
                            inner: int, mode: str, need_x_grad: bool, need_sigma_grad: bool):
    """Reference twin of ``torch.ops.t1t2.gaussian_noise_backward``: (∂L/∂x, ∂L/∂σ) with ε regenerated.
    ∂L/∂x = g (additive) or g·(1 + σ_c ε) (multiplicative), in x's dtype; ∂L/∂σ_c = Σ_{i∈c} g_i ε_i or
    Σ_{i∈c} g_i x_i ε_i, summed in float64 (as the kernels accumulate) and returned shaped like σ in
    its dtype. x is only read in multiplicative mode. A gradient not asked for is an empty tensor."""
    if grad_y.shape != x.shape:
        raise ValueError(f"gaussian_noise_backward: grad_y has shape {tuple(grad_y.shape)} but x has {tuple(x.shape)}")
    eps, s = _noise_inputs("gaussian_noise_backward", x, sigma, key, channels, inner, mode)
    g = grad_y.reshape(eps.shape)
    grad_x = grad_y.new_empty(0)
    if need_x_grad:
        acc = accumulate_dtype(x.dtype)
        grad_x = grad_y.clone() if mode == "additive" else (g.to(acc) * (s * eps.to(acc) + 1)).to(x.dtype)
        grad_x = grad_x.reshape(x.shape)
    grad_sigma = sigma.new_empty(0)
    if need_sigma_grad:
        terms = g.double() if mode == "additive" else g.double() * x.reshape(eps.shape).double()
        terms = terms * eps.double()
        grad_sigma = terms.sum(dim=(0, 2)).to(sigma.dtype).reshape(sigma.shape)
    return grad_x, grad_sigma
