// CUDA implementations of the torch.ops.t1t2 schemas (csrc/ops.cpp): the same input checks and
// messages as the CPU kernels in csrc/cpu/, then the launchers of csrc/cuda/kernels.cuh on the
// current stream of the tensors' device. Only compiled when torch has CUDA (setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "checks.h"
#include "cuda/kernels.cuh"
#include "cuda/storage_of.h"

namespace t1t2 {
namespace {

// ---- penalty_segment_dot ----------------------------------------------------------------------

at::Tensor penalty_segment_dot_cuda(const at::Tensor& u_in, const at::Tensor& theta_in, int64_t num_groups,
                                    c10::string_view kind_name) {
  const PenaltyKind kind = check_segment_dot_inputs(u_in, theta_in, num_groups, kind_name, at::kCUDA);
  const int64_t numel = theta_in.numel();
  const c10::cuda::CUDAGuard guard(theta_in.device());
  const auto out_options = theta_in.options().dtype(theta_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  if (numel == 0) return at::zeros({num_groups}, out_options);  // empty groups sum to 0
  at::Tensor out = at::empty({num_groups}, out_options);         // the kernels write every entry
  const at::Tensor u = u_in.contiguous();
  const at::Tensor theta = theta_in.contiguous();
  const int64_t inner = numel / num_groups;
  const size_t workspace_bytes = cuda::penalty_segment_dot_workspace_bytes(num_groups, inner);
  at::Tensor workspace;  // from the caching allocator: freed here, reused only after this stream's kernels
  if (workspace_bytes) workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, theta.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::launch_penalty_segment_dot(storage_of(theta.scalar_type()), kind, u.const_data_ptr(),
                                                  theta.const_data_ptr(), num_groups, inner, out.mutable_data_ptr(),
                                                  workspace_bytes ? workspace.mutable_data_ptr() : nullptr,
                                                  c10::cuda::getCurrentCUDAStream()));
  return out;
}

// ---- t1_step_ ---------------------------------------------------------------------------------

void* pointer_or_null(at::TensorList list, size_t i, bool used) {
  return used && !list.empty() && list[i].defined() && list[i].numel() > 0 ? list[i].data_ptr() : nullptr;
}

void t1_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                  at::TensorList l2, at::TensorList l1, at::TensorList decay, at::TensorList stash_theta,
                  at::TensorList stash_jac, c10::string_view optimizer_name, double lr, double momentum,
                  bool nesterov, double beta1, double beta2, double eps, at::ArrayRef<double> bias_correction1,
                  at::ArrayRef<double> bias_correction2, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, bool check_finite,
                  const std::optional<at::Tensor>& lr_scale) {
  const T1StepInputs in = check_t1_step_inputs(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac,
                                               optimizer_name, momentum, bias_correction1, bias_correction2,
                                               at::kCUDA);
  check_t1_step_guard(grad_scale, found_inf, check_finite, params);
  const bool has_lr_scale = check_t1_step_lr_scale(lr_scale, params);
  const size_t n = params.size();
  if (n == 0) return;
  const bool adam = in.adam;
  const at::Device device = params[0].device();
  std::vector<cuda::T1StepTensor> descriptors(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    cuda::T1StepTensor& d = descriptors[i];
    d.param = p.data_ptr();
    d.grad = in.grads[i].const_data_ptr();
    d.state1 = pointer_or_null(state1, i, in.uses_state1);
    d.state2 = pointer_or_null(state2, i, adam);
    d.l2_inner = in.l2_inner[i];
    d.l1_inner = in.l1_inner[i];
    d.decay_inner = in.decay_inner[i];
    d.l2 = d.l2_inner ? l2[i].const_data_ptr() : nullptr;
    d.l1 = d.l1_inner ? l1[i].const_data_ptr() : nullptr;
    d.decay = d.decay_inner ? decay[i].const_data_ptr() : nullptr;
    d.stash_theta = pointer_or_null(stash_theta, i, true);
    d.stash_jac = pointer_or_null(stash_jac, i, true);
    d.numel = p.numel();
    d.bias_correction1 = adam ? bias_correction1[i] : 1.0;
    d.bias_correction2 = adam ? bias_correction2[i] : 1.0;
    d.adam_a = adam ? (1.0 - beta1) / bias_correction1[i] : 0.0;
    d.inv_bias_correction1 = adam ? 1.0 / bias_correction1[i] : 1.0;
    d.inv_bias_correction2 = adam ? 1.0 / bias_correction2[i] : 1.0;
    d.lr_scale = has_lr_scale ? static_cast<const char*>(lr_scale->const_data_ptr()) + i * lr_scale->element_size()
                              : nullptr;
  }

  const cuda::T1StepTableLayout layout = cuda::t1_step_table_layout(descriptors.data(), static_cast<int64_t>(n));
  if (layout.num_chunks == 0) return;  // every tensor is empty
  const c10::cuda::CUDAGuard guard(device);
  // The table goes to the device in one asynchronous copy from pinned memory, ordered before the
  // kernel on the current stream; the pinned block is not reused until that copy has finished.
  const auto bytes = static_cast<int64_t>(layout.bytes);
  at::Tensor host_table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  cuda::t1_step_fill_table(descriptors.data(), layout, host_table.mutable_data_ptr());
  at::Tensor device_table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  device_table.copy_(host_table, /*non_blocking=*/true);

  // grad_scale and found_inf stay on the device: the kernels read them, the host never syncs on them.
  const float* scale_ptr = grad_scale.has_value() && grad_scale->defined() ? grad_scale->const_data_ptr<float>()
                                                                          : nullptr;
  float* found_ptr = found_inf.has_value() && found_inf->defined() ? found_inf->mutable_data_ptr<float>() : nullptr;
  const cuda::T1StepTable table = cuda::t1_step_table_view(device_table.const_data_ptr(), layout);
  if (check_finite)
    C10_CUDA_CHECK(cuda::launch_t1_step_scan(storage_of(in.dtype), table, scale_ptr, found_ptr,
                                             c10::cuda::getCurrentCUDAStream()));
  const cuda::T1StepScalars scalars{lr, momentum, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, nesterov, scale_ptr,
                                    found_ptr};
  C10_CUDA_CHECK(cuda::launch_t1_step(storage_of(in.dtype), adam ? cuda::Optimizer::Adam : cuda::Optimizer::Sgd,
                                      table, scalars,
                                      c10::cuda::getCurrentCUDAStream()));
}

// ---- penalty_hypergrad ------------------------------------------------------------------------

at::Tensor penalty_hypergrad_cuda(at::TensorList v, at::TensorList theta, at::TensorList jac,
                                  at::ArrayRef<double> jac_scalar, at::IntArrayRef segment_tensor,
                                  at::IntArrayRef segment_kind, at::IntArrayRef segment_groups, double lr,
                                  at::TensorList params) {
  const HypergradInputs in = check_penalty_hypergrad_inputs(v, theta, jac, jac_scalar, segment_tensor, segment_kind,
                                                             segment_groups, at::kCUDA, params);
  const size_t n = theta.size(), num_segments = in.segments.size();
  const at::ScalarType dtype = in.dtype;
  if (n == 0) return at::zeros({0}, at::TensorOptions().dtype(dtype));
  const at::Device device = theta[0].device();
  const c10::cuda::CUDAGuard device_guard(device);
  // θ⁺ of the lr segments in the compute dtype (a copy on the stream only for bfloat16/float16
  // parameters); kept alive here until the kernels are enqueued
  std::vector<at::Tensor> updated(in.has_lr ? n : 0);
  for (const SegmentSpec& spec : in.segments)
    if (spec.kind == kSegmentLr && !updated[spec.tensor].defined())
      updated[spec.tensor] = params[spec.tensor].to(dtype).contiguous();
  std::vector<cuda::HypergradSegment> segments(num_segments);
  for (size_t s = 0; s < num_segments; ++s) {
    const SegmentSpec& spec = in.segments[s];
    const int64_t t = spec.tensor;
    cuda::HypergradSegment& d = segments[s];
    d = cuda::HypergradSegment{};
    d.v = v[t].const_data_ptr();
    d.theta = theta[t].const_data_ptr();
    d.jac = !jac.empty() && jac[t].numel() > 0 ? jac[t].const_data_ptr() : nullptr;
    d.updated = spec.kind == kSegmentLr ? updated[t].const_data_ptr() : nullptr;
    d.jac_scalar = jac_scalar[t];
    d.kind = static_cast<cuda::SegmentKind>(spec.kind);
    d.groups = spec.groups;
    d.inner = spec.inner;
    d.out_offset = spec.out_offset;
  }
  const int64_t total = in.total;
  const c10::cuda::CUDAGuard guard(device);
  if (total == 0) return at::zeros({0}, theta[0].options());
  at::Tensor out = at::empty({total}, theta[0].options());  // the kernels write every entry
  const cuda::HypergradPlan plan = cuda::penalty_hypergrad_plan(segments.data(), static_cast<int64_t>(num_segments));
  // The segment table goes to the device in one asynchronous copy from pinned memory, as t1_step's.
  const auto bytes = static_cast<int64_t>(num_segments * sizeof(cuda::HypergradSegment));
  at::Tensor host_table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host_table.mutable_data_ptr(), segments.data(), static_cast<size_t>(bytes));
  at::Tensor device_table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  device_table.copy_(host_table, /*non_blocking=*/true);
  const size_t workspace_bytes = cuda::penalty_hypergrad_workspace_bytes(plan);
  at::Tensor workspace;  // from the caching allocator: reused only after this stream's kernels
  if (workspace_bytes) workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, out.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::launch_penalty_hypergrad(
      storage_of(dtype), static_cast<const cuda::HypergradSegment*>(device_table.const_data_ptr()), plan, lr,
      out.mutable_data_ptr(), workspace_bytes ? workspace.mutable_data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream()));
  return out;
}

