// The integer codes the ops agree on, defined once for the CPU and CUDA kernels (their Python
// twins: t1t2_fast/_dtypes.py). Plain C++ with no torch headers, so nvcc can compile it on its own.
#pragma once

#include <cstdint>

namespace t1t2 {

// Penalty of a coefficient: Ω = Σ c θ² (L2) or Σ c |θ| (L1).
enum class PenaltyKind : int { L2 = 0, L1 = 1 };

// segment_kind of penalty_hypergrad: a coupled penalty, L2 applied outside the preconditioner, or a
// learning-rate scale (Σ v·(θ⁺ − θ)).
enum class SegmentKind : int64_t { L2 = 0, L1 = 1, DecoupledL2 = 2, Lr = 3 };

// The T1 optimizer of t1_step_.
enum class Optimizer : int { Sgd = 0, Adam = 1 };

// Storage dtype of parameters and gradients (u and θ for segment_dot). Math runs in double for
// Float64 and in float for the others; optimizer state, coefficients and stash are in that compute
// type.
enum class Storage : int { Float64 = 0, Float32 = 1, BFloat16 = 2, Float16 = 3 };

namespace noise {
// y = x + σε or y = x(1 + σε).
enum class Mode : int { Additive = 0, Multiplicative = 1 };
}  // namespace noise

}  // namespace t1t2
