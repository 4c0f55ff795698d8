// C++ unit test of the element-wise math in csrc/include/t1t2/math.h against hand-computed values
// (all exact in binary floating point, so the checks are equalities). Run by ctest.
#include <cstdio>

#include "t1t2/math.h"

static int failures = 0;
#define EXPECT_EQ(actual, expected)                                                               \
  do {                                                                                            \
    const double a_ = (actual), e_ = (expected);                                                  \
    if (a_ != e_) {                                                                               \
      ++failures;                                                                                 \
      std::printf("FAILED %s:%d: %s = %.17g, expected %.17g\n", __FILE__, __LINE__, #actual, a_, e_); \
    }                                                                                             \
  } while (0)

template <typename T>
void check() {
  using t1t2::PenaltyKind;
  // penalties: Ω = Σcθ² → 2cθ, m = 2θ;  Ω = Σc|θ| → c·sign θ, m = sign θ (sign 0 = 0)
  EXPECT_EQ(t1t2::penalty_grad(PenaltyKind::L2, T(3), T(0.5)), 3.0);
  EXPECT_EQ(t1t2::penalty_grad(PenaltyKind::L1, T(-3), T(0.5)), -0.5);
  EXPECT_EQ(t1t2::penalty_grad(PenaltyKind::L1, T(0), T(0.5)), 0.0);
  EXPECT_EQ(t1t2::penalty_mixed(PenaltyKind::L2, T(-1.5)), -3.0);
  EXPECT_EQ(t1t2::penalty_mixed(PenaltyKind::L1, T(2)), 1.0);

  // SGD: b = 0.5·1 + 2 = 2.5; heavy ball d = b; Nesterov d = 2 + 0.5·2.5 = 3.25
  T buf = 1;
  EXPECT_EQ(t1t2::sgd_direction(T(2), buf, T(0.5), false), 2.5);
  EXPECT_EQ(buf, 2.5);
  buf = 1;
  EXPECT_EQ(t1t2::sgd_direction(T(2), buf, T(0.5), true), 3.25);
  buf = 0;  // from a zero buffer the first step is PyTorch's b = ĝ
  EXPECT_EQ(t1t2::sgd_direction(T(2), buf, T(0.9), false), 2.0);
  EXPECT_EQ(t1t2::sgd_jacobian(T(0.125), T(0.5), false), -0.125);
  EXPECT_EQ(t1t2::sgd_jacobian(T(0.125), T(0.5), true), -0.1875);

  // Adam with ĝ = 2, m = 1, s = 4, β1 = 0.5, β2 = 0.75, 1−β1ᵗ = 0.5, 1−β2ᵗ = 0.25 (passed as their
  // reciprocals 2 and 4), ε = 0: m = 1.5, s = 4, m̂ = 3, ŝ = 16, d = 3/4;
  // D = a/4 − 3·0.25·2/(0.25·4·16) with a = 0.5/0.5 = 1 = 0.25 − 0.09375 = 0.15625, J = −0.125·D.
  T m = 1, s = 4, m_hat, sqrt_s, denom;
  EXPECT_EQ(t1t2::adam_direction(T(2), m, s, T(0.5), T(0.5), T(0.75), T(0.25), T(2), T(4), T(0), m_hat, sqrt_s,
                                 denom),
            0.75);
  EXPECT_EQ(m, 1.5);
  EXPECT_EQ(s, 4.0);
  EXPECT_EQ(m_hat, 3.0);
  EXPECT_EQ(sqrt_s, 4.0);
  EXPECT_EQ(t1t2::adam_jacobian(T(2), m_hat, sqrt_s, denom, T(0.125), T(1), T(0.25), T(0.25)), -0.125 * 0.15625);
  // ŝ = 0: the second term takes its limit 0, leaving −η·a/ε
  EXPECT_EQ(t1t2::adam_jacobian(T(0), T(0), T(0), T(0.25), T(0.125), T(1), T(0.25), T(0.25)), -0.5);
}

int main() {
  check<float>();
  check<double>();
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
