"""Public wrappers over the compiled ops ``torch.ops.t1t2.*``; each has a twin in ``reference``."""
from __future__ import annotations

import torch

from . import _extension
from ._noise_autograd import register_autograd as register_noise_autograd
from ._dtypes import NOISE_MODES, OPTIMIZERS, PENALTY_KINDS, SEGMENT_KINDS, SUPPORTED_DTYPES, compute_dtype

_OP = "t1t2::penalty_segment_dot"


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
             bias_correction1, bias_correction2, grad_scale=None, found_inf=None, check_finite: bool = False,
             lr_scale=None) -> None:
    """Fused T1 step over a list of tensors, in place: adds the penalty gradients (coupled L2, L1),
    applies sgd (momentum, Nesterov) or adam with decoupled L2, and writes the stash (pre-step θ and
    adam's ∂θ⁺/∂ĝ) when those lists are given. ``grad_scale`` unscales the gradients in the same
    pass; nothing is written when ``found_inf`` > 0, or when ``check_finite`` finds an Inf/NaN
    gradient (then found_inf is set to 1). ``lr_scale`` (one value per tensor, compute dtype, on the
    device): tensor i steps with T(lr)·lr_scale[i]. Argument contract: the schema in csrc/ops.cpp;
    twin: ``reference.t1_step_``."""
    _require_extension("t1_step_")
    torch.ops.t1t2.t1_step_(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer,
                            float(lr), float(momentum), bool(nesterov), float(beta1), float(beta2), float(eps),
                            [float(b) for b in bias_correction1], [float(b) for b in bias_correction2],
                            grad_scale, found_inf, bool(check_finite), lr_scale)


def penalty_hypergrad(v, theta, jac, jac_scalar, segment_tensor, segment_kind, segment_groups,
                      lr: float, params=()) -> torch.Tensor:
    """T2 penalty hypergradients (before dc/dλ) of many (hyperparameter, tensor) segments in one
    deterministic pass, u = J⊙v formed on the fly; lr segments (kind 3) reduce v·(θ⁺ − θ) with θ⁺ from
    ``params``. Contract: the schema in csrc/ops.cpp; twin: ``reference.penalty_hypergrad``."""
    _require_extension("penalty_hypergrad")
    return torch.ops.t1t2.penalty_hypergrad(v, theta, jac, [float(j) for j in jac_scalar], list(segment_tensor),
                                            list(segment_kind), list(segment_groups), float(lr), list(params))


def perturb_(params, save, base, direction, scale: float) -> None:
    """θ ← base + scale·direction over many tensors in one call, first saving θ into ``save``
    (unless empty) so that ``restore_`` can put it back bit-exactly. Twin: ``reference.perturb_``."""
    _require_extension("perturb_")
    torch.ops.t1t2.perturb_(params, save, base, direction, float(scale))


def restore_(params, save) -> None:
    """θ ← save over many tensors, bit-exactly. Twin: ``reference.restore_``."""
    _require_extension("restore_")
    torch.ops.t1t2.restore_(params, save)


# ---- the fake impls' checks: those of csrc/checks.cpp, with its messages ----
# A call that mixes devices (say CPU and meta tensors) dispatches to the fake impl, so without these
# checks it would return uninitialized memory or do nothing instead of raising.


def _check_like(op, t, p, dtype, name, i):
    """csrc/checks.cpp check_like: a buffer that goes with params[i] (p)."""
    torch._check(t.shape == p.shape,
                 lambda: f"{op}: {name}[{i}] has shape {list(t.shape)} but params[{i}] has {list(p.shape)}")
    torch._check(t.dtype == dtype, lambda: f"{op}: {name}[{i}] has dtype {t.dtype}, expected {dtype}")
    torch._check(t.device == p.device, lambda: f"{op}: {name}[{i}] is on {t.device}, expected {p.device}")
    torch._check(t.is_contiguous(), lambda: f"{op}: {name}[{i}] must be contiguous")


def _check_params(op, params):
    """csrc/checks.cpp check_params: one supported dtype and one device, contiguous (written in place)."""
    dtype, device = params[0].dtype, params[0].device
    torch._check(dtype in SUPPORTED_DTYPES,
                 lambda: f"{op}: params must be float64, float32, bfloat16 or float16, got {dtype}")
    for i, p in enumerate(params):
        torch._check(p.device == device, lambda: f"{op}: params[{i}] is on {p.device}, expected {device}")
        torch._check(p.is_contiguous(), lambda: f"{op}: params[{i}] must be contiguous (it is written in place)")
        torch._check(p.dtype == dtype, lambda: f"{op}: params[{i}] has dtype {p.dtype} but params[0] has {dtype}")


