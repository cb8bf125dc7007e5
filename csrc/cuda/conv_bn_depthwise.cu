// Depthwise 3x3 conv (padding 1, stride 1/2) + per-channel affine + residual + ReLU, its batch statistics and
// its backward. One templated tile kernel serves the passes that need the conv output or its input window:
// a block owns (image, channel chunk, output tile), stages the input tile with its halo in shared memory
// (fp32, zero padded), and every thread keeps a single channel so per-channel reductions are per-thread sums
// followed by one shared-memory and one global atomic per block.
#include "common.cuh"

namespace shvit {
namespace {

constexpr int kThreads = 256;

// NCHW: a block is one channel and a 8x32 output tile (threads along W, coalesced).
// channels_last: 32 channels x 4x4 outputs (threads along C, coalesced).
template <bool CL>
struct Tile;
template <>
struct Tile<false> {
  static constexpr int CC = 1, TH = 8, TW = 32;
};
template <>
struct Tile<true> {
  static constexpr int CC = 32, TH = 4, TW = 4;
};

enum Mode { kForward, kStats, kBackwardSums, kWeightGrad };

struct DwParams {
  int n, c, h, w, oh, ow, stride;
  const float* weight;
  shvit_view x, out, residual, grad_out, g, dy, grad_x;
  const float* scale;  // forward affine (NULL: 1)
  const float* shift;  // forward affine (NULL: 0)
  int relu;
  // BatchNorm backward (bn_weight NULL: none)
  const float* bn_weight;
  const float* mean;
  const float* var;
  float eps;
  float* sums;      // (2, C)
  float* wsum;      // (C, 10)
  float* partials;  // stats: mean [T][C], M2 [T][C], count [T]
  float* dy_ws;     // BN backward: dy, dense in the layout of `dy`
};

__device__ __forceinline__ int64_t at(const shvit_view& v, int n, int c, int y, int x) {
  return n * v.sn + c * v.sc + y * v.sh + x * v.sw;
}

template <typename T, bool CL, int MODE>
__global__ void __launch_bounds__(kThreads) dw_tile_kernel(DwParams p) {
  using TL = Tile<CL>;
  constexpr int CC = TL::CC, TH = TL::TH, TW = TL::TW;
  constexpr int kPer = CC * TH * TW / kThreads;
  constexpr int IHmax = (TH - 1) * 2 + 3, IWmax = (TW - 1) * 2 + 3;
  __shared__ float xs[CC * IHmax * IWmax];
  __shared__ float red[CC][10];

  const int s = p.stride;
  const int IH = (TH - 1) * s + 3, IW = (TW - 1) * s + 3;
  const int tiles_x = (p.ow + TW - 1) / TW, tiles_y = (p.oh + TH - 1) / TH, chunks = (p.c + CC - 1) / CC;
  int64_t bid = blockIdx.x;
  const int tx = bid % tiles_x;
  bid /= tiles_x;
  const int ty = bid % tiles_y;
  bid /= tiles_y;
  const int cb = bid % chunks;
  const int nb = static_cast<int>(bid / chunks);
  const int c0 = cb * CC, oy0 = ty * TH, ox0 = tx * TW;
  const int tid = threadIdx.x;

  // Stage the input window, the fastest index following the memory layout.
  for (int j = tid; j < CC * IH * IW; j += kThreads) {
    int cc, iy, ix;
    if (CL) {
      cc = j % CC;
      ix = (j / CC) % IW;
      iy = j / (CC * IW);
    } else {
      ix = j % IW;
      iy = (j / IW) % IH;
      cc = j / (IW * IH);
    }
    const int c = c0 + cc, gy = oy0 * s - 1 + iy, gx = ox0 * s - 1 + ix;
    float v = 0.f;
    if (c < p.c && gy >= 0 && gy < p.h && gx >= 0 && gx < p.w) v = load<T>(p.x.data, at(p.x, nb, c, gy, gx));
    xs[CL ? (iy * IW + ix) * CC + cc : (cc * IH + iy) * IW + ix] = v;
  }
  for (int j = tid; j < CC * 10; j += kThreads) red[j / 10][j % 10] = 0.f;
  __syncthreads();

  const int cc = CL ? tid % CC : 0;
  const int c = c0 + cc;
  const bool c_ok = c < p.c;
  float wt[9];
#pragma unroll
  for (int k = 0; k < 9; ++k) wt[k] = c_ok ? p.weight[c * 9 + k] : 0.f;

  // Per-channel constants of the mode.
  float a_scale = 1.f, a_shift = 0.f, mean_c = 0.f, k_bn = 0.f, m1 = 0.f, k2 = 0.f;
  if (c_ok) {
    if (MODE == kForward) {
      if (p.scale) a_scale = p.scale[c];
      if (p.shift) a_shift = p.shift[c];
    }
    if ((MODE == kBackwardSums || MODE == kWeightGrad) && p.bn_weight) {
      const float count = static_cast<float>(p.n) * p.oh * p.ow;
      const float invstd = rsqrtf(p.var[c] + p.eps);
      mean_c = p.mean[c];
      if (MODE == kWeightGrad) {
        k_bn = p.bn_weight[c] * invstd;
        m1 = p.sums[c] / count;
        k2 = invstd * invstd * p.sums[p.c + c] / count;
      }
    }
  }

  float acc[10];
#pragma unroll
  for (int k = 0; k < 10; ++k) acc[k] = 0.f;
  float ys[kPer];
  bool valid[kPer];

#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int i = tid + r * kThreads;
    const int ox = CL ? (i / CC) % TW : i % TW;
    const int oy = CL ? i / (CC * TW) : (i / TW) % TH;
    const int gy = oy0 + oy, gx = ox0 + ox;
    ys[r] = 0.f;
    valid[r] = false;
    if (!c_ok || gy >= p.oh || gx >= p.ow) continue;
    float win[9];
#pragma unroll
    for (int kh = 0; kh < 3; ++kh)
#pragma unroll
      for (int kw = 0; kw < 3; ++kw) {
        const int iy = oy * s + kh, ix = ox * s + kw;
        win[kh * 3 + kw] = xs[CL ? (iy * IW + ix) * CC + cc : (cc * IH + iy) * IW + ix];
      }
    float y = 0.f;
#pragma unroll
    for (int k = 0; k < 9; ++k) y = fmaf(win[k], wt[k], y);

    if (MODE == kForward) {
      float v = y * a_scale + a_shift;
      if (p.residual.data) v += load<T>(p.residual.data, at(p.residual, nb, c, gy, gx));
      if (p.relu) v = fmaxf(v, 0.f);
      store<T>(p.out.data, at(p.out, nb, c, gy, gx), v);
    } else if (MODE == kStats) {
      ys[r] = y;
      valid[r] = true;
      acc[0] += y;
    } else {
      float g;
      const bool bn_pass2 = MODE == kWeightGrad && p.bn_weight;
      if (bn_pass2) {
        g = load<T>(p.g.data, at(p.g, nb, c, gy, gx));  // written by the sums pass
      } else {
        g = load<T>(p.grad_out.data, at(p.grad_out, nb, c, gy, gx));
        if (p.relu && !(load<T>(p.out.data, at(p.out, nb, c, gy, gx)) > 0.f)) g = 0.f;
        store<T>(p.g.data, at(p.g, nb, c, gy, gx), g);  // g is grad_out or 0: no rounding
      }
      if (MODE == kBackwardSums) {
        acc[0] += g;
        acc[1] += g * (y - mean_c);
      } else {
        float dy = g;
        if (bn_pass2) {
          dy = k_bn * (g - m1 - (y - mean_c) * k2);
          p.dy_ws[at(p.dy, nb, c, gy, gx)] = dy;
        }
#pragma unroll
        for (int k = 0; k < 9; ++k) acc[k] = fmaf(dy, win[k], acc[k]);
        acc[9] += dy;
      }
    }
  }

