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

#include "cuda/kernels.cuh"

namespace t1t2 {
namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

cuda::Storage storage_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return cuda::Storage::Float64;
    case at::kFloat: return cuda::Storage::Float32;
    case at::kBFloat16: return cuda::Storage::BFloat16;
    case at::kHalf: return cuda::Storage::Float16;
    default: TORCH_CHECK(false, "t1t2: no CUDA storage for dtype ", t);
  }
  return cuda::Storage::Float32;  // not reached
}

// ---- penalty_segment_dot ----------------------------------------------------------------------

constexpr const char* kSegmentDotOp = "t1t2::penalty_segment_dot";

at::Tensor penalty_segment_dot_cuda(const at::Tensor& u_in, const at::Tensor& theta_in, int64_t num_groups,
                                    c10::string_view kind_name) {
  TORCH_CHECK(u_in.device() == theta_in.device(), kSegmentDotOp, ": u is on ", u_in.device(), " but theta is on ",
              theta_in.device(), "; move both to one device");
  TORCH_CHECK(theta_in.device().is_cuda(), kSegmentDotOp, ": the CUDA kernel got u and theta on ", theta_in.device(),
              ", expected cuda");
  TORCH_CHECK(u_in.scalar_type() == theta_in.scalar_type(), kSegmentDotOp, ": u has dtype ", u_in.scalar_type(),
              " but theta has dtype ", theta_in.scalar_type(), "; cast them to one dtype");
  TORCH_CHECK(supported_dtype(theta_in.scalar_type()), kSegmentDotOp,
              ": expected floating-point u and theta (Double, Float, BFloat16 or Half), got ", theta_in.scalar_type());
  TORCH_CHECK(u_in.sizes() == theta_in.sizes(), kSegmentDotOp, ": u has shape ", u_in.sizes(),
              " but theta has shape ", theta_in.sizes());
  const int64_t numel = theta_in.numel();
  TORCH_CHECK(num_groups >= 0, kSegmentDotOp, ": num_groups must be >= 0, got ", num_groups);
  TORCH_CHECK((num_groups == 0 && numel == 0) || (num_groups > 0 && numel % num_groups == 0), kSegmentDotOp,
              ": num_groups=", num_groups, " does not divide numel=", numel,
              " (groups are equal contiguous slices of the flattened tensors)");
  PenaltyKind kind = PenaltyKind::L2;
  if (kind_name == "l2") kind = PenaltyKind::L2;
  else if (kind_name == "l1") kind = PenaltyKind::L1;
  else TORCH_CHECK(false, kSegmentDotOp, ": unknown kind '", kind_name, "'; expected 'l2' or 'l1'");

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

constexpr const char* kT1StepOp = "t1t2::t1_step_";

// An optional per-tensor list: empty means "none for any tensor", else one entry per tensor where an
// entry with no elements means "none for this tensor".
void check_list(at::TensorList list, size_t n, const char* name) {
  TORCH_CHECK(list.empty() || list.size() == n, kT1StepOp, ": ", name,
              " must be empty or have one tensor per parameter (", n, "), got ", list.size());
}

at::Tensor entry(at::TensorList list, size_t i) { return list.empty() ? at::Tensor() : list[i]; }

void check_state(const at::Tensor& t, const at::Tensor& p, at::ScalarType compute, const char* name, size_t i) {
  TORCH_CHECK(t.defined() && t.numel() == p.numel(), kT1StepOp, ": ", name, "[", i, "] must have ", p.numel(),
              " elements like params[", i, "], got ", (t.defined() ? t.numel() : 0));
  TORCH_CHECK(t.scalar_type() == compute, kT1StepOp, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
              ", expected ", compute, " (the compute dtype of ", p.scalar_type(), " parameters)");
  TORCH_CHECK(t.device() == p.device(), kT1StepOp, ": ", name, "[", i, "] is on ", t.device(), " but params[", i,
              "] on ", p.device());
  TORCH_CHECK(t.is_contiguous(), kT1StepOp, ": ", name, "[", i, "] must be contiguous");
}

// Elements per coefficient (0: no such penalty for this tensor).
int64_t check_coef(const at::Tensor& c, const at::Tensor& p, at::ScalarType compute, const char* name, size_t i) {
  if (!c.defined() || c.numel() == 0) return 0;
  TORCH_CHECK(c.scalar_type() == compute, kT1StepOp, ": ", name, "[", i, "] has dtype ", c.scalar_type(),
              ", expected ", compute);
  TORCH_CHECK(c.device() == p.device(), kT1StepOp, ": ", name, "[", i, "] is on ", c.device(), " but params[", i,
              "] on ", p.device());
  TORCH_CHECK(c.is_contiguous(), kT1StepOp, ": ", name, "[", i, "] must be contiguous");
  TORCH_CHECK(p.numel() % c.numel() == 0, kT1StepOp, ": ", name, "[", i, "] has ", c.numel(),
              " coefficients, which do not divide the ", p.numel(), " elements of params[", i, "]");
  return p.numel() / c.numel();
}

void* pointer_or_null(at::TensorList list, size_t i, bool used) {
  return used && !list.empty() && list[i].defined() && list[i].numel() > 0 ? list[i].data_ptr() : nullptr;
}

void t1_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                  at::TensorList l2, at::TensorList l1, at::TensorList decay, at::TensorList stash_theta,
                  at::TensorList stash_jac, c10::string_view optimizer_name, double lr, double momentum,
                  bool nesterov, double beta1, double beta2, double eps, at::ArrayRef<double> bias_correction1,
                  at::ArrayRef<double> bias_correction2) {
  const size_t n = params.size();
  TORCH_CHECK(optimizer_name == "sgd" || optimizer_name == "adam", kT1StepOp, ": unknown optimizer '",
              optimizer_name, "'; expected 'sgd' or 'adam'");
  const bool adam = optimizer_name == "adam";
  TORCH_CHECK(grads.size() == n, kT1StepOp, ": got ", n, " params but ", grads.size(), " grads");
  check_list(state1, n, "state1");
  check_list(state2, n, "state2");
  check_list(l2, n, "l2");
  check_list(l1, n, "l1");
  check_list(decay, n, "decay");
  check_list(stash_theta, n, "stash_theta");
  check_list(stash_jac, n, "stash_jac");
  if (adam) {
    TORCH_CHECK(!state1.empty() && !state2.empty(), kT1StepOp,
                ": adam needs state1 (exp_avg) and state2 (exp_avg_sq)");
    TORCH_CHECK(bias_correction1.size() == n && bias_correction2.size() == n, kT1StepOp,
                ": adam needs one bias correction per parameter, got ", bias_correction1.size(), " and ",
                bias_correction2.size(), " for ", n, " params");
  } else {
    TORCH_CHECK(momentum == 0 || !state1.empty(), kT1StepOp, ": sgd with momentum needs state1 (momentum buffers)");
    TORCH_CHECK(stash_jac.empty(), kT1StepOp, ": stash_jac is only written by adam (sgd's Jacobian is a scalar)");
  }
  if (n == 0) return;
  const at::ScalarType dtype = params[0].scalar_type();
  const at::ScalarType compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(supported_dtype(dtype), kT1StepOp, ": params must be Double, Float, BFloat16 or Half, got ", dtype);
  const at::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), kT1StepOp, ": the CUDA kernel got params[0] on ", device);
  const bool uses_state1 = adam || momentum != 0;

  std::vector<at::Tensor> grads_contig(n);
  std::vector<cuda::T1StepTensor> descriptors(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == dtype, kT1StepOp, ": params[", i, "] has dtype ", p.scalar_type(),
                " but params[0] has ", dtype, "; one dtype per call");
    TORCH_CHECK(p.device() == device, kT1StepOp, ": params[", i, "] is on ", p.device(), " but params[0] on ", device,
                "; one device per call");
    TORCH_CHECK(p.is_contiguous(), kT1StepOp, ": params[", i, "] must be contiguous (it is updated in place)");
    TORCH_CHECK(grads[i].sizes() == p.sizes(), kT1StepOp, ": grads[", i, "] has shape ", grads[i].sizes(),
                " but params[", i, "] has ", p.sizes());
    TORCH_CHECK(grads[i].scalar_type() == dtype && grads[i].device() == p.device(), kT1StepOp, ": grads[", i,
                "] is ", grads[i].scalar_type(), " on ", grads[i].device(), ", expected ", dtype, " on ", p.device());
    grads_contig[i] = grads[i].contiguous();
    if (!state1.empty() && uses_state1) check_state(state1[i], p, compute, "state1", i);
    if (adam) check_state(state2[i], p, compute, "state2", i);
    if (!stash_theta.empty()) check_state(stash_theta[i], p, compute, "stash_theta", i);
    if (!stash_jac.empty()) check_state(stash_jac[i], p, compute, "stash_jac", i);

    cuda::T1StepTensor& d = descriptors[i];
    d.param = p.data_ptr();
    d.grad = grads_contig[i].const_data_ptr();
    d.state1 = pointer_or_null(state1, i, uses_state1);
    d.state2 = pointer_or_null(state2, i, adam);
    d.l2_inner = check_coef(entry(l2, i), p, compute, "l2", i);
    d.l1_inner = check_coef(entry(l1, i), p, compute, "l1", i);
    d.decay_inner = check_coef(entry(decay, i), p, compute, "decay", i);
    d.l2 = d.l2_inner ? l2[i].const_data_ptr() : nullptr;
    d.l1 = d.l1_inner ? l1[i].const_data_ptr() : nullptr;
    d.decay = d.decay_inner ? decay[i].const_data_ptr() : nullptr;
    d.stash_theta = pointer_or_null(stash_theta, i, true);
    d.stash_jac = pointer_or_null(stash_jac, i, true);
    d.numel = p.numel();
    d.bias_correction1 = adam ? bias_correction1[i] : 1.0;
    d.bias_correction2 = adam ? bias_correction2[i] : 1.0;
    d.adam_a = adam ? (1.0 - beta1) / bias_correction1[i] : 0.0;
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

  const cuda::T1StepScalars scalars{lr, momentum, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, nesterov};
  C10_CUDA_CHECK(cuda::launch_t1_step(storage_of(dtype), adam ? cuda::Optimizer::Adam : cuda::Optimizer::Sgd,
                                      cuda::t1_step_table_view(device_table.const_data_ptr(), layout), scalars,
                                      c10::cuda::getCurrentCUDAStream()));
}

