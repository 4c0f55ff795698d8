"""Public wrappers over the compiled ops ``torch.ops.t1t2.*``; each has a twin in ``reference``."""
from __future__ import annotations

import torch

from . import _extension


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


if _extension.AVAILABLE:
    @torch.library.register_fake("t1t2::penalty_segment_dot")
    def _penalty_segment_dot_fake(u, theta, num_groups, kind):
        torch._check(u.shape == theta.shape, lambda: f"u has shape {tuple(u.shape)}, theta {tuple(theta.shape)}")
        torch._check(u.dtype == theta.dtype, lambda: f"u has dtype {u.dtype}, theta {theta.dtype}")
        torch._check(u.device == theta.device, lambda: f"u is on {u.device}, theta on {theta.device}")
        torch._check(theta.dtype.is_floating_point, lambda: f"expected floating tensors, got {theta.dtype}")
        torch._check(kind in ("l2", "l1"), lambda: f"unknown kind {kind!r}")
        torch._check(num_groups >= 0, lambda: f"num_groups must be >= 0, got {num_groups}")
        out = torch.float64 if theta.dtype == torch.float64 else torch.float32
        return theta.new_empty((num_groups,), dtype=out)
