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

#if T1T2_AVX2_CLONES
#include <immintrin.h>
#endif

namespace t1t2 {
namespace {

constexpr const char* kForwardOp = "t1t2::gaussian_noise";
constexpr const char* kBackwardOp = "t1t2::gaussian_noise_backward";
constexpr int64_t kChunk = 16384;    // elements per parallel work item of the element-wise loops
constexpr int64_t kEpsBlock = 1024;  // ε drawn per call of the generator (a stack buffer)
static_assert(noise::kMaxTileColumns <= kEpsBlock, "a tile row must fit the ε buffer");

using noise::Mode;

// ε_k = randn(key, first + k) for k < n: the hot loop (Philox and the double polynomials of
// philox.h). The baseline copy is this scalar loop (GCC does not vectorize it); the AVX2 copy below
// (cpu_features.h) is written with intrinsics. Every operation is IEEE-rounded on its own in both
// copies: the same bits.
using FillFn = void (*)(uint64_t, int64_t, int64_t, float*);

void fill_randn_default(uint64_t key, int64_t first, int64_t n, float* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = philox::randn(key, static_cast<uint64_t>(first + k));
}

#if T1T2_AVX2_CLONES
// The AVX2 copy, written with intrinsics because GCC does not vectorize the scalar loop (the
// 32×32→64-bit products and the double↔int conversions defeat it): the same operations as
// philox::randn in the same order, each IEEE-rounded on its own (no FMA), so the same bits.
// Counters and words live in the low halves of 64-bit lanes; log and cos run on 4 doubles. The
// Philox rounds and the polynomials are chains of dependent operations, so each step is applied to
// kVectors independent vectors of 4 draws at once: the core overlaps their latencies.
namespace avx2 {

constexpr int kVectors = 4;
constexpr int64_t kDraws = 4 * kVectors;  // draws per block

// p = c[0]; p = c[k] + z·p, on kVectors vectors.
template <int N>
T1T2_TARGET_AVX2 inline void horner(const __m256d* z, const double (&c)[N], __m256d* p) {
  for (int v = 0; v < kVectors; ++v) p[v] = _mm256_set1_pd(c[0]);
  for (int k = 1; k < N; ++k) {
    const __m256d ck = _mm256_set1_pd(c[k]);
    for (int v = 0; v < kVectors; ++v) p[v] = _mm256_add_pd(ck, _mm256_mul_pd(z[v], p[v]));
  }
}

// The low 32 bits of each 64-bit lane, packed into 4 int32.
T1T2_TARGET_AVX2 inline __m128i low_words(__m256i v) {
  const __m256i picked = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
  return _mm256_castsi256_si128(picked);
}

// 4 int32 lane masks widened to 4 double lane masks.
T1T2_TARGET_AVX2 inline __m256d widen(__m128i mask) { return _mm256_castsi256_pd(_mm256_cvtepi32_epi64(mask)); }

// philox::uniform of 4 words.
T1T2_TARGET_AVX2 inline __m128 uniform(__m128i word) {
  const __m128i folded = _mm_xor_si128(word, _mm_srai_epi32(word, 31));  // i < 0 ? ~i : i
  return _mm_mul_ps(_mm_cvtepi32_ps(folded), _mm_set1_ps(static_cast<float>(4.6566127342e-10)));
}

// philox::log_float of kVectors × 4 positive normal floats.
T1T2_TARGET_AVX2 inline void log_float(const __m128* x, __m128* out) {
  constexpr double kLn2Hi = 0x1.62e42feep-1, kLn2Lo = 0x1.a39ef35793c76p-33, kSqrt2 = 0x1.6a09e667f3bcdp+0;
  static constexpr double kSeries[] = {1.0 / 23, 1.0 / 21, 1.0 / 19, 1.0 / 17, 1.0 / 15, 1.0 / 13,
                                       1.0 / 11, 1.0 / 9,  1.0 / 7,  1.0 / 5,  1.0 / 3};
  const __m256d one = _mm256_set1_pd(1.0);
  __m256d s[kVectors], z[kVectors], p[kVectors], ed[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    const __m128i bits = _mm_castps_si128(x[v]);
    __m128i e = _mm_sub_epi32(_mm_srli_epi32(bits, 23), _mm_set1_epi32(127));
    const __m128i mant = _mm_or_si128(_mm_and_si128(bits, _mm_set1_epi32(0x007FFFFF)), _mm_set1_epi32(0x3F800000));
    __m256d m = _mm256_cvtps_pd(_mm_castsi128_ps(mant));
    const __m256d halve = _mm256_cmp_pd(m, _mm256_set1_pd(kSqrt2), _CMP_GT_OQ);
    m = _mm256_blendv_pd(m, _mm256_mul_pd(m, _mm256_set1_pd(0.5)), halve);
    e = _mm_sub_epi32(e, low_words(_mm256_castpd_si256(halve)));  // mask −1 where halved: e + 1
    ed[v] = _mm256_cvtepi32_pd(e);
    s[v] = _mm256_div_pd(_mm256_sub_pd(m, one), _mm256_add_pd(m, one));
    z[v] = _mm256_mul_pd(s[v], s[v]);
  }
  horner(z, kSeries, p);
  for (int v = 0; v < kVectors; ++v) {
    const __m256d two_s = _mm256_add_pd(s[v], s[v]);
    const __m256d log_m = _mm256_add_pd(two_s, _mm256_mul_pd(_mm256_mul_pd(two_s, z[v]), p[v]));
    const __m256d sum = _mm256_add_pd(_mm256_mul_pd(ed[v], _mm256_set1_pd(kLn2Hi)),
                                      _mm256_add_pd(_mm256_mul_pd(ed[v], _mm256_set1_pd(kLn2Lo)), log_m));
    out[v] = _mm256_cvtpd_ps(sum);
  }
}

// philox::cos_float of kVectors × 4 floats in [0, 8).
T1T2_TARGET_AVX2 inline void cos_float(const __m128* t, __m128* out) {
  constexpr double kTwoOverPi = 0x1.45f306dc9c883p-1, kPio2Hi = 0x1.921fb544p+0, kPio2Lo = 0x1.0b4611a626331p-34;
  static constexpr double kSin[] = {1.0 / 355687428096000.0, -1.0 / 1307674368000.0, 1.0 / 6227020800.0,
                                    -1.0 / 39916800.0,       1.0 / 362880.0,         -1.0 / 5040.0,
                                    1.0 / 120.0,             -1.0 / 6.0};
  static constexpr double kCos[] = {-1.0 / 6402373705728000.0, 1.0 / 20922789888000.0, -1.0 / 87178291200.0,
                                    1.0 / 479001600.0,         -1.0 / 3628800.0,       1.0 / 40320.0,
                                    -1.0 / 720.0,              1.0 / 24.0,             -1.0 / 2.0};
  __m256d r[kVectors], z[kVectors], ps[kVectors], pc[kVectors];
  __m128i quadrant[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    const __m256d x = _mm256_cvtps_pd(t[v]);
    const __m128i k =
        _mm256_cvttpd_epi32(_mm256_add_pd(_mm256_mul_pd(x, _mm256_set1_pd(kTwoOverPi)), _mm256_set1_pd(0.5)));
    const __m256d kd = _mm256_cvtepi32_pd(k);
    r[v] = _mm256_sub_pd(_mm256_sub_pd(x, _mm256_mul_pd(kd, _mm256_set1_pd(kPio2Hi))),
                         _mm256_mul_pd(kd, _mm256_set1_pd(kPio2Lo)));
    z[v] = _mm256_mul_pd(r[v], r[v]);
    quadrant[v] = _mm_and_si128(k, _mm_set1_epi32(3));
  }
  horner(z, kSin, ps);
  horner(z, kCos, pc);
  const __m256d sign = _mm256_set1_pd(-0.0);
  for (int v = 0; v < kVectors; ++v) {
    const __m256d sin_r = _mm256_add_pd(r[v], _mm256_mul_pd(_mm256_mul_pd(r[v], z[v]), ps[v]));
    const __m256d cos_r = _mm256_add_pd(_mm256_set1_pd(1.0), _mm256_mul_pd(z[v], pc[v]));
    const __m256d q0 = widen(_mm_cmpeq_epi32(quadrant[v], _mm_setzero_si128()));
    const __m256d q3 = widen(_mm_cmpeq_epi32(quadrant[v], _mm_set1_epi32(3)));
    const __m256d odd_q = widen(_mm_cmpeq_epi32(_mm_and_si128(quadrant[v], _mm_set1_epi32(1)), _mm_set1_epi32(1)));
    // cos(r + kπ/2) = cos r, −sin r, −cos r, sin r (negation flips the sign bit: exact)
    const __m256d even = _mm256_blendv_pd(_mm256_xor_pd(cos_r, sign), cos_r, q0);
    const __m256d odd = _mm256_blendv_pd(_mm256_xor_pd(sin_r, sign), sin_r, q3);
    out[v] = _mm256_cvtpd_ps(_mm256_blendv_pd(even, odd, odd_q));
  }
}

// out[k] = randn(key, first + k) for k < kDraws.
T1T2_TARGET_AVX2 inline void randn_block(uint64_t key, uint64_t first, float* out) {
  const __m256i low = _mm256_set1_epi64x(0xFFFFFFFFLL);
  const __m256i mul_a = _mm256_set1_epi64x(philox::kRoundA), mul_b = _mm256_set1_epi64x(philox::kRoundB);
  __m256i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    const __m256i offset = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(first + 4 * v)),
                                            _mm256_setr_epi64x(0, 1, 2, 3));
    c0[v] = _mm256_and_si256(offset, low);  // counter (offset lo, offset hi, 0, 0)
    c1[v] = _mm256_srli_epi64(offset, 32);
    c2[v] = c3[v] = _mm256_setzero_si256();
  }
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < philox::kRounds; ++round) {
    const __m256i key0 = _mm256_set1_epi64x(k0), key1 = _mm256_set1_epi64x(k1);
    for (int v = 0; v < kVectors; ++v) {
      const __m256i a = _mm256_mul_epu32(c0[v], mul_a), b = _mm256_mul_epu32(c2[v], mul_b);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(b, 32), c1[v]), key0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(a, 32), c3[v]), key1);
      c1[v] = _mm256_and_si256(b, low);
      c3[v] = _mm256_and_si256(a, low);
    }
    k0 += philox::kKeyA;
    k1 += philox::kKeyB;
  }
  __m128 u1[kVectors], theta[kVectors], log_u1[kVectors], cos_theta[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    // u1 > 1e-7 ? u1 : 1e-7 (max_ps returns its second operand unless the first is greater)
    u1[v] = _mm_max_ps(uniform(low_words(c0[v])), _mm_set1_ps(static_cast<float>(1.0e-7)));
    theta[v] = _mm_mul_ps(_mm_set1_ps(static_cast<float>(6.283185307179586)), uniform(low_words(c1[v])));
  }
  log_float(u1, log_u1);
  cos_float(theta, cos_theta);
  for (int v = 0; v < kVectors; ++v) {
    const __m128 radius = _mm_sqrt_ps(_mm_mul_ps(_mm_set1_ps(-2.0f), log_u1[v]));
    _mm_storeu_ps(out + 4 * v, _mm_mul_ps(radius, cos_theta[v]));
  }
}

}  // namespace avx2

