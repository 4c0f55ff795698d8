// Compile-only check: the element-wise math header is usable from device code.
#include "t1t2/math.h"

__global__ void penalty_terms(const float* theta, const float* c, float* grad, float* mixed, int n, int kind) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const auto k = static_cast<t1t2::PenaltyKind>(kind);
  grad[i] = t1t2::penalty_grad(k, theta[i], c[i]);
  mixed[i] = t1t2::penalty_mixed(k, theta[i]);
}
