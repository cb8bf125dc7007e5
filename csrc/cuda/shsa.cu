// SHSA: GroupNorm(1) statistics, the qkv 1x1 projection (GroupNorm applied to the input tile as a per-image
// scale/shift), single-head attention with Q = 16 and online softmax over 32-key tiles, and the backward.
//
// Tiles are 32 queries x 32 keys with 8 warps: a thread holds the scores of 4 query rows for one key (lane),
// so row max / row sum are warp shuffles; probabilities go through shared memory for the P-wide products.
// The qkv projection is written to an fp32 workspace (B, 2Q+P, N) because every query tile needs every key.
#include "common.cuh"

namespace shvit {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / kWarp;
constexpr int Q = SHVIT_SHSA_QK, MAXP = SHVIT_SHSA_MAX_P, MAXO = 2 * Q + MAXP;
constexpr int TQ = 32, TK = 32;                      // query / key tile
constexpr int kRows = TQ / kWarps;                   // score rows per thread
constexpr int kVRows = MAXP / kWarps;                // value channels per thread
constexpr int kORows = (MAXO + kWarps - 1) / kWarps;  // projection rows per thread
constexpr float kLog2e = 1.4426950408889634f;

struct Params {
  int b, c, p, o, n;
  float gn_eps;
  shvit_view x, out, grad_out, grad_x;  // sn: batch stride, sc: channel stride, sw: token stride
  const float* w;                       // (O, P)
  const float* bias;                    // (O) or NULL
  const float* gw;                      // GroupNorm affine (P) or NULL
  const float* gb;
  float* img_mean;  // (B)
  float* img_rstd;  // (B)
  float* qkv;       // (B, O, N) raw projection
  const float* aff_scale;  // per-channel affine on qkv (train BN) or NULL
  const float* aff_shift;
  float* pmean;  // projection moments per 32-token tile: [tile][O], [tile][O], count [tile]
  float* pm2;
  float* pcount;
  float* g;     // (B, O, N) gradient w.r.t. the (normalised) qkv
  float* lse;   // (B, N) log2-sum-exp2 of the scaled scores
  float* dsum;  // (B, N) sum_c dya * ya
  float* gx;    // (B, P, N) gradient w.r.t. the normalised input (pre GroupNorm backward)
  float* grad_gn_w;
  float* grad_gn_b;
};

__device__ __forceinline__ int64_t tok(const shvit_view& v, int b, int c, int n) {
  return b * v.sn + c * v.sc + n * v.sw;
}

// ---------------------------------------------------------------------------------------------------------
// GroupNorm(1) statistics per image over (P, N): mean first, then the centred second moment.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) image_stats_kernel(Params p) {
  __shared__ float scratch[kWarp];
  const int b = blockIdx.x;
  const int64_t m = static_cast<int64_t>(p.p) * p.n;
  const bool token_fast = p.x.sw == 1;
  auto elem = [&](int64_t e) {
    const int ch = static_cast<int>(token_fast ? e / p.n : e % p.p);
    const int t = static_cast<int>(token_fast ? e % p.n : e / p.p);
    return load<T>(p.x.data, tok(p.x, b, ch, t));
  };
  float s = 0.f;
  for (int64_t e = threadIdx.x; e < m; e += kThreads) s += elem(e);
  const float mean = block_sum(s, scratch) / static_cast<float>(m);
  float s2 = 0.f;
  for (int64_t e = threadIdx.x; e < m; e += kThreads) {
    const float d = elem(e) - mean;
    s2 += d * d;
  }
  const float var = block_sum(s2, scratch) / static_cast<float>(m);
  if (threadIdx.x == 0) {
    p.img_mean[b] = mean;
    p.img_rstd[b] = rsqrtf(var + p.gn_eps);
  }
}

