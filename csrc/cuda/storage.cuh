// Device-side conversions between the storage dtypes and the compute type. Explicit intrinsics only:
// torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__,
// which remove the implicit ones. Rounding to half/bfloat16 is to nearest even, as in c10.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace t1t2 {
namespace cuda {

__device__ __forceinline__ double to_compute(double x) { return x; }
__device__ __forceinline__ float to_compute(float x) { return x; }
__device__ __forceinline__ float to_compute(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename P>
struct FromCompute;
template <>
struct FromCompute<double> {
  __device__ __forceinline__ static double convert(double x) { return x; }
};
template <>
struct FromCompute<float> {
  __device__ __forceinline__ static float convert(float x) { return x; }
};
template <>
struct FromCompute<__half> {
  __device__ __forceinline__ static __half convert(float x) { return __float2half_rn(x); }
};
template <>
struct FromCompute<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 convert(float x) { return __float2bfloat16_rn(x); }
};

// The compute-type value x stored as P.
template <typename P, typename T>
__device__ __forceinline__ P from_compute(T x) {
  return FromCompute<P>::convert(x);
}

}  // namespace cuda
}  // namespace t1t2
