// Device helpers shared by the kernels: dtype conversion, warp/block reductions, moment merging, dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "shvit_cuda.h"

namespace shvit {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ float load(const void* base, int64_t off) {
  return to_f(static_cast<const T*>(base)[off]);
}
template <typename T>
__device__ __forceinline__ void store(void* base, int64_t off, float v) {
  static_cast<T*>(base)[off] = from_f<T>(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds >= 32 floats; blockDim.x % 32 == 0.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

// Chan et al.'s pairwise merge of (count, mean, M2): exact-enough for fp32 batch statistics without the
// cancellation of sum / sum-of-squares.
struct Moments {
  float n, mean, m2;
};
__device__ __forceinline__ Moments merge(Moments a, Moments b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float d = b.mean - a.mean, fb = b.n / n;
  return {n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
}
__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    Moments other{__shfl_xor_sync(kFull, m.n, o), __shfl_xor_sync(kFull, m.mean, o), __shfl_xor_sync(kFull, m.m2, o)};
    m = merge(m, other);
  }
  return m;
}

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// Calls f(T{}) with T the element type of `dtype`.
template <typename F>
cudaError_t dispatch_dtype(shvit_dtype dtype, F&& f) {
  switch (dtype) {
    case SHVIT_F32: return f(float{});
    case SHVIT_F16: return f(__half{});
    case SHVIT_BF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Per-channel moments from per-tile partials laid out [tile][channel] (mean, M2) with per-tile counts.
// One block per channel; writes mean and biased variance.
__global__ void combine_moments_kernel(const float* pmean, const float* pm2, const float* pcount, int tiles, int c,
                                       float* mean, float* var);

// out[c] = sum over r < rows of parts[r * cols + c], the rows added in order: a deterministic reduction of
// per-block partials (float atomics would add them in a different order on every run).
__global__ void sum_rows_kernel(const float* parts, int rows, int64_t cols, float* out);

// scale = w * rsqrt(var + eps), shift = b - mean * scale (BatchNorm as a per-channel affine map).
__global__ void bn_affine_kernel(const float* mean, const float* var, const float* w, const float* b, float eps,
                                 int c, float* scale, float* shift);

}  // namespace shvit