def _check_perturb_fake(params, save, base, direction):
    op, n = "t1t2::perturb_", len(params)
    torch._check(len(base) == n and len(direction) == n,
                 lambda: f"{op}: got {n} params, {len(base)} base and {len(direction)} direction tensors")
    torch._check(not save or len(save) == n,
                 lambda: f"{op}: save must be empty or have one tensor per parameter ({n}), got {len(save)}")
    if not n:
        return
    _check_params(op, params)
    compute = compute_dtype(params[0].dtype)
    for i, p in enumerate(params):
        _check_like(op, base[i], p, compute, "base", i)
        _check_like(op, direction[i], p, compute, "direction", i)
        if save:
            _check_like(op, save[i], p, p.dtype, "save", i)


def _check_restore_fake(params, save):
    op = "t1t2::restore_"
    torch._check(len(save) == len(params), lambda: f"{op}: got {len(params)} params but {len(save)} saved")
    if params:
        _check_params(op, params)
        for i, p in enumerate(params):
            _check_like(op, save[i], p, p.dtype, "save", i)


def _check_t1_step_fake(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, grad_scale, found_inf,
                        lr_scale=None):
    """csrc/checks.cpp check_t1_step_inputs and check_t1_step_guard: dtypes, shapes and one device."""
    op = "t1t2::t1_step_"
    if not params:
        return
    _check_params(op, params)
    p0 = params[0]
    compute = compute_dtype(p0.dtype)
    for i, p in enumerate(params):
        g = grads[i]
        torch._check(g.shape == p.shape, lambda: f"{op}: grads[{i}] has shape {list(g.shape)} but params[{i}] has "
                                                 f"{list(p.shape)}")
        torch._check(g.dtype == p.dtype and g.device == p.device,
                     lambda: f"{op}: grads[{i}] is {g.dtype} on {g.device}, expected {p.dtype} on {p.device}")
        for lst, name in ((state1, "state1"), (state2, "state2"), (stash_theta, "stash_theta"),
                          (stash_jac, "stash_jac"), (l2, "l2"), (l1, "l1"), (decay, "decay")):
            t = lst[i] if i < len(lst) else None
            if t is None or t.numel() == 0:
                continue
            torch._check(t.dtype == compute and t.device == p.device,
                         lambda: f"{op}: {name}[{i}] is {t.dtype} on {t.device}, expected {compute} on {p.device}")
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None:
            torch._check(t.numel() == 1 and t.dtype == torch.float32 and t.device == p0.device,
                         lambda: f"{op}: {name} must be a one-element float32 tensor on {p0.device}, got {t.dtype} "
                                 f"with {t.numel()} elements on {t.device}")
    if lr_scale is not None:
        torch._check(lr_scale.dim() == 1 and lr_scale.numel() == len(params) and lr_scale.dtype == compute
                     and lr_scale.device == p0.device,
                     lambda: f"{op}: lr_scale must be a 1-D {compute} tensor on {p0.device} with one value per "
                             f"parameter ({len(params)}), got {lr_scale.dtype} {list(lr_scale.shape)} on "
                             f"{lr_scale.device}")


