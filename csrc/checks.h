// Input validation of every t1t2 op, shared by the CPU kernels (csrc/cpu/) and the CUDA binding
// (csrc/cuda/ops_cuda.cu), so both devices accept the same arguments and fail with the same
// messages. Each check names the op, the tensor (with its index in a list) and what was expected
// against what it got. `kernel` is the device type the calling implementation runs on.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <vector>

#include "t1t2/math.h"

namespace t1t2 {

bool supported_dtype(at::ScalarType t);  // Double, Float, BFloat16, Half

// float64 stays float64; the rest computes in float32.
inline at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The entry i of an optional per-tensor list (an empty list: none for any tensor).
inline at::Tensor optional_entry(at::TensorList list, size_t i) { return list.empty() ? at::Tensor() : list[i]; }

// ---- penalty_segment_dot ----
PenaltyKind check_segment_dot_inputs(const at::Tensor& u, const at::Tensor& theta, int64_t num_groups,
                                     c10::string_view kind, at::DeviceType kernel);

// ---- t1_step_ ----
struct T1StepInputs {
  bool adam = false;
  bool uses_state1 = false;  // adam, or sgd with momentum
  at::ScalarType dtype = at::kFloat, compute = at::kFloat;
  std::vector<at::Tensor> grads;                       // contiguous
  std::vector<int64_t> l2_inner, l1_inner, decay_inner;  // elements per coefficient; 0: no such penalty
};
T1StepInputs check_t1_step_inputs(at::TensorList params, at::TensorList grads, at::TensorList state1,
                                  at::TensorList state2, at::TensorList l2, at::TensorList l1, at::TensorList decay,
                                  at::TensorList stash_theta, at::TensorList stash_jac, c10::string_view optimizer,
                                  double momentum, at::ArrayRef<double> bias_correction1,
                                  at::ArrayRef<double> bias_correction2, at::DeviceType kernel);
// The optional GradScaler/guard arguments of t1_step_: one-element float32 tensors on the params'
// device; check_finite needs found_inf (it is where a non-finite gradient is reported).
void check_t1_step_guard(const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                         bool check_finite, at::TensorList params);
// The optional lr_scale of t1_step_: a contiguous 1-D tensor in the compute dtype on the params'
// device with one value per tensor. Returns whether one was given.
bool check_t1_step_lr_scale(const c10::optional<at::Tensor>& lr_scale, at::TensorList params);

// ---- penalty_hypergrad ----
// segment_kind codes as the int64 the schema passes (t1t2/enums.h)
constexpr int64_t kSegmentL2 = static_cast<int64_t>(SegmentKind::L2);
constexpr int64_t kSegmentL1 = static_cast<int64_t>(SegmentKind::L1);
constexpr int64_t kSegmentDecoupledL2 = static_cast<int64_t>(SegmentKind::DecoupledL2);
constexpr int64_t kSegmentLr = static_cast<int64_t>(SegmentKind::Lr);
struct SegmentSpec {
  int64_t tensor, kind, groups, inner, out_offset;
};
struct HypergradInputs {
  at::ScalarType dtype = at::kFloat;
  bool has_lr = false;  // some segment has kind lr (then params has one tensor per theta)
  std::vector<SegmentSpec> segments;
  int64_t total = 0;  // length of the result: the segments' groups, concatenated
};
HypergradInputs check_penalty_hypergrad_inputs(at::TensorList v, at::TensorList theta, at::TensorList jac,
                                               at::ArrayRef<double> jac_scalar, at::IntArrayRef segment_tensor,
                                               at::IntArrayRef segment_kind, at::IntArrayRef segment_groups,
                                               at::DeviceType kernel, at::TensorList params);

// ---- perturb_ / restore_ (both return at once for empty lists) ----
void check_perturb_inputs(at::TensorList params, at::TensorList save, at::TensorList base, at::TensorList direction,
                          at::DeviceType kernel);
void check_restore_inputs(at::TensorList params, at::TensorList save, at::DeviceType kernel);

}  // namespace t1t2