// The GroupNorm output (with its affine when present) of x[b, ch, t], in fp32.
template <typename T>
__device__ __forceinline__ float normed(const Params& p, int b, int ch, int t, float mean, float rstd) {
  float v = (load<T>(p.x.data, tok(p.x, b, ch, t)) - mean) * rstd;
  if (p.gw) v = v * p.gw[ch] + p.gb[ch];
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// qkv[b, o, t] = sum_ch W[o, ch] xn[b, ch, t] + bias[o] for a 32-token tile; optional per-tile moments (train).
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) qkv_project_kernel(Params p, int with_moments) {
  __shared__ float xs[MAXP][TQ];
  const int b = blockIdx.x, t0 = blockIdx.y * TQ;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const float mean = p.img_mean[b], rstd = p.img_rstd[b];
  for (int j = threadIdx.x; j < p.p * TQ; j += kThreads) {
    const int ch = j / TQ, i = j % TQ;
    xs[ch][i] = t0 + i < p.n ? normed<T>(p, b, ch, t0 + i, mean, rstd) : 0.f;
  }
  __syncthreads();
  float acc[kORows];
#pragma unroll
  for (int r = 0; r < kORows; ++r) acc[r] = 0.f;
  for (int ch = 0; ch < p.p; ++ch) {
    const float xv = xs[ch][lane];
#pragma unroll
    for (int r = 0; r < kORows; ++r) {
      const int o = warp + r * kWarps;
      if (o < p.o) acc[r] = fmaf(__ldg(&p.w[o * p.p + ch]), xv, acc[r]);
    }
  }
  const int t = t0 + lane;
  const bool ok = t < p.n;
  const int cnt = min(TQ, p.n - t0);
  const int64_t tile = static_cast<int64_t>(b) * gridDim.y + blockIdx.y;
#pragma unroll
  for (int r = 0; r < kORows; ++r) {
    const int o = warp + r * kWarps;
    if (o >= p.o) continue;
    const float v = acc[r] + (p.bias ? p.bias[o] : 0.f);
    if (ok) p.qkv[(static_cast<int64_t>(b) * p.o + o) * p.n + t] = v;
    if (with_moments) {
      const float tm = warp_sum(ok ? v : 0.f) / cnt;
      const float m2 = warp_sum(ok ? (v - tm) * (v - tm) : 0.f);
      if (lane == 0) {
        p.pmean[tile * p.o + o] = tm;
        p.pm2[tile * p.o + o] = m2;
      }
    }
  }
  if (with_moments && threadIdx.x == 0) p.pcount[tile] = static_cast<float>(cnt);
}

// ---------------------------------------------------------------------------------------------------------
// Attention building blocks
// ---------------------------------------------------------------------------------------------------------
__device__ __forceinline__ float qkv_at(const Params& p, int b, int o, int t) {
  float v = p.qkv[(static_cast<int64_t>(b) * p.o + o) * p.n + t];
  if (p.aff_scale) v = v * p.aff_scale[o] + p.aff_shift[o];
  return v;
}

// Loads rows [o0, o0 + rows) of qkv for tokens [t0, t0 + 32) into dst[row][32] times `mul` (0 past N).
__device__ __forceinline__ void load_rows(const Params& p, int b, int o0, int rows, int t0, float mul, float* dst) {
  for (int j = threadIdx.x; j < rows * 32; j += kThreads) {
    const int r = j / 32, i = j % 32;
    dst[j] = t0 + i < p.n ? qkv_at(p, b, o0 + r, t0 + i) * mul : 0.f;
  }
}

// Scores in the log2 domain for this thread's rows i = warp + 8 r and key j = lane (-inf past N).
__device__ __forceinline__ void tile_scores(const float (*qs)[TQ], const float (*ks)[TK], int key, int n,
                                            float s[kRows]) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = warp + r * kWarps;
    float v = 0.f;
#pragma unroll
    for (int d = 0; d < Q; ++d) v = fmaf(qs[d][i], ks[d][lane], v);
    s[r] = key < n ? v : -INFINITY;
  }
}

// Online-softmax attention over all key tiles for the query tile in qs (already scaled by scale * log2 e).
// On return acc[r] holds the unnormalised output of channel warp + 8 r for query `lane`, and m/l (per row,
// replicated across the row's warp) the running max and sum.
struct AttnSmem {
  float qs[Q][TQ];
  float ks[Q][TK];
  float vs[MAXP][TK];
  float as[TQ][TK + 1];
  float rowv[TQ];  // per-row scalar passed from the row's warp to the output threads
};

__device__ void attend_tile(const Params& p, int b, AttnSmem& sm, float acc[kVRows], float m[kRows],
                            float l[kRows]) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
#pragma unroll
  for (int r = 0; r < kVRows; ++r) acc[r] = 0.f;
  for (int k0 = 0; k0 < p.n; k0 += TK) {
    __syncthreads();  // previous tile fully consumed
    load_rows(p, b, Q, Q, k0, 1.f, &sm.ks[0][0]);
    load_rows(p, b, 2 * Q, p.p, k0, 1.f, &sm.vs[0][0]);
    __syncthreads();
    float s[kRows];
    tile_scores(sm.qs, sm.ks, k0 + lane, p.n, s);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int i = warp + r * kWarps;
      const float mn = fmaxf(m[r], warp_max(s[r]));
      const float e = exp2f(s[r] - mn);
      const float alpha = exp2f(m[r] - mn);
      l[r] = l[r] * alpha + warp_sum(e);
      m[r] = mn;
      sm.as[i][lane] = e;
      if (lane == 0) sm.rowv[i] = alpha;
    }
    __syncthreads();
    const float alpha = sm.rowv[lane];
