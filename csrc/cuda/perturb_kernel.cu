// Multi-tensor perturb_ / restore_ in one launch each (same table scheme as t1_step), same semantics
// as csrc/cpu/perturb.cpp: save θ bit-exactly, then θ ← base + scale·direction in the compute type
// with a rounding after the product and after the sum (no FMA contraction: the CPU kernel's bits),
// rounded once more to θ's dtype; restore copies save back bit for bit.
#include <climits>
#include <cstring>

#include "kernels.cuh"
#include "storage.cuh"

namespace t1t2 {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// a + b·c with both roundings explicit, so nvcc does not contract it into one FMA.
__device__ __forceinline__ double add_product(double a, double b, double c) { return __dadd_rn(a, __dmul_rn(b, c)); }
__device__ __forceinline__ float add_product(float a, float b, float c) { return __fadd_rn(a, __fmul_rn(b, c)); }

template <typename P, typename T>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(const PerturbTensor* __restrict__ tensors, const PerturbChunk* __restrict__ chunks, T scale) {
  const PerturbChunk chunk = chunks[blockIdx.x];
  const PerturbTensor& d = tensors[chunk.tensor];
  P* __restrict__ param = static_cast<P*>(d.param);
  P* __restrict__ save = static_cast<P*>(d.save);
  const T* __restrict__ base = static_cast<const T*>(d.base);
  const T* __restrict__ direction = static_cast<const T*>(d.direction);
  const int64_t end = d.numel < chunk.begin + kPerturbChunk ? d.numel : chunk.begin + kPerturbChunk;
  for (int64_t i = chunk.begin + threadIdx.x; i < end; i += kThreads) {
    if (save) save[i] = param[i];  // a copy of the stored value: bit-exact for every dtype
    param[i] = from_compute<P>(add_product(base[i], scale, direction[i]));
  }
}

// Bit-exact copy save → param in units of W, an unsigned integer as wide as the storage type.
template <typename W>
__global__ void __launch_bounds__(kThreads)
    restore_kernel(const PerturbTensor* __restrict__ tensors, const PerturbChunk* __restrict__ chunks) {
  const PerturbChunk chunk = chunks[blockIdx.x];
  const PerturbTensor& d = tensors[chunk.tensor];
  W* __restrict__ param = static_cast<W*>(d.param);
  const W* __restrict__ save = static_cast<const W*>(d.save);
  const int64_t end = d.numel < chunk.begin + kPerturbChunk ? d.numel : chunk.begin + kPerturbChunk;
  for (int64_t i = chunk.begin + threadIdx.x; i < end; i += kThreads) param[i] = save[i];
}

template <typename P, typename T>
cudaError_t launch_perturb_typed(const PerturbTable& table, double scale, cudaStream_t stream) {
  perturb_kernel<P, T><<<static_cast<unsigned>(table.num_chunks), kThreads, 0, stream>>>(
      table.tensors, table.chunks, static_cast<T>(scale));
  return cudaGetLastError();
}

template <typename W>
cudaError_t launch_restore_typed(const PerturbTable& table, cudaStream_t stream) {
  restore_kernel<W><<<static_cast<unsigned>(table.num_chunks), kThreads, 0, stream>>>(table.tensors, table.chunks);
  return cudaGetLastError();
}

bool invalid(const PerturbTable& table) {
  return table.num_chunks > INT_MAX || table.tensors == nullptr || table.chunks == nullptr;
}

}  // namespace

cudaError_t launch_perturb(Storage storage, const PerturbTable& table, double scale, cudaStream_t stream) {
  if (table.num_chunks == 0) return cudaSuccess;
  if (invalid(table)) return cudaErrorInvalidValue;
  switch (storage) {
    case Storage::Float64: return launch_perturb_typed<double, double>(table, scale, stream);
    case Storage::Float32: return launch_perturb_typed<float, float>(table, scale, stream);
    case Storage::BFloat16: return launch_perturb_typed<__nv_bfloat16, float>(table, scale, stream);
    case Storage::Float16: return launch_perturb_typed<__half, float>(table, scale, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_restore(Storage storage, const PerturbTable& table, cudaStream_t stream) {
  if (table.num_chunks == 0) return cudaSuccess;
  if (invalid(table)) return cudaErrorInvalidValue;
  switch (storage) {
    case Storage::Float64: return launch_restore_typed<unsigned long long>(table, stream);
    case Storage::Float32: return launch_restore_typed<unsigned int>(table, stream);
    case Storage::BFloat16:
    case Storage::Float16: return launch_restore_typed<unsigned short>(table, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace t1t2
