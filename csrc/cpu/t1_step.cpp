#include "cpu/t1_step.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu/cpu_features.h"
#include "t1t2/math.h"

namespace t1t2 {
namespace {

constexpr const char* kOp = "t1t2::t1_step_";
constexpr int64_t kChunk = 16384;  // elements per work item; hundreds of small tensors share one call

enum class Optimizer { Sgd, Adam };

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
  T bc1, bc2;
  T a;  // (1−β1)/bc1 for adam's Jacobian, computed in double
};

// Scalars shared by every tensor, cast once from double.
template <typename T>
struct StepScalars {
  T lr, momentum, beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
};

// Per-run constants, passed by value so the compiler knows no store in the loop can change them.
template <typename T>
struct RunScalars {
  T lr, momentum, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bc1, bc2, a, c2, c1, cd;
};

// The element loop over one run. The arrays are __restrict__ parameters (GCC ignores restrict on
// local pointers, and with six streams the runtime alias checks it would need exceed its limit, so
// the Adam loop with both stashes stayed scalar).
template <bool kAdam, bool kMomentum, bool kNesterov, bool kStashTheta, bool kStashJac, typename P, typename T>
T1T2_ALWAYS_INLINE void run_elements(P* __restrict__ param, const P* __restrict__ grad, T* __restrict__ s1,
                                     T* __restrict__ s2, T* __restrict__ stash_theta, T* __restrict__ stash_jac,
                                     int64_t n, const RunScalars<T> k) {
  for (int64_t i = 0; i < n; ++i) {
    const T theta = static_cast<T>(param[i]);
    T ghat = static_cast<T>(grad[i]);
    ghat += penalty_grad(PenaltyKind::L2, theta, k.c2);
    ghat += penalty_grad(PenaltyKind::L1, theta, k.c1);
    T direction;
    if constexpr (kAdam) {
      T m_hat, sqrt_s, denom;
      direction = adam_direction(ghat, s1[i], s2[i], k.beta1, k.one_minus_beta1, k.beta2, k.one_minus_beta2, k.bc1,
                                 k.bc2, k.eps, m_hat, sqrt_s, denom);
      if constexpr (kStashJac)
        stash_jac[i] = adam_jacobian(ghat, m_hat, sqrt_s, denom, k.lr, k.a, k.one_minus_beta2, k.bc2);
    } else if constexpr (kMomentum) {
      direction = sgd_direction(ghat, s1[i], k.momentum, kNesterov);
    } else {
      direction = ghat;
    }
    T updated = theta - k.lr * direction;
    updated = updated - k.lr * penalty_grad(PenaltyKind::L2, theta, k.cd);
    if constexpr (kStashTheta) stash_theta[i] = theta;
    param[i] = static_cast<P>(updated);
  }
}

// One chunk, cut into runs over which every penalty coefficient is constant (a whole tensor for
// per-layer, a row for per-unit), so the inner loop has no branches or divisions and vectorizes.
// Everything that is constant per call is a template argument. An absent penalty enters as c = 0.
template <bool kAdam, bool kMomentum, bool kNesterov, bool kStashTheta, bool kStashJac, typename P, typename T>
T1T2_ALWAYS_INLINE void run_chunk(const TensorJob<P, T>& j, int64_t begin, int64_t end, const StepScalars<T>& k) {
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
    const RunScalars<T> scalars{k.lr, k.momentum, k.beta1, k.one_minus_beta1, k.beta2, k.one_minus_beta2, k.eps,
                                j.bc1, j.bc2, j.a, c2, c1, cd};
    run_elements<kAdam, kMomentum, kNesterov, kStashTheta, kStashJac>(
        j.param + run_begin, j.grad + run_begin, at(j.state1, run_begin), at(j.state2, run_begin),
        at(j.stash_theta, run_begin), at(j.stash_jac, run_begin), run_end - run_begin, scalars);
    run_begin = run_end;
  }
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

// An optional per-tensor list: empty means "none for any tensor", else one entry per tensor where an
// entry with no elements means "none for this tensor".
void check_list(at::TensorList list, size_t n, const char* name) {
  TORCH_CHECK(list.empty() || list.size() == n, kOp, ": ", name, " must be empty or have one tensor per parameter (",
              n, "), got ", list.size());
}

at::Tensor entry(at::TensorList list, size_t i) { return list.empty() ? at::Tensor() : list[i]; }

void check_state(const at::Tensor& t, const at::Tensor& p, at::ScalarType compute, const char* name, size_t i) {
  TORCH_CHECK(t.defined() && t.numel() == p.numel(), kOp, ": ", name, "[", i, "] must have ", p.numel(),
              " elements like params[", i, "], got ", (t.defined() ? t.numel() : 0));
  TORCH_CHECK(t.scalar_type() == compute, kOp, ": ", name, "[", i, "] has dtype ", t.scalar_type(), ", expected ",
              compute, " (the compute dtype of ", p.scalar_type(), " parameters)");
  TORCH_CHECK(t.device() == p.device(), kOp, ": ", name, "[", i, "] is on ", t.device(), " but params[", i, "] on ",
              p.device());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, "[", i, "] must be contiguous");
}

