// Tests of the CUDA kernels through their plain C++ API (csrc/cuda/kernels.cuh), without torch:
// host loops over the same math header are the reference. The host-side checks (the multi-tensor
// table, workspace sizes, argument errors) always run; the device checks need a GPU. Exit status:
// 0 all passed, 1 a check failed, 77 host checks passed and no GPU was found.
//
//   nvcc -std=c++17 -O2 -I csrc/include -I csrc -o test_cuda_kernels
//        tests/cpp/test_cuda_kernels.cu csrc/cuda/t1_step_kernel.cu csrc/cuda/segment_dot_kernel.cu
//        csrc/cuda/penalty_hypergrad_kernel.cu csrc/cuda/perturb_kernel.cu
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "cuda/kernels.cuh"

namespace {

using t1t2::PenaltyKind;
namespace tc = t1t2::cuda;

int failures = 0;

#define CHECK(cond, ...)                                      \
  do {                                                        \
    if (!(cond)) {                                            \
      ++failures;                                             \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                               \
      std::printf("\n");                                      \
    }                                                         \
  } while (0)

#define CUDA_OK(expr)                                                                                     \
  do {                                                                                                    \
    const cudaError_t status_ = (expr);                                                                   \
    if (status_ != cudaSuccess) {                                                                         \
      std::printf("FAIL %s:%d: %s returned %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(status_)); \
      std::exit(1);                                                                                       \
    }                                                                                                     \
  } while (0)

// ---- storage types on the host ----

double to_double(double x) { return x; }
double to_double(float x) { return x; }
double to_double(__half x) { return __half2float(x); }
double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename P>
P from_float(double x);
template <>
double from_float<double>(double x) { return x; }
template <>
float from_float<float>(double x) { return static_cast<float>(x); }
template <>
__half from_float<__half>(double x) { return __float2half_rn(static_cast<float>(x)); }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }

template <typename P>
constexpr tc::Storage storage_of();
template <>
constexpr tc::Storage storage_of<double>() { return tc::Storage::Float64; }
template <>
constexpr tc::Storage storage_of<float>() { return tc::Storage::Float32; }
template <>
constexpr tc::Storage storage_of<__nv_bfloat16>() { return tc::Storage::BFloat16; }
template <>
constexpr tc::Storage storage_of<__half>() { return tc::Storage::Float16; }

template <typename P>
double epsilon() { return std::numeric_limits<P>::epsilon(); }
template <>
double epsilon<__half>() { return 1.0 / 1024; }
template <>
double epsilon<__nv_bfloat16>() { return 1.0 / 128; }

template <typename P>
const char* name_of() {
  switch (storage_of<P>()) {
    case tc::Storage::Float64: return "float64";
    case tc::Storage::Float32: return "float32";
    case tc::Storage::BFloat16: return "bfloat16";
    case tc::Storage::Float16: return "float16";
  }
  return "?";
}

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(const std::vector<T>& host) : count(host.size()) {
    if (count == 0) return;
    CUDA_OK(cudaMalloc(&ptr, count * sizeof(T)));
    CUDA_OK(cudaMemcpy(ptr, host.data(), count * sizeof(T), cudaMemcpyHostToDevice));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept : ptr(other.ptr), count(other.count) { other.ptr = nullptr; }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  std::vector<T> host() const {
    std::vector<T> out(count);
    if (count) CUDA_OK(cudaMemcpy(out.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
  }
};

// ---- host checks ----

void test_table_layout() {
  const int64_t sizes[] = {0, 1, tc::kT1StepChunk, tc::kT1StepChunk + 1, 3 * tc::kT1StepChunk, 0};
  std::vector<tc::T1StepTensor> tensors(6);
  for (int t = 0; t < 6; ++t) {
    std::memset(&tensors[t], 0, sizeof(tc::T1StepTensor));
    tensors[t].numel = sizes[t];
    tensors[t].bias_correction1 = t + 0.5;  // something to find again in the table
  }
  const tc::T1StepTableLayout layout = tc::t1_step_table_layout(tensors.data(), 6);
  CHECK(layout.num_tensors == 6 && layout.num_chunks == 7, "tensors %lld chunks %lld",
        static_cast<long long>(layout.num_tensors), static_cast<long long>(layout.num_chunks));
  CHECK(layout.chunks_offset % 16 == 0 && layout.chunks_offset >= 6 * sizeof(tc::T1StepTensor), "offset %zu",
        layout.chunks_offset);
  CHECK(layout.bytes == layout.chunks_offset + 7 * sizeof(tc::T1StepChunk), "bytes %zu", layout.bytes);

  std::vector<unsigned char> buffer(layout.bytes + 1, 0xAB);
  unsigned char* table = buffer.data() + 1;  // the host buffer may have any alignment
  tc::t1_step_fill_table(tensors.data(), layout, table);
  CHECK(std::memcmp(table, tensors.data(), 6 * sizeof(tc::T1StepTensor)) == 0, "descriptors copied verbatim");
  const int64_t want[7][2] = {{1, 0}, {2, 0}, {3, 0}, {3, tc::kT1StepChunk}, {4, 0}, {4, tc::kT1StepChunk},
                              {4, 2 * tc::kT1StepChunk}};
  for (int c = 0; c < 7; ++c) {
    tc::T1StepChunk chunk;
    std::memcpy(&chunk, table + layout.chunks_offset + c * sizeof(tc::T1StepChunk), sizeof chunk);
    CHECK(chunk.tensor == want[c][0] && chunk.begin == want[c][1], "chunk %d is (%lld, %lld)", c,
          static_cast<long long>(chunk.tensor), static_cast<long long>(chunk.begin));
  }
  const tc::T1StepTable view = tc::t1_step_table_view(table, layout);
  CHECK(reinterpret_cast<const unsigned char*>(view.chunks) == table + layout.chunks_offset, "view of the chunks");
  CHECK(view.num_chunks == 7 && view.num_tensors == 6, "view sizes");
}

void test_workspace_and_argument_errors() {
  CHECK(tc::penalty_segment_dot_workspace_bytes(5, 1) == 0, "per element needs none");
  CHECK(tc::penalty_segment_dot_workspace_bytes(5, tc::kSegmentDotWarpMax) == 0, "warp path needs none");
  CHECK(tc::penalty_segment_dot_workspace_bytes(5, tc::kSegmentDotTile) == 0, "one tile per group needs none");
  CHECK(tc::penalty_segment_dot_workspace_bytes(5, tc::kSegmentDotTile + 1) == 5 * 2 * sizeof(double),
        "two tiles per group");
  CHECK(tc::penalty_segment_dot_workspace_bytes(0, 0) == 0, "nothing to reduce");
  // Rejected before anything touches the device.
  CHECK(tc::launch_penalty_segment_dot(tc::Storage::Float32, PenaltyKind::L2, nullptr, nullptr, -1, 4, nullptr,
                                       nullptr, nullptr) == cudaErrorInvalidValue,
        "negative num_groups");
  CHECK(tc::launch_penalty_segment_dot(tc::Storage::Float32, PenaltyKind::L2, nullptr, nullptr, 0, 0, nullptr,
                                       nullptr, nullptr) == cudaSuccess,
        "no groups, nothing to do");
  const tc::T1StepTable empty{nullptr, nullptr, 3, 0};
  const tc::T1StepScalars scalars{0.1, 0.9, 0.9, 0.1, 0.999, 0.001, 1e-8, false};
  CHECK(tc::launch_t1_step(tc::Storage::Float32, tc::Optimizer::Sgd, empty, scalars, nullptr) == cudaSuccess,
        "no chunks, nothing to do");
  CHECK(tc::launch_t1_step_scan(tc::Storage::Float32, empty, nullptr, nullptr, nullptr) == cudaSuccess,
        "no chunks, nothing to scan");
  const tc::T1StepTable one_chunk{nullptr, nullptr, 1, 1};
  CHECK(tc::launch_t1_step_scan(tc::Storage::Float32, one_chunk, nullptr, nullptr, nullptr) == cudaErrorInvalidValue,
        "the scan needs found_inf (and a table)");
}

void test_hypergrad_plan() {
  // inner: 0 and 31 one thread per group, 32 and kSegmentDotWarpMax one warp per group, one tile,
  // two tiles, three tiles; then a segment without groups.
  const int64_t groups[] = {3, 600, 9, 17, 2, 5, 1, 0};
  const int64_t inner[] = {0, 31, 32, tc::kSegmentDotWarpMax, tc::kSegmentDotTile, tc::kSegmentDotTile + 1,
                           2 * tc::kSegmentDotTile + 1, 0};
  const int64_t want_items[] = {1, 3, 2, 3, 2, 10, 3, 0};
  constexpr int kSegments = 8;
  std::vector<tc::HypergradSegment> segments(kSegments);
  int64_t out_offset = 0;
  for (int s = 0; s < kSegments; ++s) {
    segments[s] = tc::HypergradSegment{};
    segments[s].groups = groups[s];
    segments[s].inner = inner[s];
    segments[s].out_offset = out_offset;
    out_offset += groups[s];
  }
  const tc::HypergradPlan plan = tc::penalty_hypergrad_plan(segments.data(), kSegments);
  int64_t first = 0;
  for (int s = 0; s < kSegments; ++s) {
    CHECK(segments[s].first_item == first && segments[s].items == want_items[s], "segment %d: items [%lld, +%lld)", s,
          static_cast<long long>(segments[s].first_item), static_cast<long long>(segments[s].items));
    first += want_items[s];
  }
  CHECK(plan.num_segments == kSegments && plan.num_items == first, "items %lld",
        static_cast<long long>(plan.num_items));
  CHECK(segments[4].tiles_per_group == 1 && segments[4].split_groups == 0, "one tile per group is not split");
  CHECK(segments[5].tiles_per_group == 2 && segments[5].split_groups == 5 && segments[5].first_split == 0 &&
            segments[5].first_partial == 0,
        "two tiles per group");
  CHECK(segments[6].tiles_per_group == 3 && segments[6].split_groups == 1 && segments[6].first_split == 5 &&
            segments[6].first_partial == 10,
        "three tiles per group");
  CHECK(plan.num_partials == 13 && plan.num_split_groups == 6, "partials %lld split %lld",
        static_cast<long long>(plan.num_partials), static_cast<long long>(plan.num_split_groups));
  CHECK(tc::penalty_hypergrad_workspace_bytes(plan) == 13 * sizeof(double), "workspace bytes");
  const tc::HypergradPlan nothing{2, 0, 0, 0};
  CHECK(tc::launch_penalty_hypergrad(tc::Storage::Float32, nullptr, nothing, 0.1, nullptr, nullptr, nullptr) ==
            cudaSuccess,
        "no items, nothing to do");
  const tc::HypergradPlan some{1, 4, 0, 0};
  CHECK(tc::launch_penalty_hypergrad(tc::Storage::BFloat16, segments.data(), some, 0.1, &out_offset, nullptr,
                                     nullptr) == cudaErrorInvalidValue,
        "compute dtypes only");
  CHECK(tc::launch_penalty_hypergrad(tc::Storage::Float32, nullptr, some, 0.1, &out_offset, nullptr, nullptr) ==
            cudaErrorInvalidValue,
        "a plan with items needs the segments");
}

void test_perturb_table_layout() {
  const int64_t sizes[] = {tc::kPerturbChunk + 1, 0, 5};
  std::vector<tc::PerturbTensor> tensors(3);
  for (int t = 0; t < 3; ++t) tensors[t] = tc::PerturbTensor{nullptr, nullptr, nullptr, nullptr, sizes[t]};
  const tc::PerturbTableLayout layout = tc::perturb_table_layout(tensors.data(), 3);
  CHECK(layout.num_chunks == 3 && layout.chunks_offset % 16 == 0 &&
            layout.bytes == layout.chunks_offset + 3 * sizeof(tc::PerturbChunk),
        "perturb layout: chunks %lld bytes %zu", static_cast<long long>(layout.num_chunks), layout.bytes);
  std::vector<unsigned char> buffer(layout.bytes + 3, 0xCD);
  unsigned char* table = buffer.data() + 3;
  tc::perturb_fill_table(tensors.data(), layout, table);
  CHECK(std::memcmp(table, tensors.data(), 3 * sizeof(tc::PerturbTensor)) == 0, "perturb descriptors verbatim");
  const int64_t want[3][2] = {{0, 0}, {0, tc::kPerturbChunk}, {2, 0}};
  for (int c = 0; c < 3; ++c) {
    tc::PerturbChunk chunk;
    std::memcpy(&chunk, table + layout.chunks_offset + c * sizeof(tc::PerturbChunk), sizeof chunk);
    CHECK(chunk.tensor == want[c][0] && chunk.begin == want[c][1], "perturb chunk %d is (%lld, %lld)", c,
          static_cast<long long>(chunk.tensor), static_cast<long long>(chunk.begin));
  }
  const tc::PerturbTable empty{nullptr, nullptr, 2, 0};
  CHECK(tc::launch_perturb(tc::Storage::Float16, empty, 0.5, nullptr) == cudaSuccess, "perturb: nothing to do");
  CHECK(tc::launch_restore(tc::Storage::Float16, empty, nullptr) == cudaSuccess, "restore: nothing to do");
}

// ---- device checks: t1_step ----

// One step of one tensor on the host, as csrc/cpu/t1_step.cpp computes it, in compute type T.
template <typename P, typename T>
void host_t1_step(std::vector<P>& param, const std::vector<P>& grad, std::vector<T>& s1, std::vector<T>& s2,
                  const std::vector<T>& l2, const std::vector<T>& l1, const std::vector<T>& decay,
                  std::vector<T>& stash_theta, std::vector<T>& stash_jac, tc::Optimizer opt,
                  const tc::T1StepScalars& k, double bc1, double bc2) {
  const int64_t n = static_cast<int64_t>(param.size());
  const T lr = static_cast<T>(k.lr), a = static_cast<T>((1.0 - k.beta1) / bc1);
  for (int64_t i = 0; i < n; ++i) {
    const T theta = static_cast<T>(to_double(param[i]));
    T ghat = static_cast<T>(to_double(grad[i]));
    if (!l2.empty()) ghat += t1t2::penalty_grad(PenaltyKind::L2, theta, l2[i / (n / l2.size())]);
    if (!l1.empty()) ghat += t1t2::penalty_grad(PenaltyKind::L1, theta, l1[i / (n / l1.size())]);
    T direction;
    if (opt == tc::Optimizer::Sgd) {
      direction = s1.empty() ? ghat : t1t2::sgd_direction(ghat, s1[i], static_cast<T>(k.momentum), k.nesterov);
    } else {
      T m_hat, sqrt_s, denom;
      direction = t1t2::adam_direction(ghat, s1[i], s2[i], static_cast<T>(k.beta1), static_cast<T>(k.one_minus_beta1),
                                       static_cast<T>(k.beta2), static_cast<T>(k.one_minus_beta2), static_cast<T>(1.0 / bc1),
                                       static_cast<T>(1.0 / bc2), static_cast<T>(k.eps), m_hat, sqrt_s, denom);
      if (!stash_jac.empty())
        stash_jac[i] = t1t2::adam_jacobian(ghat, m_hat, sqrt_s, denom, lr, a, static_cast<T>(k.one_minus_beta2),
                                           static_cast<T>(bc2));
    }
    T updated = theta - lr * direction;
    if (!decay.empty())
      updated = updated - lr * t1t2::penalty_grad(PenaltyKind::L2, theta, decay[i / (n / decay.size())]);
    if (!stash_theta.empty()) stash_theta[i] = theta;
    param[i] = from_float<P>(static_cast<double>(updated));
  }
}

// GPU and host agree up to contraction into FMA (nvcc fuses, the host loop may not): a few ulps of
// the compute type at the array's scale, plus one ulp of a low-precision storage type.
template <typename T>
double max_abs(const std::vector<T>& v) {
  double m = 0;
  for (const T& x : v) m = std::fmax(m, std::fabs(to_double(x)));
  return m;
}

template <typename X>
void expect_close(const std::vector<X>& got, const std::vector<X>& want, double compute_eps, double storage_eps,
                  const char* what, const char* case_name) {
  const double scale = max_abs(want);
  int reported = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = to_double(got[i]), w = to_double(want[i]);
    const double tol = 16 * compute_eps * scale + storage_eps * std::fabs(w);
    if (!(std::fabs(g - w) <= tol) && !(std::isnan(g) && std::isnan(w))) {
      if (reported++ < 3) CHECK(false, "%s %s[%zu]: got %.17g want %.17g", case_name, what, i, g, w);
    }
  }
}

struct Case {
  const char* name;
  tc::Optimizer opt;
  double momentum;
  bool nesterov;
};

template <typename P>
void test_t1_step_dtype(std::mt19937& rng) {
  using T = typename std::conditional<std::is_same<P, double>::value, double, float>::type;
  const double compute_eps = std::numeric_limits<T>::epsilon();
  const double storage_eps = std::is_same<P, T>::value ? 0.0 : epsilon<P>();
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(0.0, 0.1);
  const int64_t rows[] = {1, 1, 1, 1, 1, 1, 33, 4, 500};
  const int64_t cols[] = {1, 7, 1023, 1025, 65537, 0, 31, 0, 3};
  constexpr int kTensors = 9;
  const Case cases[] = {{"sgd", tc::Optimizer::Sgd, 0.0, false},
                        {"momentum", tc::Optimizer::Sgd, 0.9, false},
                        {"nesterov", tc::Optimizer::Sgd, 0.9, true},
                        {"adam", tc::Optimizer::Adam, 0.0, false}};
  for (const Case& c : cases) {
    const bool adam = c.opt == tc::Optimizer::Adam, has_state1 = adam || c.momentum != 0;
    const tc::T1StepScalars k{0.05, c.momentum, 0.9, 1.0 - 0.9, 0.999, 1.0 - 0.999, 1e-8, c.nesterov};
    struct Host {
      std::vector<P> param, grad;
      std::vector<T> s1, s2, l2, l1, decay, stash_theta, stash_jac;
      double bc1, bc2;
    };
    std::vector<Host> host(kTensors);
    for (int t = 0; t < kTensors; ++t) {
      const int64_t n = rows[t] * cols[t];
      Host& h = host[t];
      for (int64_t i = 0; i < n; ++i) {
        h.param.push_back(from_float<P>(normal(rng)));
        h.grad.push_back(from_float<P>(normal(rng)));
        if (has_state1) h.s1.push_back(static_cast<T>(adam ? 0.1 * normal(rng) : normal(rng)));
        if (adam) h.s2.push_back(static_cast<T>(0.01 * std::fabs(normal(rng))));
      }
      if (n > 0) {
        h.param[0] = from_float<P>(0.0);  // sign(0) = 0 for L1
        if (t % 3 != 2) h.l2.assign(1, static_cast<T>(uniform(rng)));           // per layer
        for (int64_t r = 0; r < rows[t] && t % 3 != 1; ++r) h.l1.push_back(static_cast<T>(uniform(rng)));  // per unit
        if (t % 2 == 0)
          for (int64_t i = 0; i < n; ++i) h.decay.push_back(static_cast<T>(uniform(rng)));  // per element
        h.stash_theta.assign(n, T(-1));
        if (adam) h.stash_jac.assign(n, T(-1));
      }
      h.bc1 = adam ? 1 - std::pow(0.9, 3 + t % 5) : 1.0;
      h.bc2 = adam ? 1 - std::pow(0.999, 3 + t % 5) : 1.0;
    }
    if (adam) {  // ĝ = 0 (θ = 0, g = 0, no coupled L2) on zero moments: ŝ = 0, where J takes its limit
      host[2].grad[0] = from_float<P>(0.0);
      host[2].s1[0] = host[2].s2[0] = T(0);
    }

    // Device copies and descriptors.
    std::vector<DeviceBuffer<P>> d_param, d_grad;
    std::vector<DeviceBuffer<T>> d_s1, d_s2, d_l2, d_l1, d_decay, d_stash_theta, d_stash_jac;
    std::vector<tc::T1StepTensor> descriptors(kTensors);
    for (int t = 0; t < kTensors; ++t) {
      const Host& h = host[t];
      d_param.emplace_back(h.param);
      d_grad.emplace_back(h.grad);
      d_s1.emplace_back(h.s1);
      d_s2.emplace_back(h.s2);
      d_l2.emplace_back(h.l2);
      d_l1.emplace_back(h.l1);
      d_decay.emplace_back(h.decay);
      d_stash_theta.emplace_back(h.stash_theta);
      d_stash_jac.emplace_back(h.stash_jac);
      const int64_t n = static_cast<int64_t>(h.param.size());
      tc::T1StepTensor& d = descriptors[t];
      d = tc::T1StepTensor{};
      d.param = d_param[t].ptr;
      d.grad = d_grad[t].ptr;
      d.state1 = d_s1[t].ptr;
      d.state2 = d_s2[t].ptr;
      d.l2 = d_l2[t].ptr;
      d.l2_inner = h.l2.empty() ? 0 : n / static_cast<int64_t>(h.l2.size());
      d.l1 = d_l1[t].ptr;
      d.l1_inner = h.l1.empty() ? 0 : n / static_cast<int64_t>(h.l1.size());
      d.decay = d_decay[t].ptr;
      d.decay_inner = h.decay.empty() ? 0 : n / static_cast<int64_t>(h.decay.size());
      d.stash_theta = d_stash_theta[t].ptr;
      d.stash_jac = d_stash_jac[t].ptr;
      d.numel = n;
      d.bias_correction1 = h.bc1;
      d.bias_correction2 = h.bc2;
      d.inv_bias_correction1 = 1.0 / h.bc1;  // as ops_cuda.cu fills them: the kernel multiplies
      d.inv_bias_correction2 = 1.0 / h.bc2;
      d.adam_a = adam ? (1.0 - 0.9) / h.bc1 : 0.0;
    }
    const tc::T1StepTableLayout layout = tc::t1_step_table_layout(descriptors.data(), kTensors);
    std::vector<unsigned char> table(layout.bytes);
    tc::t1_step_fill_table(descriptors.data(), layout, table.data());
    DeviceBuffer<unsigned char> d_table(table);
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreate(&stream));
    CUDA_OK(tc::launch_t1_step(storage_of<P>(), c.opt, tc::t1_step_table_view(d_table.ptr, layout), k, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    CUDA_OK(cudaStreamDestroy(stream));

    char case_name[96];
    for (int t = 0; t < kTensors; ++t) {
      Host& h = host[t];
      const std::vector<T> theta_before = [&] {
        std::vector<T> v;
        for (const P& x : h.param) v.push_back(static_cast<T>(to_double(x)));
        return v;
      }();
      host_t1_step(h.param, h.grad, h.s1, h.s2, h.l2, h.l1, h.decay, h.stash_theta, h.stash_jac, c.opt, k, h.bc1,
                   h.bc2);
      std::snprintf(case_name, sizeof case_name, "t1_step %s %s tensor %d (%lld elements)", name_of<P>(), c.name, t,
                    static_cast<long long>(h.param.size()));
      expect_close(d_param[t].host(), h.param, compute_eps, storage_eps, "param", case_name);
      expect_close(d_s1[t].host(), h.s1, compute_eps, 0.0, "state1", case_name);
      expect_close(d_s2[t].host(), h.s2, compute_eps, 0.0, "state2", case_name);
      expect_close(d_stash_jac[t].host(), h.stash_jac, compute_eps, 0.0, "stash_jac", case_name);
      const std::vector<T> stashed = d_stash_theta[t].host();
      CHECK(stashed.size() == theta_before.size() &&
                (stashed.empty() || std::memcmp(stashed.data(), theta_before.data(), stashed.size() * sizeof(T)) == 0),
            "%s: the stash holds the pre-step θ bit for bit", case_name);
    }
  }
}

// ---- device checks: the non-finite guard and grad_scale of t1_step ----

// One tensor, sgd with momentum: (1) g·4 with grad_scale 4 writes the bits of g without a scale;
// (2) a NaN in the grads makes the scan set found_inf, after which the update writes nothing;
// (3) found_inf already set on entry: nothing written, without a scan.
template <typename P>
void test_t1_step_guard(std::mt19937& rng) {
  using T = typename std::conditional<std::is_same<P, double>::value, double, float>::type;
  std::normal_distribution<double> normal;
  const int64_t n = 40000;
  std::vector<P> param, grad, grad4;
  std::vector<T> s1;
  for (int64_t i = 0; i < n; ++i) {
    const double g = normal(rng);
    param.push_back(from_float<P>(normal(rng)));
    grad.push_back(from_float<P>(g));
    grad4.push_back(from_float<P>(4.0 * to_double(grad.back())));
    s1.push_back(static_cast<T>(normal(rng)));
  }
  const tc::T1StepScalars plain{0.05, 0.9, 0.9, 0.1, 0.999, 0.001, 1e-8, false};
  auto run = [&](const std::vector<P>& g, const float* scale, float* found, bool scan, std::vector<P>& param_out,
                 std::vector<T>& s1_out) {
    DeviceBuffer<P> d_param(param), d_grad(g);
    DeviceBuffer<T> d_s1(s1);
    tc::T1StepTensor d{};
    d.param = d_param.ptr;
    d.grad = d_grad.ptr;
    d.state1 = d_s1.ptr;
    d.numel = n;
    d.bias_correction1 = d.bias_correction2 = 1.0;
    d.inv_bias_correction1 = d.inv_bias_correction2 = 1.0;
    const tc::T1StepTableLayout layout = tc::t1_step_table_layout(&d, 1);
    std::vector<unsigned char> table(layout.bytes);
    tc::t1_step_fill_table(&d, layout, table.data());
    DeviceBuffer<unsigned char> d_table(table);
    const tc::T1StepTable view = tc::t1_step_table_view(d_table.ptr, layout);
    tc::T1StepScalars k = plain;
    k.grad_scale = scale;
    k.found_inf = found;
    if (scan) CUDA_OK(tc::launch_t1_step_scan(storage_of<P>(), view, scale, found, nullptr));
    CUDA_OK(tc::launch_t1_step(storage_of<P>(), tc::Optimizer::Sgd, view, k, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    param_out = d_param.host();
    s1_out = d_s1.host();
  };
  auto same = [](const auto& a, const auto& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0;
  };
  DeviceBuffer<float> d_scale(std::vector<float>{4.f}), d_found(std::vector<float>{0.f});
  std::vector<P> p_plain, p_scaled, p_out;
  std::vector<T> s_plain, s_scaled, s_out;
  run(grad, nullptr, nullptr, false, p_plain, s_plain);
  run(grad4, d_scale.ptr, d_found.ptr, true, p_scaled, s_scaled);
  CHECK(d_found.host()[0] == 0.f, "guard %s: finite grads leave found_inf at 0", name_of<P>());
  CHECK(same(p_plain, p_scaled) && same(s_plain, s_scaled), "guard %s: g·4 with grad_scale 4 is g", name_of<P>());
  std::vector<P> bad = grad;
  bad[33333] = from_float<P>(std::numeric_limits<double>::quiet_NaN());
  run(bad, nullptr, d_found.ptr, true, p_out, s_out);
  CHECK(d_found.host()[0] == 1.f, "guard %s: the scan sets found_inf", name_of<P>());
  CHECK(same(p_out, param) && same(s_out, s1), "guard %s: a NaN gradient writes nothing", name_of<P>());
  run(grad, nullptr, d_found.ptr, false, p_out, s_out);  // found_inf still 1 from the scan above
  CHECK(same(p_out, param) && same(s_out, s1), "guard %s: found_inf set on entry writes nothing", name_of<P>());
}

// ---- device checks: penalty_segment_dot ----

template <typename P>
void test_segment_dot_dtype(std::mt19937& rng) {
  using O = typename std::conditional<std::is_same<P, double>::value, double, float>::type;
  std::normal_distribution<double> normal;
  // One shape per path and edge: per element, warp per group (short, at the limit), one tile per
  // group, several tiles with a ragged last one, one big group, empty groups.
  const int64_t shapes[][2] = {{5, 1},    {7, 31},   {3, tc::kSegmentDotWarpMax},     {3, tc::kSegmentDotWarpMax + 1},
                               {2, 8192}, {2, 8193}, {1, 3 * tc::kSegmentDotTile + 5}, {1, 65537},
                               {4, 0},    {1000, 7}};
  for (const auto& shape : shapes) {
    const int64_t groups = shape[0], inner = shape[1], n = groups * inner;
    std::vector<P> u(n), theta(n);
    for (int64_t i = 0; i < n; ++i) {
      u[i] = from_float<P>(normal(rng));
      theta[i] = from_float<P>(i % 17 == 3 ? 0.0 : normal(rng));
    }
    DeviceBuffer<P> d_u(u), d_theta(theta);
    std::vector<O> init(groups, O(-7));
    DeviceBuffer<O> d_out(init), d_again(init);
    const size_t workspace_bytes = tc::penalty_segment_dot_workspace_bytes(groups, inner);
    DeviceBuffer<unsigned char> workspace{std::vector<unsigned char>(workspace_bytes)};
    for (PenaltyKind kind : {PenaltyKind::L2, PenaltyKind::L1}) {
      CUDA_OK(tc::launch_penalty_segment_dot(storage_of<P>(), kind, d_u.ptr, d_theta.ptr, groups, inner, d_out.ptr,
                                             workspace.ptr, nullptr));
      cudaStream_t stream;  // a second run on another stream: the same bits
      CUDA_OK(cudaStreamCreate(&stream));
      CUDA_OK(tc::launch_penalty_segment_dot(storage_of<P>(), kind, d_u.ptr, d_theta.ptr, groups, inner, d_again.ptr,
                                             workspace.ptr, stream));
      CUDA_OK(cudaDeviceSynchronize());
      CUDA_OK(cudaStreamDestroy(stream));
      const std::vector<O> got = d_out.host(), again = d_again.host();
      CHECK(got.empty() || std::memcmp(got.data(), again.data(), got.size() * sizeof(O)) == 0,
            "segment_dot %s %lldx%lld kind %d: two runs differ", name_of<P>(), static_cast<long long>(groups),
            static_cast<long long>(inner), static_cast<int>(kind));
      for (int64_t g = 0; g < groups; ++g) {
        double sum = 0, magnitude = 0;
        for (int64_t i = g * inner; i < (g + 1) * inner; ++i) {
          const double term = to_double(u[i]) * t1t2::penalty_mixed(kind, to_double(theta[i]));
          sum += term;
          magnitude += std::fabs(term);
        }
        // One product per group is exact (the same double product, the same cast); a sum may differ
        // by reordering (1e-12 of its magnitude) and then by one ulp of the float32 output.
        const double float_eps = std::numeric_limits<float>::epsilon();
        const double out_ulp = std::is_same<O, float>::value ? std::fabs(sum) * float_eps : 0.0;
        const double tol = inner == 1 ? 0.0 : 1e-12 * magnitude + out_ulp;
        const double diff = std::fabs(static_cast<double>(got[g]) - static_cast<double>(static_cast<O>(sum)));
        CHECK(diff <= tol, "segment_dot %s %lldx%lld kind %d group %lld: got %.17g want %.17g",
              name_of<P>(), static_cast<long long>(groups), static_cast<long long>(inner), static_cast<int>(kind),
              static_cast<long long>(g), static_cast<double>(got[g]), sum);
      }
    }
  }
}

// ---- device checks: penalty_hypergrad ----

template <typename T>
void test_penalty_hypergrad_dtype(std::mt19937& rng) {
  std::normal_distribution<double> normal;
  // Tensors of every path's sizes; each gets segments of several kinds and groupings.
  const int64_t sizes[] = {1, 7, 1023, 1025, 65537, 0, 33 * 31, 3 * 2049, 2 * 16385, 1000 * 7};
  constexpr int kTensors = 10;
  struct Host {
    std::vector<T> v, theta, jac;
    double jac_scalar;
  };
  std::vector<Host> host(kTensors);
  std::vector<DeviceBuffer<T>> d_v, d_theta, d_jac;
  for (int t = 0; t < kTensors; ++t) {
    Host& h = host[t];
    for (int64_t i = 0; i < sizes[t]; ++i) {
      h.v.push_back(static_cast<T>(normal(rng)));
      h.theta.push_back(static_cast<T>(i % 13 == 5 ? 0.0 : normal(rng)));
      if (t % 2 == 0) h.jac.push_back(static_cast<T>(-0.05 * std::fabs(normal(rng))));
    }
    h.jac_scalar = -0.05 * (1 + t);
    d_v.emplace_back(h.v);
    d_theta.emplace_back(h.theta);
    d_jac.emplace_back(h.jac);
  }
  const double lr = 0.05;
  std::vector<tc::HypergradSegment> segments;
  std::vector<int> segment_tensor;
  int64_t total = 0;
  for (int t = 0; t < kTensors; ++t) {
    const int64_t n = sizes[t];
    const int64_t rows = t == 6 ? 33 : t == 7 ? 3 : t == 8 ? 2 : t == 9 ? 1000 : 1;
    const int64_t groupings[] = {n ? 1 : 0, n ? rows : 0, n};  // per layer, per unit, per element
    for (int k = 0; k < 3; ++k) {
      for (int g = 0; g < 3; ++g) {
        tc::HypergradSegment s{};
        s.v = d_v[t].ptr;
        s.theta = d_theta[t].ptr;
        s.jac = d_jac[t].ptr;  // null where the tensor has no jac
        s.jac_scalar = host[t].jac_scalar;
        s.kind = static_cast<tc::SegmentKind>(k);
        s.groups = groupings[g];
        s.inner = s.groups ? n / s.groups : 0;
        s.out_offset = total;
        total += s.groups;
        segments.push_back(s);
        segment_tensor.push_back(t);
      }
    }
  }
  std::vector<tc::HypergradSegment> planned = segments;
  const tc::HypergradPlan plan = tc::penalty_hypergrad_plan(planned.data(), static_cast<int64_t>(planned.size()));
  std::vector<unsigned char> table(planned.size() * sizeof(tc::HypergradSegment));
  std::memcpy(table.data(), planned.data(), table.size());
  DeviceBuffer<unsigned char> d_table(table);
  DeviceBuffer<unsigned char> workspace{std::vector<unsigned char>(tc::penalty_hypergrad_workspace_bytes(plan))};
  const std::vector<T> init(total, T(-7));
  DeviceBuffer<T> d_out(init), d_again(init);
  const auto* d_segments = reinterpret_cast<const tc::HypergradSegment*>(d_table.ptr);
  CUDA_OK(tc::launch_penalty_hypergrad(storage_of<T>(), d_segments, plan, lr, d_out.ptr, workspace.ptr, nullptr));
  cudaStream_t stream;  // a second run on another stream: the same bits
  CUDA_OK(cudaStreamCreate(&stream));
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(tc::launch_penalty_hypergrad(storage_of<T>(), d_segments, plan, lr, d_again.ptr, workspace.ptr, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  CUDA_OK(cudaStreamDestroy(stream));
  const std::vector<T> got = d_out.host(), again = d_again.host();
  CHECK(std::memcmp(got.data(), again.data(), got.size() * sizeof(T)) == 0, "penalty_hypergrad %s: two runs differ",
        name_of<T>());
  for (size_t k = 0; k < segments.size(); ++k) {
    const tc::HypergradSegment& s = segments[k];
    const Host& h = host[segment_tensor[k]];
    const bool decoupled = s.kind == tc::SegmentKind::DecoupledL2;
    const PenaltyKind kind = s.kind == tc::SegmentKind::L1 ? PenaltyKind::L1 : PenaltyKind::L2;
    for (int64_t g = 0; g < s.groups; ++g) {
      double sum = 0, magnitude = 0;
      for (int64_t i = g * s.inner; i < (g + 1) * s.inner; ++i) {
        const T j = decoupled ? T(1) : h.jac.empty() ? static_cast<T>(h.jac_scalar) : h.jac[i];
        const T u = j * h.v[i];  // rounded to the compute type, as the kernels do
        const double term = static_cast<double>(u) * t1t2::penalty_mixed(kind, static_cast<double>(h.theta[i]));
        sum += term;
        magnitude += std::fabs(term);
      }
      const double scale = decoupled ? -lr : 1.0;
      const double want = scale * sum;
      // reordering (1e-12 of the magnitude), then one ulp of a float32 output
      const double float_eps = std::numeric_limits<float>::epsilon();
      const double out_ulp = std::is_same<T, float>::value ? std::fabs(want) * float_eps : 0.0;
      const double tol = 1e-12 * std::fabs(scale) * magnitude + out_ulp;
      const double result = static_cast<double>(got[s.out_offset + g]);
      const double diff = std::fabs(result - static_cast<double>(static_cast<T>(want)));
      CHECK(diff <= tol, "penalty_hypergrad %s segment %zu (tensor %d, kind %d, %lldx%lld) group %lld: %.17g vs %.17g",
            name_of<T>(), k, segment_tensor[k], static_cast<int>(s.kind), static_cast<long long>(s.groups),
            static_cast<long long>(s.inner), static_cast<long long>(g), result, want);
    }
  }
}

// ---- device checks: perturb / restore ----

template <typename P>
void test_perturb_dtype(std::mt19937& rng) {
  using T = typename std::conditional<std::is_same<P, double>::value, double, float>::type;
  std::normal_distribution<double> normal;
  const int64_t sizes[] = {0, 1, 7, 1023, 1025, 65537, 3 * tc::kPerturbChunk};
  constexpr int kTensors = 7;
  const double scale = -1e-3;
  for (bool with_save : {true, false}) {
    std::vector<std::vector<P>> param(kTensors);
    std::vector<std::vector<T>> base(kTensors), direction(kTensors);
    std::vector<DeviceBuffer<P>> d_param, d_save;
    std::vector<DeviceBuffer<T>> d_base, d_direction;
    std::vector<tc::PerturbTensor> descriptors(kTensors), back(kTensors);
    for (int t = 0; t < kTensors; ++t) {
      for (int64_t i = 0; i < sizes[t]; ++i) {
        param[t].push_back(from_float<P>(normal(rng)));
        base[t].push_back(static_cast<T>(normal(rng)));
        direction[t].push_back(static_cast<T>(normal(rng)));
      }
      d_param.emplace_back(param[t]);
      d_save.emplace_back(std::vector<P>(sizes[t], from_float<P>(-3.0)));
      d_base.emplace_back(base[t]);
      d_direction.emplace_back(direction[t]);
      descriptors[t] = {d_param[t].ptr, with_save ? d_save[t].ptr : nullptr, d_base[t].ptr, d_direction[t].ptr,
                        sizes[t]};
      back[t] = {d_param[t].ptr, d_save[t].ptr, nullptr, nullptr, sizes[t]};
    }
    const tc::PerturbTableLayout layout = tc::perturb_table_layout(descriptors.data(), kTensors);
    std::vector<unsigned char> table(layout.bytes), back_table(layout.bytes);
    tc::perturb_fill_table(descriptors.data(), layout, table.data());
    tc::perturb_fill_table(back.data(), layout, back_table.data());
    DeviceBuffer<unsigned char> d_table(table), d_back(back_table);
    CUDA_OK(tc::launch_perturb(storage_of<P>(), tc::perturb_table_view(d_table.ptr, layout), scale, nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    for (int t = 0; t < kTensors; ++t) {
      std::vector<P> want(sizes[t]);
      for (int64_t i = 0; i < sizes[t]; ++i) {
        volatile T product = static_cast<T>(scale) * direction[t][i];  // two roundings, as the CPU kernel
        want[i] = from_float<P>(static_cast<double>(static_cast<T>(base[t][i] + product)));
      }
      const std::vector<P> got = d_param[t].host(), saved = d_save[t].host();
      CHECK(sizes[t] == 0 || std::memcmp(got.data(), want.data(), got.size() * sizeof(P)) == 0,
            "perturb %s tensor %d: not the CPU kernel's bits", name_of<P>(), t);
      if (with_save)
        CHECK(sizes[t] == 0 || std::memcmp(saved.data(), param[t].data(), saved.size() * sizeof(P)) == 0,
              "perturb %s tensor %d: save holds θ bit for bit", name_of<P>(), t);
    }
    if (!with_save) continue;
    CUDA_OK(tc::launch_restore(storage_of<P>(), tc::perturb_table_view(d_back.ptr, layout), nullptr));
    CUDA_OK(cudaDeviceSynchronize());
    for (int t = 0; t < kTensors; ++t) {
      const std::vector<P> got = d_param[t].host();
      CHECK(sizes[t] == 0 || std::memcmp(got.data(), param[t].data(), got.size() * sizeof(P)) == 0,
            "restore %s tensor %d: θ back bit for bit", name_of<P>(), t);
    }
  }
}

}  // namespace

int main() {
  test_table_layout();
  test_workspace_and_argument_errors();
  test_hypergrad_plan();
  test_perturb_table_layout();
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("host checks: %s; no CUDA device, device checks skipped\n", failures ? "FAILED" : "passed");
    return failures ? 1 : 77;
  }
  std::mt19937 rng(1234);
  test_t1_step_dtype<double>(rng);
  test_t1_step_dtype<float>(rng);
  test_t1_step_dtype<__nv_bfloat16>(rng);
  test_t1_step_dtype<__half>(rng);
  test_t1_step_guard<double>(rng);
  test_t1_step_guard<float>(rng);
  test_t1_step_guard<__nv_bfloat16>(rng);
  test_t1_step_guard<__half>(rng);
  test_segment_dot_dtype<double>(rng);
  test_segment_dot_dtype<float>(rng);
  test_segment_dot_dtype<__nv_bfloat16>(rng);
  test_segment_dot_dtype<__half>(rng);
  test_penalty_hypergrad_dtype<double>(rng);
  test_penalty_hypergrad_dtype<float>(rng);
  test_perturb_dtype<double>(rng);
  test_perturb_dtype<float>(rng);
  test_perturb_dtype<__nv_bfloat16>(rng);
  test_perturb_dtype<__half>(rng);
  std::printf("%s (%d failed checks)\n", failures ? "FAILED" : "all CUDA kernel checks passed", failures);
  return failures ? 1 : 0;
}
