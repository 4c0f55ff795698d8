#pragma once
#include <ATen/core/Tensor.h>

namespace t1t2 {

// θ ← base + scale·direction over a list of tensors in one call, saving the current θ bit-exactly
// into `save` first (when given), for the finite-difference noise hypergradient
// (docs/design.md, "T2: noise levels").
void perturb_cpu(at::TensorList params, at::TensorList save, at::TensorList base, at::TensorList direction,
                 double scale);

// θ ← save, bit-exactly: undoes perturb_ without subtracting the perturbation again.
void restore_cpu(at::TensorList params, at::TensorList save);

}  // namespace t1t2