int64_t check_coef(const at::Tensor& c, const at::Tensor& p, at::ScalarType compute, const char* name, size_t i) {
  if (!c.defined() || c.numel() == 0) return 0;
  TORCH_CHECK(c.scalar_type() == compute, kOp, ": ", name, "[", i, "] has dtype ", c.scalar_type(), ", expected ",
              compute);
  TORCH_CHECK(c.device() == p.device(), kOp, ": ", name, "[", i, "] is on ", c.device(), " but params[", i, "] on ",
              p.device());
  TORCH_CHECK(c.is_contiguous(), kOp, ": ", name, "[", i, "] must be contiguous");
  TORCH_CHECK(p.numel() % c.numel() == 0, kOp, ": ", name, "[", i, "] has ", c.numel(),
              " coefficients, which do not divide the ", p.numel(), " elements of params[", i, "]");
  return p.numel() / c.numel();
}

}  // namespace

void t1_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                 at::TensorList l2, at::TensorList l1, at::TensorList decay, at::TensorList stash_theta,
                 at::TensorList stash_jac, c10::string_view optimizer, double lr, double momentum, bool nesterov,
                 double beta1, double beta2, double eps, at::ArrayRef<double> bias_correction1,
                 at::ArrayRef<double> bias_correction2) {
  const size_t n = params.size();
  TORCH_CHECK(optimizer == "sgd" || optimizer == "adam", kOp, ": unknown optimizer '", optimizer,
              "'; expected 'sgd' or 'adam'");
  const Optimizer opt = optimizer == "sgd" ? Optimizer::Sgd : Optimizer::Adam;
  TORCH_CHECK(grads.size() == n, kOp, ": got ", n, " params but ", grads.size(), " grads");
  check_list(state1, n, "state1");
  check_list(state2, n, "state2");
  check_list(l2, n, "l2");
  check_list(l1, n, "l1");
  check_list(decay, n, "decay");
  check_list(stash_theta, n, "stash_theta");
  check_list(stash_jac, n, "stash_jac");
  if (opt == Optimizer::Adam) {
    TORCH_CHECK(!state1.empty() && !state2.empty(), kOp, ": adam needs state1 (exp_avg) and state2 (exp_avg_sq)");
    TORCH_CHECK(bias_correction1.size() == n && bias_correction2.size() == n, kOp,
                ": adam needs one bias correction per parameter, got ", bias_correction1.size(), " and ",
                bias_correction2.size(), " for ", n, " params");
  } else {
    TORCH_CHECK(momentum == 0 || !state1.empty(), kOp, ": sgd with momentum needs state1 (momentum buffers)");
    TORCH_CHECK(stash_jac.empty(), kOp, ": stash_jac is only written by adam (sgd's Jacobian is a scalar)");
  }
  if (n == 0) return;
  const at::ScalarType dtype = params[0].scalar_type();
  const at::ScalarType compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, kOp,
              ": params must be Double, Float, BFloat16 or Half, got ", dtype);

  std::vector<at::Tensor> grads_contig(n);
  std::vector<int64_t> inners(3 * n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == dtype, kOp, ": params[", i, "] has dtype ", p.scalar_type(), " but params[0] has ",
                dtype, "; one dtype per call");
    TORCH_CHECK(p.device().is_cpu(), kOp, ": the CPU kernel got params[", i, "] on ", p.device());
    TORCH_CHECK(p.is_contiguous(), kOp, ": params[", i, "] must be contiguous (it is updated in place)");
    TORCH_CHECK(grads[i].sizes() == p.sizes(), kOp, ": grads[", i, "] has shape ", grads[i].sizes(), " but params[", i,
                "] has ", p.sizes());
    TORCH_CHECK(grads[i].scalar_type() == dtype && grads[i].device() == p.device(), kOp, ": grads[", i, "] is ",
                grads[i].scalar_type(), " on ", grads[i].device(), ", expected ", dtype, " on ", p.device());
    grads_contig[i] = grads[i].contiguous();
    if (!state1.empty() && (opt == Optimizer::Adam || momentum != 0)) check_state(state1[i], p, compute, "state1", i);
    if (opt == Optimizer::Adam) check_state(state2[i], p, compute, "state2", i);
    if (!stash_theta.empty()) check_state(stash_theta[i], p, compute, "stash_theta", i);
    if (!stash_jac.empty()) check_state(stash_jac[i], p, compute, "stash_jac", i);
    inners[3 * i] = check_coef(entry(l2, i), p, compute, "l2", i);
    inners[3 * i + 1] = check_coef(entry(l1, i), p, compute, "l1", i);
    inners[3 * i + 2] = check_coef(entry(decay, i), p, compute, "decay", i);
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "t1_step_", [&] {
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
      j.grad = grads_contig[i].const_data_ptr<P>();
      j.state1 = ptr(state1, i, opt == Optimizer::Adam || momentum != 0);
      j.state2 = ptr(state2, i, opt == Optimizer::Adam);
      j.l2 = inners[3 * i] ? entry(l2, i).const_data_ptr<T>() : nullptr;
      j.l2_inner = inners[3 * i];
      j.l1 = inners[3 * i + 1] ? entry(l1, i).const_data_ptr<T>() : nullptr;
      j.l1_inner = inners[3 * i + 1];
      j.decay = inners[3 * i + 2] ? entry(decay, i).const_data_ptr<T>() : nullptr;
      j.decay_inner = inners[3 * i + 2];
      j.stash_theta = ptr(stash_theta, i, true);
      j.stash_jac = ptr(stash_jac, i, true);
      j.numel = params[i].numel();
      j.bc1 = opt == Optimizer::Adam ? static_cast<T>(bias_correction1[i]) : T(1);
      j.bc2 = opt == Optimizer::Adam ? static_cast<T>(bias_correction2[i]) : T(1);
      j.a = opt == Optimizer::Adam ? static_cast<T>((1.0 - beta1) / bias_correction1[i]) : T(0);
      for (int64_t start = 0; start < j.numel; start += kChunk) items.emplace_back(static_cast<int64_t>(i), start);
    }
    const StepScalars<T> scalars{static_cast<T>(lr),          static_cast<T>(momentum), static_cast<T>(beta1),
                                 static_cast<T>(1.0 - beta1), static_cast<T>(beta2),    static_cast<T>(1.0 - beta2),
                                 static_cast<T>(eps)};
    const bool avx2 = use_avx2();
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