// ---- perturb_ / restore_ ----------------------------------------------------------------------

// Copies the table to the device (one asynchronous copy from pinned memory on the current stream)
// and returns the device buffer, which must live until the launch is enqueued.
at::Tensor perturb_device_table(const std::vector<cuda::PerturbTensor>& descriptors,
                                const cuda::PerturbTableLayout& layout, at::Device device) {
  const auto bytes = static_cast<int64_t>(layout.bytes);
  at::Tensor host_table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  cuda::perturb_fill_table(descriptors.data(), layout, host_table.mutable_data_ptr());
  at::Tensor device_table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  device_table.copy_(host_table, /*non_blocking=*/true);
  return device_table;
}

void perturb_cuda(at::TensorList params, at::TensorList save, at::TensorList base, at::TensorList direction,
                  double scale) {
  check_perturb_inputs(params, save, base, direction, at::kCUDA);
  const size_t n = params.size();
  if (n == 0) return;
  const at::ScalarType dtype = params[0].scalar_type();
  std::vector<cuda::PerturbTensor> descriptors(n);
  for (size_t i = 0; i < n; ++i) {
    descriptors[i] = {params[i].data_ptr(), save.empty() ? nullptr : save[i].data_ptr(), base[i].const_data_ptr(),
                      direction[i].const_data_ptr(), params[i].numel()};
  }
  const cuda::PerturbTableLayout layout = cuda::perturb_table_layout(descriptors.data(), static_cast<int64_t>(n));
  if (layout.num_chunks == 0) return;  // every tensor is empty
  const c10::cuda::CUDAGuard guard(params[0].device());
  const at::Tensor table = perturb_device_table(descriptors, layout, params[0].device());
  C10_CUDA_CHECK(cuda::launch_perturb(storage_of(dtype), cuda::perturb_table_view(table.const_data_ptr(), layout),
                                      scale, c10::cuda::getCurrentCUDAStream()));
}

