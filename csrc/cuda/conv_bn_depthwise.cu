// Depthwise 3x3 conv (padding 1, stride 1/2) + per-channel affine + residual + ReLU, its batch statistics and
// its backward. One templated tile kernel serves the passes that need the conv output or its input window:
// a block owns (image, channel chunk, output tile), stages the input tile with its halo in shared memory
// (fp32, zero padded), and every thread keeps a single channel. Per-channel reductions (BN statistics, the
// backward's sums and weight gradient) are deterministic: per-thread sums, warp shuffles and a fixed-order sum
// inside the block, per-block partials in global memory and a fixed-order reduction over blocks (no float
// atomics, whose order varies from run to run).
#include "common.cuh"

namespace shvit {
namespace {

constexpr int kThreads = 256;

// Tile configurations: CC channels x TH x TW outputs per block.
// channels_last (config kCl): 32 channels x 4x4 outputs (threads along C, coalesced), two outputs per thread.
// NCHW: one output per thread (CC * TH * TW == kThreads), threads along W; the tile is chosen from the output
// map so that small maps keep the threads busy (an 8x32 tile leaves 44%, 19% and 6% of them busy on 14x14,
// 7x7 and 4x4 maps; these keep 77%, 77% and 100%).
enum TileConfig { kWide = 0, kMap16 = 1, kMap8 = 2, kMap4 = 3, kCl = 4 };
template <int CFG>
struct Tile;
template <>
struct Tile<kWide> {
  static constexpr int CC = 1, TH = 8, TW = 32;
};
template <>
struct Tile<kMap16> {
  static constexpr int CC = 1, TH = 16, TW = 16;
};
template <>
struct Tile<kMap8> {
  static constexpr int CC = 4, TH = 8, TW = 8;
};
template <>
struct Tile<kMap4> {
  static constexpr int CC = 16, TH = 4, TW = 4;
};
template <>
struct Tile<kCl> {
  static constexpr int CC = 32, TH = 4, TW = 4;
};

int tile_config(const shvit_dw_shape* s) {
  if (s->channels_last) return kCl;
  const int m = s->oh > s->ow ? s->oh : s->ow;
  return m > 16 ? kWide : m > 8 ? kMap16 : m > 4 ? kMap8 : kMap4;
}

struct TileDims {
  int cc, th, tw;
};
TileDims tile_dims(int cfg) {
  switch (cfg) {
    case kWide: return {Tile<kWide>::CC, Tile<kWide>::TH, Tile<kWide>::TW};
    case kMap16: return {Tile<kMap16>::CC, Tile<kMap16>::TH, Tile<kMap16>::TW};
    case kMap8: return {Tile<kMap8>::CC, Tile<kMap8>::TH, Tile<kMap8>::TW};
    case kMap4: return {Tile<kMap4>::CC, Tile<kMap4>::TH, Tile<kMap4>::TW};
    default: return {Tile<kCl>::CC, Tile<kCl>::TH, Tile<kCl>::TW};
  }
}

// Per-channel sums over the block of N per-thread values v[0..N), written to red[cc][col0 + k], in a fixed order.
// A channel's threads are contiguous (NCHW: tid / (kThreads / CC)) or strided (channels_last: tid % CC):
// contiguous runs are first reduced by warp shuffles within segments of W threads, then each channel's segment
// totals are added in index order. `seg` holds kThreads x 10 floats. Starts and ends with the block in step.
template <int CFG, int N>
__device__ __forceinline__ void block_channel_sums(const float* v, float (*seg)[10], float (*red)[10], int col0) {
  constexpr int CC = Tile<CFG>::CC;
  constexpr bool CL = CFG == kCl;
  constexpr int G = kThreads / CC;                   // threads per channel
  constexpr int W = CL ? 1 : (G < kWarp ? G : kWarp);  // threads per shuffle segment
  constexpr int S = G / W;                           // segments per channel
  static_assert(CL || (G & (G - 1)) == 0, "NCHW tiles need a power-of-two thread count per channel");
  const int tid = threadIdx.x;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float x = v[k];
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
    if (tid % W == 0) seg[tid / W][k] = x;
  }
  __syncthreads();
  for (int j = tid; j < CC * N; j += kThreads) {
    const int cc = j / N, k = j % N;
    float total = 0.f;
    for (int i = 0; i < S; ++i) total += seg[CL ? cc + CC * i : cc * S + i][k];
    red[cc][col0 + k] = total;
  }
  __syncthreads();
}

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
  float* partials;  // stats: mean [T][C], M2 [T][C], count [T]; backward: per-tile sums [T][C][nacc]
  float* dy_ws;     // BN backward: dy, dense in the layout of `dy`
};

