#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace t1t2 {

// Fused T1 step over a list of tensors, in place (docs/design.md, "The T1 step"): ĝ = g + Σ penalty
// gradients, the sgd/adam update with decoupled L2, and on hyper iterations the stash (pre-step θ,
// adam's J). See the schema in csrc/ops.cpp for the argument contract.
void t1_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                 at::TensorList l2, at::TensorList l1, at::TensorList decay, at::TensorList stash_theta,
                 at::TensorList stash_jac, c10::string_view optimizer, double lr, double momentum, bool nesterov,
                 double beta1, double beta2, double eps, at::ArrayRef<double> bias_correction1,
                 at::ArrayRef<double> bias_correction2, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, bool check_finite,
                 const std::optional<at::Tensor>& lr_scale);

}  // namespace t1t2
