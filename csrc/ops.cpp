// Operator schemas of the t1t2 namespace and their CPU implementations.
#include <torch/library.h>

#include <initializer_list>

#include "cpu/cpu_features.h"
#include "cpu/noise.h"
#include "cpu/penalty_hypergrad.h"
#include "cpu/perturb.h"
#include "cpu/segment_dot.h"
#include "cpu/t1_step.h"

TORCH_LIBRARY(t1t2, m) {
  // h_g = Σ_{i∈g} u_i m_i(θ_i), m = 2θ (l2) or sign θ (l1), over num_groups contiguous equal groups.
  m.def("penalty_segment_dot(Tensor u, Tensor theta, int num_groups, str kind) -> Tensor");
  // Fused T1 step over many tensors, in place. state1: momentum buffers (sgd, momentum > 0) or
  // exp_avg (adam); state2: exp_avg_sq (adam). l2 / l1 / decay: per tensor, the coefficients c of
  // coupled L2, L1 and decoupled L2, one per group of numel/len(c) contiguous elements (an empty
  // tensor: no such penalty). stash_theta / stash_jac: empty lists, or buffers that receive the
  // pre-step θ and adam's ∂θ⁺/∂ĝ. State, coefficients and stash are in the compute dtype (float64
  // for float64 params, float32 otherwise).
  // Mixed precision and the non-finite guard (torch.amp.GradScaler's contract for fused optimizers):
  // grad_scale (one float32 value) makes the step use g·(1/scale), 1/scale in double cast to the
  // compute dtype, in the same pass; found_inf (one float32 value) > 0 on entry writes nothing; with
  // check_finite, any non-finite g·(1/scale) sets found_inf = 1 and writes nothing (a read-only scan
  // of the grads before the update).
  // lr_scale (learning-rate scales, docs/design.md): None, or a 1-D tensor in the compute dtype on the
  // params' device with one value per tensor; tensor i then steps with η_i = T(lr)·lr_scale[i], the
  // product rounded once in the compute type T (adam's stash_jac uses η_i too). Read on the device.
  m.def(
      "t1_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] state2, Tensor[] l2, "
      "Tensor[] l1, Tensor[] decay, Tensor(d!)[] stash_theta, Tensor(e!)[] stash_jac, str optimizer, float lr, "
      "float momentum, bool nesterov, float beta1, float beta2, float eps, float[] bias_correction1, "
      "float[] bias_correction2, Tensor? grad_scale=None, Tensor(f!)? found_inf=None, bool check_finite=False, "
      "Tensor? lr_scale=None) -> ()");
  // T2 penalty hypergradients (before dc/dλ) of many (hyperparameter, tensor) segments in one call.
  // v: validation gradients at θ⁺; theta: pre-step θ (the stash); jac: per tensor ∂θ⁺/∂ĝ (empty:
  // use jac_scalar). Segment s reduces tensor segment_tensor[s] over segment_groups[s] contiguous
  // groups with kind 0 (l2: Σ J v 2θ), 1 (l1: Σ J v sign θ), 2 (decoupled l2: Σ v (−2 lr θ)) or 3
  // (lr, a learning-rate scale: Σ v (θ⁺ − θ), θ⁺ = params[t] cast to the compute dtype and θ⁺ − θ
  // rounded there; params: the current parameters, any supported dtype, one per theta; empty
  // when no segment has kind 3). All in the compute dtype; returns the segments' results
  // concatenated. Deterministic.
  m.def(
      "penalty_hypergrad(Tensor[] v, Tensor[] theta, Tensor[] jac, float[] jac_scalar, int[] segment_tensor, "
      "int[] segment_kind, int[] segment_groups, float lr, Tensor[] params) -> Tensor");
  // Finite-difference probes of the noise hypergradient: θ ← base + scale·direction for every
  // tensor (base, direction in the compute dtype), first saving the current θ into `save` (same
  // dtype as params; an empty list skips it); restore_ copies θ back from `save` bit-exactly.
  m.def("perturb_(Tensor(a!)[] params, Tensor(b!)[] save, Tensor[] base, Tensor[] direction, float scale) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] save) -> ()");
  // Which compiled copy of the CPU inner loops runs: "avx2" or "default" (csrc/cpu/cpu_features.h).
  m.def("cpu_capability() -> str", [] { return t1t2::cpu_capability(); });
  // Gaussian noise with ε_i = randn(key, i) (Triton's Philox randn, csrc/include/t1t2/philox.h),
  // regenerated in the backward, never stored. x is contiguous, viewed as (outer, channels, inner):
  // element i uses sigma[(i / inner) % channels]. mode "additive": y = x + σε; "multiplicative":
  // y = x(1 + σε). sigma: `channels` values in the compute dtype (float64 for float64 x, float32
  // otherwise); key: the 64-bit Philox key as a signed int64.
  m.def("gaussian_noise(Tensor x, Tensor sigma, int key, int channels, int inner, str mode) -> Tensor");
  // (∂L/∂x, ∂L/∂σ) of gaussian_noise: g (additive) or g(1+σε) (multiplicative), and, shaped like
  // sigma, Σ_{i∈c} g_i ε_i (additive) or Σ_{i∈c} g_i x_i ε_i (multiplicative), accumulated in double
  // in a fixed order (the same bits for any thread count). x is read only in multiplicative mode
  // (additive: any tensor shaped like grad_y, e.g. grad_y itself). A gradient not needed comes back
  // as an empty tensor.
  m.def(
      "gaussian_noise_backward(Tensor grad_y, Tensor x, Tensor sigma, int key, int channels, int inner, str mode, "
      "bool need_x_grad, bool need_sigma_grad) -> (Tensor, Tensor)");
}

