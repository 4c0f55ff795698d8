// Counter-based Gaussian noise (docs/design.md, "Noise modules"): ε_i = randn(key, i), the draw of
// Triton's triton.language.random.randn, shared by the CPU and CUDA kernels and mirrored
// operation for operation by the pure-PyTorch twin t1t2_fast/rng.py. Plain C++, no torch headers.
//
// randn(seed, offset), as Triton defines it:
//   1. Philox4x32-10 (Salmon et al., SC 2011; Random123) on the counter (offset lo 32 bits,
//      offset hi 32 bits, 0, 0) with the key (seed lo 32 bits, seed hi 32 bits);
//   2. its first two words w1, w2 → uniforms in [0, 1): the word bitcast to int32, x < 0 → −x−1,
//      converted to float32 and multiplied by float32(4.6566127342e-10);
//   3. Box–Muller in float32: u1 = max(1e-7, u1), r = sqrt(−2 log u1), θ = 2π·u2, ε = r cos θ.
//
// Steps 1–2 are integer arithmetic plus one float32 rounding each, so they reproduce Triton's
// tl.randint4x / tl.rand bit for bit. Step 3 needs float32 log and cos, whose last bit is not
// specified anywhere: Triton evaluates them with its backend's float32 math (numpy's SIMD log and
// cos under TRITON_INTERPRET=1 are off by up to 4 ulps in a fifth of the draws here; the GPU
// backends use their own approximations). We pin them down instead: log and cos are evaluated in
// double with fixed polynomials made of +, −, ×, ÷ only (every one correctly rounded in IEEE
// arithmetic) and rounded to float32 once, i.e. the correctly rounded float32 log u1 and cos θ
// except in ~1e-9 of the draws (a double error within reach of a float32 rounding midpoint). So
// the CPU kernel, the CUDA kernel and the PyTorch twin give the same bits on every machine, and
// agree with Triton's tl.randn to a few ulps.
//
// Bit-identity needs every operation rounded on its own: no fused multiply-add. Device code says
// so with the __*_rn intrinsics (nvcc contracts a*b+c otherwise); host code relies on the
// compiler not contracting, which holds for the x86-64 baseline and the AVX2 (no FMA) copies the
// project builds (csrc/cpu/cpu_features.h). A build with -mfma needs -ffp-contract=off.
#pragma once

#include <cstdint>
#include <cstring>

#include "t1t2/math.h"  // T1T2_HOST_DEVICE

