// C++ unit test of the CPU segmented dot product: against a naive double loop, through the
// dispatcher, and for determinism across thread counts. Run by ctest.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "cpu/segment_dot.h"
#include "t1t2/math.h"

static int failures = 0;
#define EXPECT(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      ++failures;                                                          \
      std::printf("FAILED %s:%d: %s  ", __FILE__, __LINE__, #cond);        \
      std::printf(__VA_ARGS__);                                            \
      std::printf("\n");                                                   \
    }                                                                      \
  } while (0)

static std::vector<double> naive(const at::Tensor& u, const at::Tensor& theta, int64_t groups, t1t2::PenaltyKind kind) {
  auto ud = u.to(at::kDouble).contiguous(), td = theta.to(at::kDouble).contiguous();
  const double* up = ud.data_ptr<double>();
  const double* tp = td.data_ptr<double>();
  std::vector<double> out(groups, 0.0);
  const int64_t inner = groups ? theta.numel() / groups : 0;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = g * inner; i < (g + 1) * inner; ++i) out[g] += up[i] * t1t2::penalty_mixed(kind, tp[i]);
  return out;
}

int main() {
  // Element-wise math against hand-computed values.
  EXPECT(t1t2::penalty_grad(t1t2::PenaltyKind::L2, 3.0, 0.5) == 3.0, "L2 grad");
  EXPECT(t1t2::penalty_grad(t1t2::PenaltyKind::L1, -3.0, 0.5) == -0.5, "L1 grad");
  EXPECT(t1t2::penalty_mixed(t1t2::PenaltyKind::L1, 0.0) == 0.0, "sign(0) = 0");
  EXPECT(t1t2::penalty_mixed(t1t2::PenaltyKind::L2, -1.5) == -3.0, "L2 mixed");

  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("t1t2::penalty_segment_dot", "")
                      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, c10::string_view)>();
  at::manual_seed(0);
  for (auto dtype : {at::kDouble, at::kFloat}) {
    for (int64_t numel : {0, 1, 7, 1023, 1025, 65537, 7 * 65537}) {
      auto u = at::randn({numel}, at::TensorOptions().dtype(dtype));
      auto theta = at::randn({numel}, at::TensorOptions().dtype(dtype));
      std::vector<int64_t> group_counts = numel == 0 ? std::vector<int64_t>{0, 1} : std::vector<int64_t>{1, numel};
      if (numel % 7 == 0 && numel > 0) group_counts.push_back(7);
      for (int64_t groups : group_counts) {
        for (auto kind : {t1t2::PenaltyKind::L2, t1t2::PenaltyKind::L1}) {
          const char* name = kind == t1t2::PenaltyKind::L2 ? "l2" : "l1";
          auto want = naive(u, theta, groups, kind);
          auto got = t1t2::penalty_segment_dot_cpu(u, theta, groups, name).to(at::kDouble).contiguous();
          auto via_dispatcher = op.call(u, theta, groups, name).to(at::kDouble);
          EXPECT(got.numel() == groups, "numel %ld groups %ld", (long)numel, (long)groups);
          EXPECT(at::equal(got, via_dispatcher), "dispatcher result differs (numel %ld)", (long)numel);
          const double tol = dtype == at::kDouble ? 1e-10 : 1e-4;
          for (int64_t g = 0; g < groups; ++g) {
            const double err = std::abs(got.data_ptr<double>()[g] - want[g]);
            EXPECT(err <= tol * (1.0 + std::abs(want[g])), "%s numel %ld group %ld: got %.17g want %.17g", name,
                  (long)numel, (long)g, got.data_ptr<double>()[g], want[g]);
          }
        }
      }
    }
  }

  // Same bits for any thread count.
  auto u = at::randn({3 * 200003}), theta = at::randn({3 * 200003});
  at::set_num_threads(1);
  auto one = t1t2::penalty_segment_dot_cpu(u, theta, 3, "l2");
  at::set_num_threads(2);
  auto two = t1t2::penalty_segment_dot_cpu(u, theta, 3, "l2");
  EXPECT(at::equal(one, two), "thread-count dependent result");

  // Errors name the problem.
  bool threw = false;
  try {
    t1t2::penalty_segment_dot_cpu(at::randn({6}), at::randn({6}), 4, "l2");
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("does not divide") != std::string::npos;
  }
  EXPECT(threw, "bad num_groups must raise a clear error");

  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
