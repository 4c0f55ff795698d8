#include "cpu/penalty_hypergrad.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/cpu_features.h"
#include "cpu/segment_dot.h"  // kReduceBlock: the same fixed partition as penalty_segment_dot
#include "t1t2/math.h"

namespace t1t2 {
namespace {


// Σ w_i m_i over n elements in double, w = J⊙v (coupled; J a tensor when kJacTensor, else the
// scalar jac_scalar) or v (decoupled, scaled by −η afterwards). Eight accumulators in a fixed
// pattern: the same order on every run and in both compiled copies (cpu_features.h).
template <PenaltyKind kKind, bool kJacTensor, typename T>
T1T2_ALWAYS_INLINE double block_sum(const T* __restrict__ v, const T* __restrict__ theta, const T* __restrict__ jac,
                                    T jac_scalar, int64_t n) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  auto term = [&](int64_t i) {
    const T u = (kJacTensor ? jac[i] : jac_scalar) * v[i];
    return static_cast<double>(u) * penalty_mixed(kKind, static_cast<double>(theta[i]));
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += term(i + l);
  for (int l = 0; i < n; ++i, ++l) acc[l] += term(i);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Σ v_i·(θ⁺_i − θ_i) of a learning-rate scale, θ⁺ − θ rounded in T (exact by Sterbenz's lemma when
// θ⁺ is within a factor 2 of θ), the products and sums in double as block_sum's.
template <typename T>
T1T2_ALWAYS_INLINE double block_sum_lr(const T* __restrict__ v, const T* __restrict__ theta,
                                       const T* __restrict__ updated, int64_t n) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  auto term = [&](int64_t i) {
    const T step = updated[i] - theta[i];
    return static_cast<double>(v[i]) * static_cast<double>(step);
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += term(i + l);
  for (int l = 0; i < n; ++i, ++l) acc[l] += term(i);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename T>
using BlockSumFn = double (*)(const T*, const T*, const T*, T, int64_t);

template <typename T>
double block_sum_lr_default(const T* v, const T* theta, const T* updated, T, int64_t n) {
  return block_sum_lr(v, theta, updated, n);
}

#if T1T2_AVX2_CLONES
template <typename T>
T1T2_TARGET_AVX2 double block_sum_lr_avx2(const T* v, const T* theta, const T* updated, T, int64_t n) {
  return block_sum_lr(v, theta, updated, n);
}
#endif

template <typename T>
BlockSumFn<T> pick_lr(bool avx2) {
#if T1T2_AVX2_CLONES
  if (avx2) return &block_sum_lr_avx2<T>;
#endif
  (void)avx2;
  return &block_sum_lr_default<T>;
}

template <PenaltyKind kKind, bool kJacTensor, typename T>
double block_sum_default(const T* v, const T* theta, const T* jac, T jac_scalar, int64_t n) {
  return block_sum<kKind, kJacTensor>(v, theta, jac, jac_scalar, n);
}

#if T1T2_AVX2_CLONES
template <PenaltyKind kKind, bool kJacTensor, typename T>
T1T2_TARGET_AVX2 double block_sum_avx2(const T* v, const T* theta, const T* jac, T jac_scalar, int64_t n) {
  return block_sum<kKind, kJacTensor>(v, theta, jac, jac_scalar, n);
}
#endif

template <PenaltyKind kKind, bool kJacTensor, typename T>
BlockSumFn<T> pick(bool avx2) {
#if T1T2_AVX2_CLONES
  if (avx2) return &block_sum_avx2<kKind, kJacTensor, T>;
#endif
  (void)avx2;
  return &block_sum_default<kKind, kJacTensor, T>;
}

// A unit of parallel work: either whole small groups [g0, g1) written straight to the output, or
// one block k of a large group g0 written to partial[slot].
struct Item {
  int64_t segment, g0, g1, block, slot;
};

}  // namespace

at::Tensor penalty_hypergrad_cpu(at::TensorList v, at::TensorList theta, at::TensorList jac,
                                 at::ArrayRef<double> jac_scalar, at::IntArrayRef segment_tensor,
                                 at::IntArrayRef segment_kind, at::IntArrayRef segment_groups, double lr,
                                 at::TensorList params) {
  const HypergradInputs in = check_penalty_hypergrad_inputs(v, theta, jac, jac_scalar, segment_tensor, segment_kind,
                                                             segment_groups, at::kCPU, params);
  const at::ScalarType dtype = in.dtype;
  const std::vector<SegmentSpec>& segments = in.segments;
  const size_t num_segments = segments.size();
  const int64_t total = in.total;
  at::Tensor out = at::zeros({total}, theta.empty() ? at::TensorOptions().dtype(dtype) : theta[0].options());
  if (total == 0) return out;

  // Work items over all segments: a fixed partition of the data, independent of the thread count.
  std::vector<Item> items;
  int64_t slots = 0;
  for (size_t s = 0; s < num_segments; ++s) {
    const SegmentSpec& seg = segments[s];
    if (seg.inner == 0) continue;
    if (seg.inner <= kReduceBlock) {
      const int64_t per_item = std::max<int64_t>(1, kReduceBlock / seg.inner);
      for (int64_t g = 0; g < seg.groups; g += per_item)
        items.push_back({static_cast<int64_t>(s), g, std::min(seg.groups, g + per_item), -1, -1});
    } else {
      const int64_t blocks = (seg.inner + kReduceBlock - 1) / kReduceBlock;
      for (int64_t g = 0; g < seg.groups; ++g)
        for (int64_t k = 0; k < blocks; ++k) items.push_back({static_cast<int64_t>(s), g, g + 1, k, slots++});
    }
  }
  std::vector<double> partial(slots);
  // θ⁺ of the lr segments in the compute dtype (a copy only for bfloat16/float16 parameters)
  std::vector<at::Tensor> updated(in.has_lr ? theta.size() : 0);
  for (const SegmentSpec& seg : segments)
    if (seg.kind == kSegmentLr && !updated[seg.tensor].defined())
      updated[seg.tensor] = params[seg.tensor].to(dtype).contiguous();

  AT_DISPATCH_FLOATING_TYPES(dtype, "penalty_hypergrad", [&] {
    using T = scalar_t;
    T* op = out.mutable_data_ptr<T>();
    const bool avx2 = use_avx2();
    const BlockSumFn<T> l2_tensor = pick<PenaltyKind::L2, true, T>(avx2), l2_scalar = pick<PenaltyKind::L2, false, T>(avx2),
                        l1_tensor = pick<PenaltyKind::L1, true, T>(avx2), l1_scalar = pick<PenaltyKind::L1, false, T>(avx2),
                        lr_sum = pick_lr<T>(avx2);
    auto segment_sum = [&](const SegmentSpec& seg, int64_t begin, int64_t count) {
      const T* vp = v[seg.tensor].const_data_ptr<T>() + begin;
      const T* tp = theta[seg.tensor].const_data_ptr<T>() + begin;
      if (seg.kind == kSegmentDecoupledL2)  // ∂θ⁺/∂c = −η·2θ, independent of the optimizer's Jacobian
        return -lr * l2_scalar(vp, tp, nullptr, T(1), count);
      if (seg.kind == kSegmentLr)  // s·∂θ⁺/∂s = θ⁺ − θ
        return lr_sum(vp, tp, updated[seg.tensor].const_data_ptr<T>() + begin, T(1), count);
      const bool has_jac = !jac.empty() && jac[seg.tensor].numel() > 0;
      const T* jp = has_jac ? jac[seg.tensor].const_data_ptr<T>() + begin : nullptr;
      const T js = static_cast<T>(jac_scalar[seg.tensor]);
      const BlockSumFn<T> fn = seg.kind == kSegmentL2 ? (has_jac ? l2_tensor : l2_scalar) : (has_jac ? l1_tensor : l1_scalar);
      return fn(vp, tp, jp, js, count);
    };
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        const Item& it = items[k];
        const SegmentSpec& seg = segments[it.segment];
        if (it.block < 0) {
          for (int64_t g = it.g0; g < it.g1; ++g)
            op[seg.out_offset + g] = static_cast<T>(segment_sum(seg, g * seg.inner, seg.inner));
        } else {
          const int64_t begin = it.g0 * seg.inner + it.block * kReduceBlock;
          partial[it.slot] = segment_sum(seg, begin, std::min(kReduceBlock, seg.inner - it.block * kReduceBlock));
        }
      }
    });
    // Large groups: add their blocks in order (items of one group are consecutive).
    for (size_t k = 0; k < items.size();) {
      const Item& it = items[k];
      if (it.block < 0) {
        ++k;
        continue;
      }
      double sum = 0;
      size_t j = k;
      for (; j < items.size() && items[j].segment == it.segment && items[j].g0 == it.g0 && items[j].block >= 0; ++j)
        sum += partial[items[j].slot];
      op[segments[it.segment].out_offset + it.g0] = static_cast<T>(sum);
      k = j;
    }
  });
  return out;
}

}  // namespace t1t2
