#pragma once
#include <ATen/core/Tensor.h>

namespace t1t2 {

// T2 penalty hypergradients of every (hyperparameter, tensor) segment in one call
// (docs/design.md, "T2: penalties"):
// coupled l2/l1: Σ_{i∈g} J_i v_i m_i(θ_i); decoupled l2: Σ_{i∈g} v_i·(−2ηθ_i);
// lr: Σ_{i∈g} v_i·(θ⁺_i − θ_i) with θ⁺ = params. See csrc/ops.cpp.
at::Tensor penalty_hypergrad_cpu(at::TensorList v, at::TensorList theta, at::TensorList jac,
                                 at::ArrayRef<double> jac_scalar, at::IntArrayRef segment_tensor,
                                 at::IntArrayRef segment_kind, at::IntArrayRef segment_groups, double lr,
                                 at::TensorList params);

}  // namespace t1t2