// ---- penalty_hypergrad ------------------------------------------------------------------------

constexpr const char* kHypergradOp = "t1t2::penalty_hypergrad";

at::Tensor penalty_hypergrad_cuda(at::TensorList v, at::TensorList theta, at::TensorList jac,
                                  at::ArrayRef<double> jac_scalar, at::IntArrayRef segment_tensor,
                                  at::IntArrayRef segment_kind, at::IntArrayRef segment_groups, double lr) {
  const size_t n = theta.size();
  TORCH_CHECK(v.size() == n, kHypergradOp, ": got ", n, " theta but ", v.size(), " v");
  TORCH_CHECK(jac.empty() || jac.size() == n, kHypergradOp, ": jac must be empty or have one tensor per theta (", n,
              "), got ", jac.size());
  TORCH_CHECK(jac_scalar.size() == n, kHypergradOp, ": jac_scalar must have one value per theta (", n, "), got ",
              jac_scalar.size());
  const size_t num_segments = segment_tensor.size();
  TORCH_CHECK(segment_kind.size() == num_segments && segment_groups.size() == num_segments, kHypergradOp,
              ": segment_tensor, segment_kind and segment_groups must have one entry per segment, got ",
              segment_tensor.size(), ", ", segment_kind.size(), " and ", segment_groups.size());
  const at::ScalarType dtype = n ? theta[0].scalar_type() : at::kFloat;
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat, kHypergradOp,
              ": theta must be in the compute dtype (Double or Float), got ", dtype);
  TORCH_CHECK(n > 0 || num_segments == 0, kHypergradOp, ": segment 0 names tensor ", segment_tensor[0], " of 0");
  if (n == 0) return at::zeros({0}, at::TensorOptions().dtype(dtype));
  const at::Device device = theta[0].device();
  TORCH_CHECK(device.is_cuda(), kHypergradOp, ": the CUDA kernel got theta[0] on ", device);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(theta[i].scalar_type() == dtype && v[i].scalar_type() == dtype, kHypergradOp, ": v[", i,
                "] and theta[", i, "] must both be ", dtype, ", got ", v[i].scalar_type(), " and ",
                theta[i].scalar_type());
    TORCH_CHECK(theta[i].device() == device && v[i].device() == device, kHypergradOp, ": the CUDA kernel got v[", i,
                "] on ", v[i].device(), " and theta[", i, "] on ", theta[i].device(), ", expected ", device);
    TORCH_CHECK(v[i].sizes() == theta[i].sizes(), kHypergradOp, ": v[", i, "] has shape ", v[i].sizes(),
                " but theta[", i, "] has ", theta[i].sizes());
    TORCH_CHECK(theta[i].is_contiguous() && v[i].is_contiguous(), kHypergradOp, ": v[", i, "] and theta[", i,
                "] must be contiguous");
    if (!jac.empty() && jac[i].numel() > 0) {
      TORCH_CHECK(jac[i].sizes() == theta[i].sizes() && jac[i].scalar_type() == dtype && jac[i].is_contiguous() &&
                      jac[i].device() == device,
                  kHypergradOp, ": jac[", i, "] must be a contiguous ", dtype, " tensor on ", device, " of shape ",
                  theta[i].sizes(), " (or empty to use jac_scalar[", i, "]), got ", jac[i].scalar_type(), " ",
                  jac[i].sizes(), " on ", jac[i].device());
    }
  }
  std::vector<cuda::HypergradSegment> segments(num_segments);
  int64_t total = 0;
  for (size_t s = 0; s < num_segments; ++s) {
    const int64_t t = segment_tensor[s], kind = segment_kind[s], groups = segment_groups[s];
    TORCH_CHECK(t >= 0 && static_cast<size_t>(t) < n, kHypergradOp, ": segment ", s, " names tensor ", t, " of ", n);
    TORCH_CHECK(kind == 0 || kind == 1 || kind == 2, kHypergradOp, ": segment ", s, " has kind ", kind,
                "; expected 0 (l2), 1 (l1) or 2 (decoupled l2)");
    const int64_t numel = theta[t].numel();
    TORCH_CHECK(groups >= 0 && ((groups == 0 && numel == 0) || (groups > 0 && numel % groups == 0)), kHypergradOp,
                ": segment ", s, ": ", groups, " groups do not divide the ", numel, " elements of tensor ", t);
    cuda::HypergradSegment& d = segments[s];
    d = cuda::HypergradSegment{};
    d.v = v[t].const_data_ptr();
    d.theta = theta[t].const_data_ptr();
    d.jac = !jac.empty() && jac[t].numel() > 0 ? jac[t].const_data_ptr() : nullptr;
    d.jac_scalar = jac_scalar[t];
    d.kind = static_cast<cuda::SegmentKind>(kind);
    d.groups = groups;
    d.inner = groups ? numel / groups : 0;
    d.out_offset = total;
    total += groups;
  }
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