namespace {

// A call whose tensor lists are all empty carries no dispatch key: the dispatcher then runs the
// CompositeExplicitAutograd kernel, and without one it raises NotImplementedError ("There were no
// tensor arguments to this function"). The same kernel runs for tensors on a device this build has
// no kernel for. With no tensors the call is valid and has nothing to do: the CPU kernel runs its
// checks and returns (penalty_hypergrad: an empty float32 result). Tensors get a clear error.
void require_no_tensors(const char* op, std::initializer_list<at::TensorList> lists) {
  for (at::TensorList list : lists) {
    TORCH_CHECK(list.empty(), op, ": this build has no kernel for tensors on ", list[0].device(),
                " (it has CPU kernels, and CUDA kernels when built with T1T2_CUDA=1)");
  }
}

at::Tensor penalty_hypergrad_no_tensors(at::TensorList v, at::TensorList theta, at::TensorList jac,
                                        at::ArrayRef<double> jac_scalar, at::IntArrayRef segment_tensor,
                                        at::IntArrayRef segment_kind, at::IntArrayRef segment_groups, double lr,
                                        at::TensorList params) {
  require_no_tensors("t1t2::penalty_hypergrad", {v, theta, jac, params});
  return t1t2::penalty_hypergrad_cpu(v, theta, jac, jac_scalar, segment_tensor, segment_kind, segment_groups, lr,
                                     params);
}

void perturb_no_tensors(at::TensorList params, at::TensorList save, at::TensorList base, at::TensorList direction,
                        double scale) {
  require_no_tensors("t1t2::perturb_", {params, save, base, direction});
  t1t2::perturb_cpu(params, save, base, direction, scale);
}

void restore_no_tensors(at::TensorList params, at::TensorList save) {
  require_no_tensors("t1t2::restore_", {params, save});
  t1t2::restore_cpu(params, save);
}

void t1_step_no_tensors(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                        at::TensorList l2, at::TensorList l1, at::TensorList decay, at::TensorList stash_theta,
                        at::TensorList stash_jac, c10::string_view optimizer, double lr, double momentum,
                        bool nesterov, double beta1, double beta2, double eps,
                        at::ArrayRef<double> bias_correction1, at::ArrayRef<double> bias_correction2,
                        const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                        bool check_finite, const std::optional<at::Tensor>& lr_scale) {
  require_no_tensors("t1t2::t1_step_", {params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac});
  t1t2::t1_step_cpu(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac, optimizer, lr, momentum,
                    nesterov, beta1, beta2, eps, bias_correction1, bias_correction2, grad_scale, found_inf,
                    check_finite, lr_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(t1t2, CompositeExplicitAutograd, m) {
  m.impl("t1_step_", &t1_step_no_tensors);
  m.impl("penalty_hypergrad", &penalty_hypergrad_no_tensors);
  m.impl("perturb_", &perturb_no_tensors);
  m.impl("restore_", &restore_no_tensors);
}

TORCH_LIBRARY_IMPL(t1t2, CPU, m) {
  m.impl("penalty_segment_dot", &t1t2::penalty_segment_dot_cpu);
  m.impl("t1_step_", &t1t2::t1_step_cpu);
  m.impl("penalty_hypergrad", &t1t2::penalty_hypergrad_cpu);
  m.impl("perturb_", &t1t2::perturb_cpu);
  m.impl("restore_", &t1t2::restore_cpu);
  m.impl("gaussian_noise", &t1t2::gaussian_noise_cpu);
  m.impl("gaussian_noise_backward", &t1t2::gaussian_noise_backward_cpu);
}
