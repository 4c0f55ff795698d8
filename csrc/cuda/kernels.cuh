// CUDA kernels of T1-T2 (docs/design.md, "The T1 step", "The T2 step" and "Backends and the op
// contract") behind a plain C++ API: device pointers and a stream in, cudaError_t out. No torch
// headers, so nvcc compiles these files on a machine whose torch has no CUDA;
// csrc/cuda/ops_cuda.cu binds them to the torch.ops.t1t2 schemas. The element-wise math is
// t1t2/math.h, shared with the CPU kernels, whose semantics these kernels match.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "t1t2/math.h"

namespace t1t2 {
namespace cuda {

// The codes of t1t2/enums.h, under the names the CUDA sources use.
using ::t1t2::Optimizer;
using ::t1t2::SegmentKind;
using ::t1t2::Storage;

// ---------------------------------------------------------------------------------------------
// Multi-tensor tables (t1_step, perturb): the host describes every tensor with a descriptor D and
// splits it into fixed-size chunks; one thread block handles one chunk. Descriptors and chunk list
// travel to the device as one contiguous table (a single host-to-device copy), so hundreds of
// tensors cost one launch. Byte layout: [D × num_tensors | padding to 16 | TensorChunk × num_chunks].
// ---------------------------------------------------------------------------------------------

struct TensorChunk {
  int64_t tensor;  // index into the descriptor array
  int64_t begin;   // first element of the chunk
};

struct TableLayout {
  int64_t num_tensors;
  int64_t num_chunks;
  size_t chunks_offset;
  size_t bytes;
};

// Where the table's parts live on the device.
template <typename D>
struct TensorTable {
  const D* tensors;
  const TensorChunk* chunks;
  int64_t num_tensors;
  int64_t num_chunks;
};

// Host side: the layout for these descriptors (each with a `numel`), chunks of chunk_numel elements.
template <typename D>
TableLayout table_layout(const D* tensors, int64_t num_tensors, int64_t chunk_numel) {
  int64_t num_chunks = 0;
  for (int64_t t = 0; t < num_tensors; ++t) num_chunks += (tensors[t].numel + chunk_numel - 1) / chunk_numel;
  const size_t chunks_offset = (static_cast<size_t>(num_tensors) * sizeof(D) + 15) / 16 * 16;
  return {num_tensors, num_chunks, chunks_offset, chunks_offset + static_cast<size_t>(num_chunks) * sizeof(TensorChunk)};
}

// Writes the table into a host buffer of layout.bytes bytes (any alignment), ready to be copied to a
// device buffer as one block.
template <typename D>
void fill_table(const D* tensors, const TableLayout& layout, int64_t chunk_numel, void* host_table) {
  auto* out = static_cast<unsigned char*>(host_table);
  const size_t descriptor_bytes = static_cast<size_t>(layout.num_tensors) * sizeof(D);
  if (descriptor_bytes) std::memcpy(out, tensors, descriptor_bytes);
  std::memset(out + descriptor_bytes, 0, layout.chunks_offset - descriptor_bytes);
  size_t at = layout.chunks_offset;
  for (int64_t t = 0; t < layout.num_tensors; ++t) {
    for (int64_t begin = 0; begin < tensors[t].numel; begin += chunk_numel) {
      const TensorChunk chunk{t, begin};
      std::memcpy(out + at, &chunk, sizeof chunk);
      at += sizeof chunk;
    }
  }
}

// The view of a copied table; device_table must be aligned to 16 bytes (cudaMalloc gives 256).
template <typename D>
TensorTable<D> table_view(const void* device_table, const TableLayout& layout) {
  const auto* base = static_cast<const unsigned char*>(device_table);
  return {reinterpret_cast<const D*>(base), reinterpret_cast<const TensorChunk*>(base + layout.chunks_offset),
          layout.num_tensors, layout.num_chunks};
}

// ---------------------------------------------------------------------------------------------
// t1_step: one fused T1 step over many tensors in one launch (multi-tensor apply).
//
// The host describes every tensor with a T1StepTensor and splits it into chunks of kT1StepChunk
// elements; one thread block updates one chunk. Descriptors and chunk list travel to the device as
// one contiguous table (a single host-to-device copy), so hundreds of tensors cost one launch.
// ---------------------------------------------------------------------------------------------

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
  double inv_bias_correction1;       // 1/(1−β1ᵗ), in double by the host (math.h's adam_direction)
  double inv_bias_correction2;  // 1/(1−β2ᵗ)
  const void* lr_scale;     // null, or this tensor's entry of lr_scale (compute type): η = T(lr)·*lr_scale
};

using T1StepChunk = TensorChunk;

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
  // Mixed precision and the non-finite guard (device pointers to one float each, null if absent):
  // the update uses g·(1/*grad_scale) and writes nothing where *found_inf > 0. Read on the device,
  // so neither needs a host sync.
  const float* grad_scale;
  const float* found_inf;
};

using T1StepTableLayout = TableLayout;
using T1StepTable = TensorTable<T1StepTensor>;

inline T1StepTableLayout t1_step_table_layout(const T1StepTensor* tensors, int64_t num_tensors) {
  return table_layout(tensors, num_tensors, kT1StepChunk);
}
inline void t1_step_fill_table(const T1StepTensor* tensors, const T1StepTableLayout& layout, void* host_table) {
  fill_table(tensors, layout, kT1StepChunk, host_table);
}
inline T1StepTable t1_step_table_view(const void* device_table, const T1StepTableLayout& layout) {
  return table_view<T1StepTensor>(device_table, layout);
}