namespace t1t2 {

// Correctly rounded IEEE operations, spelled out so that nvcc cannot fuse them.
namespace ieee {

#ifdef __CUDA_ARCH__
__device__ inline double add(double a, double b) { return __dadd_rn(a, b); }
__device__ inline double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ inline double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ inline double div(double a, double b) { return __ddiv_rn(a, b); }
__device__ inline float add(float a, float b) { return __fadd_rn(a, b); }
__device__ inline float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ inline float sqrt(float a) { return __fsqrt_rn(a); }
__device__ inline float to_float(double a) { return __double2float_rn(a); }
__device__ inline float to_float(int32_t a) { return __int2float_rn(a); }
__device__ inline uint32_t float_bits(float a) { return __float_as_uint(a); }
__device__ inline float bits_float(uint32_t a) { return __uint_as_float(a); }
#else
inline double add(double a, double b) { return a + b; }
inline double sub(double a, double b) { return a - b; }
inline double mul(double a, double b) { return a * b; }
inline double div(double a, double b) { return a / b; }
inline float add(float a, float b) { return a + b; }
inline float mul(float a, float b) { return a * b; }
inline float sqrt(float a) { return std::sqrt(a); }
inline float to_float(double a) { return static_cast<float>(a); }
inline float to_float(int32_t a) { return static_cast<float>(a); }
inline uint32_t float_bits(float a) {
  uint32_t u;
  std::memcpy(&u, &a, sizeof u);
  return u;
}
inline float bits_float(uint32_t a) {
  float f;
  std::memcpy(&f, &a, sizeof f);
  return f;
}
#endif

}  // namespace ieee

namespace philox {

// Philox4x32 multipliers and Weyl key increments (Random123's PHILOX_M4x32_0/1, PHILOX_W32_0/1).
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Words {
  uint32_t w0, w1, w2, w3;
};

// Philox4x32-R on counter (c0, c1, c2, c3) with key (k0, k1); R = 10 by default.
T1T2_HOST_DEVICE inline Words philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                                         int rounds = kRounds) {
  for (int round = 0; round < rounds; ++round) {
    const uint64_t a = static_cast<uint64_t>(kRoundA) * c0;
    const uint64_t b = static_cast<uint64_t>(kRoundB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(b >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(b);
    c3 = static_cast<uint32_t>(a);
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return {c0, c1, c2, c3};
}

// Triton's randint4x(seed, offset) for a 64-bit offset.
T1T2_HOST_DEVICE inline Words randint4x(uint64_t seed, uint64_t offset) {
  return philox4x32(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u,
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Triton's uint_to_uniform_float for 32-bit words: [0, 1). The scale is the largest float32 with
// float32(2^31 − 1)·scale < 1; Triton writes it as the double 4.6566127342e-10 and rounds it.
T1T2_HOST_DEVICE inline float uniform(uint32_t word) {
  constexpr float kScale = static_cast<float>(4.6566127342e-10);
  const int32_t i = static_cast<int32_t>(word);  // bitcast (two's complement)
  return ieee::mul(ieee::to_float(i < 0 ? ~i : i), kScale);
}

// ---- float32 log and cos, correctly rounded (see the top of the file) ----

// Horner's rule, highest power first, every step rounded: p = c[0], then p = c[k] + z·p.
template <int N>
T1T2_HOST_DEVICE inline double horner(double z, const double (&c)[N]) {
  double p = c[0];
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int k = 1; k < N; ++k) p = ieee::add(c[k], ieee::mul(z, p));
  return p;
}

// log x for a positive normal float32 x: x = m·2^e with m in [√½, √2), log m = 2 atanh s =
// 2(s + s³/3 + s⁵/5 + …) with s = (m−1)/(m+1), |s| ≤ 0.1716 (terms to s²³: truncation < 1e-19
// relative), e·ln 2 in two parts (fdlibm's ln2_hi has 11 trailing zero bits: e·ln2_hi is exact).
T1T2_HOST_DEVICE inline float log_float(float x) {
  constexpr double kLn2Hi = 0x1.62e42feep-1, kLn2Lo = 0x1.a39ef35793c76p-33, kSqrt2 = 0x1.6a09e667f3bcdp+0;
  const uint32_t bits = ieee::float_bits(x);
  int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  double m = ieee::bits_float((bits & 0x007FFFFFu) | 0x3F800000u);  // [1, 2), exact
  const bool halve = m > kSqrt2;
  m = halve ? ieee::mul(m, 0.5) : m;
  e += halve ? 1 : 0;
  const double s = ieee::div(ieee::sub(m, 1.0), ieee::add(m, 1.0));
  const double z = ieee::mul(s, s);
  constexpr double kSeries[] = {1.0 / 23, 1.0 / 21, 1.0 / 19, 1.0 / 17, 1.0 / 15, 1.0 / 13,
                                1.0 / 11, 1.0 / 9,  1.0 / 7,  1.0 / 5,  1.0 / 3};
  const double p = horner(z, kSeries);
  const double two_s = ieee::add(s, s);
  const double log_m = ieee::add(two_s, ieee::mul(ieee::mul(two_s, z), p));
  const double ed = static_cast<double>(e);
  return ieee::to_float(ieee::add(ieee::mul(ed, kLn2Hi), ieee::add(ieee::mul(ed, kLn2Lo), log_m)));
}

// cos t for a float32 t in [0, 8): t = k·π/2 + r with k = ⌊t·2/π + ½⌋ ≤ 5 and |r| ≤ π/4 (+ an
// ulp), π/2 in two parts (fdlibm's pio2_1 has 33 significant bits, so t − k·pio2_1 is exact), then
// Taylor series of sin r (to r¹⁷) and cos r (to r¹⁸), truncation < 1e-18, picked by k mod 4.
T1T2_HOST_DEVICE inline float cos_float(float t) {
  constexpr double kTwoOverPi = 0x1.45f306dc9c883p-1, kPio2Hi = 0x1.921fb544p+0, kPio2Lo = 0x1.0b4611a626331p-34;
  const double x = t;
  const int32_t k = static_cast<int32_t>(ieee::add(ieee::mul(x, kTwoOverPi), 0.5));
  const double kd = static_cast<double>(k);
  const double r = ieee::sub(ieee::sub(x, ieee::mul(kd, kPio2Hi)), ieee::mul(kd, kPio2Lo));
  const double z = ieee::mul(r, r);
  // sin r = r + r·z·S(z), S = −1/3! + z/5! − … + z⁷/17!
  // cos r = 1 + z·C(z),   C = −1/2! + z/4! − … − z⁸/18!
  constexpr double kSin[] = {1.0 / 355687428096000.0, -1.0 / 1307674368000.0, 1.0 / 6227020800.0,
                             -1.0 / 39916800.0,       1.0 / 362880.0,         -1.0 / 5040.0,
                             1.0 / 120.0,             -1.0 / 6.0};
  constexpr double kCos[] = {-1.0 / 6402373705728000.0, 1.0 / 20922789888000.0, -1.0 / 87178291200.0,
                             1.0 / 479001600.0,         -1.0 / 3628800.0,       1.0 / 40320.0,
                             -1.0 / 720.0,              1.0 / 24.0,             -1.0 / 2.0};
  const double sin_r = ieee::add(r, ieee::mul(ieee::mul(r, z), horner(z, kSin)));
  const double cos_r = ieee::add(1.0, ieee::mul(z, horner(z, kCos)));
  const int32_t quadrant = k & 3;  // cos(r + kπ/2) = cos r, −sin r, −cos r, sin r
  const double even = quadrant == 0 ? cos_r : -cos_r;
  const double odd = quadrant == 3 ? sin_r : -sin_r;
  return ieee::to_float((quadrant & 1) ? odd : even);
}

// Triton's pair_uniform_to_normal, first output: u1 = max(1e-7, u1), r cos θ in float32.
T1T2_HOST_DEVICE inline float box_muller(float u1, float u2) {
  constexpr float kMinUniform = static_cast<float>(1.0e-7), kTwoPi = static_cast<float>(6.283185307179586);
  u1 = u1 > kMinUniform ? u1 : kMinUniform;
  const float radius = ieee::sqrt(ieee::mul(-2.0f, log_float(u1)));
  return ieee::mul(radius, cos_float(ieee::mul(kTwoPi, u2)));
}

// ε = randn(seed, offset): a standard normal float32, a pure function of (seed, offset).
T1T2_HOST_DEVICE inline float randn(uint64_t seed, uint64_t offset) {
  const Words w = randint4x(seed, offset);
  return box_muller(uniform(w.w0), uniform(w.w1));
}

}  // namespace philox
}  // namespace t1t2
