// Deterministic block reductions shared by the T2 kernels (segment_dot, penalty_hypergrad): a fixed
// shuffle tree per warp, then warp 0's tree over the warp sums, so the order of additions depends
// on the block size only, never on timing.
#pragma once

#include <cuda_runtime.h>

namespace t1t2 {
namespace cuda {

// Fixed shuffle tree over a full warp; lane 0 ends with the sum.
__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

// Sum of one value per thread of a block of kWarps full warps, valid in thread 0. Ends with a
// barrier so the caller may call it again at once.
template <int kWarps>
__device__ __forceinline__ double block_sum(double x) {
  static_assert(kWarps >= 1 && kWarps <= 32, "warp 0 reduces one value per warp");
  __shared__ double warp_sums[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) x = warp_sum(lane < kWarps ? warp_sums[lane] : 0.0);
  __syncthreads();
  return x;
}

}  // namespace cuda
}  // namespace t1t2