// Enqueues the update of every chunk of the table on `stream`, in place. Returns the launch error
// (cudaSuccess when there is nothing to do); errors during execution surface at the next sync.
cudaError_t launch_t1_step(Storage storage, Optimizer optimizer, const T1StepTable& table,
                           const T1StepScalars& scalars, cudaStream_t stream);

// The scan of check_finite: sets *found_inf = 1 if any g·(1/*grad_scale) of the table (computed in
// the compute type) is Inf or NaN. Enqueued before launch_t1_step on the same stream, whose blocks
// then see the flag and write nothing. grad_scale may be null (scale 1).
cudaError_t launch_t1_step_scan(Storage storage, const T1StepTable& table, const float* grad_scale, float* found_inf,
                                cudaStream_t stream);

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

// ---------------------------------------------------------------------------------------------
// penalty_hypergrad: the T2 penalty hypergradients of many (hyperparameter, tensor) segments in one
// pass, same semantics as csrc/cpu/penalty_hypergrad.cpp. Segment s reduces its tensor over
// `groups` contiguous groups of `inner` elements:
//   L2 / L1       Σ_{i∈g} u_i m_i(θ_i) with u_i = J_i·v_i rounded to the compute type (J from `jac`,
//                 or `jac_scalar` where jac is null);
//   DecoupledL2   −lr · Σ_{i∈g} v_i·2θ_i;
//   Lr            Σ_{i∈g} v_i·(θ⁺_i − θ_i), θ⁺ from `updated`, the difference rounded in the compute type.
// Products and sums in double, the result cast to the compute type (float32 or float64 only).
// Deterministic: the work items and the order of every addition follow from each segment's `inner`
// and the constants below only, never from the launch configuration:
//   inner < kHypergradThreadMax      one thread per group, elements added in order;
//   inner <= kSegmentDotWarpMax      one warp per group, as penalty_segment_dot;
//   otherwise                        tiles of kSegmentDotTile elements (one block each) into double
//                                    partials, then one block per group adds them in a fixed
//                                    pattern; a group of one tile is written straight to out.
// All segments run in one launch (plus one for the partials): the host plans the items, the device
// finds an item's segment by binary search over the segment table.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kHypergradThreadMax = 32;

// One segment. Device pointers in the compute type; the scheduling fields below the line are
// written by penalty_hypergrad_plan.
struct HypergradSegment {
  const void* v;
  const void* theta;
  const void* jac;  // null: jac_scalar for every element
  const void* updated;  // Lr segments: θ⁺ in the compute type (else null)
  double jac_scalar;
  SegmentKind kind;
  int64_t groups;
  int64_t inner;       // elements per group (0 when the tensor is empty)
  int64_t out_offset;  // index of the segment's first result in out
  // ---- planned ----
  int64_t first_item;       // the segment's work items are [first_item, first_item + items)
  int64_t items;
  int64_t tiles_per_group;  // tile path only (else 0)
  int64_t first_partial;    // groups · tiles_per_group partials from here (tile path, > 1 tile)
  int64_t first_split;      // index among all groups of more than one tile
  int64_t split_groups;     // this segment's groups of more than one tile
};

struct HypergradPlan {
  int64_t num_segments;
  int64_t num_items;
  int64_t num_partials;      // doubles of workspace
  int64_t num_split_groups;  // groups of more than one tile, over all segments
};

// Host side: fills the planned fields of every segment (out_offset, groups, inner and kind must be
// set) and returns the totals. The segments then go to the device as one array.
HypergradPlan penalty_hypergrad_plan(HypergradSegment* segments, int64_t num_segments);
size_t penalty_hypergrad_workspace_bytes(const HypergradPlan& plan);

// storage: Float64 or Float32 (the compute dtype); segments: the planned array on the device;
// out: the segments' results in that dtype; workspace: penalty_hypergrad_workspace_bytes(plan)
// bytes of device memory aligned to 8 (null if 0).
cudaError_t launch_penalty_hypergrad(Storage storage, const HypergradSegment* segments, const HypergradPlan& plan,
                                     double lr, void* out, void* workspace, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// perturb_ / restore_: θ ← base + scale·direction over many tensors in one launch, first copying θ
// bit-exactly into save (when not null); restore copies save back into θ bit-exactly. Same table
// scheme as t1_step: one thread block per chunk of kPerturbChunk elements. base and direction are
// in the compute type; base + scale·direction is rounded in the compute type at each step (no FMA
// contraction, as the CPU kernel computes it) and once more to θ's dtype.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kPerturbChunk = 16384;

struct PerturbTensor {
  void* param;
  void* save;             // null: nothing saved (perturb); the source (restore)
  const void* base;       // perturb only
  const void* direction;  // perturb only
  int64_t numel;
};

using PerturbChunk = TensorChunk;
using PerturbTableLayout = TableLayout;
using PerturbTable = TensorTable<PerturbTensor>;

inline PerturbTableLayout perturb_table_layout(const PerturbTensor* tensors, int64_t num_tensors) {
  return table_layout(tensors, num_tensors, kPerturbChunk);
}
inline void perturb_fill_table(const PerturbTensor* tensors, const PerturbTableLayout& layout, void* host_table) {
  fill_table(tensors, layout, kPerturbChunk, host_table);
}
inline PerturbTable perturb_table_view(const void* device_table, const PerturbTableLayout& layout) {
  return table_view<PerturbTensor>(device_table, layout);
}

// Storage is θ's dtype (and save's).
cudaError_t launch_perturb(Storage storage, const PerturbTable& table, double scale, cudaStream_t stream);
cudaError_t launch_restore(Storage storage, const PerturbTable& table, cudaStream_t stream);

}  // namespace cuda
}  // namespace t1t2
