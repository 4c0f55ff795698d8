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
             bias_correction1, bias_correction2) -> None:
    """Fused T1 step over a list of tensors, in place: adds the penalty gradients (coupled L2, L1),
    applies sgd (momentum, Nesterov) or adam with decoupled L2, and writes the stash (pre-step θ and
    adam's ∂θ⁺/∂ĝ) when those lists are given. Argument contract: the schema in csrc/ops.cpp; twin:
    ``reference.t1_step_``."""
    _require_extension("t1_step_")
    torch.ops.t1t2.t1_step_(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer,
                            float(lr), float(momentum), bool(nesterov), float(beta1), float(beta2), float(eps),
                            [float(b) for b in bias_correction1], [float(b) for b in bias_correction2])


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
                      momentum, nesterov, beta1, beta2, eps, bias_correction1, bias_correction2):
        torch._check(len(grads) == len(params),
                     lambda: f"t1t2::t1_step_: got {len(params)} params but {len(grads)} grads")
        torch._check(optimizer in ("sgd", "adam"),
                     lambda: f"t1t2::t1_step_: unknown optimizer '{optimizer}'; expected 'sgd' or 'adam'")
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
