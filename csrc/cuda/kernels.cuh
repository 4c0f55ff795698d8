// CUDA kernels of T1-T2 (DESIGN.md §2, §4) behind a plain C++ API: device pointers and a stream in,
// cudaError_t out. No torch headers, so nvcc compiles these files on a machine whose torch has no
// CUDA; csrc/cuda/ops_cuda.cu binds them to the torch.ops.t1t2 schemas. The element-wise math is
// t1t2/math.h, shared with the CPU kernels, whose semantics these kernels match.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "t1t2/math.h"

namespace t1t2 {
namespace cuda {

// Storage dtype of parameters and gradients (u and θ for segment_dot). Math runs in double for
// Float64 and in float for the others; optimizer state, coefficients and stash are in that compute
// type.
enum class Storage : int { Float64 = 0, Float32 = 1, BFloat16 = 2, Float16 = 3 };

// ---------------------------------------------------------------------------------------------
// t1_step: one fused T1 step over many tensors in one launch (multi-tensor apply).
//
// The host describes every tensor with a T1StepTensor and splits it into chunks of kT1StepChunk
// elements; one thread block updates one chunk. Descriptors and chunk list travel to the device as
// one contiguous table (a single host-to-device copy), so hundreds of tensors cost one launch.
// ---------------------------------------------------------------------------------------------

enum class Optimizer : int { Sgd = 0, Adam = 1 };

constexpr int64_t kT1StepChunk = 16384;  // elements per thread block

// One parameter tensor. Device pointers; param and grad in the storage dtype, the others in the
// compute type; null means absent (no momentum, no such penalty, no stash). Element i of a
// penalty uses coefficient c[i / inner].
struct T1StepTensor {
  void* param;
  const void* grad;
  void* state1;  // momentum buffer (sgd, μ > 0) or exp_avg (adam)
  void* state2;  // exp_avg_sq (adam)
  const void* l2;
  const void* l1;
  const void* decay;  // decoupled L2
  int64_t l2_inner;
  int64_t l1_inner;
  int64_t decay_inner;
  void* stash_theta;  // receives the pre-step θ
  void* stash_jac;    // receives adam's ∂θ⁺/∂ĝ
  int64_t numel;
  double bias_correction1;  // 1−β1ᵗ (adam; 1 for sgd)
  double bias_correction2;  // 1−β2ᵗ
  double adam_a;            // (1−β1)/(1−β1ᵗ), computed in double by the host
};

struct T1StepChunk {
  int64_t tensor;  // index into the descriptor array
  int64_t begin;   // first element of the chunk
};

// Scalars shared by every tensor, in double; the launcher casts them to the compute type once.
// 1−β1 and 1−β2 are computed in double by the caller (in float, 1 − float(0.999) is off by 1e-5).
struct T1StepScalars {
  double lr;
  double momentum;
  double beta1;
  double one_minus_beta1;
  double beta2;
  double one_minus_beta2;
  double eps;
  bool nesterov;
};

// Byte layout of the table: [T1StepTensor × num_tensors | padding | T1StepChunk × num_chunks].
struct T1StepTableLayout {
  int64_t num_tensors;
  int64_t num_chunks;
  size_t chunks_offset;
  size_t bytes;
};

// Where the table's parts live on the device.
struct T1StepTable {
  const T1StepTensor* tensors;
  const T1StepChunk* chunks;
  int64_t num_tensors;
  int64_t num_chunks;
};

// Host side: the layout for these descriptors, then the table written into a host buffer of
// layout.bytes bytes (any alignment), ready to be copied to a device buffer as one block.
T1StepTableLayout t1_step_table_layout(const T1StepTensor* tensors, int64_t num_tensors);
void t1_step_fill_table(const T1StepTensor* tensors, const T1StepTableLayout& layout, void* host_table);
// The view of a copied table; device_table must be aligned to 16 bytes (cudaMalloc gives 256).
T1StepTable t1_step_table_view(const void* device_table, const T1StepTableLayout& layout);

// Enqueues the update of every chunk of the table on `stream`, in place. Returns the launch error
// (cudaSuccess when there is nothing to do); errors during execution surface at the next sync.
cudaError_t launch_t1_step(Storage storage, Optimizer optimizer, const T1StepTable& table,
                           const T1StepScalars& scalars, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// penalty_segment_dot: out_g = Σ_{i∈g} u_i m_i(θ_i) over num_groups contiguous groups of `inner`
// elements, accumulated in double. Deterministic: the partition of the data and the order of every
// addition depend on `inner` and the constants below only, never on the launch configuration, the
// SM count or scheduling.
//   inner == 1                       one product per output;
//   inner <= kSegmentDotWarpMax      one warp per group, lanes stride by 32, fixed shuffle tree;
//   otherwise                        stage 1: one block per tile of kSegmentDotTile elements of a
//                                    group → a double partial; stage 2: one block per group adds
//                                    its partials in a fixed pattern. A group of one tile is
//                                    written straight to out by stage 1.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kSegmentDotWarpMax = 2048;
constexpr int64_t kSegmentDotTile = 8192;

// Bytes of double workspace launch_penalty_segment_dot needs for this problem (0 if none).
size_t penalty_segment_dot_workspace_bytes(int64_t num_groups, int64_t inner);

// u and θ in the storage dtype, both num_groups * inner contiguous elements; out: num_groups
// doubles (Float64) or floats (otherwise); workspace: at least
// penalty_segment_dot_workspace_bytes(...) bytes of device memory aligned to 8 (null if that is 0).
// inner == 0 writes zeros (empty groups sum to 0).
cudaError_t launch_penalty_segment_dot(Storage storage, PenaltyKind kind, const void* u, const void* theta,
                                       int64_t num_groups, int64_t inner, void* out, void* workspace,
                                       cudaStream_t stream);

}  // namespace cuda
}  // namespace t1t2
