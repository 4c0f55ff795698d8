#include "checks.h"

#include <c10/util/Exception.h>

#include <limits>

namespace t1t2 {
namespace {

const char* kernel_name(at::DeviceType kernel) { return kernel == at::kCUDA ? "CUDA" : "CPU"; }

// The first tensor fixes the device of a call; it must be the implementation's device type.
void check_kernel_device(const char* op, const at::Tensor& first, const char* name, at::DeviceType kernel) {
  TORCH_CHECK(first.device().type() == kernel, op, ": the ", kernel_name(kernel), " kernel got ", name, " on ",
              first.device(), ", expected ", c10::DeviceTypeName(kernel, /*lower_case=*/true));
}

// ---- t1_step_ ----
constexpr const char* kT1Step = "t1t2::t1_step_";

// An optional per-tensor list: empty means "none for any tensor", else one entry per tensor where
// an entry with no elements means "none for this tensor".
void check_list(at::TensorList list, size_t n, const char* name) {
  TORCH_CHECK(list.empty() || list.size() == n, kT1Step, ": ", name,
              " must be empty or have one tensor per parameter (", n, "), got ", list.size());
}

void check_state(const at::Tensor& t, const at::Tensor& p, at::ScalarType compute, const char* name, size_t i) {
  TORCH_CHECK(t.defined() && t.numel() == p.numel(), kT1Step, ": ", name, "[", i, "] must have ", p.numel(),
              " elements like params[", i, "], got ", (t.defined() ? t.numel() : 0));
  TORCH_CHECK(t.scalar_type() == compute, kT1Step, ": ", name, "[", i, "] has dtype ", t.scalar_type(), ", expected ",
              compute, " (the compute dtype of ", p.scalar_type(), " parameters)");
  TORCH_CHECK(t.device() == p.device(), kT1Step, ": ", name, "[", i, "] is on ", t.device(), " but params[", i,
              "] on ", p.device());
  TORCH_CHECK(t.is_contiguous(), kT1Step, ": ", name, "[", i, "] must be contiguous");
}

int64_t check_coef(const at::Tensor& c, const at::Tensor& p, at::ScalarType compute, const char* name, size_t i) {
  if (!c.defined() || c.numel() == 0) return 0;
  TORCH_CHECK(c.scalar_type() == compute, kT1Step, ": ", name, "[", i, "] has dtype ", c.scalar_type(), ", expected ",
              compute);
  TORCH_CHECK(c.device() == p.device(), kT1Step, ": ", name, "[", i, "] is on ", c.device(), " but params[", i,
              "] on ", p.device());
  TORCH_CHECK(c.is_contiguous(), kT1Step, ": ", name, "[", i, "] must be contiguous");
  TORCH_CHECK(p.numel() % c.numel() == 0, kT1Step, ": ", name, "[", i, "] has ", c.numel(),
              " coefficients, which do not divide the ", p.numel(), " elements of params[", i, "]");
  return p.numel() / c.numel();
}

// ---- perturb_ / restore_ ----
void check_like(const at::Tensor& t, const at::Tensor& p, at::ScalarType dtype, const char* op, const char* name,
                size_t i) {
  TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(), " but params[", i, "] has ",
              p.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.device() == p.device(), op, ": ", name, "[", i, "] is on ", t.device(), ", expected ", p.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
}

void check_params(at::TensorList params, const char* op, at::DeviceType kernel) {
  check_kernel_device(op, params[0], "params[0]", kernel);
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

}  // namespace

bool supported_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

PenaltyKind check_segment_dot_inputs(const at::Tensor& u, const at::Tensor& theta, int64_t num_groups,
                                     c10::string_view kind, at::DeviceType kernel) {
  constexpr const char* op = "t1t2::penalty_segment_dot";
  TORCH_CHECK(u.device() == theta.device(), op, ": u is on ", u.device(), " but theta is on ", theta.device(),
              "; move both to one device");
  TORCH_CHECK(theta.device().type() == kernel, op, ": the ", kernel_name(kernel), " kernel got u and theta on ",
              theta.device(), ", expected ", c10::DeviceTypeName(kernel, /*lower_case=*/true));
  TORCH_CHECK(u.scalar_type() == theta.scalar_type(), op, ": u has dtype ", u.scalar_type(), " but theta has dtype ",
              theta.scalar_type(), "; cast them to one dtype");
  TORCH_CHECK(supported_dtype(theta.scalar_type()), op,
              ": expected floating-point u and theta (Double, Float, BFloat16 or Half), got ", theta.scalar_type());
  TORCH_CHECK(u.sizes() == theta.sizes(), op, ": u has shape ", u.sizes(), " but theta has shape ", theta.sizes());
  const int64_t numel = theta.numel();
  TORCH_CHECK(num_groups >= 0, op, ": num_groups must be >= 0, got ", num_groups);
  TORCH_CHECK((num_groups == 0 && numel == 0) || (num_groups > 0 && numel % num_groups == 0), op,
              ": num_groups=", num_groups, " does not divide numel=", numel,
              " (groups are equal contiguous slices of the flattened tensors)");
  if (kind == "l2") return PenaltyKind::L2;
  if (kind == "l1") return PenaltyKind::L1;
  TORCH_CHECK(false, op, ": unknown kind '", kind, "'; expected 'l2' or 'l1'");
}

T1StepInputs check_t1_step_inputs(at::TensorList params, at::TensorList grads, at::TensorList state1,
                                  at::TensorList state2, at::TensorList l2, at::TensorList l1, at::TensorList decay,
                                  at::TensorList stash_theta, at::TensorList stash_jac, c10::string_view optimizer,
                                  double momentum, at::ArrayRef<double> bias_correction1,
                                  at::ArrayRef<double> bias_correction2, at::DeviceType kernel) {
  const size_t n = params.size();
  TORCH_CHECK(optimizer == "sgd" || optimizer == "adam", kT1Step, ": unknown optimizer '", optimizer,
              "'; expected 'sgd' or 'adam'");
  T1StepInputs in;
  in.adam = optimizer == "adam";
  in.uses_state1 = in.adam || momentum != 0;
  TORCH_CHECK(grads.size() == n, kT1Step, ": got ", n, " params but ", grads.size(), " grads");
  check_list(state1, n, "state1");
  check_list(state2, n, "state2");
  check_list(l2, n, "l2");
  check_list(l1, n, "l1");
  check_list(decay, n, "decay");
  check_list(stash_theta, n, "stash_theta");
  check_list(stash_jac, n, "stash_jac");
  if (in.adam) {
    TORCH_CHECK(n == 0 || (!state1.empty() && !state2.empty()), kT1Step,
                ": adam needs state1 (exp_avg) and state2 (exp_avg_sq)");
    TORCH_CHECK(bias_correction1.size() == n && bias_correction2.size() == n, kT1Step,
                ": adam needs one bias correction per parameter, got ", bias_correction1.size(), " and ",
                bias_correction2.size(), " for ", n, " params");
  } else {
    TORCH_CHECK(momentum == 0 || n == 0 || !state1.empty(), kT1Step,
                ": sgd with momentum needs state1 (momentum buffers)");
    TORCH_CHECK(stash_jac.empty(), kT1Step, ": stash_jac is only written by adam (sgd's Jacobian is a scalar)");
  }
  if (n == 0) return in;
  in.dtype = params[0].scalar_type();
  in.compute = compute_dtype(in.dtype);
  TORCH_CHECK(supported_dtype(in.dtype), kT1Step, ": params must be Double, Float, BFloat16 or Half, got ", in.dtype);
  check_kernel_device(kT1Step, params[0], "params[0]", kernel);
  const at::Device device = params[0].device();
  in.grads.resize(n);
  in.l2_inner.resize(n);
  in.l1_inner.resize(n);
  in.decay_inner.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == in.dtype, kT1Step, ": params[", i, "] has dtype ", p.scalar_type(),
                " but params[0] has ", in.dtype, "; one dtype per call");
    TORCH_CHECK(p.device() == device, kT1Step, ": params[", i, "] is on ", p.device(), " but params[0] on ", device,
                "; one device per call");
    TORCH_CHECK(p.is_contiguous(), kT1Step, ": params[", i, "] must be contiguous (it is updated in place)");
    TORCH_CHECK(grads[i].sizes() == p.sizes(), kT1Step, ": grads[", i, "] has shape ", grads[i].sizes(),
                " but params[", i, "] has ", p.sizes());
    TORCH_CHECK(grads[i].scalar_type() == in.dtype && grads[i].device() == device, kT1Step, ": grads[", i, "] is ",
                grads[i].scalar_type(), " on ", grads[i].device(), ", expected ", in.dtype, " on ", device);
    in.grads[i] = grads[i].contiguous();
    if (!state1.empty() && in.uses_state1) check_state(state1[i], p, in.compute, "state1", i);
    if (in.adam) check_state(state2[i], p, in.compute, "state2", i);
    if (!stash_theta.empty()) check_state(stash_theta[i], p, in.compute, "stash_theta", i);
    if (!stash_jac.empty()) check_state(stash_jac[i], p, in.compute, "stash_jac", i);
    in.l2_inner[i] = check_coef(optional_entry(l2, i), p, in.compute, "l2", i);
    in.l1_inner[i] = check_coef(optional_entry(l1, i), p, in.compute, "l1", i);
    in.decay_inner[i] = check_coef(optional_entry(decay, i), p, in.compute, "decay", i);
  }
  return in;
}