void check_like(const at::Tensor& t, const at::Tensor& p, at::ScalarType dtype, const char* op, const char* name,
                size_t i) {
  TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(), " but params[", i, "] has ",
              p.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.device() == p.device(), op, ": ", name, "[", i, "] is on ", t.device(), ", expected ", p.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
}

void check_params(at::TensorList params, const char* op) {
  TORCH_CHECK(params[0].device().is_cuda(), op, ": the CUDA kernel got params[0] on ", params[0].device());
  TORCH_CHECK(supported_dtype(params[0].scalar_type()), op, ": params must be Double, Float, BFloat16 or Half, got ",
              params[0].scalar_type());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device() == params[0].device(), op, ": params[", i, "] is on ", params[i].device(),
                ", expected ", params[0].device());
    TORCH_CHECK(params[i].is_contiguous(), op, ": params[", i, "] must be contiguous (it is written in place)");
    TORCH_CHECK(params[i].scalar_type() == params[0].scalar_type(), op, ": params[", i, "] has dtype ",
                params[i].scalar_type(), " but params[0] has ", params[0].scalar_type());
  }
}

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
  constexpr const char* op = "t1t2::perturb_";
  const size_t n = params.size();
  TORCH_CHECK(base.size() == n && direction.size() == n, op, ": got ", n, " params, ", base.size(), " base and ",
              direction.size(), " direction tensors");
  TORCH_CHECK(save.empty() || save.size() == n, op, ": save must be empty or have one tensor per parameter (", n,
              "), got ", save.size());
  if (n == 0) return;
  check_params(params, op);
  const at::ScalarType dtype = params[0].scalar_type();
  const at::ScalarType compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<cuda::PerturbTensor> descriptors(n);
  for (size_t i = 0; i < n; ++i) {
    check_like(base[i], params[i], compute, op, "base", i);
    check_like(direction[i], params[i], compute, op, "direction", i);
    if (!save.empty()) check_like(save[i], params[i], dtype, op, "save", i);
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
  constexpr const char* op = "t1t2::restore_";
  TORCH_CHECK(save.size() == params.size(), op, ": got ", params.size(), " params but ", save.size(), " saved");
  if (params.empty()) return;
  check_params(params, op);
  std::vector<cuda::PerturbTensor> descriptors(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    check_like(save[i], params[i], params[0].scalar_type(), op, "save", i);
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
