// Gaussian noise on the GPU, same semantics and bits as csrc/cpu/noise.cpp: ε regenerated from
// (key, element index) by philox.h; every floating-point operation rounded on its own (the
// t1t2::ieee helpers use __*_rn intrinsics, so nvcc fuses nothing); the σ-gradient reduction in
// the fixed tile / lane / column order of t1t2/noise.h.
#include <climits>

#include "noise_kernel.cuh"
#include "storage.cuh"

namespace t1t2 {
namespace cuda {
namespace {

constexpr int kThreads = static_cast<int>(noise::kBlockThreads);
constexpr int kMaxGrid = 65536;  // element-wise kernels stride over the rest

template <typename T>
__device__ __forceinline__ T from_double(double v);
template <>
__device__ __forceinline__ double from_double<double>(double v) { return v; }
template <>
__device__ __forceinline__ float from_double<float>(double v) { return ieee::to_float(v); }

template <typename P, typename T>
__global__ void __launch_bounds__(kThreads)
    apply_noise_kernel(const P* __restrict__ src, const T* __restrict__ sigma, P* __restrict__ dst, int64_t numel,
                       int64_t channels, int64_t inner, uint64_t key, noise::Mode mode) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel; i += stride) {
    const float eps = philox::randn(key, static_cast<uint64_t>(i));
    dst[i] = from_compute<P>(noise::apply<T>(mode, to_compute(src[i]), sigma[(i / inner) % channels], eps));
  }
}

// One block per tile (rt, ct) of the plan. Thread t is row lane t / per_pass of column t % per_pass
// (+ multiples of per_pass): with lanes > 1 a tile has at most per_pass columns, with one lane the
// threads walk up to kMaxTileColumns columns. Lane sums go to shared memory, then the fixed lane
// tree, then one thread per channel adds that channel's column sums in column order.
template <typename P, typename T>
__global__ void __launch_bounds__(kThreads)
    sigma_grad_tiles(const P* __restrict__ g, const P* __restrict__ x, const T* __restrict__ sigma,
                     P* __restrict__ grad_x, double* __restrict__ partial, const noise::Plan p, uint64_t key,
                     noise::Mode mode) {
  __shared__ double acc[noise::kMaxTileColumns];  // lanes × columns ≤ max(kBlockThreads, kMaxTileColumns)
  const int64_t tile = blockIdx.x;
  const int64_t rt = tile / p.column_tiles, ct = tile % p.column_tiles;
  const int64_t r0 = rt * p.tile_rows, r1 = min(p.rows, r0 + p.tile_rows);
  const int64_t j0 = ct * p.tile_columns, columns = min(p.row_width, j0 + p.tile_columns) - j0;
  const int lanes = static_cast<int>(p.lanes), per_pass = kThreads / lanes;
  const int lane = threadIdx.x / per_pass, first_column = threadIdx.x % per_pass;
  for (int64_t j = first_column; j < columns; j += per_pass) {
    const int64_t c = (j0 + j) / p.inner;
    double s = 0.0;
    for (int64_t r = r0 + lane; r < r1; r += lanes) {
      const int64_t i = r * p.row_width + j0 + j;
      const float eps = philox::randn(key, static_cast<uint64_t>(i));
      const double xi = mode == noise::Mode::Multiplicative ? static_cast<double>(to_compute(x[i])) : 0.0;
      s = ieee::add(s, noise::sigma_term(mode, static_cast<double>(to_compute(g[i])), xi, eps));
      if (grad_x != nullptr)
        grad_x[i] = from_compute<P>(noise::apply<T>(noise::Mode::Multiplicative, to_compute(g[i]), sigma[c], eps));
    }
    acc[lane * columns + j] = s;
  }
  __syncthreads();
  for (int stride = lanes / 2; stride >= 1; stride /= 2) {
    if (lane < stride)
      for (int64_t j = first_column; j < columns; j += per_pass)
        acc[lane * columns + j] = ieee::add(acc[lane * columns + j], acc[(lane + stride) * columns + j]);
    __syncthreads();
  }
  const int64_t c_first = noise::first_channel(p, ct), c_last = (j0 + columns - 1) / p.inner;
  for (int64_t c = c_first + threadIdx.x; c <= c_last; c += kThreads) {
    const int64_t begin = max(j0, c * p.inner) - j0, end = min(j0 + columns, (c + 1) * p.inner) - j0;
    double s = 0.0;
    for (int64_t j = begin; j < end; ++j) s = ieee::add(s, acc[j]);
    partial[tile * p.partials_per_tile + c - c_first] = s;
  }
}

// One thread per channel: its partials over row tiles (outer) and column tiles (inner), in order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sigma_grad_channels(const double* __restrict__ partial, T* __restrict__ out, const noise::Plan p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < p.channels; c += stride) {
    const int64_t ct0 = noise::first_column_tile(p, c), ct1 = noise::last_column_tile(p, c);
    double s = 0.0;
    for (int64_t rt = 0; rt < p.row_tiles; ++rt)
      for (int64_t ct = ct0; ct <= ct1; ++ct)
        s = ieee::add(s, partial[(rt * p.column_tiles + ct) * p.partials_per_tile + c - noise::first_channel(p, ct)]);
    out[c] = from_double<T>(s);
  }
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxGrid ? (blocks > 0 ? blocks : 1) : kMaxGrid);
}

