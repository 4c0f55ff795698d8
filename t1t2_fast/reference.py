"""Pure-PyTorch reference path: the oracle for every fused kernel.

Every fused op in ``t1t2_fast.ops`` has a twin here with the same signature and
the same semantics (DESIGN.md §2).  These functions favour clarity over speed.
"""
from __future__ import annotations

import torch

PENALTY_KINDS = ("l2", "l1")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def penalty_grad(theta: torch.Tensor, c: torch.Tensor, kind: str) -> torch.Tensor:
    """dΩ/dθ for Ω = Σ c θ² (l2) or Σ c |θ| (l1); ``c`` broadcasts against θ."""
    if kind == "l2":
        return 2.0 * c * theta
    if kind == "l1":
        return c * torch.sign(theta)
    raise ValueError(f"unknown penalty kind {kind!r}; expected one of {PENALTY_KINDS}")


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