#pragma unroll
    for (int r = 0; r < kVRows; ++r) {
      const int ch = warp + r * kWarps;
      if (ch >= p.p) continue;
      float v = acc[r] * alpha;
#pragma unroll 8
      for (int j = 0; j < TK; ++j) v = fmaf(sm.as[lane][j], sm.vs[ch][j], v);
      acc[r] = v;
    }
  }
  __syncthreads();
}

// Hands each row's l from its warp to the threads that own the row's outputs (query = lane).
__device__ __forceinline__ float row_to_lane(AttnSmem& sm, const float l[kRows]) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
    if (lane == 0) sm.rowv[warp + r * kWarps] = l[r];
  __syncthreads();
  const float v = sm.rowv[lane];
  __syncthreads();
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) attn_forward_kernel(Params p) {
  __shared__ AttnSmem sm;
  const int b = blockIdx.x, q0 = blockIdx.y * TQ;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  load_rows(p, b, 0, Q, q0, rsqrtf(static_cast<float>(Q)) * kLog2e, &sm.qs[0][0]);
  float acc[kVRows], m[kRows], l[kRows];
  attend_tile(p, b, sm, acc, m, l);
  const float inv_l = 1.f / row_to_lane(sm, l);
  const int t = q0 + lane;
  if (t < p.n) {
#pragma unroll
    for (int r = 0; r < kVRows; ++r) {
      const int ch = warp + r * kWarps;
      if (ch < p.p) store<T>(p.out.data, tok(p.out, b, ch, t), fmaxf(acc[r] * inv_l, 0.f));
    }
  }
  // Pass-through channels: relu(x).
  for (int j = threadIdx.x; j < (p.c - p.p) * TQ; j += kThreads) {
    const int ch = p.p + j / TQ, tt = q0 + j % TQ;
    if (tt < p.n) store<T>(p.out.data, tok(p.out, b, ch, tt), fmaxf(load<T>(p.x.data, tok(p.x, b, ch, tt)), 0.f));
  }
}

// dya[ch][i] = grad_out * (out > 0) for the value channels of a 32-token tile (0 past N).
template <typename T>
__device__ __forceinline__ void load_dya(const Params& p, int b, int t0, float (*dst)[TQ]) {
  for (int j = threadIdx.x; j < p.p * TQ; j += kThreads) {
    const int ch = j / TQ, i = j % TQ, t = t0 + i;
    float v = 0.f;
    if (t < p.n && load<T>(p.out.data, tok(p.out, b, ch, t)) > 0.f)
      v = load<T>(p.grad_out.data, tok(p.grad_out, b, ch, t));
    dst[ch][i] = v;
  }
}

// For this thread's rows i = warp + 8 r and key `lane`: probabilities a = exp2(s - lse_i) and
// dscores a (dya_i . v_j - D_i). Writes ds, and the probabilities too when `as` is given.
__device__ __forceinline__ void probs_and_dscores(const AttnSmem& sm, const float (*dya)[TQ], const float* lse,
                                                  const float* dsum, int key, int n, int nch, float (*as)[TK + 1],
                                                  float (*ds)[TK + 1]) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  float s[kRows];
  tile_scores(sm.qs, sm.ks, key, n, s);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = warp + r * kWarps;
    const float a = exp2f(s[r] - lse[i]);
    float da = 0.f;
    for (int ch = 0; ch < nch; ++ch) da = fmaf(dya[ch][i], sm.vs[ch][lane], da);
    if (as) as[i][lane] = a;
    ds[i][lane] = a * (da - dsum[i]);
  }
}

