// Compile-only check: the element-wise math header is usable from device code.
#include "t1t2/math.h"

__global__ void penalty_terms(const float* theta, const float* c, float* grad, float* mixed, int n, int kind) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const auto k = static_cast<t1t2::PenaltyKind>(kind);
  grad[i] = t1t2::penalty_grad(k, theta[i], c[i]);
  mixed[i] = t1t2::penalty_mixed(k, theta[i]);
}

// The T1 update formulas in device code, in both compute types.
template <typename T>
__global__ void t1_terms(T* theta, const T* ghat, T* buf, T* exp_avg, T* exp_avg_sq, T* jac, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const T sgd = t1t2::sgd_direction(ghat[i], buf[i], T(0.9), true) * t1t2::sgd_jacobian(T(0.1), T(0.9), true);
  T m_hat, sqrt_s, denom;
  const T adam = t1t2::adam_direction(ghat[i], exp_avg[i], exp_avg_sq[i], T(0.9), T(0.1), T(0.999), T(0.001), T(0.5),
                                      T(0.2), T(1e-8), m_hat, sqrt_s, denom);
  jac[i] = t1t2::adam_jacobian(ghat[i], m_hat, sqrt_s, denom, T(0.1), T(0.2), T(0.001), T(0.2));
  theta[i] -= sgd + adam;
}

template __global__ void t1_terms<float>(float*, const float*, float*, float*, float*, float*, int);
template __global__ void t1_terms<double>(double*, const double*, double*, double*, double*, double*, int);
