// Small kernels shared by the op families.
#include "common.cuh"

namespace shvit {

__global__ void combine_moments_kernel(const float* pmean, const float* pm2, const float* pcount, int tiles, int c,
                                       float* mean, float* var) {
  __shared__ float sn[kWarp], smean[kWarp], sm2[kWarp];
  const int ch = blockIdx.x;
  Moments m{0.f, 0.f, 0.f};
  for (int t = threadIdx.x; t < tiles; t += blockDim.x) {
    const int64_t i = static_cast<int64_t>(t) * c + ch;
    m = merge(m, Moments{pcount[t], pmean[i], pm2[i]});
  }
  m = warp_merge(m);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) {
    sn[warp] = m.n;
    smean[warp] = m.mean;
    sm2[warp] = m.m2;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarp;
    m = lane < warps ? Moments{sn[lane], smean[lane], sm2[lane]} : Moments{0.f, 0.f, 0.f};
    m = warp_merge(m);
    if (lane == 0) {
      mean[ch] = m.mean;
      var[ch] = m.n > 0.f ? fmaxf(m.m2 / m.n, 0.f) : 0.f;
    }
  }
}

__global__ void sum_rows_kernel(const float* parts, int rows, int64_t cols, float* out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float total = 0.f;
  for (int r = 0; r < rows; ++r) total += parts[r * cols + c];
  out[c] = total;
}

__global__ void bn_affine_kernel(const float* mean, const float* var, const float* w, const float* b, float eps,
                                 int c, float* scale, float* shift) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= c) return;
  const float s = w[i] * rsqrtf(var[i] + eps);
  scale[i] = s;
  shift[i] = b[i] - mean[i] * s;
}

}  // namespace shvit