template <typename P, typename T>
cudaError_t launch_apply_typed(noise::Mode mode, const void* src, const void* sigma, void* dst, int64_t numel,
                               int64_t channels, int64_t inner, uint64_t key, cudaStream_t stream) {
  apply_noise_kernel<P, T><<<grid_for(numel), kThreads, 0, stream>>>(
      static_cast<const P*>(src), static_cast<const T*>(sigma), static_cast<P*>(dst), numel, channels, inner, key, mode);
  return cudaGetLastError();
}

template <typename P, typename T>
cudaError_t launch_sigma_grad_typed(noise::Mode mode, const void* grad_y, const void* x, const void* sigma,
                                    void* grad_x, void* grad_sigma, const noise::Plan& p, uint64_t key,
                                    void* workspace, cudaStream_t stream) {
  if (p.tiles() > INT_MAX || (p.tiles() > 0 && workspace == nullptr)) return cudaErrorInvalidValue;
  auto* partial = static_cast<double*>(workspace);
  if (p.tiles() > 0) {
    sigma_grad_tiles<P, T><<<static_cast<unsigned>(p.tiles()), kThreads, 0, stream>>>(
        static_cast<const P*>(grad_y), static_cast<const P*>(x), static_cast<const T*>(sigma), static_cast<P*>(grad_x),
        partial, p, key, mode);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  sigma_grad_channels<T><<<grid_for(p.channels), kThreads, 0, stream>>>(partial, static_cast<T*>(grad_sigma), p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gaussian_noise(Storage storage, noise::Mode mode, const void* src, const void* sigma, void* dst,
                                  int64_t numel, int64_t channels, int64_t inner, uint64_t key, cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  if (channels < 1 || inner < 1) return cudaErrorInvalidValue;
  switch (storage) {
    case Storage::Float64:
      return launch_apply_typed<double, double>(mode, src, sigma, dst, numel, channels, inner, key, stream);
    case Storage::Float32:
      return launch_apply_typed<float, float>(mode, src, sigma, dst, numel, channels, inner, key, stream);
    case Storage::BFloat16:
      return launch_apply_typed<__nv_bfloat16, float>(mode, src, sigma, dst, numel, channels, inner, key, stream);
    case Storage::Float16:
      return launch_apply_typed<__half, float>(mode, src, sigma, dst, numel, channels, inner, key, stream);
  }
  return cudaErrorInvalidValue;
}

size_t gaussian_noise_sigma_grad_workspace_bytes(int64_t numel, int64_t channels, int64_t inner) {
  if (channels < 1 || inner < 1) return 0;
  return static_cast<size_t>(noise::make_plan(numel, channels, inner).partials()) * sizeof(double);
}

cudaError_t launch_gaussian_noise_sigma_grad(Storage storage, noise::Mode mode, const void* grad_y, const void* x,
                                             const void* sigma, void* grad_x, void* grad_sigma, int64_t numel,
                                             int64_t channels, int64_t inner, uint64_t key, void* workspace,
                                             cudaStream_t stream) {
  if (channels < 1 || inner < 1 || numel < 0) return cudaErrorInvalidValue;
  const noise::Plan p = noise::make_plan(numel, channels, inner);
  switch (storage) {
    case Storage::Float64:
      return launch_sigma_grad_typed<double, double>(mode, grad_y, x, sigma, grad_x, grad_sigma, p, key, workspace,
                                                     stream);
    case Storage::Float32:
      return launch_sigma_grad_typed<float, float>(mode, grad_y, x, sigma, grad_x, grad_sigma, p, key, workspace,
                                                   stream);
    case Storage::BFloat16:
      return launch_sigma_grad_typed<__nv_bfloat16, float>(mode, grad_y, x, sigma, grad_x, grad_sigma, p, key,
                                                           workspace, stream);
    case Storage::Float16:
      return launch_sigma_grad_typed<__half, float>(mode, grad_y, x, sigma, grad_x, grad_sigma, p, key, workspace,
                                                    stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace t1t2