// Backward for a query tile: recomputes the forward (row statistics and the output, for
// D_i = sum_c dya[c, i] ya[c, i]), then dq. Also writes the pass-through channels' input gradient.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_backward_q_kernel(Params p) {
  __shared__ AttnSmem sm;
  __shared__ float dya[MAXP][TQ];
  __shared__ float dsum[TQ], lse_s[TQ];
  const int b = blockIdx.x, q0 = blockIdx.y * TQ;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const float scale = rsqrtf(static_cast<float>(Q));
  load_rows(p, b, 0, Q, q0, scale * kLog2e, &sm.qs[0][0]);
  load_dya<T>(p, b, q0, dya);
  for (int j = threadIdx.x; j < (p.c - p.p) * TQ; j += kThreads) {
    const int ch = p.p + j / TQ, t = q0 + j % TQ;
    if (t >= p.n) continue;
    float v = 0.f;
    if (load<T>(p.out.data, tok(p.out, b, ch, t)) > 0.f) v = load<T>(p.grad_out.data, tok(p.grad_out, b, ch, t));
    store<T>(p.grad_x.data, tok(p.grad_x, b, ch, t), v);
  }
  float acc[kVRows], m[kRows], l[kRows];
  attend_tile(p, b, sm, acc, m, l);  // starts and ends with __syncthreads
  const float inv_l = 1.f / row_to_lane(sm, l);
  float d = 0.f;
#pragma unroll
  for (int r = 0; r < kVRows; ++r) {
    const int ch = warp + r * kWarps;
    if (ch < p.p) d += dya[ch][lane] * acc[r] * inv_l;
  }
  // D per query: the warps' partial sums added in warp order (sm.as is free until the dq loop).
  sm.as[warp][lane] = d;
  __syncthreads();
  if (warp == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += sm.as[w][lane];
    dsum[lane] = total;
  }
  float lse[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    lse[r] = m[r] + log2f(l[r]);
    if (lane == 0) lse_s[warp + r * kWarps] = lse[r];
  }
  __syncthreads();

  float dq[2] = {0.f, 0.f};  // d = warp + 8 r, query = lane
  for (int k0 = 0; k0 < p.n; k0 += TK) {
    load_rows(p, b, Q, Q, k0, 1.f, &sm.ks[0][0]);
    load_rows(p, b, 2 * Q, p.p, k0, 1.f, &sm.vs[0][0]);
    __syncthreads();
    probs_and_dscores(sm, dya, lse_s, dsum, k0 + lane, p.n, p.p, nullptr, sm.as);  // as <- dscores
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int dd = warp + r * kWarps;
      float v = dq[r];
#pragma unroll 8
      for (int j = 0; j < TK; ++j) v = fmaf(sm.as[lane][j], sm.ks[dd][j], v);
      dq[r] = v;
    }
    __syncthreads();
  }
  const int t = q0 + lane;
  if (t < p.n) {
#pragma unroll
    for (int r = 0; r < 2; ++r) p.g[(static_cast<int64_t>(b) * p.o + warp + r * kWarps) * p.n + t] = dq[r] * scale;
    if (warp == 0) p.dsum[static_cast<int64_t>(b) * p.n + t] = dsum[lane];
  }
  // lse for rows owned by this warp
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int tt = q0 + warp + r * kWarps;
    if (lane == 0 && tt < p.n) p.lse[static_cast<int64_t>(b) * p.n + tt] = lse[r];
  }
}

// Backward for a key tile: dk and dv over all query tiles, from the saved lse and D.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_backward_kv_kernel(Params p) {
  __shared__ AttnSmem sm;  // qs: scaled queries of the current query tile, as: probabilities
  __shared__ float dya[MAXP][TQ];
  __shared__ float ds[TQ][TK + 1];
  __shared__ float lse_s[TQ], dsum_s[TQ];
  const int b = blockIdx.x, k0 = blockIdx.y * TK;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const float qmul = rsqrtf(static_cast<float>(Q)) * kLog2e;
  load_rows(p, b, Q, Q, k0, 1.f, &sm.ks[0][0]);
  load_rows(p, b, 2 * Q, p.p, k0, 1.f, &sm.vs[0][0]);
  float dv[kVRows], dk[2] = {0.f, 0.f};
#pragma unroll
  for (int r = 0; r < kVRows; ++r) dv[r] = 0.f;
  for (int q0 = 0; q0 < p.n; q0 += TQ) {
    __syncthreads();
    load_rows(p, b, 0, Q, q0, qmul, &sm.qs[0][0]);
    load_dya<T>(p, b, q0, dya);
    if (threadIdx.x < TQ) {
      const int t = q0 + threadIdx.x;
      const int64_t idx = static_cast<int64_t>(b) * p.n + t;
      lse_s[threadIdx.x] = t < p.n ? p.lse[idx] : 0.f;
      dsum_s[threadIdx.x] = t < p.n ? p.dsum[idx] : 0.f;
    }
    __syncthreads();
    probs_and_dscores(sm, dya, lse_s, dsum_s, k0 + lane, p.n, p.p, sm.as, ds);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kVRows; ++r) {
      const int ch = warp + r * kWarps;
      if (ch >= p.p) continue;
      float v = dv[r];
#pragma unroll 8
      for (int i = 0; i < TQ; ++i) v = fmaf(dya[ch][i], sm.as[i][lane], v);
      dv[r] = v;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int dd = warp + r * kWarps;
      float v = dk[r];
#pragma unroll 8
      for (int i = 0; i < TQ; ++i) v = fmaf(sm.qs[dd][i], ds[i][lane], v);
      dk[r] = v;
    }
  }
  const int t = k0 + lane;
  if (t >= p.n) return;
  const int64_t base = static_cast<int64_t>(b) * p.o;
  // qs held q * scale * log2 e; dk = scale * sum_i q_i ds_i.
