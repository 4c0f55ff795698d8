#include "cpu/noise.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/cpu_features.h"

namespace t1t2 {
namespace {

constexpr const char* kForwardOp = "t1t2::gaussian_noise";
constexpr const char* kBackwardOp = "t1t2::gaussian_noise_backward";
constexpr int64_t kChunk = 16384;    // elements per parallel work item of the element-wise loops
constexpr int64_t kEpsBlock = 1024;  // ε drawn per call of the generator (a stack buffer)
static_assert(noise::kMaxTileColumns <= kEpsBlock, "a tile row must fit the ε buffer");

using noise::Mode;

// ε_k = randn(key, first + k) for k < n: the hot loop (Philox and the double polynomials of
// philox.h, branch-free, so it vectorizes), with an AVX2 copy (cpu_features.h). Every operation is
// IEEE-rounded on its own in both copies: the same bits.
T1T2_ALWAYS_INLINE void fill_randn(uint64_t key, int64_t first, int64_t n, float* __restrict__ out) {
  for (int64_t k = 0; k < n; ++k) out[k] = philox::randn(key, static_cast<uint64_t>(first + k));
}

using FillFn = void (*)(uint64_t, int64_t, int64_t, float*);

void fill_randn_default(uint64_t key, int64_t first, int64_t n, float* out) { fill_randn(key, first, n, out); }

#if T1T2_AVX2_CLONES
T1T2_TARGET_AVX2 void fill_randn_avx2(uint64_t key, int64_t first, int64_t n, float* out) {
  fill_randn(key, first, n, out);
}
#endif

FillFn pick_fill() {
#if T1T2_AVX2_CLONES
  if (use_avx2()) return &fill_randn_avx2;
#endif
  return &fill_randn_default;
}

// dst_i = apply(mode, src_i, σ_c, ε_i) over all elements: the forward (src = x) and the
// multiplicative ∂L/∂x (src = g, mode multiplicative).
template <typename scalar_t>
void apply_noise(const scalar_t* src, const at::opmath_type<scalar_t>* sigma, scalar_t* dst, int64_t numel,
                 int64_t channels, int64_t inner, uint64_t key, Mode mode) {
  using T = at::opmath_type<scalar_t>;
  const FillFn fill = pick_fill();
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    float eps[kEpsBlock];
    const int64_t end = std::min(numel, last * kChunk);
    for (int64_t begin = first * kChunk; begin < end; begin += kEpsBlock) {
      const int64_t n = std::min(kEpsBlock, end - begin);
      fill(key, begin, n, eps);
      int64_t c = (begin / inner) % channels, pos = begin % inner;
      for (int64_t k = 0; k < n; ++k) {
        dst[begin + k] = static_cast<scalar_t>(noise::apply<T>(mode, static_cast<T>(src[begin + k]), sigma[c], eps[k]));
        if (++pos == inner) {
          pos = 0;
          if (++c == channels) c = 0;
        }
      }
    }
  });
}

