// CUDA kernels of the Gaussian noise ops (csrc/ops.cpp: gaussian_noise, gaussian_noise_backward)
// behind a plain C++ API: device pointers and a stream in, cudaError_t out; no torch headers.
// csrc/cuda/noise_ops_cuda.cu binds them to the torch.ops.t1t2 schemas. The math and the order of
// every addition of the σ-gradient are those of csrc/include/t1t2/noise.h, shared with the CPU
// kernel (csrc/cpu/noise.cpp), so both give the same bits.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels.cuh"  // Storage
#include "t1t2/noise.h"

namespace t1t2 {
namespace cuda {

// dst_i = noise::apply(mode, src_i, sigma[(i / inner) % channels], randn(key, i)) for i < numel:
// the forward (src = x) and the multiplicative ∂L/∂x (src = grad_y, mode Multiplicative). src and
// dst in the storage dtype, sigma in the compute type (double for Float64, float otherwise).
cudaError_t launch_gaussian_noise(Storage storage, noise::Mode mode, const void* src, const void* sigma, void* dst,
                                  int64_t numel, int64_t channels, int64_t inner, uint64_t key, cudaStream_t stream);

// Bytes of double workspace launch_gaussian_noise_sigma_grad needs (0 if none).
size_t gaussian_noise_sigma_grad_workspace_bytes(int64_t numel, int64_t channels, int64_t inner);

// grad_sigma[c] = Σ_{i∈c} g_i ε_i (additive) or Σ_{i∈c} g_i x_i ε_i (multiplicative), in the
// compute type, `channels` values; two launches: one block per tile of noise::make_plan writes the
// (tile, channel) partials, then one thread per channel adds them. When grad_x is not null it also
// receives the multiplicative ∂L/∂x from the same ε. x is only read in multiplicative mode.
// workspace: gaussian_noise_sigma_grad_workspace_bytes(...) bytes aligned to 8 (null if 0).
cudaError_t launch_gaussian_noise_sigma_grad(Storage storage, noise::Mode mode, const void* grad_y, const void* x,
                                             const void* sigma, void* grad_x, void* grad_sigma, int64_t numel,
                                             int64_t channels, int64_t inner, uint64_t key, void* workspace,
                                             cudaStream_t stream);

}  // namespace cuda
}  // namespace t1t2
