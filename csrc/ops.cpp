// Operator schemas of the t1t2 namespace and their CPU implementations.
#include <torch/library.h>

#include "cpu/segment_dot.h"

TORCH_LIBRARY(t1t2, m) {
  // h_g = Σ_{i∈g} u_i m_i(θ_i), m = 2θ (l2) or sign θ (l1), over num_groups contiguous equal groups.
  m.def("penalty_segment_dot(Tensor u, Tensor theta, int num_groups, str kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(t1t2, CPU, m) {
  m.impl("penalty_segment_dot", &t1t2::penalty_segment_dot_cpu);
}
