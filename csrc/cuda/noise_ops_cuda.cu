// CUDA implementations of the Gaussian noise schemas (csrc/ops.cpp): the CPU kernels' input checks
// and messages (check_noise_inputs, csrc/cpu/noise.cpp), then the launchers of
// csrc/cuda/noise_kernel.cuh on the current stream of x's device. Only compiled when torch has
// CUDA (setup.py); a TORCH_LIBRARY_IMPL block of its own, beside csrc/cuda/ops_cuda.cu's.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/noise.h"
#include "cuda/noise_kernel.cuh"
#include "cuda/storage_of.h"

namespace t1t2 {
namespace {

constexpr const char* kForwardOp = "t1t2::gaussian_noise";
constexpr const char* kBackwardOp = "t1t2::gaussian_noise_backward";

at::Tensor gaussian_noise_cuda(const at::Tensor& x, const at::Tensor& sigma, int64_t key, int64_t channels,
                               int64_t inner, c10::string_view mode_name) {
  const noise::Mode mode = check_noise_inputs(kForwardOp, x, nullptr, sigma, channels, inner, mode_name, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  C10_CUDA_CHECK(cuda::launch_gaussian_noise(storage_of(x.scalar_type()), mode, x.const_data_ptr(),
                                             sigma.const_data_ptr(), y.mutable_data_ptr(), x.numel(), channels, inner,
                                             static_cast<uint64_t>(key), c10::cuda::getCurrentCUDAStream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> gaussian_noise_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                const at::Tensor& sigma, int64_t key,
                                                                int64_t channels, int64_t inner,
                                                                c10::string_view mode_name, bool need_x_grad,
                                                                bool need_sigma_grad) {
  const noise::Mode mode = check_noise_inputs(kBackwardOp, x, &grad_y, sigma, channels, inner, mode_name, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool fused_x_grad = need_x_grad && mode == noise::Mode::Multiplicative;
  at::Tensor grad_x = !need_x_grad ? x.new_empty({0})
                      : fused_x_grad ? at::empty_like(x)
                                     : grad_y.clone();  // additive: ∂L/∂x = g
  at::Tensor grad_sigma = need_sigma_grad ? at::empty_like(sigma) : sigma.new_empty({0});
  const cuda::Storage storage = storage_of(x.scalar_type());
  const uint64_t seed = static_cast<uint64_t>(key);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  void* gx = fused_x_grad ? grad_x.mutable_data_ptr() : nullptr;
  if (need_sigma_grad) {
    const size_t bytes = cuda::gaussian_noise_sigma_grad_workspace_bytes(x.numel(), channels, inner);
    at::Tensor workspace;  // from the caching allocator: reused only after this stream's kernels
    if (bytes) workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
    C10_CUDA_CHECK(cuda::launch_gaussian_noise_sigma_grad(
        storage, mode, grad_y.const_data_ptr(), x.const_data_ptr(), sigma.const_data_ptr(), gx,
        grad_sigma.mutable_data_ptr(), x.numel(), channels, inner, seed, bytes ? workspace.mutable_data_ptr() : nullptr,
        stream));
  } else if (fused_x_grad) {
    C10_CUDA_CHECK(cuda::launch_gaussian_noise(storage, noise::Mode::Multiplicative, grad_y.const_data_ptr(),
                                               sigma.const_data_ptr(), gx, x.numel(), channels, inner, seed, stream));
  }
  return {grad_x, grad_sigma};
}

}  // namespace
}  // namespace t1t2

TORCH_LIBRARY_IMPL(t1t2, CUDA, m) {
  m.impl("gaussian_noise", &t1t2::gaussian_noise_cuda);
  m.impl("gaussian_noise_backward", &t1t2::gaussian_noise_backward_cuda);
}
