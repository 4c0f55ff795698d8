// A parameter dtype as the CUDA kernels' storage code (t1t2/enums.h): one mapping for every
// binding in csrc/cuda/. The callers' input checks accept only these four dtypes.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "t1t2/enums.h"

namespace t1t2 {

inline Storage storage_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return Storage::Float64;
    case at::kFloat: return Storage::Float32;
    case at::kBFloat16: return Storage::BFloat16;
    case at::kHalf: return Storage::Float16;
    default: TORCH_CHECK(false, "t1t2: no CUDA storage for dtype ", t);
  }
  return Storage::Float32;  // not reached
}

}  // namespace t1t2
