#pragma once
#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

namespace t1t2 {

// Fixed number of elements per reduction block. The partition of the data into blocks depends on
// this constant only (never on the thread count), which keeps the reduction bit-deterministic.
constexpr int64_t kReduceBlock = 16384;

// h_g = Σ_{i ∈ g} u_i m_i(θ_i) over num_groups equal contiguous groups of the flattened tensors.
at::Tensor penalty_segment_dot_cpu(const at::Tensor& u, const at::Tensor& theta, int64_t num_groups,
                                   c10::string_view kind);

}  // namespace t1t2