void check_t1_step_guard(const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                         bool check_finite, at::TensorList params) {
  TORCH_CHECK(!check_finite || (found_inf.has_value() && found_inf->defined()), kT1Step,
              ": check_finite=True needs a found_inf tensor to report a non-finite gradient in");
  auto check_flag = [&](const c10::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value() || !t->defined()) return;
    TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat, kT1Step, ": ", name,
                " must be a one-element float32 tensor (as torch.amp.GradScaler makes), got ", t->scalar_type(),
                " with ", t->numel(), " elements");
    TORCH_CHECK(params.empty() || t->device() == params[0].device(), kT1Step, ": ", name, " is on ", t->device(),
                " but the params are on ", params[0].device());
  };
  check_flag(grad_scale, "grad_scale");
  check_flag(found_inf, "found_inf");
}

bool check_t1_step_lr_scale(const c10::optional<at::Tensor>& lr_scale, at::TensorList params) {
  if (!lr_scale.has_value() || !lr_scale->defined()) return false;
  const at::Tensor& s = *lr_scale;
  const auto n = static_cast<int64_t>(params.size());
  TORCH_CHECK(s.dim() == 1 && s.numel() == n, kT1Step, ": lr_scale must be a 1-D tensor with one value per parameter (",
              n, "), got shape ", s.sizes());
  if (n == 0) return true;
  const at::ScalarType compute = compute_dtype(params[0].scalar_type());
  TORCH_CHECK(s.scalar_type() == compute, kT1Step, ": lr_scale has dtype ", s.scalar_type(), ", expected ", compute,
              " (the compute dtype of ", params[0].scalar_type(), " parameters)");
  TORCH_CHECK(s.device() == params[0].device(), kT1Step, ": lr_scale is on ", s.device(), " but the params are on ",
              params[0].device());
  TORCH_CHECK(s.is_contiguous(), kT1Step, ": lr_scale must be contiguous");
  return true;
}

