// Fused T1 step over many tensors in one launch (multi-tensor apply), same semantics as
// csrc/cpu/t1_step.cpp: ĝ = g + coupled L2/L1 penalty gradients, the sgd (momentum, Nesterov) or
// adam update, decoupled L2, and the stash of the pre-step θ and adam's Jacobian.
#include <climits>
#include <cstring>

#include "kernels.cuh"
#include "storage.cuh"

namespace t1t2 {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kIlp = 4;  // elements per thread per round: their loads are all issued before any math
static_assert(kT1StepChunk % (kThreads * kIlp) == 0, "a chunk is a whole number of rounds");

template <typename T>
struct Scalars {
  T lr, momentum, beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  bool nesterov;
  const float* grad_scale;  // null: scale 1
  const float* found_inf;   // null: no guard
};

// 1/scale in double, cast to the compute type (the CPU kernel's and the reference's rounding).
template <typename T>
__device__ __forceinline__ T inverse_scale(const float* grad_scale) {
  return grad_scale ? static_cast<T>(1.0 / static_cast<double>(*grad_scale)) : T(1);
}

// c[i / inner] without a 64-bit division in the common cases (one coefficient, one per element,
// tensors under 2³¹ elements). The branches are uniform over a block.
template <typename T>
__device__ __forceinline__ T coefficient(const T* __restrict__ c, int64_t i, int64_t inner, int64_t numel) {
  if (inner >= numel) return c[0];
  if (inner == 1) return c[i];
  if (numel <= INT_MAX) return c[static_cast<unsigned>(i) / static_cast<unsigned>(inner)];
  return c[i / inner];
}

// One block updates one chunk: thread t handles elements begin + t + k·kThreads in rounds of kIlp.
template <typename P, typename T, Optimizer kOptimizer>
__global__ void __launch_bounds__(kThreads)
    t1_step_kernel(const T1StepTensor* __restrict__ tensors, const T1StepChunk* __restrict__ chunks, Scalars<T> k) {
  const T1StepChunk chunk = chunks[blockIdx.x];
  const T1StepTensor& d = tensors[chunk.tensor];
  P* __restrict__ param = static_cast<P*>(d.param);
  const P* __restrict__ grad = static_cast<const P*>(d.grad);
  T* __restrict__ state1 = static_cast<T*>(d.state1);
  T* __restrict__ state2 = static_cast<T*>(d.state2);
  const T* __restrict__ l2 = static_cast<const T*>(d.l2);
  const T* __restrict__ l1 = static_cast<const T*>(d.l1);
  const T* __restrict__ decay = static_cast<const T*>(d.decay);
  T* __restrict__ stash_theta = static_cast<T*>(d.stash_theta);
  T* __restrict__ stash_jac = static_cast<T*>(d.stash_jac);
  const int64_t numel = d.numel, l2_inner = d.l2_inner, l1_inner = d.l1_inner, decay_inner = d.decay_inner;
  const int64_t end = numel < chunk.begin + kT1StepChunk ? numel : chunk.begin + kT1StepChunk;
  const T inv_bc1 = static_cast<T>(d.inv_bias_correction1), bc2 = static_cast<T>(d.bias_correction2);
  const T inv_bc2 = static_cast<T>(d.inv_bias_correction2);
  const T adam_a = static_cast<T>(d.adam_a);
  // η of this tensor: T(lr), or T(lr)·lr_scale[i] rounded once in T (read on the device)
  const T lr = d.lr_scale ? k.lr * *static_cast<const T*>(d.lr_scale) : k.lr;
  if (k.found_inf && *k.found_inf > 0.f) return;  // uniform over the grid: the step is skipped
  const T inv_scale = inverse_scale<T>(k.grad_scale);

  for (int64_t base = chunk.begin + threadIdx.x; base < end; base += kIlp * kThreads) {
    T theta[kIlp], g[kIlp], s1[kIlp], s2[kIlp];
#pragma unroll
    for (int r = 0; r < kIlp; ++r) {
      const int64_t i = base + r * kThreads;
      if (i < end) {
        theta[r] = to_compute(param[i]);
        g[r] = to_compute(grad[i]) * inv_scale;
        if (state1) s1[r] = state1[i];
        if (kOptimizer == Optimizer::Adam) s2[r] = state2[i];
      }
    }
#pragma unroll
    for (int r = 0; r < kIlp; ++r) {
      const int64_t i = base + r * kThreads;
      if (i >= end) continue;
      T ghat = g[r];
      if (l2) ghat += penalty_grad(PenaltyKind::L2, theta[r], coefficient(l2, i, l2_inner, numel));
      if (l1) ghat += penalty_grad(PenaltyKind::L1, theta[r], coefficient(l1, i, l1_inner, numel));
      T direction;
      if (kOptimizer == Optimizer::Sgd) {
        direction = state1 ? sgd_direction(ghat, s1[r], k.momentum, k.nesterov) : ghat;
        if (state1) state1[i] = s1[r];
      } else {
        T m_hat, sqrt_s, denom;
        direction = adam_direction(ghat, s1[r], s2[r], k.beta1, k.one_minus_beta1, k.beta2, k.one_minus_beta2,
                                   inv_bc1, inv_bc2, k.eps, m_hat, sqrt_s, denom);
        state1[i] = s1[r];
        state2[i] = s2[r];
        if (stash_jac) stash_jac[i] = adam_jacobian(ghat, m_hat, sqrt_s, denom, lr, adam_a, k.one_minus_beta2, bc2);
      }
      T updated = theta[r] - lr * direction;
      if (decay)
        updated = updated - lr * penalty_grad(PenaltyKind::L2, theta[r], coefficient(decay, i, decay_inner, numel));
      if (stash_theta) stash_theta[i] = theta[r];
      param[i] = from_compute<P>(updated);
    }
  }
}

template <typename P, typename T>
cudaError_t launch_typed(Optimizer optimizer, const T1StepTable& table, const T1StepScalars& s, cudaStream_t stream) {
  const Scalars<T> k{static_cast<T>(s.lr),
                     static_cast<T>(s.momentum),
                     static_cast<T>(s.beta1),
                     static_cast<T>(s.one_minus_beta1),
                     static_cast<T>(s.beta2),
                     static_cast<T>(s.one_minus_beta2),
                     static_cast<T>(s.eps),
                     s.nesterov,
                     s.grad_scale,
                     s.found_inf};
  const dim3 grid(static_cast<unsigned>(table.num_chunks));
  if (optimizer == Optimizer::Sgd)
    t1_step_kernel<P, T, Optimizer::Sgd><<<grid, kThreads, 0, stream>>>(table.tensors, table.chunks, k);
  else
    t1_step_kernel<P, T, Optimizer::Adam><<<grid, kThreads, 0, stream>>>(table.tensors, table.chunks, k);
  return cudaGetLastError();
}

// One block scans one chunk of grads; any non-finite value sets *found_inf (a benign race: every
// writer stores 1).
template <typename P, typename T>
__global__ void __launch_bounds__(kThreads)
    t1_step_scan_kernel(const T1StepTensor* __restrict__ tensors, const T1StepChunk* __restrict__ chunks,
                        const float* grad_scale, float* found_inf) {
  const T1StepChunk chunk = chunks[blockIdx.x];
  const T1StepTensor& d = tensors[chunk.tensor];
  const P* __restrict__ grad = static_cast<const P*>(d.grad);
  const int64_t end = d.numel < chunk.begin + kT1StepChunk ? d.numel : chunk.begin + kT1StepChunk;
  const T inv_scale = inverse_scale<T>(grad_scale);
  int bad = 0;
  for (int64_t i = chunk.begin + threadIdx.x; i < end; i += kThreads) {
    const T x = to_compute(grad[i]) * inv_scale;
    bad |= !isfinite(x);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.f;
}

template <typename P, typename T>
cudaError_t launch_scan_typed(const T1StepTable& table, const float* grad_scale, float* found_inf,
                              cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(table.num_chunks));
  t1_step_scan_kernel<P, T><<<grid, kThreads, 0, stream>>>(table.tensors, table.chunks, grad_scale, found_inf);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_t1_step_scan(Storage storage, const T1StepTable& table, const float* grad_scale, float* found_inf,
                                cudaStream_t stream) {
  if (table.num_chunks == 0) return cudaSuccess;
  if (table.num_chunks > INT_MAX || table.tensors == nullptr || table.chunks == nullptr || found_inf == nullptr)
    return cudaErrorInvalidValue;
  switch (storage) {
    case Storage::Float64: return launch_scan_typed<double, double>(table, grad_scale, found_inf, stream);
    case Storage::Float32: return launch_scan_typed<float, float>(table, grad_scale, found_inf, stream);
    case Storage::BFloat16: return launch_scan_typed<__nv_bfloat16, float>(table, grad_scale, found_inf, stream);
    case Storage::Float16: return launch_scan_typed<__half, float>(table, grad_scale, found_inf, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_t1_step(Storage storage, Optimizer optimizer, const T1StepTable& table,
                           const T1StepScalars& scalars, cudaStream_t stream) {
  if (table.num_chunks == 0) return cudaSuccess;
  if (table.num_chunks > INT_MAX || table.tensors == nullptr || table.chunks == nullptr) return cudaErrorInvalidValue;
  switch (storage) {
    case Storage::Float64: return launch_typed<double, double>(optimizer, table, scalars, stream);
    case Storage::Float32: return launch_typed<float, float>(optimizer, table, scalars, stream);
    case Storage::BFloat16: return launch_typed<__nv_bfloat16, float>(optimizer, table, scalars, stream);
    case Storage::Float16: return launch_typed<__half, float>(optimizer, table, scalars, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace t1t2
