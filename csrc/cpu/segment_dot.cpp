#include "cpu/segment_dot.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "t1t2/math.h"

namespace t1t2 {
namespace {

PenaltyKind parse_kind(c10::string_view kind) {
  if (kind == "l2") return PenaltyKind::L2;
  if (kind == "l1") return PenaltyKind::L1;
  TORCH_CHECK(false, "t1t2::penalty_segment_dot: unknown kind '", kind, "'; expected 'l2' or 'l1'");
}

// Sum of u_i m_i over [begin, end) in double. Eight independent accumulators in a fixed pattern
// let the compiler vectorize while the order of additions stays the same on every run. The kind is
// a template argument so the branch in penalty_mixed folds away inside the loop.
template <PenaltyKind kKind, typename scalar_t>
double block_dot(const scalar_t* u, const scalar_t* theta, int64_t begin, int64_t end) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes)
    for (int l = 0; l < kLanes; ++l)
      acc[l] += static_cast<double>(u[i + l]) * penalty_mixed(kKind, static_cast<double>(theta[i + l]));
  for (int l = 0; i < end; ++i, ++l)
    acc[l] += static_cast<double>(u[i]) * penalty_mixed(kKind, static_cast<double>(theta[i]));
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void check_inputs(const at::Tensor& u, const at::Tensor& theta, int64_t num_groups) {
  const char* op = "t1t2::penalty_segment_dot";
  TORCH_CHECK(u.device() == theta.device(), op, ": u is on ", u.device(), " but theta is on ", theta.device(),
              "; move both to one device");
  TORCH_CHECK(theta.device().is_cpu(), op, ": the CPU kernel got tensors on ", theta.device());
  TORCH_CHECK(u.scalar_type() == theta.scalar_type(), op, ": u has dtype ", u.scalar_type(),
              " but theta has dtype ", theta.scalar_type(), "; cast them to one dtype");
  TORCH_CHECK(at::isFloatingType(theta.scalar_type()), op, ": expected floating-point tensors, got ",
              theta.scalar_type());
  TORCH_CHECK(u.sizes() == theta.sizes(), op, ": u has shape ", u.sizes(), " but theta has shape ",
              theta.sizes());
  const int64_t numel = theta.numel();
  TORCH_CHECK(num_groups >= 0, op, ": num_groups must be >= 0, got ", num_groups);
  TORCH_CHECK((num_groups == 0 && numel == 0) || (num_groups > 0 && numel % num_groups == 0), op,
              ": num_groups=", num_groups, " does not divide numel=", numel);
}

}  // namespace

at::Tensor penalty_segment_dot_cpu(const at::Tensor& u_in, const at::Tensor& theta_in, int64_t num_groups,
                                   c10::string_view kind_name) {
  check_inputs(u_in, theta_in, num_groups);
  const PenaltyKind kind = parse_kind(kind_name);
  const auto out_dtype = theta_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto out_options = theta_in.options().dtype(out_dtype);
  const int64_t numel = theta_in.numel();
  if (numel == 0) return at::zeros({num_groups}, out_options);  // empty groups sum to 0
  at::Tensor out = at::empty({num_groups}, out_options);         // every entry is written below

  const at::Tensor u = u_in.contiguous();
  const at::Tensor theta = theta_in.contiguous();
  const int64_t inner = numel / num_groups;
  const int64_t blocks_per_group = (inner + kReduceBlock - 1) / kReduceBlock;
  const int64_t num_blocks = num_groups * blocks_per_group;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta.scalar_type(), "penalty_segment_dot", [&] {
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const scalar_t* tp = theta.const_data_ptr<scalar_t>();
    auto dot = [&](int64_t begin, int64_t end) {
      return kind == PenaltyKind::L2 ? block_dot<PenaltyKind::L2>(up, tp, begin, end)
                                     : block_dot<PenaltyKind::L1>(up, tp, begin, end);
    };
    auto reduce_into = [&](auto* op) {
      using out_t = std::remove_pointer_t<decltype(op)>;
      if (inner == 1) {
        // per="element": no reduction, one product per element (the same value block_dot gives).
        at::parallel_for(0, num_groups, kReduceBlock, [&](int64_t first, int64_t last) {
          for (int64_t i = first; i < last; ++i)
            op[i] = static_cast<out_t>(static_cast<double>(up[i]) *
                                       (kind == PenaltyKind::L2 ? penalty_mixed(PenaltyKind::L2, static_cast<double>(tp[i]))
                                                                : penalty_mixed(PenaltyKind::L1, static_cast<double>(tp[i]))));
        });
        return;
      }
      if (blocks_per_group == 1) {
        // Small groups (per unit / element): each group is one block, summed straight into the output.
        const int64_t grain = std::max<int64_t>(1, kReduceBlock / inner);
        at::parallel_for(0, num_groups, grain, [&](int64_t first, int64_t last) {
          for (int64_t g = first; g < last; ++g) op[g] = static_cast<out_t>(dot(g * inner, (g + 1) * inner));
        });
        return;
      }
      // Large groups: stage 1, one partial sum per (group, block) in parallel; stage 2, each group
      // adds its blocks in order.
      std::vector<double> partial(num_blocks);
      at::parallel_for(0, num_blocks, 1, [&](int64_t first, int64_t last) {
        for (int64_t b = first; b < last; ++b) {
          const int64_t g = b / blocks_per_group, k = b % blocks_per_group;
          partial[b] = dot(g * inner + k * kReduceBlock, g * inner + std::min(inner, (k + 1) * kReduceBlock));
        }
      });
      for (int64_t g = 0; g < num_groups; ++g) {
        double total = 0;
        for (int64_t k = 0; k < blocks_per_group; ++k) total += partial[g * blocks_per_group + k];
        op[g] = static_cast<out_t>(total);
      }
    };
    if (out_dtype == at::kDouble) reduce_into(out.mutable_data_ptr<double>());
    else reduce_into(out.mutable_data_ptr<float>());
  });
  return out;
}

}  // namespace t1t2