__device__ __forceinline__ int64_t at(const shvit_view& v, int n, int c, int y, int x) {
  return n * v.sn + c * v.sc + y * v.sh + x * v.sw;
}

template <typename T, int CFG, int MODE>
__global__ void __launch_bounds__(kThreads) dw_tile_kernel(DwParams p) {
  using TL = Tile<CFG>;
  constexpr bool CL = CFG == kCl;
  constexpr int CC = TL::CC, TH = TL::TH, TW = TL::TW;
  constexpr int kPer = CC * TH * TW / kThreads;
  static_assert(kPer * kThreads == CC * TH * TW, "a tile is a whole number of outputs per thread");
  static_assert(CL || kPer == 1, "NCHW threads keep one channel only with one output each");
  constexpr int IHmax = (TH - 1) * 2 + 3, IWmax = (TW - 1) * 2 + 3;
  __shared__ float xs[CC * IHmax * IWmax];
  __shared__ float red[CC][10];
  __shared__ float seg[kThreads][10];

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
  __syncthreads();

  const int cc = CL ? tid % CC : tid / (TH * TW);
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
  const int64_t tiles = static_cast<int64_t>(p.n) * tiles_y * tiles_x;
  const int64_t tile = (static_cast<int64_t>(nb) * tiles_y + ty) * tiles_x + tx;
  if (MODE == kStats) {
    // Tile-local two-pass moments, merged across tiles by combine_moments_kernel.
    const int cnt = min(TH, p.oh - oy0) * min(TW, p.ow - ox0);
    block_channel_sums<CFG, 1>(acc, seg, red, 0);
    const float tmean = red[cc][0] / cnt;
    float m2 = 0.f;
#pragma unroll
    for (int r = 0; r < kPer; ++r)
      if (valid[r]) m2 += (ys[r] - tmean) * (ys[r] - tmean);
    block_channel_sums<CFG, 1>(&m2, seg, red, 1);
    if (tid < CC && c0 + tid < p.c) {
      p.partials[tile * p.c + c0 + tid] = red[tid][0] / cnt;
      p.partials[(tiles + tile) * p.c + c0 + tid] = red[tid][1];
    }
    if (tid == 0 && cb == 0) p.partials[2 * tiles * p.c + tile] = static_cast<float>(cnt);
    return;
  }
  // This tile's per-channel sums go to partials[tile][channel][k]; reduce_tile_sums_kernel adds the tiles.
  constexpr int nacc = MODE == kBackwardSums ? 2 : 10;
  block_channel_sums<CFG, nacc>(acc, seg, red, 0);
  for (int j = tid; j < CC * nacc; j += kThreads) {
    const int ch = c0 + j / nacc, k = j % nacc;
    if (ch < p.c) p.partials[(tile * p.c + ch) * nacc + k] = red[j / nacc][k];
  }
}

