// Element-wise math of T1-T2 (docs/design.md, "The T1 step" and "The T2 step"): the one source of
// truth for the CPU and CUDA kernels.
// Plain C++ with no torch headers, so nvcc can compile it on its own.
#pragma once

#include <cmath>

#include "t1t2/enums.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define T1T2_HOST_DEVICE __host__ __device__
#else
#define T1T2_HOST_DEVICE
#endif

namespace t1t2 {

// sign(±0) = 0 and sign(NaN) = 0, as torch.sign gives.
template <typename T>
T1T2_HOST_DEVICE inline T sign(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

// dΩ/dθ for Ω = Σ c θ² (L2, no ½ as in the paper) or Ω = Σ c |θ| (L1). c = 0 contributes exactly 0,
// also where θ is ±inf or NaN (0·inf would be NaN): the CPU kernel enters an absent penalty as c = 0,
// and a non-finite θ must then propagate as it does without the penalty.
template <typename T>
T1T2_HOST_DEVICE inline T penalty_grad(PenaltyKind kind, T theta, T c) {
  return kind == PenaltyKind::L2 ? (c == T(0) ? T(0) : T(2) * c * theta) : c * sign(theta);
}

// Mixed derivative m = ∂²Ω/∂θ∂c: what a unit change of c does to the gradient.
template <typename T>
T1T2_HOST_DEVICE inline T penalty_mixed(PenaltyKind kind, T theta) {
  return kind == PenaltyKind::L2 ? T(2) * theta : sign(theta);
}

template <typename T>
T1T2_HOST_DEVICE inline T square_root(T x) {
#ifdef __CUDA_ARCH__
  return ::sqrt(x);  // CUDA's overloads for float and double
#else
  return std::sqrt(x);
#endif
}

// ---- T1 update, PyTorch semantics (docs/design.md, "The T1 step") ----
// T is the compute type (float or double).

// SGD direction d from the regularized gradient ĝ; updates the momentum buffer b in place.
// b ← μb + ĝ (starting from b = 0, which equals PyTorch's first-step b = ĝ); d = ĝ + μb (Nesterov) or b.
template <typename T>
T1T2_HOST_DEVICE inline T sgd_direction(T ghat, T& buf, T momentum, bool nesterov) {
  buf = momentum * buf + ghat;
  return nesterov ? ghat + momentum * buf : buf;
}

// ∂θ⁺/∂ĝ of an SGD step: −η for plain and heavy-ball SGD, −η(1+μ) for Nesterov.
template <typename T>
T1T2_HOST_DEVICE inline T sgd_jacobian(T lr, T momentum, bool nesterov) {
  return nesterov ? -lr * (T(1) + momentum) : -lr;
}

// Adam moments and direction m̂/(√ŝ+ε) with m̂ = m·(1/bc1), ŝ = s·(1/bc2), bc1 = 1−β1ᵗ, bc2 = 1−β2ᵗ:
// the caller passes inv_bc1 = 1/bc1 and inv_bc2 = 1/bc2 computed in double and cast to T, so an
// element costs one division and one square root (torch's fused Adam: two divisions), which is
// what bounds this loop on one CPU thread. Also 1−β1 and 1−β2 are computed in
// double: in float, 1 − float(0.999) is off by 1e-5 relative. Writes m̂, √ŝ and √ŝ+ε for the Jacobian.
template <typename T>
T1T2_HOST_DEVICE inline T adam_direction(T ghat, T& exp_avg, T& exp_avg_sq, T beta1, T one_minus_beta1, T beta2,
                                         T one_minus_beta2, T inv_bc1, T inv_bc2, T eps, T& m_hat, T& sqrt_s,
                                         T& denom) {
  exp_avg = exp_avg * beta1 + one_minus_beta1 * ghat;
  exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * ghat * ghat;
  m_hat = exp_avg * inv_bc1;
  sqrt_s = square_root(exp_avg_sq * inv_bc2);
  denom = sqrt_s + eps;
  return m_hat / denom;
}

// ∂θ⁺/∂ĝ of an Adam step: −η·D, D = a/(√ŝ+ε) − m̂(1−β2)ĝ/((1−β2ᵗ)√ŝ(√ŝ+ε)²), a = (1−β1)/(1−β1ᵗ)
// (passed in, computed in double); the second term is taken as its limit 0 where ŝ = 0 (autograd
// through the update gives NaN there).
template <typename T>
T1T2_HOST_DEVICE inline T adam_jacobian(T ghat, T m_hat, T sqrt_s, T denom, T lr, T a, T one_minus_beta2, T bc2) {
  // Computed unconditionally (inf or NaN where ŝ = 0), then selected: a branch-free loop vectorizes.
  const T raw = m_hat * one_minus_beta2 * ghat / (bc2 * sqrt_s * denom * denom);
  const T second = sqrt_s > T(0) ? raw : T(0);
  return -lr * (a / denom - second);
}

}  // namespace t1t2
