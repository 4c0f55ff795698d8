// T2 penalty hypergradients of many segments in one launch, same semantics as
// csrc/cpu/penalty_hypergrad.cpp: u = J⊙v rounded to the compute type, products and sums in double,
// decoupled L2 scaled by −lr, results in the compute type. Deterministic (see kernels.cuh): the work
// items and every addition's order follow from each segment's `inner` and compile-time constants.
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

enum class Path : int { Thread = 0, Warp = 1, Tile = 2 };

__host__ __device__ inline Path path_of(int64_t inner) {
  if (inner < kHypergradThreadMax) return Path::Thread;
  if (inner <= kSegmentDotWarpMax) return Path::Warp;
  return Path::Tile;
}

// The segment whose items (or split groups) contain index k: the last one whose first index is
// <= k. Segments with none share their first index with the next one, so they are never returned
// for a k they do not own.
template <bool kSplit>
__device__ __forceinline__ int64_t find_segment(const HypergradSegment* __restrict__ segments, int64_t num_segments,
                                                int64_t k) {
  int64_t lo = 0, hi = num_segments;  // invariant: answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    const int64_t first = kSplit ? segments[mid].first_split : segments[mid].first_item;
    if (first <= k) lo = mid;
    else hi = mid;
  }
  return lo;
}

// kLr: a learning-rate scale's term v·(θ⁺ − θ), the difference rounded in T (as the CPU kernel).
template <PenaltyKind kKind, bool kLr, typename T>
__device__ __forceinline__ double term(const T* __restrict__ v, const T* __restrict__ theta, const T* __restrict__ jac,
                                       T jac_scalar, const T* __restrict__ updated, int64_t i) {
  if (kLr) {
    const T step = updated[i] - theta[i];
    return static_cast<double>(v[i]) * static_cast<double>(step);
  }
  const T u = (jac ? jac[i] : jac_scalar) * v[i];
  return static_cast<double>(u) * penalty_mixed(kKind, static_cast<double>(theta[i]));
}

// One work item of one segment; the path is uniform over the block.
// Decoupled L2 sums v·2θ (J = 1 exactly, whatever jac holds) and scales by −lr afterwards.
template <PenaltyKind kKind, bool kLr, typename T>
__device__ __forceinline__ void run_item(const HypergradSegment& s, int64_t item, bool decoupled, double lr,
                                         double* __restrict__ partial, T* __restrict__ out) {
  const T* __restrict__ v = static_cast<const T*>(s.v);
  const T* __restrict__ theta = static_cast<const T*>(s.theta);
  const T* __restrict__ jac = decoupled ? nullptr : static_cast<const T*>(s.jac);
  const T* __restrict__ updated = static_cast<const T*>(s.updated);
  const T jac_scalar = decoupled ? T(1) : static_cast<T>(s.jac_scalar);
  const double scale = decoupled ? -lr : 1.0;
  const int64_t inner = s.inner;
  switch (path_of(inner)) {
    case Path::Thread: {
      const int64_t g = item * kThreads + threadIdx.x;
      if (g >= s.groups) return;
      if (inner == 0) {  // empty groups sum to +0, as the CPU kernel's zero-filled output
        out[s.out_offset + g] = T(0);
        return;
      }
      double acc = 0.0;
      for (int64_t i = g * inner; i < (g + 1) * inner; ++i)
        acc += term<kKind, kLr>(v, theta, jac, jac_scalar, updated, i);
      out[s.out_offset + g] = static_cast<T>(scale * acc);
      return;
    }
    case Path::Warp: {
      const int64_t g = item * kWarps + (threadIdx.x >> 5);
      if (g >= s.groups) return;  // the same for the 32 lanes of a warp
      const int lane = threadIdx.x & 31;
      double acc = 0.0;
      for (int64_t i = g * inner + lane; i < (g + 1) * inner; i += 32)
        acc += term<kKind, kLr>(v, theta, jac, jac_scalar, updated, i);
      acc = warp_sum(acc);
      if (lane == 0) out[s.out_offset + g] = static_cast<T>(scale * acc);
      return;
    }
    case Path::Tile: {
      const int64_t tiles = s.tiles_per_group;
      const int64_t g = item / tiles, k = item - g * tiles;
      const int64_t begin = g * inner + k * kSegmentDotTile;
      const int64_t n = inner - k * kSegmentDotTile < kSegmentDotTile ? inner - k * kSegmentDotTile : kSegmentDotTile;
      double acc = 0.0;
      if (n == kSegmentDotTile) {  // the same additions in the same order as the loop below, unrolled
#pragma unroll 8
        for (int r = 0; r < kSegmentDotTile / kThreads; ++r)
          acc += term<kKind, kLr>(v, theta, jac, jac_scalar, updated, begin + threadIdx.x + r * kThreads);
      } else {
        for (int64_t i = threadIdx.x; i < n; i += kThreads)
          acc += term<kKind, kLr>(v, theta, jac, jac_scalar, updated, begin + i);
      }
      acc = block_sum<kWarps>(acc);
      if (threadIdx.x == 0) {
        if (tiles == 1) out[s.out_offset + g] = static_cast<T>(scale * acc);
        else partial[s.first_partial + item] = acc;
      }
      return;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    hypergrad_items(const HypergradSegment* __restrict__ segments, int64_t num_segments, int64_t num_items, double lr,
                    double* __restrict__ partial, T* __restrict__ out) {
  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const HypergradSegment& s = segments[find_segment<false>(segments, num_segments, item)];
    const int64_t local = item - s.first_item;
    switch (s.kind) {
      case SegmentKind::L2: run_item<PenaltyKind::L2, false, T>(s, local, false, lr, partial, out); break;
      case SegmentKind::L1: run_item<PenaltyKind::L1, false, T>(s, local, false, lr, partial, out); break;
      case SegmentKind::DecoupledL2: run_item<PenaltyKind::L2, false, T>(s, local, true, lr, partial, out); break;
      case SegmentKind::Lr: run_item<PenaltyKind::L2, true, T>(s, local, false, lr, partial, out); break;
    }
  }
}

// One block per group of more than one tile: thread t adds tiles t, t+kThreads, ..., then the tree.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    hypergrad_combine(const HypergradSegment* __restrict__ segments, int64_t num_segments, int64_t num_split,
                      double lr, const double* __restrict__ partial, T* __restrict__ out) {
  for (int64_t k = blockIdx.x; k < num_split; k += gridDim.x) {
    const HypergradSegment& s = segments[find_segment<true>(segments, num_segments, k)];
    const int64_t g = k - s.first_split, tiles = s.tiles_per_group;
    const double* pg = partial + s.first_partial + g * tiles;
    double acc = 0.0;
    for (int64_t t = threadIdx.x; t < tiles; t += kThreads) acc += pg[t];
    acc = block_sum<kWarps>(acc);
    const double scale = s.kind == SegmentKind::DecoupledL2 ? -lr : 1.0;
    if (threadIdx.x == 0) out[s.out_offset + g] = static_cast<T>(scale * acc);
  }
}

unsigned grid_for(int64_t blocks) { return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks); }

