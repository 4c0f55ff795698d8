// T2 penalty hypergradient reduction out_g = Σ_{i∈g} u_i m_i(θ_i), same semantics as
// csrc/cpu/segment_dot.cpp: products and sums in double, float32 out for low-precision inputs.
// Deterministic (see kernels.cuh): which thread or block adds what, and in which order, follows from
// `inner` and compile-time constants only, so every run gives the same bits on every GPU.
#include <climits>

#include "kernels.cuh"
#include "reduce.cuh"
#include "storage.cuh"

namespace t1t2 {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride beyond; does not change any result
static_assert(kSegmentDotTile % kThreads == 0, "a full tile gives every thread the same count");

template <PenaltyKind kKind, typename S>
__device__ __forceinline__ double product(const S* __restrict__ u, const S* __restrict__ theta, int64_t i) {
  return static_cast<double>(to_compute(u[i])) * penalty_mixed(kKind, static_cast<double>(to_compute(theta[i])));
}

unsigned grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// inner == 1: one product per output, no reduction.
template <PenaltyKind kKind, typename S, typename O>
__global__ void __launch_bounds__(kThreads)
    segment_dot_elementwise(const S* __restrict__ u, const S* __restrict__ theta, int64_t n, O* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    out[i] = static_cast<O>(product<kKind>(u, theta, i));
}

// Small groups: one warp per group. Lane l adds elements l, l+32, ... in order, then the warp tree.
template <PenaltyKind kKind, typename S, typename O>
__global__ void __launch_bounds__(kThreads)
    segment_dot_warp_per_group(const S* __restrict__ u, const S* __restrict__ theta, int64_t num_groups,
                               int64_t inner, O* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  // g is the same for the 32 lanes of a warp, so every lane reaches the full-warp shuffles.
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); g < num_groups; g += stride) {
    const S* ug = u + g * inner;
    const S* tg = theta + g * inner;
    double acc = 0.0;
    for (int64_t i = lane; i < inner; i += 32) acc += product<kKind>(ug, tg, i);
    acc = warp_sum(acc);
    if (lane == 0) out[g] = static_cast<O>(acc);
  }
}

// Stage 1: one block per tile of kSegmentDotTile elements of a group (the last tile of a group may
// be shorter). Thread t adds elements t, t+kThreads, ... in order, then the block tree. A group of
// one tile goes straight to out; otherwise the tile's sum goes to partial[tile].
template <PenaltyKind kKind, typename S, typename O>
__global__ void __launch_bounds__(kThreads)
    segment_dot_tiles(const S* __restrict__ u, const S* __restrict__ theta, int64_t num_groups, int64_t inner,
                      int64_t tiles_per_group, double* __restrict__ partial, O* __restrict__ out) {
  const int64_t num_tiles = num_groups * tiles_per_group;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t g = tile / tiles_per_group, k = tile - g * tiles_per_group;
    const int64_t begin = g * inner + k * kSegmentDotTile;
    const int64_t n = inner - k * kSegmentDotTile < kSegmentDotTile ? inner - k * kSegmentDotTile : kSegmentDotTile;
    const S* ut = u + begin;
    const S* tt = theta + begin;
    double acc = 0.0;
    if (n == kSegmentDotTile) {  // the same additions in the same order as the loop below, unrolled
#pragma unroll 8
      for (int r = 0; r < kSegmentDotTile / kThreads; ++r) acc += product<kKind>(ut, tt, threadIdx.x + r * kThreads);
    } else {
      for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += product<kKind>(ut, tt, i);
    }
    acc = block_sum<kWarps>(acc);
    if (threadIdx.x == 0) {
      if (tiles_per_group == 1) out[g] = static_cast<O>(acc);
      else partial[tile] = acc;
    }
  }
}

// Stage 2: one block per group adds the group's tile partials (thread t: tiles t, t+kThreads, ...,
// then the block tree).
template <typename O>
__global__ void __launch_bounds__(kThreads)
    segment_dot_combine(const double* __restrict__ partial, int64_t num_groups, int64_t tiles_per_group,
                        O* __restrict__ out) {
  for (int64_t g = blockIdx.x; g < num_groups; g += gridDim.x) {
    const double* pg = partial + g * tiles_per_group;
    double acc = 0.0;
    for (int64_t k = threadIdx.x; k < tiles_per_group; k += kThreads) acc += pg[k];
    acc = block_sum<kWarps>(acc);
    if (threadIdx.x == 0) out[g] = static_cast<O>(acc);
  }
}

