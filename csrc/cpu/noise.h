#pragma once
#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <tuple>

#include "t1t2/noise.h"

namespace t1t2 {

// y = x + σ_c ε or x·(1 + σ_c ε), ε_i = randn(key, i) regenerated from the counter, never stored
// (docs/design.md, "Noise modules"; contract in csrc/ops.cpp and csrc/include/t1t2/noise.h).
at::Tensor gaussian_noise_cpu(const at::Tensor& x, const at::Tensor& sigma, int64_t key, int64_t channels,
                              int64_t inner, c10::string_view mode);

// (∂L/∂x, ∂L/∂σ) from grad_y with ε regenerated; ∂L/∂σ accumulated in double in the fixed order of
// t1t2/noise.h. A gradient not asked for comes back as an empty tensor.
std::tuple<at::Tensor, at::Tensor> gaussian_noise_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                               const at::Tensor& sigma, int64_t key, int64_t channels,
                                                               int64_t inner, c10::string_view mode, bool need_x_grad,
                                                               bool need_sigma_grad);

// The input checks of both ops, shared with the CUDA binding (csrc/cuda/noise_ops_cuda.cu), in the
// style of csrc/checks.h: x (and grad_y) contiguous on a `kernel` device in a supported dtype, sigma
// with `channels` elements in the compute dtype on that device, channels·inner dividing numel.
// Returns the mode.
noise::Mode check_noise_inputs(const char* op, const at::Tensor& x, const at::Tensor* grad_y, const at::Tensor& sigma,
                               int64_t channels, int64_t inner, c10::string_view mode, at::DeviceType kernel);

}  // namespace t1t2