// out[k * stride_k + ch * stride_c] = sum over tiles, in tile order, of partials[tile][ch][k] (k < nacc).
// A warp takes 32 consecutive (ch, k) columns (coalesced); its 8 warps split the tiles, then add in warp order.
__global__ void __launch_bounds__(kThreads) reduce_tile_sums_kernel(const float* partials, int64_t tiles, int c,
                                                                    int nacc, float* out, int stride_k,
                                                                    int stride_c) {
  __shared__ float part[kThreads / kWarp][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t width = static_cast<int64_t>(c) * nacc;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarp + lane;
  float total = 0.f;
  if (col < width)
    for (int64_t t = warp; t < tiles; t += kThreads / kWarp) total += partials[t * width + col];
  part[warp][lane] = total;
  __syncthreads();
  if (warp == 0 && col < width) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / kWarp; ++w) s += part[w][lane];
    const int ch = static_cast<int>(col / nacc), k = static_cast<int>(col % nacc);
    out[static_cast<int64_t>(k) * stride_k + static_cast<int64_t>(ch) * stride_c] = s;
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

// Spatial tiles over the batch (a tile spans one chunk of channels; chunks are separate blocks).
int64_t spatial_tiles(const shvit_dw_shape* s) {
  const TileDims d = tile_dims(tile_config(s));
  return static_cast<int64_t>(s->n) * ceil_div(s->oh, d.th) * ceil_div(s->ow, d.tw);
}

int64_t tile_blocks(const shvit_dw_shape* s) { return spatial_tiles(s) * ceil_div(s->c, tile_dims(tile_config(s)).cc); }

template <int MODE>
cudaError_t launch_tiles(const shvit_dw_shape* s, const DwParams& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(tile_blocks(s));
  return dispatch_dtype(s->dtype, [&](auto t) {
    using T = decltype(t);
    switch (tile_config(s)) {
      case kWide: dw_tile_kernel<T, kWide, MODE><<<blocks, kThreads, 0, stream>>>(p); break;
      case kMap16: dw_tile_kernel<T, kMap16, MODE><<<blocks, kThreads, 0, stream>>>(p); break;
      case kMap8: dw_tile_kernel<T, kMap8, MODE><<<blocks, kThreads, 0, stream>>>(p); break;
      case kMap4: dw_tile_kernel<T, kMap4, MODE><<<blocks, kThreads, 0, stream>>>(p); break;
      default: dw_tile_kernel<T, kCl, MODE><<<blocks, kThreads, 0, stream>>>(p); break;
    }
    return cudaGetLastError();
  });
}

// Adds the per-tile sums of a backward pass (nacc per channel) into out in a fixed order.
cudaError_t reduce_tiles(const shvit_dw_shape* s, const float* partials, int nacc, float* out, int stride_k,
                         int stride_c, cudaStream_t stream) {
  const unsigned blocks = ceil_div(static_cast<int64_t>(s->c) * nacc, kWarp);
  reduce_tile_sums_kernel<<<blocks, kThreads, 0, stream>>>(partials, spatial_tiles(s), s->c, nacc, out, stride_k,
                                                           stride_c);
  return cudaGetLastError();
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
  return spatial_tiles(s) * (2 * static_cast<int64_t>(s->c) + 1);
}

extern "C" int64_t shvit_dw_backward_workspace(const shvit_dw_shape* s) {
  return spatial_tiles(s) * static_cast<int64_t>(s->c) * 10;
}

extern "C" cudaError_t shvit_dw_stats(const shvit_dw_shape* s, shvit_view x, float* partials, float* mean,
                                      float* var, cudaStream_t stream) {
  DwParams p = make_params(s);
  p.x = x;
  p.partials = partials;
  cudaError_t err = launch_tiles<kStats>(s, p, stream);
  if (err != cudaSuccess) return err;
  const int64_t tiles = spatial_tiles(s);
  combine_moments_kernel<<<s->c, kThreads, 0, stream>>>(partials, partials + tiles * s->c,
                                                        partials + 2 * tiles * s->c, static_cast<int>(tiles), s->c,
                                                        mean, var);
  return cudaGetLastError();
}

extern "C" cudaError_t shvit_dw_backward(const shvit_dw_shape* s, shvit_view x, shvit_view grad_out, shvit_view out,
                                         int relu, shvit_dw_bn bn, float* sums, shvit_view g, float* dy_ws,
                                         float* wsum, float* partials, shvit_view grad_x, cudaStream_t stream) {
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
  p.partials = partials;
  p.dy_ws = dy_ws;
  // dy workspace: dense, in the layout of the activations.
  const int64_t C = s->c, OH = s->oh, OW = s->ow;
  p.dy = s->channels_last ? shvit_view{dy_ws, OH * OW * C, 1, OW * C, C} : shvit_view{dy_ws, C * OH * OW, OH * OW, OW, 1};
  // Each pass writes per-tile sums to `partials`, reduced in a fixed order before the next pass reads them.
  cudaError_t err;
  if (bn.bn_weight) {
    if ((err = launch_tiles<kBackwardSums>(s, p, stream)) != cudaSuccess) return err;
    if ((err = reduce_tiles(s, partials, 2, sums, static_cast<int>(C), 1, stream)) != cudaSuccess) return err;
  }
  if ((err = launch_tiles<kWeightGrad>(s, p, stream)) != cudaSuccess) return err;
  if ((err = reduce_tiles(s, partials, 10, wsum, 1, 10, stream)) != cudaSuccess) return err;

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
