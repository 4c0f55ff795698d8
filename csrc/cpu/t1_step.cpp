#include "cpu/t1_step.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "checks.h"
#include "cpu/cpu_features.h"
#include "t1t2/math.h"

namespace t1t2 {
namespace {

constexpr int64_t kChunk = 16384;  // elements per work item; hundreds of small tensors share one call

// What one tensor needs, as raw pointers in the compute type T (float or double).
template <typename P, typename T>
struct TensorJob {
  P* param;
  const P* grad;
  T* state1;       // momentum buffer (sgd, μ > 0) or exp_avg (adam); null otherwise
  T* state2;       // exp_avg_sq (adam)
  const T* l2;     // coefficient per group, null if no coupled L2; group of element i is i / l2_inner
  int64_t l2_inner;
  const T* l1;
  int64_t l1_inner;
  const T* decay;  // decoupled L2
  int64_t decay_inner;
  T* stash_theta;  // null unless a hyper iteration
  T* stash_jac;    // null unless adam-exact on a hyper iteration
  int64_t numel;
  T inv_bc1, inv_bc2, bc2;  // 1/(1−β1ᵗ), 1/(1−β2ᵗ) (from double), 1−β2ᵗ
  T a;  // (1−β1)/bc1 for adam's Jacobian, computed in double
  T lr;  // this tensor's η: T(lr), or T(lr)·lr_scale[i] rounded in T
};

// Scalars shared by every tensor, cast once from double.
template <typename T>
struct StepScalars {
  T lr, momentum, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, inv_scale;
};

// Per-run constants, passed by value so the compiler knows no store in the loop can change them.
template <typename T>
struct RunScalars {
  T lr, momentum, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, inv_scale, inv_bc1, inv_bc2, bc2, a, c2,
      c1, cd;
};

// The element loop over one run. The arrays are __restrict__ parameters (GCC ignores restrict on
// local pointers, and with six streams the runtime alias checks it would need exceed its limit, so
// the Adam loop with both stashes stayed scalar).
template <bool kAdam, bool kMomentum, bool kNesterov, bool kStashTheta, bool kStashJac, bool kL1Decay, typename P,
          typename T>
T1T2_ALWAYS_INLINE void run_elements(P* __restrict__ param, const P* __restrict__ grad, T* __restrict__ s1,
                                     T* __restrict__ s2, T* __restrict__ stash_theta, T* __restrict__ stash_jac,
                                     int64_t n, const RunScalars<T> k) {
  for (int64_t i = 0; i < n; ++i) {
    const T theta = static_cast<T>(param[i]);
    T ghat = static_cast<T>(grad[i]) * k.inv_scale;  // 1 without a GradScaler: exact
    ghat += penalty_grad(PenaltyKind::L2, theta, k.c2);
    if constexpr (kL1Decay) ghat += penalty_grad(PenaltyKind::L1, theta, k.c1);
    T direction;
    if constexpr (kAdam) {
      T m_hat, sqrt_s, denom;
      direction = adam_direction(ghat, s1[i], s2[i], k.beta1, k.one_minus_beta1, k.beta2, k.one_minus_beta2,
                                 k.inv_bc1, k.inv_bc2, k.eps, m_hat, sqrt_s, denom);
      if constexpr (kStashJac)
        stash_jac[i] = adam_jacobian(ghat, m_hat, sqrt_s, denom, k.lr, k.a, k.one_minus_beta2, k.bc2);
    } else if constexpr (kMomentum) {
      direction = sgd_direction(ghat, s1[i], k.momentum, kNesterov);
    } else {
      direction = ghat;
    }
    T updated = theta - k.lr * direction;
    if constexpr (kL1Decay) updated = updated - k.lr * penalty_grad(PenaltyKind::L2, theta, k.cd);
    if constexpr (kStashTheta) stash_theta[i] = theta;
    param[i] = static_cast<P>(updated);
  }
}

// dst[0, n) = src[0, n) with non-temporal stores where the CPU has them (SSE2: every x86-64). The
// stash is written once and read once, at the hyper step, long after: a plain store would first
// read each line of dst into the cache (write-allocate), so the stash would cost a read and a write
// of θ, where this costs the write alone. src is read here and, from the cache, by the update loop
// right after: the chunk (kChunk elements of each stream) fits in L2.
template <typename T>
T1T2_ALWAYS_INLINE void stream_copy(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
#if defined(__SSE2__)
  int64_t i = 0;
  constexpr int64_t kLanes = 16 / static_cast<int64_t>(sizeof(T));
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
  for (; i + kLanes <= n; i += kLanes) {
    if constexpr (std::is_same_v<T, float>)
      _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    else
      _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
  }
  for (; i < n; ++i) dst[i] = src[i];
  _mm_sfence();  // streamed stores are weakly ordered: visible to other threads before the op returns
#else
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
#endif
}

// Elements [begin, end) of one tensor, cut into runs over which every penalty coefficient is
// constant (a whole tensor for per-layer, a row for per-unit), so the inner loop has no branches or
// divisions and vectorizes. Everything that is constant per call is a template argument. An absent
// penalty enters as c = 0. ``jac``: where element begin's ∂θ⁺/∂ĝ goes (kStashJac).
template <bool kAdam, bool kMomentum, bool kNesterov, bool kStashTheta, bool kStashJac, typename P, typename T>
T1T2_ALWAYS_INLINE void run_range(const TensorJob<P, T>& j, int64_t begin, int64_t end, const StepScalars<T>& k,
                                  T* jac) {
  auto at = [](auto* ptr, int64_t offset) { return ptr ? ptr + offset : ptr; };
  for (int64_t run_begin = begin; run_begin < end;) {
    int64_t run_end = end;
    auto coefficient = [&](const T* c, int64_t inner) {
      if (!c) return T(0);
      const int64_t g = run_begin / inner;
      run_end = std::min(run_end, (g + 1) * inner);
      return c[g];
    };
    const T c2 = coefficient(j.l2, j.l2_inner), c1 = coefficient(j.l1, j.l1_inner);
    const T cd = coefficient(j.decay, j.decay_inner);
    const RunScalars<T> scalars{j.lr,  k.momentum, k.beta1, k.one_minus_beta1, k.beta2, k.one_minus_beta2, k.eps,
                                k.inv_scale, j.inv_bc1, j.inv_bc2, j.bc2, j.a, c2, c1, cd};
    T* run_jac = kStashJac ? jac + (run_begin - begin) : nullptr;
    // A run without L1 and decoupled L2 (the common case: coupled L2 or none) takes a loop without
    // their terms. Their c = 0 terms are exactly ±0 (math.h), so this changes no value, only work:
    // at one thread the loop is compute-bound enough for the sign and select to cost ~10 %.
    if (c1 == T(0) && cd == T(0))
      run_elements<kAdam, kMomentum, kNesterov, kStashTheta, kStashJac, false>(
          j.param + run_begin, j.grad + run_begin, at(j.state1, run_begin), at(j.state2, run_begin),
          at(j.stash_theta, run_begin), run_jac, run_end - run_begin, scalars);
    else
      run_elements<kAdam, kMomentum, kNesterov, kStashTheta, kStashJac, true>(
          j.param + run_begin, j.grad + run_begin, at(j.state1, run_begin), at(j.state2, run_begin),
          at(j.stash_theta, run_begin), run_jac, run_end - run_begin, scalars);
    run_begin = run_end;
  }
}

// One chunk. The stash is written with non-temporal stores (stream_copy): θ copied from the
// parameters before the update reads them again from the cache (where θ is stored as computed),
// adam's Jacobian computed into a small buffer that stays in L1 and streamed out from there.
template <bool kAdam, bool kMomentum, bool kNesterov, bool kStashTheta, bool kStashJac, typename P, typename T>
T1T2_ALWAYS_INLINE void run_chunk(const TensorJob<P, T>& j, int64_t begin, int64_t end, const StepScalars<T>& k) {
  constexpr bool kCopyTheta = kStashTheta && std::is_same_v<P, T>;
  if constexpr (kCopyTheta) stream_copy(j.stash_theta + begin, j.param + begin, end - begin);
  if constexpr (kStashJac) {
    constexpr int64_t kBlock = 2048;
    alignas(64) T buffer[kBlock];
    for (int64_t b = begin; b < end; b += kBlock) {
      const int64_t e = std::min(end, b + kBlock);
      run_range<kAdam, kMomentum, kNesterov, kStashTheta && !kCopyTheta, true>(j, b, e, k, buffer);
      stream_copy(j.stash_jac + b, buffer, e - b);
    }
  } else {
    run_range<kAdam, kMomentum, kNesterov, kStashTheta && !kCopyTheta, false>(j, begin, end, k,
                                                                               static_cast<T*>(nullptr));
  }
}

// The non-finite scan of check_finite: is any g·(1/scale), in the compute type, Inf or NaN? A value
// is non-finite exactly when its exponent bits are all ones, so (bits & exp) ^ exp is 0 for it and
// positive otherwise; a min-reduction over unsigned integers vectorizes, where a float reduction
// would not without reassociation.
template <typename T>
struct FloatBits;
template <>
struct FloatBits<float> {
  using U = uint32_t;
  static constexpr U kExponent = 0x7f800000u;
};
template <>
struct FloatBits<double> {
  using U = uint64_t;
  static constexpr U kExponent = 0x7ff0000000000000ull;
};

template <typename P, typename T>
T1T2_ALWAYS_INLINE bool any_nonfinite(const P* __restrict__ grad, int64_t n, T inv_scale) {
  using Bits = FloatBits<T>;
  typename Bits::U least = Bits::kExponent;
  for (int64_t i = 0; i < n; ++i) {
    const T x = static_cast<T>(grad[i]) * inv_scale;
    typename Bits::U bits;
    std::memcpy(&bits, &x, sizeof bits);
    const typename Bits::U e = (bits & Bits::kExponent) ^ Bits::kExponent;
    least = e < least ? e : least;
  }
  return least == 0;
}

template <typename P, typename T>
using ScanFn = bool (*)(const P*, int64_t, T);

template <typename P, typename T>
bool any_nonfinite_default(const P* grad, int64_t n, T inv_scale) {
  return any_nonfinite(grad, n, inv_scale);
}

#if T1T2_AVX2_CLONES
template <typename P, typename T>
T1T2_TARGET_AVX2 bool any_nonfinite_avx2(const P* grad, int64_t n, T inv_scale) {
  return any_nonfinite(grad, n, inv_scale);
}
#endif

template <typename P, typename T>
ScanFn<P, T> scan_kernel(bool avx2) {
#if T1T2_AVX2_CLONES
  if (avx2) return &any_nonfinite_avx2<P, T>;
#endif
  (void)avx2;
  return &any_nonfinite_default<P, T>;
}

template <typename P, typename T>
using ChunkFn = void (*)(const TensorJob<P, T>&, int64_t, int64_t, const StepScalars<T>&);

// The two compiled copies of run_chunk (cpu_features.h): baseline and AVX2, same bits.
template <bool kAdam, bool kMomentum, bool kNesterov, bool kStashTheta, bool kStashJac, typename P, typename T>
void run_chunk_default(const TensorJob<P, T>& j, int64_t begin, int64_t end, const StepScalars<T>& k) {
  run_chunk<kAdam, kMomentum, kNesterov, kStashTheta, kStashJac>(j, begin, end, k);
}

#if T1T2_AVX2_CLONES
template <bool kAdam, bool kMomentum, bool kNesterov, bool kStashTheta, bool kStashJac, typename P, typename T>
T1T2_TARGET_AVX2 void run_chunk_avx2(const TensorJob<P, T>& j, int64_t begin, int64_t end, const StepScalars<T>& k) {
  run_chunk<kAdam, kMomentum, kNesterov, kStashTheta, kStashJac>(j, begin, end, k);
}
#endif

template <bool kAdam, bool kMomentum, bool kNesterov, bool kStashTheta, bool kStashJac, typename P, typename T>
ChunkFn<P, T> pick(bool avx2) {
#if T1T2_AVX2_CLONES
  if (avx2) return &run_chunk_avx2<kAdam, kMomentum, kNesterov, kStashTheta, kStashJac, P, T>;
#endif
  (void)avx2;
  return &run_chunk_default<kAdam, kMomentum, kNesterov, kStashTheta, kStashJac, P, T>;
}

// Picks the instantiation of run_chunk for a tensor's optimizer, momentum and stash.
template <typename P, typename T>
ChunkFn<P, T> chunk_kernel(Optimizer opt, bool momentum, bool nesterov, bool stash_theta, bool stash_jac, bool avx2) {
  if (opt == Optimizer::Adam) {
    if (stash_jac) return stash_theta ? pick<true, false, false, true, true, P, T>(avx2)
                                      : pick<true, false, false, false, true, P, T>(avx2);
    return stash_theta ? pick<true, false, false, true, false, P, T>(avx2)
                       : pick<true, false, false, false, false, P, T>(avx2);
  }
  if (!momentum) return stash_theta ? pick<false, false, false, true, false, P, T>(avx2)
                                    : pick<false, false, false, false, false, P, T>(avx2);
  if (nesterov) return stash_theta ? pick<false, true, true, true, false, P, T>(avx2)
                                   : pick<false, true, true, false, false, P, T>(avx2);
  return stash_theta ? pick<false, true, false, true, false, P, T>(avx2)
                     : pick<false, true, false, false, false, P, T>(avx2);
}

}  // namespace

void t1_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                 at::TensorList l2, at::TensorList l1, at::TensorList decay, at::TensorList stash_theta,
                 at::TensorList stash_jac, c10::string_view optimizer, double lr, double momentum, bool nesterov,
                 double beta1, double beta2, double eps, at::ArrayRef<double> bias_correction1,
                 at::ArrayRef<double> bias_correction2, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, bool check_finite,
                 const std::optional<at::Tensor>& lr_scale) {
  const T1StepInputs in = check_t1_step_inputs(params, grads, state1, state2, l2, l1, decay, stash_theta, stash_jac,
                                               optimizer, momentum, bias_correction1, bias_correction2, at::kCPU);
  check_t1_step_guard(grad_scale, found_inf, check_finite, params);
  const bool has_lr_scale = check_t1_step_lr_scale(lr_scale, params);
  const bool has_found = found_inf.has_value() && found_inf->defined();
  if (has_found && found_inf->item<float>() > 0) return;  // a GradScaler (or the caller) saw Inf/NaN: skip
  const double inv_scale = grad_scale.has_value() && grad_scale->defined() ? 1.0 / grad_scale->item<float>() : 1.0;
  const size_t n = params.size();
  if (n == 0) return;
  const Optimizer opt = in.adam ? Optimizer::Adam : Optimizer::Sgd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.dtype, "t1_step_", [&] {
    using P = scalar_t;
    using T = at::opmath_type<scalar_t>;
    std::vector<TensorJob<P, T>> jobs(n);
    std::vector<std::pair<int64_t, int64_t>> items;  // (tensor, chunk start)
    auto ptr = [](at::TensorList list, size_t i, bool used) -> T* {
      return used && !list.empty() && list[i].defined() && list[i].numel() > 0 ? list[i].data_ptr<T>() : nullptr;
    };
    for (size_t i = 0; i < n; ++i) {
      auto& j = jobs[i];
      j.param = params[i].data_ptr<P>();
      j.grad = in.grads[i].const_data_ptr<P>();
      j.state1 = ptr(state1, i, in.uses_state1);
      j.state2 = ptr(state2, i, in.adam);
      j.l2 = in.l2_inner[i] ? l2[i].const_data_ptr<T>() : nullptr;
      j.l2_inner = in.l2_inner[i];
      j.l1 = in.l1_inner[i] ? l1[i].const_data_ptr<T>() : nullptr;
      j.l1_inner = in.l1_inner[i];
      j.decay = in.decay_inner[i] ? decay[i].const_data_ptr<T>() : nullptr;
      j.decay_inner = in.decay_inner[i];
      j.stash_theta = ptr(stash_theta, i, true);
      j.stash_jac = ptr(stash_jac, i, true);
      j.numel = params[i].numel();
      j.inv_bc1 = opt == Optimizer::Adam ? static_cast<T>(1.0 / bias_correction1[i]) : T(1);
      j.inv_bc2 = opt == Optimizer::Adam ? static_cast<T>(1.0 / bias_correction2[i]) : T(1);
      j.bc2 = opt == Optimizer::Adam ? static_cast<T>(bias_correction2[i]) : T(1);
      j.a = opt == Optimizer::Adam ? static_cast<T>((1.0 - beta1) / bias_correction1[i]) : T(0);
      j.lr = has_lr_scale ? static_cast<T>(lr) * lr_scale->const_data_ptr<T>()[i] : static_cast<T>(lr);
      for (int64_t start = 0; start < j.numel; start += kChunk) items.emplace_back(static_cast<int64_t>(i), start);
    }
    const StepScalars<T> scalars{static_cast<T>(lr),          static_cast<T>(momentum), static_cast<T>(beta1),
                                 static_cast<T>(1.0 - beta1), static_cast<T>(beta2),    static_cast<T>(1.0 - beta2),
                                 static_cast<T>(eps),         static_cast<T>(inv_scale)};
    const bool avx2 = use_avx2();
    if (check_finite) {  // read-only pass first: a non-finite gradient anywhere means nothing is written
      const ScanFn<P, T> scan = scan_kernel<P, T>(avx2);
      std::atomic<bool> found{false};
      at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
        for (int64_t k = first; k < last && !found.load(std::memory_order_relaxed); ++k) {
          const size_t i = static_cast<size_t>(items[k].first);
          const int64_t begin = items[k].second, end = std::min(jobs[i].numel, begin + kChunk);
          if (scan(jobs[i].grad + begin, end - begin, scalars.inv_scale)) found.store(true, std::memory_order_relaxed);
        }
      });
      if (found.load()) {
        found_inf->fill_(1.0);
        return;
      }
    }
    std::vector<ChunkFn<P, T>> kernels(n);
    for (size_t i = 0; i < n; ++i)
      kernels[i] = chunk_kernel<P, T>(opt, jobs[i].state1 != nullptr, nesterov, jobs[i].stash_theta != nullptr,
                                      jobs[i].stash_jac != nullptr, avx2);
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        const size_t i = static_cast<size_t>(items[k].first);
        const int64_t begin = items[k].second, end = std::min(jobs[i].numel, begin + kChunk);
        kernels[i](jobs[i], begin, end, scalars);
      }
    });
  });
}

}  // namespace t1t2