def _check_penalty_hypergrad_fake(v, theta, jac, jac_scalar, segment_tensor, segment_kind, segment_groups, params=()):
    """csrc/checks.cpp check_penalty_hypergrad_inputs; returns the result's length."""
    op, n = "t1t2::penalty_hypergrad", len(theta)
    torch._check(len(v) == n, lambda: f"{op}: got {n} theta but {len(v)} v")
    torch._check(not jac or len(jac) == n,
                 lambda: f"{op}: jac must be empty or have one tensor per theta ({n}), got {len(jac)}")
    torch._check(len(jac_scalar) == n, lambda: f"{op}: jac_scalar must have one value per theta ({n}), got "
                                               f"{len(jac_scalar)}")
    ns = len(segment_tensor)
    torch._check(len(segment_kind) == ns and len(segment_groups) == ns,
                 lambda: f"{op}: segment_tensor, segment_kind and segment_groups must have one entry per segment, "
                         f"got {ns}, {len(segment_kind)} and {len(segment_groups)}")
    dtype = theta[0].dtype if n else torch.float32
    torch._check(dtype in (torch.float64, torch.float32),
                 lambda: f"{op}: theta must be in the compute dtype (float64 or float32), got {dtype}")
    device = theta[0].device if n else None
    for i in range(n):
        torch._check(theta[i].dtype == dtype and v[i].dtype == dtype,
                     lambda: f"{op}: v[{i}] and theta[{i}] must both be {dtype}, got {v[i].dtype} and {theta[i].dtype}")
        torch._check(theta[i].device == device and v[i].device == device,
                     lambda: f"{op}: got v[{i}] on {v[i].device} and theta[{i}] on {theta[i].device}, expected "
                             f"{device}")
        torch._check(v[i].shape == theta[i].shape,
                     lambda: f"{op}: v[{i}] has shape {list(v[i].shape)} but theta[{i}] has {list(theta[i].shape)}")
        torch._check(theta[i].is_contiguous() and v[i].is_contiguous(),
                     lambda: f"{op}: v[{i}] and theta[{i}] must be contiguous")
        if jac and jac[i].numel() > 0:
            j = jac[i]
            torch._check(j.shape == theta[i].shape and j.dtype == dtype and j.is_contiguous() and j.device == device,
                         lambda: f"{op}: jac[{i}] must be a contiguous {dtype} tensor on {device} of shape "
                                 f"{list(theta[i].shape)} (or empty to use jac_scalar[{i}]), got {j.dtype} "
                                 f"{list(j.shape)} on {j.device}")
    total = 0
    for s in range(ns):
        t, kind, groups = segment_tensor[s], segment_kind[s], segment_groups[s]
        torch._check(0 <= t < n, lambda: f"{op}: segment {s} names tensor {t} of {n}")
        torch._check(0 <= kind < len(SEGMENT_KINDS),
                     lambda: f"{op}: segment {s} has kind {kind}; expected 0 (l2), 1 (l1), 2 (decoupled l2) or 3 (lr)")
        numel = theta[t].numel()
        torch._check(groups >= 0 and ((groups == 0 and numel == 0) or (groups > 0 and numel % groups == 0)),
                     lambda: f"{op}: segment {s}: {groups} groups do not divide the {numel} elements of tensor {t}")
        torch._check(total + groups < 2**63, lambda: f"{op}: segment {s}: its {groups} groups after {total} in the "
                                                     f"segments before it overflow the result's int64 length")
        total += groups
    torch._check(not params or len(params) == n,
                 lambda: f"{op}: params must be empty or have one tensor per theta ({n}), got {len(params)}")
    torch._check(len(params) == n or not any(k == SEGMENT_KINDS.index("lr") for k in segment_kind),
                 lambda: f"{op}: lr segments (kind 3) need params, one tensor per theta ({n}), got {len(params)}")
    for i, p in enumerate(params):
        torch._check(p.shape == theta[i].shape and p.device == device and compute_dtype(p.dtype) == dtype,
                     lambda: f"{op}: params[{i}] must have theta[{i}]'s shape, device and compute dtype, got "
                             f"{p.dtype} {list(p.shape)} on {p.device}")
    return total


if _extension.AVAILABLE:
    @torch.library.register_fake("t1t2::perturb_")
    def _perturb_fake(params, save, base, direction, scale):
        _check_perturb_fake(params, save, base, direction)
        return None

    @torch.library.register_fake("t1t2::restore_")
    def _restore_fake(params, save):
        _check_restore_fake(params, save)
        return None

    @torch.library.register_fake("t1t2::penalty_hypergrad")
    def _penalty_hypergrad_fake(v, theta, jac, jac_scalar, segment_tensor, segment_kind, segment_groups, lr,
                                params=()):
        total = _check_penalty_hypergrad_fake(v, theta, jac, jac_scalar, segment_tensor, segment_kind,
                                              segment_groups, params)
        dtype = theta[0].dtype if theta else torch.float32
        device = theta[0].device if theta else torch.device("cpu")
        return torch.empty((total,), dtype=dtype, device=device)

    @torch.library.register_fake("t1t2::t1_step_")
    def _t1_step_fake(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer, lr,
                      momentum, nesterov, beta1, beta2, eps, bias_correction1, bias_correction2, grad_scale=None,
                      found_inf=None, check_finite=False, lr_scale=None):
        torch._check(len(grads) == len(params),
                     lambda: f"t1t2::t1_step_: got {len(params)} params but {len(grads)} grads")
        torch._check(optimizer in OPTIMIZERS,
                     lambda: f"t1t2::t1_step_: unknown optimizer '{optimizer}'; expected 'sgd' or 'adam'")
        torch._check(not check_finite or found_inf is not None,
                     lambda: "t1t2::t1_step_: check_finite=True needs a found_inf tensor to report a non-finite "
                             "gradient in")
        _check_t1_step_fake(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, grad_scale,
                            found_inf, lr_scale)
        return None

    # Shape/dtype propagation for meta tensors, FakeTensor and torch.compile; the same checks and
    # messages as the C++ kernel.
    @torch.library.register_fake(_OP)
    def _penalty_segment_dot_fake(u, theta, num_groups, kind):
        torch._check(u.device == theta.device,
                     lambda: f"{_OP}: u is on {u.device} but theta is on {theta.device}; move both to one device")
        torch._check(u.dtype == theta.dtype,
                     lambda: f"{_OP}: u has dtype {u.dtype} but theta has dtype {theta.dtype}; cast them to one dtype")
        torch._check(theta.dtype in SUPPORTED_DTYPES,
                     lambda: f"{_OP}: expected floating-point u and theta (float64, float32, bfloat16 or "
                             f"float16), got {theta.dtype}")
        torch._check(u.shape == theta.shape,
                     lambda: f"{_OP}: u has shape {list(u.shape)} but theta has shape {list(theta.shape)}")
        torch._check(kind in PENALTY_KINDS, lambda: f"{_OP}: unknown kind {kind!r}; expected 'l2' or 'l1'")
        torch._check(num_groups >= 0, lambda: f"{_OP}: num_groups must be >= 0, got {num_groups}")
        numel = theta.numel()
        torch._check(numel == 0 if num_groups == 0 else numel % num_groups == 0,
                     lambda: f"{_OP}: num_groups={num_groups} does not divide numel={numel} "
                             f"(groups are equal contiguous slices of the flattened tensors)")
        return theta.new_empty((num_groups,), dtype=compute_dtype(theta.dtype))