HypergradInputs check_penalty_hypergrad_inputs(at::TensorList v, at::TensorList theta, at::TensorList jac,
                                               at::ArrayRef<double> jac_scalar, at::IntArrayRef segment_tensor,
                                               at::IntArrayRef segment_kind, at::IntArrayRef segment_groups,
                                               at::DeviceType kernel, at::TensorList params) {
  constexpr const char* op = "t1t2::penalty_hypergrad";
  const size_t n = theta.size();
  TORCH_CHECK(v.size() == n, op, ": got ", n, " theta but ", v.size(), " v");
  TORCH_CHECK(jac.empty() || jac.size() == n, op, ": jac must be empty or have one tensor per theta (", n, "), got ",
              jac.size());
  TORCH_CHECK(jac_scalar.size() == n, op, ": jac_scalar must have one value per theta (", n, "), got ",
              jac_scalar.size());
  const size_t num_segments = segment_tensor.size();
  TORCH_CHECK(segment_kind.size() == num_segments && segment_groups.size() == num_segments, op,
              ": segment_tensor, segment_kind and segment_groups must have one entry per segment, got ",
              segment_tensor.size(), ", ", segment_kind.size(), " and ", segment_groups.size());
  HypergradInputs in;
  in.dtype = n ? theta[0].scalar_type() : at::kFloat;
  TORCH_CHECK(in.dtype == at::kDouble || in.dtype == at::kFloat, op,
              ": theta must be in the compute dtype (Double or Float), got ", in.dtype);
  if (n) check_kernel_device(op, theta[0], "theta[0]", kernel);
  const at::Device device = n ? theta[0].device() : at::Device(kernel);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(theta[i].scalar_type() == in.dtype && v[i].scalar_type() == in.dtype, op, ": v[", i, "] and theta[",
                i, "] must both be ", in.dtype, ", got ", v[i].scalar_type(), " and ", theta[i].scalar_type());
    TORCH_CHECK(theta[i].device() == device && v[i].device() == device, op, ": the ", kernel_name(kernel),
                " kernel got v[", i, "] on ", v[i].device(), " and theta[", i, "] on ", theta[i].device(),
                ", expected ", device);
    TORCH_CHECK(v[i].sizes() == theta[i].sizes(), op, ": v[", i, "] has shape ", v[i].sizes(), " but theta[", i,
                "] has ", theta[i].sizes());
    TORCH_CHECK(theta[i].is_contiguous() && v[i].is_contiguous(), op, ": v[", i, "] and theta[", i,
                "] must be contiguous");
    if (!jac.empty() && jac[i].numel() > 0) {
      TORCH_CHECK(jac[i].sizes() == theta[i].sizes() && jac[i].scalar_type() == in.dtype && jac[i].is_contiguous() &&
                      jac[i].device() == device,
                  op, ": jac[", i, "] must be a contiguous ", in.dtype, " tensor on ", device, " of shape ",
                  theta[i].sizes(), " (or empty to use jac_scalar[", i, "]), got ", jac[i].scalar_type(), " ",
                  jac[i].sizes(), " on ", jac[i].device());
    }
  }
  in.segments.resize(num_segments);
  for (size_t s = 0; s < num_segments; ++s) {
    const int64_t t = segment_tensor[s], kind = segment_kind[s], groups = segment_groups[s];
    TORCH_CHECK(t >= 0 && static_cast<size_t>(t) < n, op, ": segment ", s, " names tensor ", t, " of ", n);
    TORCH_CHECK(kind == kSegmentL2 || kind == kSegmentL1 || kind == kSegmentDecoupledL2 || kind == kSegmentLr, op,
                ": segment ", s, " has kind ", kind, "; expected 0 (l2), 1 (l1), 2 (decoupled l2) or 3 (lr)");
    in.has_lr = in.has_lr || kind == kSegmentLr;
    const int64_t numel = theta[t].numel();
    TORCH_CHECK(groups >= 0 && ((groups == 0 && numel == 0) || (groups > 0 && numel % groups == 0)), op, ": segment ",
                s, ": ", groups, " groups do not divide the ", numel, " elements of tensor ", t);
    TORCH_CHECK(groups <= std::numeric_limits<int64_t>::max() - in.total, op, ": segment ", s, ": its ", groups,
                " groups after ", in.total, " in the segments before it overflow the result's int64 length");
    in.segments[s] = {t, kind, groups, groups ? numel / groups : 0, in.total};
    in.total += groups;
  }
  TORCH_CHECK(params.empty() || params.size() == n, op, ": params must be empty or have one tensor per theta (", n,
              "), got ", params.size());
  TORCH_CHECK(!in.has_lr || params.size() == n, op, ": lr segments (kind 3) need params, one tensor per theta (", n,
              "), got ", params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].sizes() == theta[i].sizes(), op, ": params[", i, "] has shape ", params[i].sizes(),
                " but theta[", i, "] has ", theta[i].sizes());
    TORCH_CHECK(supported_dtype(params[i].scalar_type()) && compute_dtype(params[i].scalar_type()) == in.dtype, op,
                ": params[", i, "] has dtype ", params[i].scalar_type(), ", whose compute dtype is not theta's (",
                in.dtype, ")");
    TORCH_CHECK(params[i].device() == device, op, ": params[", i, "] is on ", params[i].device(), ", expected ",
                device);
  }
  return in;
}