#pragma unroll
  for (int r = 0; r < 2; ++r) p.g[(base + Q + warp + r * kWarps) * p.n + t] = dk[r] / kLog2e;
#pragma unroll
  for (int r = 0; r < kVRows; ++r) {
    const int ch = warp + r * kWarps;
    if (ch < p.p) p.g[(base + 2 * Q + ch) * p.n + t] = dv[r];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Reductions over (B, N) per qkv channel and the BatchNorm backward on the qkv gradient.
// ---------------------------------------------------------------------------------------------------------
// s1[split][o] = sum g; s2[split][o] = sum g * (raw - mean[o]) when raw is given, over the images of this
// split (grid (O, splits)); sum_rows_kernel then adds the splits in order.
__global__ void __launch_bounds__(kThreads) channel_sums_kernel(const float* g, const float* raw, const float* mean,
                                                                int bsz, int o_count, int n, float* s1, float* s2) {
  __shared__ float scratch[kWarp];
  const int o = blockIdx.x;
  float a = 0.f, c = 0.f;
  for (int bb = blockIdx.y; bb < bsz; bb += gridDim.y) {
    const int64_t base = (static_cast<int64_t>(bb) * o_count + o) * n;
    for (int t = threadIdx.x; t < n; t += kThreads) {
      const float v = g[base + t];
      a += v;
      if (raw) c += v * (raw[base + t] - mean[o]);
    }
  }
  a = block_sum(a, scratch);
  if (raw) c = block_sum(c, scratch);
  if (threadIdx.x == 0) {
    s1[blockIdx.y * o_count + o] = a;
    if (raw) s2[blockIdx.y * o_count + o] = c;
  }
}

// g <- bn_w invstd (g - s1/M - (raw - mean) invstd^2 s2/M), in place; also the BN parameter gradients.
__global__ void bn_backward_kernel(float* g, const float* raw, const float* mean, const float* var,
                                   const float* bn_w, float eps, const float* s1, const float* s2, int bsz,
                                   int o_count, int n, float* grad_bn_w, float* grad_bn_b) {
  const int64_t total = static_cast<int64_t>(bsz) * o_count * n;
  const float count = static_cast<float>(bsz) * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int o = static_cast<int>((i / n) % o_count);
    const float invstd = rsqrtf(var[o] + eps);
    g[i] = bn_w[o] * invstd * (g[i] - s1[o] / count - (raw[i] - mean[o]) * invstd * invstd * s2[o] / count);
    if (i < o_count) {
      grad_bn_w[i] = rsqrtf(var[i] + eps) * s2[i];
      grad_bn_b[i] = s1[i];
    }
  }
}

