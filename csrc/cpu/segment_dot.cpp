#include "cpu/segment_dot.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/cpu_features.h"
#include "t1t2/math.h"

namespace t1t2 {
namespace {

// Σ u_i m_i over n elements, in double. Eight independent accumulators in a fixed pattern let the
// compiler vectorize while the order of additions is the same on every run.
// Both compiled copies (cpu_features.h) add in this same order, so they give the same bits.
template <PenaltyKind kKind, typename scalar_t>
T1T2_ALWAYS_INLINE double block_dot_body(const scalar_t* __restrict__ u, const scalar_t* __restrict__ theta,
                                         int64_t n) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l)
      acc[l] += static_cast<double>(u[i + l]) * penalty_mixed(kKind, static_cast<double>(theta[i + l]));
  for (int l = 0; i < n; ++i, ++l)
    acc[l] += static_cast<double>(u[i]) * penalty_mixed(kKind, static_cast<double>(theta[i]));
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <PenaltyKind kKind, typename scalar_t>
double block_dot_default(const scalar_t* u, const scalar_t* theta, int64_t n) {
  return block_dot_body<kKind>(u, theta, n);
}

#if T1T2_AVX2_CLONES
template <PenaltyKind kKind, typename scalar_t>
T1T2_TARGET_AVX2 double block_dot_avx2(const scalar_t* u, const scalar_t* theta, int64_t n) {
  return block_dot_body<kKind>(u, theta, n);
}
#endif

template <PenaltyKind kKind, typename scalar_t>
double block_dot(const scalar_t* u, const scalar_t* theta, int64_t n, bool avx2) {
#if T1T2_AVX2_CLONES
  if (avx2) return block_dot_avx2<kKind>(u, theta, n);
#endif
  (void)avx2;
  return block_dot_default<kKind>(u, theta, n);
}

// out_g = Σ_{i∈g} u_i m_i for num_groups groups of `inner` elements. Every output is a fixed
// function of the data: the thread count only decides who computes a block, never how it is summed.
template <PenaltyKind kKind, typename scalar_t, typename out_t>
void segment_dot(const scalar_t* u, const scalar_t* theta, int64_t num_groups, int64_t inner, out_t* out) {
  if (inner == 1) {  // per="element": one product per output, no reduction
    at::parallel_for(0, num_groups, kReduceBlock, [&](int64_t first, int64_t last) {
      const scalar_t* __restrict__ up = u;
      const scalar_t* __restrict__ tp = theta;
      out_t* __restrict__ op = out;
      for (int64_t i = first; i < last; ++i)
        op[i] = static_cast<out_t>(static_cast<double>(up[i]) * penalty_mixed(kKind, static_cast<double>(tp[i])));
    });
    return;
  }
  const bool avx2 = use_avx2();
  const int64_t blocks_per_group = (inner + kReduceBlock - 1) / kReduceBlock;
  if (blocks_per_group == 1) {  // small groups (per="unit"): one block each, summed straight into out
    const int64_t grain = std::max<int64_t>(1, kReduceBlock / inner);
    at::parallel_for(0, num_groups, grain, [&](int64_t first, int64_t last) {
      for (int64_t g = first; g < last; ++g)
        out[g] = static_cast<out_t>(block_dot<kKind>(u + g * inner, theta + g * inner, inner, avx2));
    });
    return;
  }
  // Large groups: one partial sum per (group, block) in parallel, then each group adds its blocks
  // in order.
  const int64_t num_blocks = num_groups * blocks_per_group;
  std::vector<double> partial(num_blocks);
  at::parallel_for(0, num_blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t g = b / blocks_per_group, k = b % blocks_per_group;
      const int64_t begin = g * inner + k * kReduceBlock;
      const int64_t n = std::min(kReduceBlock, inner - k * kReduceBlock);
      partial[b] = block_dot<kKind>(u + begin, theta + begin, n, avx2);
    }
  });
  for (int64_t g = 0; g < num_groups; ++g) {
    double total = 0;
    for (int64_t k = 0; k < blocks_per_group; ++k) total += partial[g * blocks_per_group + k];
    out[g] = static_cast<out_t>(total);
  }
}

}  // namespace

at::Tensor penalty_segment_dot_cpu(const at::Tensor& u_in, const at::Tensor& theta_in, int64_t num_groups,
                                   c10::string_view kind_name) {
  const PenaltyKind kind = check_segment_dot_inputs(u_in, theta_in, num_groups, kind_name, at::kCPU);
  const auto out_dtype = theta_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto out_options = theta_in.options().dtype(out_dtype);
  const int64_t numel = theta_in.numel();
  if (numel == 0) return at::zeros({num_groups}, out_options);  // empty groups sum to 0
  at::Tensor out = at::empty({num_groups}, out_options);         // segment_dot writes every entry

  const at::Tensor u = u_in.contiguous();
  const at::Tensor theta = theta_in.contiguous();
  const int64_t inner = numel / num_groups;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta.scalar_type(), "penalty_segment_dot", [&] {
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const scalar_t* tp = theta.const_data_ptr<scalar_t>();
    auto run = [&](auto* op) {
      if (kind == PenaltyKind::L2) segment_dot<PenaltyKind::L2>(up, tp, num_groups, inner, op);
      else segment_dot<PenaltyKind::L1>(up, tp, num_groups, inner, op);
    };
    if (out_dtype == at::kDouble) run(out.mutable_data_ptr<double>());
    else run(out.mutable_data_ptr<float>());
  });
  return out;
}

}  // namespace t1t2