void check_perturb_inputs(at::TensorList params, at::TensorList save, at::TensorList base, at::TensorList direction,
                          at::DeviceType kernel) {
  constexpr const char* op = "t1t2::perturb_";
  const size_t n = params.size();
  TORCH_CHECK(base.size() == n && direction.size() == n, op, ": got ", n, " params, ", base.size(), " base and ",
              direction.size(), " direction tensors");
  TORCH_CHECK(save.empty() || save.size() == n, op, ": save must be empty or have one tensor per parameter (", n,
              "), got ", save.size());
  if (n == 0) return;
  check_params(params, op, kernel);
  const at::ScalarType dtype = params[0].scalar_type();
  for (size_t i = 0; i < n; ++i) {
    check_like(base[i], params[i], compute_dtype(dtype), op, "base", i);
    check_like(direction[i], params[i], compute_dtype(dtype), op, "direction", i);
    if (!save.empty()) check_like(save[i], params[i], dtype, op, "save", i);
  }
}

void check_restore_inputs(at::TensorList params, at::TensorList save, at::DeviceType kernel) {
  constexpr const char* op = "t1t2::restore_";
  TORCH_CHECK(save.size() == params.size(), op, ": got ", params.size(), " params but ", save.size(), " saved");
  if (params.empty()) return;
  check_params(params, op, kernel);
  for (size_t i = 0; i < params.size(); ++i) check_like(save[i], params[i], params[0].scalar_type(), op, "save", i);
}

}  // namespace t1t2