// wparts[split][o, ch] = sum_{b in split, t} g[b, o, t] xn[b, ch, t]; 32x32 output tile per block, batch split
// over grid.z; sum_rows_kernel adds the splits in order.
template <typename T>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(Params p, float* grad_w) {
  __shared__ float gs[32][33];
  __shared__ float xs[32][33];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int o0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int b = blockIdx.z; b < p.b; b += gridDim.z) {
    const float mean = p.img_mean[b], rstd = p.img_rstd[b];
    for (int t0 = 0; t0 < p.n; t0 += 32) {
      __syncthreads();
      for (int j = threadIdx.x; j < 32 * 32; j += kThreads) {
        const int r = j / 32, i = j % 32, t = t0 + i;
        const bool ok = t < p.n;
        gs[r][i] = ok && o0 + r < p.o ? p.g[(static_cast<int64_t>(b) * p.o + o0 + r) * p.n + t] : 0.f;
        xs[r][i] = ok && c0 + r < p.p ? normed<T>(p, b, c0 + r, t, mean, rstd) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int oo = warp + r * kWarps;
        float v = acc[r];
#pragma unroll 8
        for (int i = 0; i < 32; ++i) v = fmaf(gs[oo][i], xs[lane][i], v);
        acc[r] = v;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int o = o0 + warp + r * kWarps, ch = c0 + lane;
    if (o < p.o && ch < p.p) grad_w[(static_cast<int64_t>(blockIdx.z) * p.o + o) * p.p + ch] = acc[r];
  }
}

// Per image: gxn = (W^T g) * gn_w, stored to p.gx, then the GroupNorm(1) backward into grad_x[:, :P];
// with the GroupNorm affine also its parameter gradients.
template <typename T>
__global__ void __launch_bounds__(kThreads) input_grad_kernel(Params p) {
  extern __shared__ float gs[];  // [O][32]
  __shared__ float scratch[kWarp];
  const int b = blockIdx.x;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const float mean = p.img_mean[b], rstd = p.img_rstd[b];
  float s1 = 0.f, s2 = 0.f, cgw[kVRows], cgb[kVRows];
#pragma unroll
  for (int r = 0; r < kVRows; ++r) cgw[r] = cgb[r] = 0.f;
  for (int t0 = 0; t0 < p.n; t0 += 32) {
    __syncthreads();
    for (int j = threadIdx.x; j < p.o * 32; j += kThreads) {
      const int o = j / 32, t = t0 + j % 32;
      gs[j] = t < p.n ? p.g[(static_cast<int64_t>(b) * p.o + o) * p.n + t] : 0.f;
    }
    __syncthreads();
    const int t = t0 + lane;
#pragma unroll
    for (int r = 0; r < kVRows; ++r) {
      const int ch = warp + r * kWarps;
      if (ch >= p.p) continue;
      float v = 0.f;
      for (int o = 0; o < p.o; ++o) v = fmaf(__ldg(&p.w[o * p.p + ch]), gs[o * 32 + lane], v);
      if (t >= p.n) continue;
      const float xn = (load<T>(p.x.data, tok(p.x, b, ch, t)) - mean) * rstd;
      const float gx = p.gw ? v * p.gw[ch] : v;
      cgw[r] += v * xn;
      cgb[r] += v;
      s1 += gx;
      s2 += gx * xn;
      p.gx[(static_cast<int64_t>(b) * p.p + ch) * p.n + t] = gx;
    }
  }
  if (p.grad_gn_w) {
#pragma unroll
    for (int r = 0; r < kVRows; ++r) {
      const int ch = warp + r * kWarps;
      const float a = warp_sum(cgw[r]), c = warp_sum(cgb[r]);
      if (lane == 0 && ch < p.p) {  // per image; sum_rows_kernel adds the images in order
        p.grad_gn_w[static_cast<int64_t>(b) * p.p + ch] = a;
        p.grad_gn_b[static_cast<int64_t>(b) * p.p + ch] = c;
      }
    }
  }
  const float m = static_cast<float>(p.p) * p.n;
  s1 = block_sum(s1, scratch) / m;  // also orders the p.gx writes before the reads below
  s2 = block_sum(s2, scratch) / m;
  const bool token_fast = p.x.sw == 1;
  for (int64_t e = threadIdx.x; e < static_cast<int64_t>(p.p) * p.n; e += kThreads) {
    const int ch = static_cast<int>(token_fast ? e / p.n : e % p.p);
    const int t = static_cast<int>(token_fast ? e % p.n : e / p.p);
    const float xn = (load<T>(p.x.data, tok(p.x, b, ch, t)) - mean) * rstd;
    const float gx = p.gx[(static_cast<int64_t>(b) * p.p + ch) * p.n + t];
    store<T>(p.grad_x.data, tok(p.grad_x, b, ch, t), rstd * (gx - s1 - xn * s2));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------
// Splits of the batch for the per-channel sums and the weight gradient (partials per split, added in order).
constexpr int kSumSplits = 32, kWeightSplitBlocks = 512;

struct Workspace {
  float *img_mean, *img_rstd, *qkv, *pmean, *pm2, *pcount, *scale, *shift, *g, *lse, *dsum, *gx, *sums;
  float *sum_parts, *w_parts, *gn_parts;
};

unsigned sum_splits(const shvit_shsa_shape* s) { return s->b < kSumSplits ? s->b : kSumSplits; }
unsigned weight_splits(const shvit_shsa_shape* s) {
  const unsigned wtiles = ceil_div(2 * Q + s->p, 32) * ceil_div(s->p, 32);
  const unsigned splits = static_cast<unsigned>(s->b) < kWeightSplitBlocks / wtiles ? s->b : kWeightSplitBlocks / wtiles;
  return splits > 0 ? splits : 1;
}

int64_t token_tiles(const shvit_shsa_shape* s) { return static_cast<int64_t>(s->b) * ceil_div(s->n, TQ); }

// Carves the workspace; returns the floats used (call with base NULL to size it).
int64_t carve(const shvit_shsa_shape* s, int train, int backward, float* base, Workspace* w) {
  const int64_t o = 2 * Q + s->p, bon = static_cast<int64_t>(s->b) * o * s->n, tiles = token_tiles(s);
  int64_t used = 0;
  auto take = [&](int64_t count) {
    float* ptr = base ? base + used : nullptr;
    used += (count + 31) / 32 * 32;  // 128-byte aligned pieces
    return ptr;
  };
  *w = Workspace{};
  w->img_mean = take(s->b);
  w->img_rstd = take(s->b);
  w->qkv = take(bon);
  if (train) {
    w->scale = take(o);
    w->shift = take(o);
    if (!backward) {
      w->pmean = take(tiles * o);
      w->pm2 = take(tiles * o);
      w->pcount = take(tiles);
    }
  }
  if (backward) {
    w->g = take(bon);
    w->lse = take(static_cast<int64_t>(s->b) * s->n);
    w->dsum = take(static_cast<int64_t>(s->b) * s->n);
    w->gx = take(static_cast<int64_t>(s->b) * s->p * s->n);
    w->sums = take(2 * o);
    w->sum_parts = take(2 * o * sum_splits(s));
    w->w_parts = take(static_cast<int64_t>(weight_splits(s)) * o * s->p);
    w->gn_parts = take(2 * static_cast<int64_t>(s->b) * s->p);
  }
  return used;
}

Params make_params(const shvit_shsa_shape* s, const Workspace& w) {
  Params p{};
  p.b = s->b;
  p.c = s->c;
  p.p = s->p;
  p.o = 2 * Q + s->p;
  p.n = s->n;
  p.gn_eps = s->gn_eps;
  p.w = s->qkv_weight;
  p.bias = s->qkv_bias;
  p.gw = s->gn_weight;
  p.gb = s->gn_bias;
  p.img_mean = w.img_mean;
  p.img_rstd = w.img_rstd;
  p.qkv = w.qkv;
  p.pmean = w.pmean;
  p.pm2 = w.pm2;
  p.pcount = w.pcount;
  p.g = w.g;
  p.lse = w.lse;
  p.dsum = w.dsum;
  p.gx = w.gx;
  return p;
}

// Statistics and projection; in training also the qkv BatchNorm as a per-channel affine (scale, shift)
// from batch statistics (forward) or the given ones (backward).
template <typename T>
cudaError_t prologue(const shvit_shsa_shape* s, Params& p, const Workspace& w, int train, int backward,
                     const float* bn_w, const float* bn_b, float bn_eps, float* mean, float* var,
                     cudaStream_t stream) {
  const dim3 tiles(s->b, ceil_div(s->n, TQ));
  image_stats_kernel<T><<<s->b, kThreads, 0, stream>>>(p);
  const int moments = train && !backward;
  qkv_project_kernel<T><<<tiles, kThreads, 0, stream>>>(p, moments);
  if (moments)
    combine_moments_kernel<<<p.o, kThreads, 0, stream>>>(w.pmean, w.pm2, w.pcount,
                                                         static_cast<int>(token_tiles(s)), p.o, mean, var);
  if (train) {
    bn_affine_kernel<<<ceil_div(p.o, kThreads), kThreads, 0, stream>>>(mean, var, bn_w, bn_b, bn_eps, p.o, w.scale,
                                                                       w.shift);
    p.aff_scale = w.scale;
    p.aff_shift = w.shift;
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace shvit

using namespace shvit;

extern "C" int64_t shvit_shsa_forward_workspace(const shvit_shsa_shape* s, int train) {
  Workspace w;
  return carve(s, train, 0, nullptr, &w);
}

extern "C" int64_t shvit_shsa_backward_workspace(const shvit_shsa_shape* s, int train) {
  Workspace w;
  return carve(s, train, 1, nullptr, &w);
}

extern "C" cudaError_t shvit_shsa_forward(const shvit_shsa_shape* s, shvit_view x, shvit_view out, int train,
                                          const float* bn_weight, const float* bn_bias, float bn_eps, float* mean,
                                          float* var, float* workspace, cudaStream_t stream) {
  if (s->p < 1 || s->p > MAXP || s->p > s->c || s->n < 1 || s->b < 1) return cudaErrorInvalidValue;
  Workspace w;
  carve(s, train, 0, workspace, &w);
  Params p = make_params(s, w);
  p.x = x;
  p.out = out;
  return dispatch_dtype(s->dtype, [&](auto t) {
    using T = decltype(t);
    cudaError_t err = prologue<T>(s, p, w, train, 0, bn_weight, bn_bias, bn_eps, mean, var, stream);
    if (err != cudaSuccess) return err;
    attn_forward_kernel<T><<<dim3(s->b, ceil_div(s->n, TQ)), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

extern "C" cudaError_t shvit_shsa_backward(const shvit_shsa_shape* s, shvit_view grad_out, shvit_view x,
                                           shvit_view out, int train, const float* bn_weight, const float* bn_bias,
                                           const float* mean, const float* var, float bn_eps,
                                           shvit_shsa_grads grads, shvit_view grad_x, float* workspace,
                                           cudaStream_t stream) {
  if (s->p < 1 || s->p > MAXP || s->p > s->c || s->n < 1 || s->b < 1) return cudaErrorInvalidValue;
  Workspace w;
  carve(s, train, 1, workspace, &w);
  Params p = make_params(s, w);
  p.x = x;
  p.out = out;
  p.grad_out = grad_out;
  p.grad_x = grad_x;
  const int o = p.o;
  const size_t gn_smem = sizeof(float) * o * 32;
  return dispatch_dtype(s->dtype, [&](auto t) {
    using T = decltype(t);
    // Every gradient below is a sum over the batch: per-split (or per-image) partials added in a fixed order by
    // sum_rows_kernel, so the results do not change from run to run (float atomics would).
    cudaError_t err = prologue<T>(s, p, w, train, 1, bn_weight, bn_bias, bn_eps, const_cast<float*>(mean),
                                  const_cast<float*>(var), stream);
    if (err != cudaSuccess) return err;
    auto sum_rows = [&](const float* parts, unsigned rows, int64_t cols, float* dst) {
      sum_rows_kernel<<<ceil_div(cols, kThreads), kThreads, 0, stream>>>(parts, static_cast<int>(rows), cols, dst);
    };
    const dim3 tiles(s->b, ceil_div(s->n, TQ));
    attn_backward_q_kernel<T><<<tiles, kThreads, 0, stream>>>(p);
    attn_backward_kv_kernel<T><<<tiles, kThreads, 0, stream>>>(p);
    const unsigned ssplits = sum_splits(s);
    const dim3 sums_grid(o, ssplits);
    float* s1p = w.sum_parts;
    float* s2p = w.sum_parts + static_cast<int64_t>(ssplits) * o;
    if (train) {
      channel_sums_kernel<<<sums_grid, kThreads, 0, stream>>>(w.g, w.qkv, mean, s->b, o, s->n, s1p, s2p);
      sum_rows(s1p, ssplits, o, w.sums);
      sum_rows(s2p, ssplits, o, w.sums + o);
      const int64_t total = static_cast<int64_t>(s->b) * o * s->n;
      const unsigned blocks = static_cast<unsigned>(total / kThreads + 1 < (1 << 16) ? total / kThreads + 1 : (1 << 16));
      bn_backward_kernel<<<blocks, kThreads, 0, stream>>>(w.g, w.qkv, mean, var, bn_weight, bn_eps, w.sums,
                                                          w.sums + o, s->b, o, s->n, grads.grad_bn_w, grads.grad_bn_b);
      p.grad_gn_w = w.gn_parts;
      p.grad_gn_b = w.gn_parts + static_cast<int64_t>(s->b) * s->p;
    } else {
      channel_sums_kernel<<<sums_grid, kThreads, 0, stream>>>(w.g, nullptr, nullptr, s->b, o, s->n, s1p, nullptr);
      sum_rows(s1p, ssplits, o, grads.grad_bias);
    }
    const unsigned wsplits = weight_splits(s);
    weight_grad_kernel<T><<<dim3(ceil_div(o, 32), ceil_div(s->p, 32), wsplits), kThreads, 0, stream>>>(p, w.w_parts);
    sum_rows(w.w_parts, wsplits, static_cast<int64_t>(o) * s->p, grads.grad_w);
    input_grad_kernel<T><<<s->b, kThreads, gn_smem, stream>>>(p);
    if (train) {
      sum_rows(p.grad_gn_w, s->b, s->p, grads.grad_gn_w);
      sum_rows(p.grad_gn_b, s->b, s->p, grads.grad_gn_b);
    }
    return cudaGetLastError();
  });
}