# ---------------------------------------------------------------------------------------------
# Gaussian noise (docs/design.md, "Noise modules"); the differentiable entry point with backend
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
    torch._check(mode in NOISE_MODES,
                 lambda: f"{op}: unknown mode '{mode}'; expected 'additive' or 'multiplicative'")
    torch._check(x.dtype in SUPPORTED_DTYPES,
                 lambda: f"{op}: x must be float64, float32, bfloat16 or float16, got {x.dtype}")
    torch._check(channels >= 1 and inner >= 1,
                 lambda: f"{op}: channels and inner must be >= 1, got {channels} and {inner}")
    torch._check(x.numel() % (channels * inner) == 0,
                 lambda: f"{op}: channels·inner = {channels}·{inner} does not divide the {x.numel()} elements of x")
    compute = compute_dtype(x.dtype)
    torch._check(sigma.dtype == compute, lambda: f"{op}: sigma has dtype {sigma.dtype}, expected {compute}")
    torch._check(sigma.device == x.device, lambda: f"{op}: sigma is on {sigma.device} but x is on {x.device}")
    torch._check(sigma.numel() == channels,
                 lambda: f"{op}: sigma has {sigma.numel()} elements, expected channels = {channels}")
    torch._check(x.is_contiguous(), lambda: f"{op}: x (shape {list(x.shape)}, strides {list(x.stride())}) must be "
                                            f"contiguous: the noise of element i is drawn from its index in the "
                                            f"contiguous layout; call .contiguous() first")
    torch._check(sigma.is_contiguous(), lambda: f"{op}: sigma must be contiguous")


if _extension.AVAILABLE:
    @torch.library.register_fake(_NOISE_OP)
    def _gaussian_noise_fake(x, sigma, key, channels, inner, mode):
        _check_noise_fake(_NOISE_OP, x, sigma, channels, inner, mode)
        return torch.empty_like(x)

    @torch.library.register_fake(_NOISE_BACKWARD_OP)
    def _gaussian_noise_backward_fake(grad_y, x, sigma, key, channels, inner, mode, need_x_grad, need_sigma_grad):
        _check_noise_fake(_NOISE_BACKWARD_OP, x, sigma, channels, inner, mode)
        op = _NOISE_BACKWARD_OP
        torch._check(grad_y.device == x.device, lambda: f"{op}: grad_y is on {grad_y.device} but x is on {x.device}")
        torch._check(grad_y.shape == x.shape,
                     lambda: f"{op}: grad_y has shape {list(grad_y.shape)} but x has shape {list(x.shape)}")
        torch._check(grad_y.dtype == x.dtype, lambda: f"{op}: grad_y has dtype {grad_y.dtype} but x has dtype {x.dtype}")
        torch._check(grad_y.is_contiguous(), lambda: f"{op}: grad_y must be contiguous; call .contiguous() first")
        grad_x = torch.empty_like(x) if need_x_grad else x.new_empty((0,))
        grad_sigma = torch.empty_like(sigma) if need_sigma_grad else sigma.new_empty((0,))
        return grad_x, grad_sigma

    register_noise_autograd(_NOISE_OP, gaussian_noise_backward)