int64_t tiles_per_group(int64_t inner) { return (inner + kSegmentDotTile - 1) / kSegmentDotTile; }

template <PenaltyKind kKind, typename S, typename O>
cudaError_t launch_typed(const void* u_raw, const void* theta_raw, int64_t num_groups, int64_t inner, void* out_raw,
                         void* workspace, cudaStream_t stream) {
  const S* u = static_cast<const S*>(u_raw);
  const S* theta = static_cast<const S*>(theta_raw);
  O* out = static_cast<O*>(out_raw);
  if (inner == 1) {
    segment_dot_elementwise<kKind><<<grid_for(num_groups, kThreads), kThreads, 0, stream>>>(u, theta, num_groups, out);
    return cudaGetLastError();
  }
  if (inner <= kSegmentDotWarpMax) {
    segment_dot_warp_per_group<kKind>
        <<<grid_for(num_groups, kWarps), kThreads, 0, stream>>>(u, theta, num_groups, inner, out);
    return cudaGetLastError();
  }
  const int64_t tiles = tiles_per_group(inner);
  double* partial = static_cast<double*>(workspace);
  if (tiles > 1 && partial == nullptr) return cudaErrorInvalidValue;
  segment_dot_tiles<kKind>
      <<<grid_for(num_groups * tiles, 1), kThreads, 0, stream>>>(u, theta, num_groups, inner, tiles, partial, out);
  if (tiles == 1) return cudaGetLastError();
  const cudaError_t stage1 = cudaGetLastError();
  if (stage1 != cudaSuccess) return stage1;
  segment_dot_combine<<<grid_for(num_groups, 1), kThreads, 0, stream>>>(partial, num_groups, tiles, out);
  return cudaGetLastError();
}

template <typename S, typename O>
cudaError_t launch_kind(PenaltyKind kind, const void* u, const void* theta, int64_t num_groups, int64_t inner,
                        void* out, void* workspace, cudaStream_t stream) {
  if (kind == PenaltyKind::L2)
    return launch_typed<PenaltyKind::L2, S, O>(u, theta, num_groups, inner, out, workspace, stream);
  return launch_typed<PenaltyKind::L1, S, O>(u, theta, num_groups, inner, out, workspace, stream);
}

}  // namespace

size_t penalty_segment_dot_workspace_bytes(int64_t num_groups, int64_t inner) {
  if (num_groups <= 0 || inner <= kSegmentDotWarpMax) return 0;
  const int64_t tiles = tiles_per_group(inner);
  return tiles > 1 ? static_cast<size_t>(num_groups * tiles) * sizeof(double) : 0;
}

cudaError_t launch_penalty_segment_dot(Storage storage, PenaltyKind kind, const void* u, const void* theta,
                                       int64_t num_groups, int64_t inner, void* out, void* workspace,
                                       cudaStream_t stream) {
  if (num_groups < 0 || inner < 0) return cudaErrorInvalidValue;
  if (num_groups == 0) return cudaSuccess;
  if (inner == 0) {  // empty groups sum to 0; all-zero bits are +0.0 in float and double
    const size_t out_size = storage == Storage::Float64 ? sizeof(double) : sizeof(float);
    return cudaMemsetAsync(out, 0, static_cast<size_t>(num_groups) * out_size, stream);
  }
  switch (storage) {
    case Storage::Float64:
      return launch_kind<double, double>(kind, u, theta, num_groups, inner, out, workspace, stream);
    case Storage::Float32:
      return launch_kind<float, float>(kind, u, theta, num_groups, inner, out, workspace, stream);
    case Storage::BFloat16:
      return launch_kind<__nv_bfloat16, float>(kind, u, theta, num_groups, inner, out, workspace, stream);
    case Storage::Float16:
      return launch_kind<__half, float>(kind, u, theta, num_groups, inner, out, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace t1t2