// ∂L/∂σ in the fixed order of t1t2/noise.h (and, when grad_x is given, the multiplicative ∂L/∂x
// from the same ε). x is only read in multiplicative mode.
template <typename scalar_t>
void sigma_grad(const scalar_t* g, const scalar_t* x, const at::opmath_type<scalar_t>* sigma, scalar_t* grad_x,
                at::opmath_type<scalar_t>* out, int64_t numel, int64_t channels, int64_t inner, uint64_t key,
                Mode mode) {
  using T = at::opmath_type<scalar_t>;
  const noise::Plan p = noise::make_plan(numel, channels, inner);
  const FillFn fill = pick_fill();
  std::vector<double> partial(p.partials());
  at::parallel_for(0, p.tiles(), 1, [&](int64_t first, int64_t last) {
    double acc[noise::kMaxTileColumns];  // lanes × columns ≤ max(kBlockThreads, kMaxTileColumns)
    float eps[kEpsBlock];
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t rt = tile / p.column_tiles, ct = tile % p.column_tiles;
      const int64_t r0 = rt * p.tile_rows, r1 = std::min(p.rows, r0 + p.tile_rows);
      const int64_t j0 = ct * p.tile_columns, columns = std::min(p.row_width, j0 + p.tile_columns) - j0;
      std::fill(acc, acc + p.lanes * columns, 0.0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t base = r * p.row_width + j0;
        fill(key, base, columns, eps);
        double* lane = acc + ((r - r0) % p.lanes) * columns;
        for (int64_t j = 0; j < columns; ++j) {
          const double xi = mode == Mode::Multiplicative ? static_cast<double>(x[base + j]) : 0.0;
          lane[j] += noise::sigma_term(mode, static_cast<double>(g[base + j]), xi, eps[j]);
        }
        if (grad_x != nullptr) {
          int64_t c = (j0 / inner) % channels, pos = j0 % inner;
          for (int64_t j = 0; j < columns; ++j) {
            const T gx = noise::apply<T>(Mode::Multiplicative, static_cast<T>(g[base + j]), sigma[c], eps[j]);
            grad_x[base + j] = static_cast<scalar_t>(gx);
            if (++pos == inner) {
              pos = 0;
              ++c;
            }
          }
        }
      }
      for (int64_t stride = p.lanes / 2; stride >= 1; stride /= 2)
        for (int64_t l = 0; l < stride; ++l)
          for (int64_t j = 0; j < columns; ++j) acc[l * columns + j] += acc[(l + stride) * columns + j];
      // Column sums → one partial per channel of the tile, in column order.
      double* tile_partial = partial.data() + tile * p.partials_per_tile;
      const int64_t c_first = noise::first_channel(p, ct);
      for (int64_t j = 0; j < columns;) {
        const int64_t c = (j0 + j) / inner, stop = std::min(columns, (c + 1) * inner - j0);
        double s = 0.0;
        for (; j < stop; ++j) s += acc[j];
        tile_partial[c - c_first] = s;
      }
    }
  });
  at::parallel_for(0, channels, 256, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t ct0 = noise::first_column_tile(p, c), ct1 = noise::last_column_tile(p, c);
      double s = 0.0;
      for (int64_t rt = 0; rt < p.row_tiles; ++rt)
        for (int64_t ct = ct0; ct <= ct1; ++ct)
          s += partial[(rt * p.column_tiles + ct) * p.partials_per_tile + c - noise::first_channel(p, ct)];
      out[c] = static_cast<T>(s);
    }
  });
}

}  // namespace

