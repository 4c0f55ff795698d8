// Element-wise math of T1-T2 (DESIGN.md §2): the one source of truth for the CPU and CUDA kernels.
// Plain C++ with no torch headers, so nvcc can compile it on its own.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define T1T2_HOST_DEVICE __host__ __device__
#else
#define T1T2_HOST_DEVICE
#endif

namespace t1t2 {

enum class PenaltyKind : int { L2 = 0, L1 = 1 };

// sign(±0) = 0 and sign(NaN) = 0, as torch.sign gives.
template <typename T>
T1T2_HOST_DEVICE inline T sign(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

// dΩ/dθ for Ω = Σ c θ² (L2, no ½ as in the paper) or Ω = Σ c |θ| (L1).
template <typename T>
T1T2_HOST_DEVICE inline T penalty_grad(PenaltyKind kind, T theta, T c) {
  return kind == PenaltyKind::L2 ? T(2) * c * theta : c * sign(theta);
}

// Mixed derivative m = ∂²Ω/∂θ∂c: what a unit change of c does to the gradient.
template <typename T>
T1T2_HOST_DEVICE inline T penalty_mixed(PenaltyKind kind, T theta) {
  return kind == PenaltyKind::L2 ? T(2) * theta : sign(theta);
}

}  // namespace t1t2