void restore_cuda(at::TensorList params, at::TensorList save) {
  check_restore_inputs(params, save, at::kCUDA);
  if (params.empty()) return;
  std::vector<cuda::PerturbTensor> descriptors(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    descriptors[i] = {params[i].data_ptr(), const_cast<void*>(save[i].const_data_ptr()), nullptr, nullptr,
                      params[i].numel()};
  }
  const cuda::PerturbTableLayout layout =
      cuda::perturb_table_layout(descriptors.data(), static_cast<int64_t>(descriptors.size()));
  if (layout.num_chunks == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const at::Tensor table = perturb_device_table(descriptors, layout, params[0].device());
  C10_CUDA_CHECK(cuda::launch_restore(storage_of(params[0].scalar_type()),
                                      cuda::perturb_table_view(table.const_data_ptr(), layout),
                                      c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace t1t2

TORCH_LIBRARY_IMPL(t1t2, CUDA, m) {
  m.impl("penalty_segment_dot", &t1t2::penalty_segment_dot_cuda);
  m.impl("t1_step_", &t1t2::t1_step_cuda);
  m.impl("penalty_hypergrad", &t1t2::penalty_hypergrad_cuda);
  m.impl("perturb_", &t1t2::perturb_cuda);
  m.impl("restore_", &t1t2::restore_cuda);
}