noise::Mode check_noise_inputs(const char* op, const at::Tensor& x, const at::Tensor* grad_y, const at::Tensor& sigma,
                               int64_t channels, int64_t inner, c10::string_view mode, at::DeviceType kernel) {
  TORCH_CHECK(mode == "additive" || mode == "multiplicative", op, ": unknown mode '", mode,
              "'; expected 'additive' or 'multiplicative'");
  // mixed devices first: the dispatcher sends x on cpu with sigma on cuda to the CUDA kernel
  TORCH_CHECK(sigma.device() == x.device(), op, ": sigma is on ", sigma.device(), " but x is on ", x.device(),
              "; move both to one device");
  if (grad_y != nullptr)
    TORCH_CHECK(grad_y->device() == x.device(), op, ": grad_y is on ", grad_y->device(), " but x is on ", x.device(),
                "; move both to one device");
  TORCH_CHECK(x.device().type() == kernel, op, ": the ", kernel == at::kCUDA ? "CUDA" : "CPU", " kernel got x on ",
              x.device(), ", expected ", c10::DeviceTypeName(kernel, /*lower_case=*/true));
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(supported_dtype(dtype), op, ": x must be float64, float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(x.is_contiguous(), op, ": x (shape ", x.sizes(), ", strides ", x.strides(),
              ") must be contiguous: the noise of element i is drawn from its index in the contiguous layout; "
              "call .contiguous() first");
  if (grad_y != nullptr) {
    TORCH_CHECK(grad_y->sizes() == x.sizes(), op, ": grad_y has shape ", grad_y->sizes(), " but x has shape ",
                x.sizes());
    TORCH_CHECK(grad_y->scalar_type() == dtype, op, ": grad_y has dtype ", grad_y->scalar_type(), " but x has dtype ",
                dtype);
    TORCH_CHECK(grad_y->is_contiguous(), op, ": grad_y must be contiguous; call .contiguous() first");
  }
  TORCH_CHECK(channels >= 1, op, ": channels must be >= 1, got ", channels);
  TORCH_CHECK(inner >= 1, op, ": inner must be >= 1, got ", inner);
  TORCH_CHECK(channels <= std::numeric_limits<int64_t>::max() / inner, op, ": channels·inner = ", channels, "·", inner,
              " overflows int64");
  TORCH_CHECK(x.numel() % (channels * inner) == 0, op, ": channels·inner = ", channels, "·", inner, " = ",
              channels * inner, " does not divide the ", x.numel(), " elements of x (shape ", x.sizes(),
              "); per-unit noise of an (N, F, ...) input has channels = F and inner = the product of the dims after F");
  const at::ScalarType compute = compute_dtype(dtype);
  TORCH_CHECK(sigma.scalar_type() == compute, op, ": sigma has dtype ", sigma.scalar_type(), ", expected ", compute,
              " (the compute dtype of ", dtype, " x)");
  TORCH_CHECK(sigma.numel() == channels, op, ": sigma has ", sigma.numel(), " elements (shape ", sigma.sizes(),
              "), expected channels = ", channels);
  TORCH_CHECK(sigma.is_contiguous(), op, ": sigma must be contiguous");
  return mode == "additive" ? Mode::Additive : Mode::Multiplicative;
}

at::Tensor gaussian_noise_cpu(const at::Tensor& x, const at::Tensor& sigma, int64_t key, int64_t channels,
                              int64_t inner, c10::string_view mode_name) {
  const Mode mode = check_noise_inputs(kForwardOp, x, nullptr, sigma, channels, inner, mode_name, at::kCPU);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gaussian_noise", [&] {
    using T = at::opmath_type<scalar_t>;
    apply_noise<scalar_t>(x.const_data_ptr<scalar_t>(), sigma.const_data_ptr<T>(), y.mutable_data_ptr<scalar_t>(),
                          x.numel(), channels, inner, static_cast<uint64_t>(key), mode);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> gaussian_noise_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                               const at::Tensor& sigma, int64_t key, int64_t channels,
                                                               int64_t inner, c10::string_view mode_name,
                                                               bool need_x_grad, bool need_sigma_grad) {
  const Mode mode = check_noise_inputs(kBackwardOp, x, &grad_y, sigma, channels, inner, mode_name, at::kCPU);
  const bool fused_x_grad = need_x_grad && mode == Mode::Multiplicative;
  at::Tensor grad_x = !need_x_grad ? x.new_empty({0})
                      : fused_x_grad ? at::empty_like(x)
                                     : grad_y.clone();  // additive: ∂L/∂x = g
  at::Tensor grad_sigma = need_sigma_grad ? at::empty_like(sigma) : sigma.new_empty({0});
  if (!fused_x_grad && !need_sigma_grad) return {grad_x, grad_sigma};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gaussian_noise_backward", [&] {
    using T = at::opmath_type<scalar_t>;
    const uint64_t seed = static_cast<uint64_t>(key);
    scalar_t* gx = fused_x_grad ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    if (need_sigma_grad) {
      sigma_grad<scalar_t>(grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), sigma.const_data_ptr<T>(),
                           gx, grad_sigma.mutable_data_ptr<T>(), x.numel(), channels, inner, seed, mode);
    } else {
      apply_noise<scalar_t>(grad_y.const_data_ptr<scalar_t>(), sigma.const_data_ptr<T>(), gx, x.numel(), channels,
                            inner, seed, Mode::Multiplicative);
    }
  });
  return {grad_x, grad_sigma};
}

}  // namespace t1t2
