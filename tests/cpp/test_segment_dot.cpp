// C++ unit test of the CPU segmented dot product: against a naive double loop, through the
// dispatcher, for determinism across thread counts, and for its input errors. Run by ctest.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "cpu/segment_dot.h"
#include "t1t2/math.h"

static int failures = 0;
static int checks = 0;
#define EXPECT(cond, ...)                                            \
  do {                                                              \
    ++checks;                                                       \
    if (!(cond)) {                                                  \
      ++failures;                                                   \
      std::printf("FAILED %s:%d: %s  ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                     \
      std::printf("\n");                                            \
    }                                                               \
  } while (0)

using t1t2::PenaltyKind;

static std::vector<double> naive(const at::Tensor& u, const at::Tensor& theta, int64_t groups, PenaltyKind kind) {
  auto ud = u.to(at::kDouble).contiguous(), td = theta.to(at::kDouble).contiguous();
  const double* up = ud.data_ptr<double>();
  const double* tp = td.data_ptr<double>();
  std::vector<double> out(groups, 0.0);
  const int64_t inner = groups ? theta.numel() / groups : 0;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = g * inner; i < (g + 1) * inner; ++i) out[g] += up[i] * t1t2::penalty_mixed(kind, tp[i]);
  return out;
}

// num_groups for per layer (1), per unit (a divisor standing in for rows) and per element (numel).
static std::vector<int64_t> groupings(int64_t numel) {
  if (numel == 0) return {0, 1};
  std::vector<int64_t> groups{1};
  for (int64_t d = 2; d * d <= numel; ++d)
    if (numel % d == 0) {
      groups.push_back(d);
      break;
    }
  if (numel > 1) groups.push_back(numel);
  return groups;
}

static const char* kind_name(PenaltyKind kind) { return kind == PenaltyKind::L2 ? "l2" : "l1"; }

static std::string error_of(const std::function<void()>& call) {
  try {
    call();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

static void expect_error(const std::function<void()>& call, const std::string& needle) {
  const std::string message = error_of(call);
  EXPECT(message.find(needle) != std::string::npos, "expected an error containing \"%s\", got \"%s\"",
         needle.c_str(), message.c_str());
}

static void test_math() {
  EXPECT(t1t2::penalty_grad(PenaltyKind::L2, 3.0, 0.5) == 3.0, "L2 grad = 2 c theta");
  EXPECT(t1t2::penalty_grad(PenaltyKind::L1, -3.0, 0.5) == -0.5, "L1 grad = c sign(theta)");
  EXPECT(t1t2::penalty_grad(PenaltyKind::L1, 0.0f, 0.5f) == 0.0f, "L1 grad at 0");
  EXPECT(t1t2::penalty_mixed(PenaltyKind::L2, -1.5) == -3.0, "L2 mixed = 2 theta");
  EXPECT(t1t2::penalty_mixed(PenaltyKind::L1, 2.0f) == 1.0f, "sign(2) = 1");
  EXPECT(t1t2::penalty_mixed(PenaltyKind::L1, -1e-30) == -1.0, "sign(-tiny) = -1");
  EXPECT(t1t2::penalty_mixed(PenaltyKind::L1, 0.0) == 0.0, "sign(0) = 0");
  EXPECT(t1t2::penalty_mixed(PenaltyKind::L1, -0.0) == 0.0, "sign(-0) = 0");
  EXPECT(t1t2::penalty_mixed(PenaltyKind::L1, std::nan("")) == 0.0, "sign(NaN) = 0, as torch.sign");
}

static void test_against_naive() {
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("t1t2::penalty_segment_dot", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, c10::string_view)>();
  at::manual_seed(0);
  for (auto dtype : {at::kDouble, at::kFloat, at::kBFloat16}) {
    // 7 * 65537: seven groups of several reduction blocks each, with a ragged last block.
    for (int64_t numel : {0, 1, 7, 1023, 1025, 65537, 7 * 65537}) {
      auto u = at::randn({numel}, at::TensorOptions().dtype(dtype));
      auto theta = at::randn({numel}, at::TensorOptions().dtype(dtype));
      for (int64_t groups : groupings(numel)) {
        for (auto kind : {PenaltyKind::L2, PenaltyKind::L1}) {
          const auto want = naive(u, theta, groups, kind);
          const auto direct = t1t2::penalty_segment_dot_cpu(u, theta, groups, kind_name(kind));
          const auto via_dispatcher = op.call(u, theta, groups, kind_name(kind));
          EXPECT(direct.scalar_type() == (dtype == at::kDouble ? at::kDouble : at::kFloat), "output dtype");
          EXPECT(direct.dim() == 1 && direct.numel() == groups, "numel %ld groups %ld", (long)numel, (long)groups);
          EXPECT(at::equal(direct, via_dispatcher), "dispatcher result differs (numel %ld)", (long)numel);
          // Both accumulate in double; the only rounding left is the output cast.
          const double tol = direct.scalar_type() == at::kDouble ? 1e-12 : 1.2e-7;
          const auto got = direct.to(at::kDouble).contiguous();
          for (int64_t g = 0; g < groups; ++g) {
            const double err = std::abs(got.data_ptr<double>()[g] - want[g]);
            EXPECT(err <= tol * std::abs(want[g]) + 1e-300, "%s %s numel %ld group %ld: got %.17g want %.17g",
                   kind_name(kind), c10::toString(dtype), (long)numel, (long)g, got.data_ptr<double>()[g], want[g]);
          }
        }
      }
    }
  }
  // Non-contiguous input is read in its logical order.
  auto u = at::randn({40, 30}, at::kDouble).t();
  auto theta = at::randn({30, 40}, at::kDouble);
  const auto want = naive(u, theta, 30, PenaltyKind::L2);
  const auto got = t1t2::penalty_segment_dot_cpu(u, theta, 30, "l2");
  for (int64_t g = 0; g < 30; ++g)
    EXPECT(std::abs(got.data_ptr<double>()[g] - want[g]) <= 1e-12 * std::abs(want[g]), "non-contiguous group %ld",
           (long)g);
}

static void test_thread_count_does_not_change_bits() {
  const int before = at::get_num_threads();
  for (auto dtype : {at::kDouble, at::kFloat}) {
    auto u = at::randn({3 * 200003}, dtype), theta = at::randn({3 * 200003}, dtype);
    for (int64_t groups : {int64_t{1}, int64_t{3}, int64_t{3 * 200003}}) {
      for (auto kind : {"l2", "l1"}) {
        at::set_num_threads(1);
        const auto one = t1t2::penalty_segment_dot_cpu(u, theta, groups, kind);
        at::set_num_threads(2);
        const auto two = t1t2::penalty_segment_dot_cpu(u, theta, groups, kind);
        const auto again = t1t2::penalty_segment_dot_cpu(u, theta, groups, kind);
        EXPECT(at::equal(one, two) && at::equal(two, again), "%s groups %ld: result depends on the thread count",
               kind, (long)groups);
      }
    }
  }
  at::set_num_threads(before);
}

static void test_errors() {
  const auto f = at::randn({6});
  expect_error([&] { t1t2::penalty_segment_dot_cpu(f, at::randn({7}), 1, "l2"); },
               "u has shape [6] but theta has shape [7]");
  expect_error([&] { t1t2::penalty_segment_dot_cpu(f, f.to(at::kDouble), 1, "l2"); },
               "u has dtype Float but theta has dtype Double");
  expect_error([&] { t1t2::penalty_segment_dot_cpu(f.to(at::kInt), f.to(at::kInt), 1, "l2"); },
               "expected floating-point u and theta (Double, Float, BFloat16 or Half), got Int");
  const auto meta = at::empty({6}, at::TensorOptions().device(at::kMeta));
  expect_error([&] { t1t2::penalty_segment_dot_cpu(f, meta, 1, "l2"); }, "u is on cpu but theta is on meta");
  expect_error([&] { t1t2::penalty_segment_dot_cpu(meta, meta, 1, "l2"); }, "got u and theta on meta, expected cpu");
  expect_error([&] { t1t2::penalty_segment_dot_cpu(f, f, 4, "l2"); }, "num_groups=4 does not divide numel=6");
  expect_error([&] { t1t2::penalty_segment_dot_cpu(f, f, 0, "l2"); }, "num_groups=0 does not divide numel=6");
  expect_error([&] { t1t2::penalty_segment_dot_cpu(f, f, -2, "l2"); }, "num_groups must be >= 0, got -2");
  expect_error([&] { t1t2::penalty_segment_dot_cpu(f, f, 1, "L2"); }, "unknown kind 'L2'; expected 'l2' or 'l1'");
  // Empty input with zero or one group is valid: zeros.
  const auto empty = at::empty({0});
  EXPECT(t1t2::penalty_segment_dot_cpu(empty, empty, 0, "l2").numel() == 0, "0 groups of nothing");
  EXPECT(at::equal(t1t2::penalty_segment_dot_cpu(empty, empty, 1, "l1"), at::zeros({1})), "1 group of nothing");
}

int main() {
  test_math();
  test_against_naive();
  test_thread_count_does_not_change_bits();
  test_errors();
  std::printf("%s: %d checks, %d failures\n", failures ? "FAILED" : "OK", checks, failures);
  return failures ? 1 : 0;
}