  if (MODE == kForward) return;
  if (MODE == kStats) {
    // Tile-local two-pass moments, merged across tiles by combine_moments_kernel.
    const int cnt = min(TH, p.oh - oy0) * min(TW, p.ow - ox0);
    if (c_ok) atomicAdd(&red[cc][0], acc[0]);
    __syncthreads();
    const float tmean = red[cc][0] / cnt;
    float m2 = 0.f;
#pragma unroll
    for (int r = 0; r < kPer; ++r)
      if (valid[r]) m2 += (ys[r] - tmean) * (ys[r] - tmean);
    if (c_ok) atomicAdd(&red[cc][1], m2);
    __syncthreads();
    const int64_t tiles = static_cast<int64_t>(p.n) * tiles_y * tiles_x;
    const int64_t tile = (static_cast<int64_t>(nb) * tiles_y + ty) * tiles_x + tx;
    if (tid < CC && c0 + tid < p.c) {
      p.partials[tile * p.c + c0 + tid] = red[tid][0] / cnt;
      p.partials[(tiles + tile) * p.c + c0 + tid] = red[tid][1];
    }
    if (tid == 0 && cb == 0) p.partials[2 * tiles * p.c + tile] = static_cast<float>(cnt);
    return;
  }
  const int nacc = MODE == kBackwardSums ? 2 : 10;
  if (c_ok)
    for (int k = 0; k < nacc; ++k) atomicAdd(&red[cc][k], acc[k]);
  __syncthreads();
  for (int j = tid; j < CC * nacc; j += kThreads) {
    const int ch = c0 + j / nacc, k = j % nacc;
    if (ch >= p.c) continue;
    if (MODE == kBackwardSums)
      atomicAdd(&p.sums[k * p.c + ch], red[j / nacc][k]);
    else
      atomicAdd(&p.wsum[ch * 10 + k], red[j / nacc][k]);
  }
}

// grad_x[n, c, iy, ix] = sum over taps of dy[n, c, oy, ox] * w[c, kh, kw] with oy * s - 1 + kh == iy.
template <typename T, typename G, bool CL>
__global__ void __launch_bounds__(kThreads) dw_input_grad_kernel(DwParams p, const G* dy, shvit_view dyv) {
  const int64_t total = static_cast<int64_t>(p.n) * p.c * p.h * p.w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    int64_t r = i;
    int c, ix, iy;
    if (CL) {
      c = r % p.c; r /= p.c;
      ix = r % p.w; r /= p.w;
      iy = r % p.h; r /= p.h;
    } else {
      ix = r % p.w; r /= p.w;
      iy = r % p.h; r /= p.h;
      c = r % p.c; r /= p.c;
    }
    const int n = static_cast<int>(r);
    float acc = 0.f;
#pragma unroll
    for (int kh = 0; kh < 3; ++kh) {
      const int ty = iy + 1 - kh;
      if (ty < 0 || ty % p.stride) continue;
      const int oy = ty / p.stride;
      if (oy >= p.oh) continue;
#pragma unroll
      for (int kw = 0; kw < 3; ++kw) {
        const int tx = ix + 1 - kw;
        if (tx < 0 || tx % p.stride) continue;
        const int ox = tx / p.stride;
        if (ox >= p.ow) continue;
        acc = fmaf(to_f(dy[at(dyv, n, c, oy, ox)]), p.weight[c * 9 + kh * 3 + kw], acc);
      }
    }
    store<T>(p.grad_x.data, at(p.grad_x, n, c, iy, ix), acc);
  }
}