template <typename T>
cudaError_t launch_typed(const HypergradSegment* segments, const HypergradPlan& plan, double lr, void* out_raw,
                         void* workspace, cudaStream_t stream) {
  T* out = static_cast<T*>(out_raw);
  double* partial = static_cast<double*>(workspace);
  hypergrad_items<T><<<grid_for(plan.num_items), kThreads, 0, stream>>>(segments, plan.num_segments, plan.num_items,
                                                                         lr, partial, out);
  const cudaError_t stage1 = cudaGetLastError();
  if (stage1 != cudaSuccess || plan.num_split_groups == 0) return stage1;
  hypergrad_combine<T><<<grid_for(plan.num_split_groups), kThreads, 0, stream>>>(
      segments, plan.num_segments, plan.num_split_groups, lr, partial, out);
  return cudaGetLastError();
}

}  // namespace

HypergradPlan penalty_hypergrad_plan(HypergradSegment* segments, int64_t num_segments) {
  HypergradPlan plan{num_segments, 0, 0, 0};
  for (int64_t k = 0; k < num_segments; ++k) {
    HypergradSegment& s = segments[k];
    s.first_item = plan.num_items;
    s.first_partial = plan.num_partials;
    s.first_split = plan.num_split_groups;
    s.tiles_per_group = 0;
    s.split_groups = 0;
    const int64_t groups = s.groups > 0 ? s.groups : 0;
    switch (path_of(s.inner)) {
      case Path::Thread: s.items = (groups + kThreads - 1) / kThreads; break;  // inner 0 writes zeros
      case Path::Warp: s.items = (groups + kWarps - 1) / kWarps; break;
      case Path::Tile:
        s.tiles_per_group = (s.inner + kSegmentDotTile - 1) / kSegmentDotTile;
        s.items = groups * s.tiles_per_group;
        if (s.tiles_per_group > 1) {
          s.split_groups = groups;
          plan.num_partials += s.items;
        }
        break;
    }
    plan.num_items += s.items;
    plan.num_split_groups += s.split_groups;
  }
  return plan;
}

size_t penalty_hypergrad_workspace_bytes(const HypergradPlan& plan) {
  return static_cast<size_t>(plan.num_partials) * sizeof(double);
}

cudaError_t launch_penalty_hypergrad(Storage storage, const HypergradSegment* segments, const HypergradPlan& plan,
                                     double lr, void* out, void* workspace, cudaStream_t stream) {
  if (plan.num_segments < 0 || plan.num_items < 0) return cudaErrorInvalidValue;
  if (plan.num_items == 0) return cudaSuccess;
  if (segments == nullptr || out == nullptr || (plan.num_partials > 0 && workspace == nullptr))
    return cudaErrorInvalidValue;
  switch (storage) {
    case Storage::Float64: return launch_typed<double>(segments, plan, lr, out, workspace, stream);
    case Storage::Float32: return launch_typed<float>(segments, plan, lr, out, workspace, stream);
    default: return cudaErrorInvalidValue;  // the compute dtype only
  }
}

}  // namespace cuda
}  // namespace t1t2