T1T2_TARGET_AVX2 void fill_randn_avx2(uint64_t key, int64_t first, int64_t n, float* out) {
  int64_t k = 0;
  for (; k + avx2::kDraws <= n; k += avx2::kDraws) avx2::randn_block(key, static_cast<uint64_t>(first + k), out + k);
  for (; k < n; ++k) out[k] = philox::randn(key, static_cast<uint64_t>(first + k));
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
      if (channels == 1) {  // one σ (per-layer noise): a plain loop the compiler vectorizes
        const T s = sigma[0];
        const scalar_t* __restrict__ in = src + begin;
        scalar_t* __restrict__ out = dst + begin;
        for (int64_t k = 0; k < n; ++k) out[k] = static_cast<scalar_t>(noise::apply<T>(mode, static_cast<T>(in[k]), s, eps[k]));
        continue;
      }
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

// acc[t] += the σ-gradient term of element t, for t < n (x is read in multiplicative mode only).
template <Mode mode, typename scalar_t>
inline void accumulate(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, const float* __restrict__ eps,
                       double* __restrict__ acc, int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    const double xi = mode == Mode::Multiplicative ? static_cast<double>(x[t]) : 0.0;
    acc[t] += noise::sigma_term(mode, static_cast<double>(g[t]), xi, eps[t]);
  }
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
      if (columns == p.row_width && grad_x == nullptr) {
        // The tile spans whole rows: one contiguous range of x, whose element e (from the tile's
        // start) goes to lane (e / columns) % lanes, column e % columns, i.e. acc[e % (lanes·columns)].
        // Walk it in runs that do not wrap around acc (plain vectorizable loops) and draw ε in
        // blocks of kEpsBlock: per-layer noise has rows of one element, so a generator call per row
        // would cost more than the draws. Each acc entry gets its terms in the same order as below.
        const int64_t begin = r0 * p.row_width, end = r1 * p.row_width, period = p.lanes * columns;
        int64_t slot = 0;
        for (int64_t b = begin; b < end; b += kEpsBlock) {
          const int64_t n = std::min(kEpsBlock, end - b);
          fill(key, b, n, eps);
          for (int64_t k = 0; k < n;) {
            const int64_t run = std::min(n - k, period - slot);
            if (mode == Mode::Additive)
              accumulate<Mode::Additive>(g + b + k, x + b + k, eps + k, acc + slot, run);
            else
              accumulate<Mode::Multiplicative>(g + b + k, x + b + k, eps + k, acc + slot, run);
            k += run;
            slot = slot + run == period ? 0 : slot + run;
          }
        }
      } else {
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