DwParams make_params(const shvit_dw_shape* s) {
  DwParams p{};
  p.n = s->n;
  p.c = s->c;
  p.h = s->h;
  p.w = s->w;
  p.oh = s->oh;
  p.ow = s->ow;
  p.stride = s->stride;
  p.weight = s->weight;
  return p;
}

template <bool CL>
int64_t tile_blocks(const DwParams& p) {
  using TL = Tile<CL>;
  return static_cast<int64_t>(p.n) * ceil_div(p.c, TL::CC) * ceil_div(p.oh, TL::TH) * ceil_div(p.ow, TL::TW);
}

template <int MODE>
cudaError_t launch_tiles(const shvit_dw_shape* s, const DwParams& p, cudaStream_t stream) {
  return dispatch_dtype(s->dtype, [&](auto t) {
    using T = decltype(t);
    if (s->channels_last)
      dw_tile_kernel<T, true, MODE><<<static_cast<unsigned>(tile_blocks<true>(p)), kThreads, 0, stream>>>(p);
    else
      dw_tile_kernel<T, false, MODE><<<static_cast<unsigned>(tile_blocks<false>(p)), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

int64_t stats_tiles(const shvit_dw_shape* s) {
  const DwParams p = make_params(s);
  return s->channels_last ? tile_blocks<true>(p) / ceil_div(p.c, Tile<true>::CC)
                          : tile_blocks<false>(p) / ceil_div(p.c, Tile<false>::CC);
}

}  // namespace
}  // namespace shvit

using namespace shvit;

extern "C" cudaError_t shvit_dw_forward(const shvit_dw_shape* s, shvit_view x, const float* scale,
                                        const float* shift, shvit_view residual, int relu, shvit_view out,
                                        cudaStream_t stream) {
  DwParams p = make_params(s);
  p.x = x;
  p.scale = scale;
  p.shift = shift;
  p.residual = residual;
  p.relu = relu;
  p.out = out;
  return launch_tiles<kForward>(s, p, stream);
}

extern "C" int64_t shvit_dw_stats_workspace(const shvit_dw_shape* s) {
  return stats_tiles(s) * (2 * static_cast<int64_t>(s->c) + 1);
}

extern "C" cudaError_t shvit_dw_stats(const shvit_dw_shape* s, shvit_view x, float* partials, float* mean,
                                      float* var, cudaStream_t stream) {
  DwParams p = make_params(s);
  p.x = x;
  p.partials = partials;
  cudaError_t err = launch_tiles<kStats>(s, p, stream);
  if (err != cudaSuccess) return err;
  const int64_t tiles = stats_tiles(s);
  combine_moments_kernel<<<s->c, kThreads, 0, stream>>>(partials, partials + tiles * s->c,
                                                        partials + 2 * tiles * s->c, static_cast<int>(tiles), s->c,
                                                        mean, var);
  return cudaGetLastError();
}

extern "C" cudaError_t shvit_dw_backward(const shvit_dw_shape* s, shvit_view x, shvit_view grad_out, shvit_view out,
                                         int relu, shvit_dw_bn bn, float* sums, shvit_view g, float* dy_ws,
                                         float* wsum, shvit_view grad_x, cudaStream_t stream) {
  DwParams p = make_params(s);
  p.x = x;
  p.grad_out = grad_out;
  p.out = out;
  p.relu = relu;
  p.g = g;
  p.grad_x = grad_x;
  p.bn_weight = bn.bn_weight;
  p.mean = bn.mean;
  p.var = bn.var;
  p.eps = bn.eps;
  p.sums = sums;
  p.wsum = wsum;
  p.dy_ws = dy_ws;
  // dy workspace: dense, in the layout of the activations.
  const int64_t C = s->c, OH = s->oh, OW = s->ow;
  p.dy = s->channels_last ? shvit_view{dy_ws, OH * OW * C, 1, OW * C, C} : shvit_view{dy_ws, C * OH * OW, OH * OW, OW, 1};
  cudaError_t err = cudaMemsetAsync(wsum, 0, sizeof(float) * 10 * C, stream);
  if (err != cudaSuccess) return err;
  if (bn.bn_weight) {
    if ((err = cudaMemsetAsync(sums, 0, sizeof(float) * 2 * C, stream)) != cudaSuccess) return err;
    if ((err = launch_tiles<kBackwardSums>(s, p, stream)) != cudaSuccess) return err;
  }
  if ((err = launch_tiles<kWeightGrad>(s, p, stream)) != cudaSuccess) return err;

  const int64_t total = static_cast<int64_t>(s->n) * C * s->h * s->w;
  const unsigned blocks = static_cast<unsigned>(total / kThreads + 1 < (1 << 20) ? total / kThreads + 1 : (1 << 20));
  return dispatch_dtype(s->dtype, [&](auto t) {
    using T = decltype(t);
    if (bn.bn_weight) {
      if (s->channels_last)
        dw_input_grad_kernel<T, float, true><<<blocks, kThreads, 0, stream>>>(p, dy_ws, p.dy);
      else
        dw_input_grad_kernel<T, float, false><<<blocks, kThreads, 0, stream>>>(p, dy_ws, p.dy);
    } else {
      const T* gp = static_cast<const T*>(g.data);
      if (s->channels_last)
        dw_input_grad_kernel<T, T, true><<<blocks, kThreads, 0, stream>>>(p, gp, g);
      else
        dw_input_grad_kernel<T, T, false><<<blocks, kThreads, 0, stream>>>(p, gp, g);
    }
    return cudaGetLastError();
  });
}
