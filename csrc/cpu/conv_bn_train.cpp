// Training Conv+BN and the conv backwards.
//
// conv_bn_train: the raw conv y (fp32 on this backend's own kernels, bf16 on ATen's as the reference), the mean
// (ATen's sum, the reference's) and ONE pass for the fp64 per-channel sums of d = y - mean and d^2 (a two-pass
// variance), or over many values per channel one pass of its own for both (below), ONE pass normalise + residual +
// ReLU (in place on y unless y is kept for the backward).
// conv_bn_train_backward takes the kept y or recomputes it (as the reference does), one pass for fp64 sums of g,
// g (y - mean), y - mean and (y - mean)^2 with the ReLU mask taken from `out`, one pass writing dy (fp32, computed in
// fp64) and g, then the conv's gradients, accumulated in fp32: 1x1 and dense channels_last convs on micro-kernel GEMMs
// where measured faster than ATen's convolution_backward (the 1x1 ones take dy chunk by chunk from the pass, and in
// bf16 multiply bf16 pairs where bf16 GEMMs do), the rest on it in fp32. Over many values per channel (kFp32Count)
// the forward takes mean and variance from one pass of its own and the backward its sums, both in fp32 blocks into
// fp64 totals, and the backward computes dy in fp32.
#include "ops.h"

#include <array>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>

// The forward's normalisation rounds step by step like the reference's eager ops (no fused multiply-add): given the
// same y and statistics, its output is the reference's bit for bit.
#pragma GCC optimize("fp-contract=off")

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

namespace {

// A (N, C, plane) activation in either layout: NCHW runs are one channel's plane, channels_last runs are rows of C.
struct ChannelLayout {
  bool channels_last;
  int64_t batch, c, plane;
  int64_t count() const { return batch * plane; }
};

// Per-channel parameters (of type S, float or double) as vectors: splats of channel ch (NCHW), or channels
// [c0, c0 + kVec) (channels_last).
template <int P, typename S = float>
struct ChannelParams {
  using Vec = std::conditional_t<std::is_same_v<S, float>, fVec, dVec>;
  std::array<const S*, P> ptr;
  void splat(int64_t ch, Vec* v) const {
    for (int i = 0; i < P; ++i) v[i] = Vec(ptr[i][ch]);
  }
  void load(int64_t c0, int64_t n, Vec* v) const {
    for (int i = 0; i < P; ++i) {
      if constexpr (std::is_same_v<S, float>) v[i] = load_f(ptr[i] + c0, n);
      else v[i] = dVec::loadu(ptr[i] + c0, n);
    }
  }
};

// Per-channel sums of K quantities: contrib(offset, count, params, v) sets K vectors v (fVec for Acc = float, dVec for
// Acc = double) for the `count` values at `offset`; lanes past `count` are masked or never read here. Tasks (one
// channel in NCHW, 256 rows in channels_last) do not depend on the thread count, so neither does the result. fp32
// sums restart every short block (256 values of one image's channel, or 16 rows) into fp64 totals, for about pairwise
// accuracy; fp64 sums run lane-wise over the whole task (a horizontal sum per image made small NCHW maps several
// times slower than the reference).
template <int K, typename Acc, int P, typename S, typename F>
void reduce_per_channel(const ChannelLayout& l, const ChannelParams<P, S>& params, F contrib, double* out /* K x C */) {
  using ParamVec = typename ChannelParams<P, S>::Vec;
  using AccVec = std::conditional_t<std::is_same_v<Acc, float>, fVec, dVec>;
  const AccVec zero(Acc(0));
  if (!l.channels_last) {
    constexpr int64_t kBlock = 16 * kVec;
    at::parallel_for(0, l.c, 1, [&](int64_t c0, int64_t c1) {
      const F f = contrib;  // a local copy: its captures stay in registers
      for (int64_t ch = c0; ch < c1; ++ch) {
        ParamVec pv[P > 0 ? P : 1];
        params.splat(ch, pv);
        double total[K] = {};
        AccVec acc[K];
        auto flush = [&] {
          for (int k = 0; k < K; ++k) {
            total[k] += sum_lanes(acc[k]);
            acc[k] = zero;
          }
        };
        for (int k = 0; k < K; ++k) acc[k] = zero;
        for (int64_t n = 0; n < l.batch; ++n) {
          const int64_t base = (n * l.c + ch) * l.plane;
          for (int64_t b0 = 0; b0 < l.plane; b0 += kBlock) {
            for (int64_t i = b0; i < std::min(l.plane, b0 + kBlock); i += kVec) {
              const int64_t m = std::min(kVec, l.plane - i);
              AccVec v[K];
              f(base + i, m, pv, v);
              for (int k = 0; k < K; ++k) acc[k] = acc[k] + (m == kVec ? v[k] : AccVec::set(zero, v[k], m));
            }
            if (std::is_same_v<Acc, float>) flush();
          }
        }
        flush();
        for (int k = 0; k < K; ++k) out[k * l.c + ch] = total[k];
      }
    });
    return;
  }
  constexpr int64_t kTaskRows = 256, kBlockRows = 16;
  const int64_t rows = l.count(), tasks = ceil_div(rows, kTaskRows);
  std::vector<double> partial(tasks * K * l.c, 0.0);
  // Rows outer, channel blocks inner, the sums of every channel block in a small array (in L1): the input streams run
  // sequentially. Channel blocks outer (sums in registers, consecutive rows 1 KiB apart) stalled on a cache miss per
  // row: the backward's statistics pass was 15% of a 1x1 backward's samples (S1's 128 -> 256 at 14x14), 7% after;
  // that backward 1.07x, 256 -> 128 1.06x, the smaller maps within noise (AMD Zen 5, interleaved, 2026-12-02).
  // Each lane still adds its rows in order: the same sums. contrib is copied into the task (call sites capture by
  // value) so that its pointers stay in registers.
  const int64_t blocks = ceil_div(l.c, kVec);
  constexpr int kParamVecs = P > 0 ? P : 1;  // per channel block
  // Fewer tasks than threads (S1's 4 x 4 maps at batch 16 are one task): each task's channel blocks are also split
  // between threads. A lane's sums are the same either way.
  const int64_t threads = at::get_num_threads();
  const int64_t groups = tasks == 0 || tasks >= threads ? 1 : std::min(blocks, ceil_div(threads, tasks));
  const int64_t group_blocks = ceil_div(blocks, groups);
  at::parallel_for(0, tasks * groups, 1, [&](int64_t q0, int64_t q1) {
    const F f = contrib;
    std::vector<AccVec> acc(K * blocks);
    std::vector<ParamVec> pv(kParamVecs * blocks);
    for (int64_t cb = 0; cb < blocks; ++cb) params.load(cb * kVec, std::min(kVec, l.c - cb * kVec), &pv[cb * kParamVecs]);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t t = q / groups, cb0 = (q % groups) * group_blocks, cb1 = std::min(blocks, cb0 + group_blocks);
      double* part = partial.data() + t * K * l.c;
      const int64_t r0 = t * kTaskRows, r1 = std::min(rows, r0 + kTaskRows);
      // fp64 sums run over the whole task as one block.
      for (int64_t b0 = r0, b1; b0 < r1; b0 = b1) {
        b1 = std::is_same_v<Acc, float> ? std::min(r1, b0 + kBlockRows) : r1;
        std::fill(acc.begin(), acc.end(), zero);
        for (int64_t r = b0; r < b1; ++r) {
          for (int64_t cb = cb0; cb < cb1; ++cb) {
            AccVec v[K];
            f(r * l.c + cb * kVec, std::min(kVec, l.c - cb * kVec), &pv[cb * kParamVecs], v);
            for (int k = 0; k < K; ++k) acc[k * blocks + cb] = acc[k * blocks + cb] + v[k];  // lanes past m: unread
          }
        }
        for (int k = 0; k < K; ++k)
          for (int64_t cb = cb0; cb < cb1; ++cb) {
            const int64_t c0 = cb * kVec, m = std::min(kVec, l.c - c0);
            Acc lanes[kVec];
            acc[k * blocks + cb].store(lanes, m);
            for (int64_t j = 0; j < m; ++j) part[k * l.c + c0 + j] += lanes[j];
          }
      }
    }
  });
  std::fill(out, out + K * l.c, 0.0);
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t i = 0; i < K * l.c; ++i) out[i] += partial[t * K * l.c + i];
}

// reduce_per_channel summing in fp32 blocks (fp32_blocks) or in fp64; contrib takes its accumulator vectors as an
// auto* (fVec or dVec, see as_acc).
template <int K, int P, typename S, typename F>
void reduce_per_channel_in(bool fp32_blocks, const ChannelLayout& l, const ChannelParams<P, S>& params, F contrib,
                           double* out) {
  if (fp32_blocks) reduce_per_channel<K, float>(l, params, contrib, out);
  else reduce_per_channel<K, double>(l, params, contrib, out);
}

// v as accumulator vector V: itself (fVec) or widened exactly (dVec).
template <typename V>
inline V as_acc(const fVec& v) {
  if constexpr (std::is_same_v<V, dVec>) return widen(v);
  else return v;
}

// body(offset, count, params) for the channel blocks of channels_last rows [r0, r1), in this thread.
template <int P, typename S, typename F>
void map_rows(const ChannelLayout& l, const ChannelParams<P, S>& params, int64_t r0, int64_t r1, F body) {
  using ParamVec = typename ChannelParams<P, S>::Vec;
  const F f = body;  // a local copy: its captures stay in registers
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c0 = 0; c0 < l.c; c0 += kVec) {
      const int64_t m = std::min(kVec, l.c - c0);
      ParamVec pv[P > 0 ? P : 1];
      params.load(c0, m, pv);
      f(r * l.c + c0, m, pv);
    }
}

// Elementwise pass: body(offset, count, params) for every run of at most kVec values of one channel block.
template <int P, typename S, typename F>
void map_per_channel(const ChannelLayout& l, const ChannelParams<P, S>& params, F body) {
  using ParamVec = typename ChannelParams<P, S>::Vec;
  if (!l.channels_last) {
    at::parallel_for(0, l.batch * l.c, 1, [&](int64_t q0, int64_t q1) {
      const F f = body;  // a local copy: its captures stay in registers
      for (int64_t q = q0; q < q1; ++q) {
        ParamVec pv[P > 0 ? P : 1];
        params.splat(q % l.c, pv);
        for (int64_t i = 0; i < l.plane; i += kVec) f(q * l.plane + i, std::min(kVec, l.plane - i), pv);
      }
    });
    return;
  }
  at::parallel_for(0, l.count(), 64, [&](int64_t r0, int64_t r1) { map_rows(l, params, r0, r1, body); });
}

template <typename T>
inline fVec load_n(const T* p, int64_t n) {
  return n == kVec ? load_f(p) : load_f(p, n);
}
template <typename T>
inline void store_n(const fVec& v, T* p, int64_t n) {
  if (n == kVec) store_f(v, p); else store_f(v, p, n);
}

void check_conv_train_args(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                           int64_t padding, int64_t groups) {
  check_float_tensor(x, op, "x", 4);
  check_float_tensor(weight, op, "weight", 4);
  check_same_dtype(weight, x, op, "weight");
  TORCH_CHECK(x.numel() > 0, op, ": 'x' must not be empty, got shape ", x.sizes());
  TORCH_CHECK(stride >= 1, op, ": 'stride' must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, op, ": 'padding' must be >= 0, got ", padding);
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && weight.size(0) % groups == 0, op, ": 'groups' = ", groups,
              " must be >= 1 and divide the input (", x.size(1), ") and output (", weight.size(0), ") channels");
  TORCH_CHECK(weight.size(1) * groups == x.size(1), op, ": 'weight' ", weight.sizes(), " with groups=", groups,
              " expects ", weight.size(1) * groups, " input channels but 'x' has ", x.size(1));
  TORCH_CHECK(x.size(2) + 2 * padding >= weight.size(2) && x.size(3) + 2 * padding >= weight.size(3), op,
              ": input spatial size ", x.sizes().slice(2), " is smaller than the kernel ", weight.sizes().slice(2),
              " with padding ", padding);
}

// A Conv+BN over at least this many values per channel sums its statistics in fp32 blocks, forward and backward
// (see conv_bn_train and its backward).
constexpr int64_t kFp32Count = 256;

inline bool stats_in_fp32_blocks(int64_t count) { return count >= kFp32Count; }

// oneDNN's bf16 conv with stride > 1 and a one-pixel-wide output returned wrong values (torch 2.13.0, Xeon with AMX,
// 2026-12-02): such convs, and their gradients, run in fp32.
inline bool onednn_bf16_conv_wrong(int64_t stride, int64_t out_w) { return stride > 1 && out_w == 1; }

// Rows per thread up to which a 1x1 conv's gradients split gw by output channels (pointwise_grads_by_channels).
constexpr int64_t kSplitRowsPerThread = 512;

template <typename T, typename DyRows>
void pointwise_grads_by_channels(DyRows dy_rows, const T* x, const T* w, int64_t rows, int64_t cin, int64_t cout,
                                 T* gx, float* gw);

// The 1x1 channels_last gradients as micro-kernel GEMMs on (rows, channels) matrices of T (float, or bf16 multiplied
// as pairs), chunk by chunk of rows: the chunk's dy rows (dy_rows(r0, n, buffer) returns them, in place or produced
// into the per-thread buffer, where they stay in cache for both GEMMs) give gx rows = dy W and, transposed, add
// dy^T x to per-thread partial weight gradients, all accumulated in fp32. w: (cout, cin) row-major. gx (of T) may be
// null. On several threads with at most kSplitRowsPerThread rows each, pointwise_grads_by_channels instead.
template <typename T, typename DyRows>
void pointwise_grads_brgemm(DyRows dy_rows, const T* x, const T* w, int64_t rows, int64_t cin, int64_t cout,
                            T* gx, float* gw) {
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && rows <= kSplitRowsPerThread * threads)
    return pointwise_grads_by_channels(dy_rows, x, w, rows, cin, cout, gx, gw);
  const int64_t chunks = ceil_div(ceil_div(rows, 512), threads) * threads;  // at most 512 rows, whole rounds
  const int64_t chunk = std::min(rows, ceil_div(ceil_div(rows, chunks), 16) * 16);
  MatB<T> wb;
  if (gx) wb.assign(w, cout, cin, cin);
  // Each thread's weight-gradient partial is written by its first chunk's product, not zeroed first: the thread with
  // chunk 0 writes gw itself, the others blocks of their own, added after in thread order. (A zeroed partial per
  // thread, copied to gw, was two weight-sized passes per call; a training step makes one per 1x1 conv.)
  std::vector<Scratch<float>> partials;
  for (int64_t t = 0; t < threads; ++t) partials.emplace_back(0);
  std::vector<char> wrote(threads, 0);
  at::parallel_for(0, ceil_div(rows, chunk), 1, [&](int64_t c0, int64_t c1) {
    MatmulThreadGuard guard;
    const int64_t t = at::get_thread_num();
    if (c0 > 0) partials[t] = Scratch<float>(cout * cin), wrote[t] = 1;
    float* acc = c0 == 0 ? gw : partials[t].data();
    Scratch<T> buffer(chunk * cout), dy_t(cout * chunk);
    // bf16 gx rows are rounded from the chunk's fp32 product while it is in cache (a whole fp32 gx converted after
    // was another pass over memory).
    Scratch<float> gx_acc(std::is_same_v<T, float> ? 0 : chunk * cin);
    MatB<T> xb;  // one per thread: its bf16 VNNI copy's storage is reused, not zero-filled afresh per chunk
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t r0 = ch * chunk, nr = std::min(chunk, rows - r0);
      const T* dy = dy_rows(r0, nr, buffer.data());
      if (gx) {
        if constexpr (std::is_same_v<T, float>) {
          matmul(nr, dy, cout, wb, gx + r0 * cin, cin);
        } else {
          matmul(nr, dy, cout, wb, gx_acc.data(), cin);
          at::vec::convert(gx_acc.data(), gx + r0 * cin, nr * cin);
        }
      }
      transpose_matrix(dy, nr, cout, dy_t.data());
      xb.assign(x + r0 * cin, nr, cin, cin);
      matmul(cout, dy_t.data(), nr, xb, acc, cin, /*accumulate=*/ch > c0);
    }
  });
  for (int64_t t = 0; t < threads; ++t) {
    if (!wrote[t]) continue;
    const float* partial = partials[t].data();
    for (int64_t i = 0; i < cout * cin; ++i) gw[i] += partial[i];
  }
}

// pointwise_grads_brgemm over few rows per thread: the per-thread weight-gradient partials (threads x cout x cin,
// zeroed, then summed on one thread) cost more than the products there. Rows are split for dy and gx, then gw's
// output channels, each summed over all rows by one thread (so gw does not depend on the thread count). S1's bf16
// 320 -> 640 backward at 4 x 4 (batch 16, AMX) took 0.76 ms on two threads the old way against 0.72 on one.
template <typename T, typename DyRows>
void pointwise_grads_by_channels(DyRows dy_rows, const T* x, const T* w, int64_t rows, int64_t cin, int64_t cout,
                                 T* gx, float* gw) {
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = ceil_div(ceil_div(rows, threads), 16) * 16;
  Scratch<T> dy_buffer(rows * cout);
  const T* dy = nullptr;  // all rows: dy_rows writes them into dy_buffer or reads them in place
  MatB<T> wb;
  if (gx) wb.assign(w, cout, cin, cin);
  at::parallel_for(0, ceil_div(rows, chunk), 1, [&](int64_t c0, int64_t c1) {
    MatmulThreadGuard guard;
    Scratch<float> gx_acc(std::is_same_v<T, float> || !gx ? 0 : chunk * cin);
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t r0 = ch * chunk, nr = std::min(chunk, rows - r0);
      const T* rows_dy = dy_rows(r0, nr, dy_buffer.data() + r0 * cout);
      if (r0 == 0) dy = rows_dy;
      if (!gx) continue;
      if constexpr (std::is_same_v<T, float>) {
        matmul(nr, rows_dy, cout, wb, gx + r0 * cin, cin);
      } else {
        matmul(nr, rows_dy, cout, wb, gx_acc.data(), cin);
        at::vec::convert(gx_acc.data(), gx + r0 * cin, nr * cin);
      }
    }
  });
  Scratch<T> dy_t(cout * rows);
  transpose_matrix(dy, rows, cout, dy_t.data());
  MatB<T> xb;
  xb.assign(x, rows, cin, cin);
  const int64_t block = ceil_div(ceil_div(cout, threads), 16) * 16;
  at::parallel_for(0, ceil_div(cout, block), 1, [&](int64_t b0, int64_t b1) {
    MatmulThreadGuard guard;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o0 = b * block, n = std::min(block, cout - o0);
      matmul(n, dy_t.data() + o0 * rows, rows, xb, gw + o0 * cin, cin);
    }
  });
}

// dy rows read in place from a (rows, cout) matrix.
auto rows_of(const float* dy, int64_t cout) {
  return [dy, cout](int64_t r0, int64_t, float*) { return dy + r0 * cout; };
}

// dst[0, n) = src[0, n), or zeros for a null src; dst[0, n) += src[0, n). Inline vector moves for a patch row's few
// channels: with std::copy_n / std::fill_n / at::vec::map2 in their place S1's 16 -> 32 stem gradients ran at 0.87x
// oneDNN's instead of 0.97x (one thread, AMD Zen 5, 2026-12-02).
inline void copy_channels(const float* src, float* dst, int64_t n) {
  int64_t c = 0;
  for (; c + kVec <= n; c += kVec) (src ? fVec::loadu(src + c) : fVec(0.f)).store(dst + c);
  if (c < n) (src ? fVec::loadu(src + c, n - c) : fVec(0.f)).store(dst + c, n - c);
}
inline void add_channels(const float* src, float* dst, int64_t n) {
  int64_t c = 0;
  for (; c + kVec <= n; c += kVec) (fVec::loadu(dst + c) + fVec::loadu(src + c)).store(dst + c);
  if (c < n) (fVec::loadu(dst + c, n - c) + fVec::loadu(src + c, n - c)).store(dst + c, n - c);
}

// A kxk conv's geometry (channels_last; one stride and padding for both axes); the micro-kernel gradients take
// groups 1 only.
struct DenseConvShape {
  int64_t batch, h, w, cin, oh, ow, cout, kh, kw, stride, pad;
  int64_t groups = 1;
  int64_t k() const { return kh * kw * cin; }
};

// body(p, i, ih, iw0) for each pixel p of output rows [r0, r0 + rows) (numbered from 0) and kernel row i: the patch
// row it reads starts at input row ih, column iw0 (kw columns, either possibly outside the image).
template <typename F>
inline void for_each_patch_row(const DenseConvShape& s, int64_t r0, int64_t rows, F body) {
  for (int64_t r = 0, p = 0; r < rows; ++r)
    for (int64_t ow = 0; ow < s.ow; ++ow, ++p)
      for (int64_t i = 0; i < s.kh; ++i) body(p, i, (r0 + r) * s.stride - s.pad + i, ow * s.stride - s.pad);
}

// A dense (groups 1) kxk conv's gradients in channels_last fp32 as micro-kernel GEMMs over blocks of output rows of
// one image: gw (cout x kh kw cin) += dy_blk^T cols, cols the block's im2col patches (pixels x kh kw cin); gx by
// dcols = dy_blk W (W: cout x kh kw cin), scattered back (col2im). One image per task, so the scatters of
// neighbouring row blocks never race; weight gradients summed in per-thread partials. gx may be null.
void dense_grads_brgemm(const float* dy, const float* x, const float* w_rows /* cout x kh kw cin */,
                        const DenseConvShape& s, float* gx, float* gw /* cout x kh kw cin */) {
  const int64_t k = s.k(), image_in = s.h * s.w * s.cin, image_out = s.oh * s.ow * s.cout;
  const int64_t block_rows = std::max<int64_t>(1, std::min<int64_t>(s.oh, 512 / std::max<int64_t>(s.ow, 1)));
  const int64_t threads = at::get_num_threads();
  std::vector<float> partial(threads * s.cout * k, 0.f);
  MatB<float> wb;
  if (gx) wb.assign(w_rows, s.cout, k, k);
  at::parallel_for(0, s.batch, 1, [&](int64_t n0, int64_t n1) {
    MatmulThreadGuard guard;
    float* acc = partial.data() + at::get_thread_num() * s.cout * k;
    std::vector<float> cols(block_rows * s.ow * k), dy_t(s.cout * block_rows * s.ow);
    for (int64_t n = n0; n < n1; ++n) {
      const float* xn = x + n * image_in;
      float* gxn = gx ? gx + n * image_in : nullptr;
      int64_t zeroed_rows = 0;  // gx rows [0, zeroed_rows) of this image are zeroed, just before first use (cached)
      for (int64_t r0 = 0; r0 < s.oh; r0 += block_rows) {
        const int64_t rows = std::min(block_rows, s.oh - r0), pixels = rows * s.ow;
        const float* dyb = dy + n * image_out + r0 * s.ow * s.cout;
        // cols[p, (i, j, c)] = x[n, oh s - pad + i, ow s - pad + j, c], zero outside the image.
        for_each_patch_row(s, r0, rows, [&](int64_t p, int64_t i, int64_t ih, int64_t iw0) {
          float* col = cols.data() + p * k + i * s.kw * s.cin;
          if (ih < 0 || ih >= s.h) return copy_channels(nullptr, col, s.kw * s.cin);
          const float* src = xn + ih * s.w * s.cin;
          if (iw0 >= 0 && iw0 + s.kw <= s.w) return copy_channels(src + iw0 * s.cin, col, s.kw * s.cin);
          for (int64_t j = 0, iw = iw0; j < s.kw; ++j, ++iw, col += s.cin)
            copy_channels(iw >= 0 && iw < s.w ? src + iw * s.cin : nullptr, col, s.cin);
        });
        transpose_matrix(dyb, pixels, s.cout, dy_t.data());
        MatB<float> cb;
        cb.assign(cols.data(), pixels, k, k);
        matmul(s.cout, dy_t.data(), pixels, cb, acc, k, true);
        if (!gxn) continue;
        matmul(pixels, dyb, s.cout, wb, cols.data(), k);  // cols now holds dcols
        const int64_t last_row = std::min(s.h, (r0 + rows - 1) * s.stride - s.pad + s.kh);
        if (last_row > zeroed_rows) {
          std::fill(gxn + zeroed_rows * s.w * s.cin, gxn + last_row * s.w * s.cin, 0.f);
          zeroed_rows = last_row;
        }
        for_each_patch_row(s, r0, rows, [&](int64_t p, int64_t i, int64_t ih, int64_t iw0) {
          if (ih < 0 || ih >= s.h) return;
          const float* col = cols.data() + p * k + i * s.kw * s.cin;
          float* dst = gxn + ih * s.w * s.cin;
          if (iw0 >= 0 && iw0 + s.kw <= s.w) return add_channels(col, dst + iw0 * s.cin, s.kw * s.cin);
          for (int64_t j = 0, iw = iw0; j < s.kw; ++j, ++iw, col += s.cin)
            if (iw >= 0 && iw < s.w) add_channels(col, dst + iw * s.cin, s.cin);
        });
      }
      if (gxn) std::fill(gxn + zeroed_rows * s.w * s.cin, gxn + image_in, 0.f);  // rows no patch reaches
    }
  });
  std::copy_n(partial.data(), s.cout * k, gw);
  for (int64_t t = 1; t < threads; ++t)
    for (int64_t i = 0; i < s.cout * k; ++i) gw[i] += partial[t * s.cout * k + i];
}

// Both gradient GEMMs of one S1 stage-1 FFN-sized conv (16 x 14 x 14 pixels, 128 -> 256 channels), best of a few
// runs (seconds).
double time_pointwise_grads(bool brgemm) {
  const int64_t rows = 3136, cin = 128, cout = 256;
  const at::Tensor x = at::rand({rows, cin}), dy = at::rand({rows, cout}), w = at::rand({cout, cin});
  at::Tensor gx = at::empty({rows, cin}), gw = at::empty({cout, cin});
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    if (brgemm) {
      pointwise_grads_brgemm(rows_of(dy.data_ptr<float>(), cout), x.data_ptr<float>(), w.data_ptr<float>(), rows, cin,
                             cout, gx.data_ptr<float>(), gw.data_ptr<float>());
    } else {
      at::mm_out(gx, dy, w);
      at::mm_out(gw, dy.t(), x);
    }
    best = std::min(best, seconds_since(start));
  }
  return best;
}

// Which GEMMs a 1x1 channels_last conv's gradients run on.
enum class PointwiseGrads { kAten, kBrgemm, kBrgemmBf16 };

// fp32: the micro-kernel GEMMs above or ATen's mm (MKL's sgemm where torch has it: S1's 1x1 gradients ran at 84-98
// GFLOP/s on it against 180-212 on the micro-kernel, AMD Zen 5, 2026-12-02), "auto" timing both once per process.
// bf16 (x's dtype) where bf16 GEMMs multiply as pairs (bf16_widened() measured them faster than fp32 ones): the
// micro-kernel in bf16 pairs, dy rounded to bf16 as the reference's conv backward takes it (S1's bf16 1x1 gradients
// widened to fp32 ran at 58 GFLOP/s on a Xeon with AMX). SHVIT_CPU_POINTWISE_GRADS=brgemm|aten forces the
// micro-kernel or ATen's mm (tests run both).
PointwiseGrads pointwise_grads_path(at::ScalarType dtype) {
  const char* env = std::getenv("SHVIT_CPU_POINTWISE_GRADS");
  const std::string mode = env ? env : "auto";
  TORCH_CHECK(mode == "auto" || mode.empty() || mode == "brgemm" || mode == "aten",
              "SHVIT_CPU_POINTWISE_GRADS must be auto, brgemm or aten, got '", mode, "'");
  if (mode == "aten") return PointwiseGrads::kAten;
  if (dtype == at::kBFloat16 && bf16_brgemm_usable() && !bf16_widened()) return PointwiseGrads::kBrgemmBf16;
  if (mode == "brgemm") return PointwiseGrads::kBrgemm;
  static const bool faster = time_pointwise_grads(true) < time_pointwise_grads(false);
  return faster ? PointwiseGrads::kBrgemm : PointwiseGrads::kAten;
}

// A 1x1 conv that is a GEMM on (pixels, channels) matrices.
bool is_pointwise(const at::Tensor& weight, int64_t stride, int64_t padding, int64_t groups) {
  return weight.size(2) == 1 && weight.size(3) == 1 && stride == 1 && padding == 0 && groups == 1;
}

// ATen's convolution_backward (oneDNN) of a dense conv in channels_last fp32.
std::tuple<at::Tensor, at::Tensor> aten_conv_grads(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                                   int64_t stride, int64_t padding, int64_t groups, bool input_grad) {
  auto grads = at::convolution_backward(dy, x, weight, std::nullopt, {stride}, {padding}, {1}, false, {0}, groups,
                                        {input_grad, true, false});
  return {std::get<0>(grads), std::get<1>(grads)};
}

std::tuple<at::Tensor, at::Tensor> brgemm_dense_grads(const at::Tensor& dy, const at::Tensor& x,
                                                      const at::Tensor& weight, const DenseConvShape& s,
                                                      bool input_grad) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor gx = input_grad ? empty_output(x.sizes(), x.options().dtype(at::kFloat), cl) : at::Tensor();
  const at::Tensor w_rows = weight.to(at::kFloat).permute({0, 2, 3, 1}).contiguous();
  at::Tensor gw_rows = at::empty({s.cout, s.kh, s.kw, s.cin}, w_rows.options());
  dense_grads_brgemm(dy.data_ptr<float>(), x.data_ptr<float>(), w_rows.data_ptr<float>(), s,
                     input_grad ? gx.data_ptr<float>() : nullptr, gw_rows.data_ptr<float>());
  return {gx, gw_rows.permute({0, 3, 1, 2})};
}

// The input gradient nobody asked for (input_grad false): empty, as the op's contract says (zeros of x's shape cost a
// fill and, in bf16, a conversion).
at::Tensor skipped_input_grad(const at::Tensor& x) {
  return at::empty({0}, x.options());
}

// A depthwise 3x3 conv (groups == channels, weight (C, 1, 3, 3)).
bool is_depthwise3x3(const DenseConvShape& s) {
  return s.groups == s.cin && s.cout == s.cin && s.kh == 3 && s.kw == 3;
}

// Depthwise 3x3 gradients in channels_last, vectorised over channels, image by image. The input gradient is gathered:
// each input pixel sums the dy of the output pixels that read it times their taps (fp32) and is stored once in x's
// dtype, rounded as the caller's cast would. For the weight gradient, per channel vector, the 9 sums stay in
// registers while the image's output pixels pass; each image's (fp32) is summed over the images in order in fp64, so
// the result does not depend on the thread count. ATen's fp32 backward, with the bf16 input widened to fp32 and its
// gradient rounded back by copies, took a median 2.6-2.9 ms (four runs) on S1's 512-channel stride-2 conv (batch 16,
// one thread; AMD Zen 5, 2026-12-04).
template <typename TX>
void depthwise_grads(const float* dy, const TX* x, const float* taps, const DenseConvShape& s, TX* gx,
                     float* image_gw) {
  const int64_t c = s.cin;
  // Per input row (column): the (tap, output row (column)) pairs that read it, up to 3, tap -1 after the last, so the
  // gather loops divide by the stride nowhere.
  struct Reach {
    int tap;
    int64_t out;
  };
  auto reach = [&](int64_t size, int64_t out_size) {
    std::vector<Reach> table(size * 3, Reach{-1, 0});
    for (int64_t in = 0; in < size; ++in) {
      int found = 0;
      for (int t = 0; t < 3; ++t) {
        const int64_t o = in + s.pad - t;  // output index times the stride
        if (o >= 0 && o % s.stride == 0 && o / s.stride < out_size) table[in * 3 + found++] = Reach{t, o / s.stride};
      }
    }
    return table;
  };
  const std::vector<Reach> reach_h = reach(s.h, s.oh), reach_w = reach(s.w, s.ow);
  at::parallel_for(0, s.batch, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const TX* xn = x + n * s.h * s.w * c;
      const float* dyn = dy + n * s.oh * s.ow * c;
      // One channel vector (FULL: all kVec lanes, loads without a mask) over the image.
      auto channel_block = [&](int64_t c0, int64_t nc, auto full_c) {
        constexpr bool kFull = decltype(full_c)::value;
        auto load = [nc](const auto* p) { return kFull ? load_f(p) : load_f(p, nc); };
        fVec acc[9];
        for (int64_t oh = 0; oh < s.oh; ++oh) {
          for (int i = 0; i < 3; ++i) {
            const int64_t ih = oh * s.stride - s.pad + i;
            if (ih < 0 || ih >= s.h) continue;
            const TX* xr = xn + ih * s.w * c + c0;
            const float* dr = dyn + oh * s.ow * c + c0;
            fVec a0 = acc[i * 3], a1 = acc[i * 3 + 1], a2 = acc[i * 3 + 2];
            for (int64_t ow = 0; ow < s.ow; ++ow) {
              const fVec d = load(dr + ow * c);
              const int64_t iw = ow * s.stride - s.pad;
              if (iw >= 0 && iw + 2 < s.w) {
                const TX* xp = xr + iw * c;
                a0 = at::vec::fmadd(d, load(xp), a0);
                a1 = at::vec::fmadd(d, load(xp + c), a1);
                a2 = at::vec::fmadd(d, load(xp + 2 * c), a2);
              } else {
                if (iw >= 0 && iw < s.w) a0 = at::vec::fmadd(d, load(xr + iw * c), a0);
                if (iw + 1 >= 0 && iw + 1 < s.w) a1 = at::vec::fmadd(d, load(xr + (iw + 1) * c), a1);
                if (iw + 2 >= 0 && iw + 2 < s.w) a2 = at::vec::fmadd(d, load(xr + (iw + 2) * c), a2);
              }
            }
            acc[i * 3] = a0, acc[i * 3 + 1] = a1, acc[i * 3 + 2] = a2;
          }
        }
        for (int t = 0; t < 9; ++t) store_n(acc[t], image_gw + (n * 9 + t) * c + c0, nc);
        if (!gx) return;
        fVec w[9];
        for (int t = 0; t < 9; ++t) w[t] = load(taps + t * c + c0);
        TX* gxn = gx + n * s.h * s.w * c + c0;
        for (int64_t ih = 0; ih < s.h; ++ih) {
          const Reach* rows = &reach_h[ih * 3];
          for (int64_t iw = 0; iw < s.w; ++iw) {
            const Reach* cols = &reach_w[iw * 3];
            fVec sum(0.f);
            for (int ra = 0; ra < 3 && rows[ra].tap >= 0; ++ra) {
              const float* dr = dyn + rows[ra].out * s.ow * c + c0;
              for (int cb = 0; cb < 3 && cols[cb].tap >= 0; ++cb)
                sum = at::vec::fmadd(load(dr + cols[cb].out * c), w[rows[ra].tap * 3 + cols[cb].tap], sum);
            }
            if constexpr (kFull) store_f(sum, gxn + (ih * s.w + iw) * c);
            else store_f(sum, gxn + (ih * s.w + iw) * c, nc);
          }
        }
      };
      int64_t c0 = 0;
      for (; c0 + kVec <= c; c0 += kVec) channel_block(c0, kVec, std::true_type{});
      if (c0 < c) channel_block(c0, c - c0, std::false_type{});
    }
  });
}

// depthwise_grads on a channels_last conv from an fp32 dy: gx in x's dtype (empty without input_grad), gw fp32
// (C, 1, 3, 3), the images' weight gradients added one after another in fp64.
std::tuple<at::Tensor, at::Tensor> depthwise_conv_grads(const at::Tensor& dy, const at::Tensor& x,
                                                        const at::Tensor& weight, const DenseConvShape& s,
                                                        bool input_grad) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const int64_t c = s.cin;
  at::Tensor gx = input_grad ? empty_output(x.sizes(), x.options(), cl) : skipped_input_grad(x);
  const at::Tensor taps = weight.to(at::kFloat).reshape({c, 9}).t().contiguous();  // (9, C)
  std::vector<float> image_gw(s.batch * 9 * c);  // (N, 9, C)
  const at::Tensor xc = x.contiguous(cl), dyc = converted(dy, at::kFloat, cl);
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_depthwise_grads", [&] {
    using TX = scalar_t;
    depthwise_grads(dyc.data_ptr<float>(), xc.data_ptr<TX>(), taps.data_ptr<float>(), s,
                    input_grad ? gx.data_ptr<TX>() : nullptr, image_gw.data());
  });
  std::vector<double> total(9 * c, 0.0);
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t k = 0; k < 9 * c; ++k) total[k] += image_gw[n * 9 * c + k];
  at::Tensor gw = at::empty(weight.sizes(), weight.options().dtype(at::kFloat));
  float* gwp = gw.data_ptr<float>();  // (C, 1, 3, 3) contiguous
  for (int64_t ch = 0; ch < c; ++ch)
    for (int t = 0; t < 9; ++t) gwp[ch * 9 + t] = static_cast<float>(total[t * c + ch]);
  return {gx, gw};
}

// Which gradients a kxk (dense or grouped, not 1x1) channels_last conv takes.
enum class KxkGrads { kAten, kBrgemm, kAtenBf16, kDepthwise };

// The name SHVIT_CPU_DENSE_GRADS gives the path.
const char* kxk_grads_name(KxkGrads path) {
  switch (path) {
    case KxkGrads::kBrgemm: return "brgemm";
    case KxkGrads::kAtenBf16: return "aten_bf16";
    case KxkGrads::kDepthwise: return "depthwise";
    default: return "aten";
  }
}

// The micro-kernel ones above (groups 1) or ATen's in fp32, or for a bf16 conv where bf16 GEMMs multiply as pairs
// ATen's in bf16 (oneDNN's pair or AMX kernels; dy rounded to bf16, as the reference's conv backward takes it).
// oneDNN's fp32 backward ran S1's stride-2 stem convs at 26-230 GFLOP/s depending on the shape (AMD Zen 5,
// 2026-12-02), and its bf16 depthwise backward ran 0.7x its fp32 one alone but 1.1-2.2x with the fp32 path's
// conversions (Xeon with AMX, 2026-12-03), so "auto" times the candidates (bf16 inputs converted as the call would,
// both gradients) once per shape, dtype and thread count (on random data of the shape) and remembers
// the fastest: one choice whether or not the input gradient is asked for, so the weight gradient is the same.
// A depthwise 3x3 conv also has depthwise_grads above. SHVIT_CPU_DENSE_GRADS=brgemm|aten|aten_bf16 forces one (brgemm:
// the project's kernels, the micro-kernel GEMMs for groups 1 or depthwise_grads, else aten; aten_bf16: where the bf16
// candidate exists, else aten; tests run each). Not in bf16 where oneDNN's bf16 conv is wrong (see conv_raw).
// Each shape's choice, for kxk_grads_choices too. Key: batch, h, w, c_in, out h, out w, c_out, kh, kw, stride,
// padding, groups, threads, bf16, whether the bf16 candidate exists.
using KxkKey = std::array<int64_t, 15>;
std::mutex& kxk_choices_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::map<KxkKey, KxkGrads>& kxk_choices() {
  static std::map<KxkKey, KxkGrads> chosen;
  return chosen;
}

KxkGrads kxk_grads_path(const DenseConvShape& s, at::ScalarType dtype) {
  const char* env = std::getenv("SHVIT_CPU_DENSE_GRADS");
  const std::string mode = env ? env : "auto";
  TORCH_CHECK(mode == "auto" || mode.empty() || mode == "brgemm" || mode == "aten" || mode == "aten_bf16",
              "SHVIT_CPU_DENSE_GRADS must be auto, brgemm, aten or aten_bf16, got '", mode, "'");
  const bool bf16_candidate =
      dtype == at::kBFloat16 && bf16_brgemm_usable() && !bf16_widened() && !onednn_bf16_conv_wrong(s.stride, s.ow);
  if (mode == "brgemm")
    return s.groups == 1 ? KxkGrads::kBrgemm : is_depthwise3x3(s) ? KxkGrads::kDepthwise : KxkGrads::kAten;
  if (mode == "aten") return KxkGrads::kAten;
  if (mode == "aten_bf16") return bf16_candidate ? KxkGrads::kAtenBf16 : KxkGrads::kAten;
  if (s.groups > 1 && !is_depthwise3x3(s) && !bf16_candidate) return KxkGrads::kAten;  // the only candidate
  const KxkKey key{s.batch, s.h, s.w, s.cin, s.oh, s.ow, s.cout, s.kh, s.kw, s.stride, s.pad,
                   s.groups, at::get_num_threads(), dtype == at::kBFloat16, bf16_candidate};
  {
    std::lock_guard<std::mutex> lock(kxk_choices_mutex());
    auto it = kxk_choices().find(key);
    if (it != kxk_choices().end()) return it->second;
  }
  const auto cl = at::MemoryFormat::ChannelsLast;
  // On the shape's own batch: timed on 4 of S4's 64 images (one thread), five of its nine shapes took another path,
  // the first training step 2.7 s instead of 15.3 but the next ones 1,838 ms instead of 1,768 (Intel Xeon family 6
  // model 167, 2026-12-05).
  // x and w in the call's dtype; dy in fp32 as the fp32 paths take it.
  const at::Tensor x = at::rand({s.batch, s.cin, s.h, s.w}).contiguous(cl).to(dtype);
  const at::Tensor dy = at::rand({s.batch, s.cout, s.oh, s.ow}).contiguous(cl);
  const at::Tensor w = at::rand({s.cout, s.cin / s.groups, s.kh, s.kw}).to(dtype);
  // The median of five calls after one untimed: the fastest of a few hid the page faults of fresh multi-MiB blocks
  // (ATen's gradient outputs; then also the fp32 path's copies, now in reused blocks), which most calls pay (S1's
  // 512-channel stride-2 depthwise backward in bf16: 0.8 ms at best, 2.9 ms median; AMD Zen 5, 2026-12-04); of
  // three where a call takes over 20 ms (page faults weigh little there). A candidate whose first timed call takes
  // over twice the best median so far stops there: it cannot win but by a later call twice as fast. (The full count
  // cost seconds of the first step on large batches: 13 s for S4's 64 images on one thread.)
  double best = std::numeric_limits<double>::infinity();
  KxkGrads fastest = KxkGrads::kAten;
  auto time_candidate = [&](KxkGrads path, auto&& fn) {
    fn();
    std::vector<double> times;
    for (int rep = 0, reps = 5; rep < reps; ++rep) {
      const auto start = std::chrono::steady_clock::now();
      fn();
      times.push_back(seconds_since(start));
      if (rep == 0 && times[0] > 2 * best) return;
      if (rep == 0 && times[0] > 0.02) reps = 3;
    }
    const size_t middle = times.size() / 2;
    std::nth_element(times.begin(), times.begin() + middle, times.end());
    if (times[middle] < best) best = times[middle], fastest = path;
  };
  // Both gradients; the fp32 paths' gx converted back to the call's dtype. The usual winners first, so the others
  // stop early.
  if (is_depthwise3x3(s)) {
    time_candidate(KxkGrads::kDepthwise,
                   [&] { converted(std::get<0>(depthwise_conv_grads(dy, x, w, s, true)), dtype, cl); });
  }
  if (bf16_candidate) {
    const at::Tensor dy16 = converted(dy, at::kBFloat16, cl);
    time_candidate(KxkGrads::kAtenBf16, [&] { aten_conv_grads(dy16, x, w, s.stride, s.pad, s.groups, true); });
  }
  if (s.groups == 1) {
    time_candidate(KxkGrads::kBrgemm, [&] {
      converted(std::get<0>(brgemm_dense_grads(dy, converted(x, at::kFloat, cl), w, s, true)), dtype, cl);
    });
  }
  time_candidate(KxkGrads::kAten, [&] {
    const at::Tensor x32 = converted(x, at::kFloat, cl);
    converted(std::get<0>(aten_conv_grads(dy, x32, w.to(at::kFloat), s.stride, s.pad, s.groups, true)), dtype, cl);
  });
  std::lock_guard<std::mutex> lock(kxk_choices_mutex());
  return kxk_choices().emplace(key, fastest).first->second;
}

// A channels_last conv's geometry, from arguments check_conv_train_args accepted.
DenseConvShape kxk_conv_shape(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding,
                              int64_t groups) {
  const int64_t oh = (x.size(2) + 2 * padding - weight.size(2)) / stride + 1;
  const int64_t ow = (x.size(3) + 2 * padding - weight.size(3)) / stride + 1;
  return {x.size(0), x.size(2), x.size(3), x.size(1), oh, ow, weight.size(0), weight.size(2), weight.size(3),
          stride, padding, groups};
}

// Convs this backend's own kernels take (conv_bias_act, no bias): in fp32 groups 1 and depthwise 3x3 with padding
// 1; in bf16 the channels_last 1x1 ones where they run on AMX tiles: six of S1's, each with a new autocast weight
// as in training, took 0.84 ms on two threads against oneDNN's 1.08 (and its S1 bf16 training step 2-3% less time;
// Intel Xeon family 6 model 167, 2026-12-05). On VDPBF16PS the pair kernels ran near oneDNN's rate (AMD Zen 5), so
// there bf16 stays on ATen's.
bool own_conv(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding, int64_t groups) {
  if (x.scalar_type() == at::kBFloat16)
    return amx_usable() && is_pointwise(weight, stride, padding, groups) &&
           activation_format(x) == at::MemoryFormat::ChannelsLast;
  if (x.scalar_type() != at::kFloat) return false;
  return groups == 1 || (is_depthwise3x3(kxk_conv_shape(x, weight, stride, padding, groups)) && padding == 1 &&
                         (stride == 1 || stride == 2));
}

// The raw conv output of a training Conv+BN in x's dtype and layout; the backward recomputes it the same way. fp32 on
// this backend's own kernels: ATen's (oneDNN) ran S1's 1x1 training convs at 66% of the FMA peak where the inference
// GEMMs reach about 90%, and its 3 -> 16 stem conv at 27 GFLOP/s against 166 (AMD Zen 5, one thread, 2026-12-04).
// Rounded differently from the reference's, it can flip a ReLU mask by an ulp: the lock-step test allows that in a
// few of its 30 steps (the reference on ATen's other fp32 conv does it in one). bf16 on ATen's, as the reference's,
// but for the 1x1 convs on AMX tiles (own_conv); a bf16 conv oneDNN gets wrong runs in fp32, rounded once.
at::Tensor conv_raw(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding, int64_t groups) {
  const auto fmt = activation_format(x);
  if (own_conv(x, weight, stride, padding, groups))
    return conv_bias_act(x, weight, std::nullopt, stride, padding, groups, false, std::nullopt);
  const int64_t out_w = (x.size(3) + 2 * padding - weight.size(3)) / stride + 1;
  if (x.scalar_type() == at::kBFloat16 && onednn_bf16_conv_wrong(stride, out_w))
    return at::conv2d(x.contiguous(fmt).to(at::kFloat), weight.to(at::kFloat), {}, stride, padding, 1, groups)
        .to(at::kBFloat16)
        .contiguous(fmt);
  return at::conv2d(x.contiguous(fmt), weight, {}, stride, padding, 1, groups).contiguous(fmt);
}


// A 1x1 channels_last conv's gradients on the micro-kernel GEMMs in T (see pointwise_grads_brgemm), dy rows of T
// from dy_rows; gx in T (empty without input_grad), gw in fp32.
template <typename T, typename DyRows>
std::tuple<at::Tensor, at::Tensor> pointwise_conv_grads(DyRows dy_rows, const at::Tensor& x, const at::Tensor& weight,
                                                        bool input_grad) {
  const int64_t cin = x.size(1), cout = weight.size(0), rows = x.numel() / cin;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  at::Tensor gx = input_grad ? empty_output(x.sizes(), x.options().dtype(dtype), cl) : skipped_input_grad(x);
  // A reused block: the gradient becomes the parameter's .grad, which zero_grad frees before the next step's.
  at::Tensor gw = empty_output(weight.sizes(), weight.options().dtype(at::kFloat), at::MemoryFormat::Contiguous);
  const at::Tensor x_rows = converted(x, dtype, cl);
  const at::Tensor w_rows = contiguous_matrix(weight.to(dtype).reshape({cout, cin}));
  pointwise_grads_brgemm<T>(dy_rows, x_rows.data_ptr<T>(), w_rows.data_ptr<T>(), rows, cin, cout,
                            input_grad ? gx.data_ptr<T>() : nullptr, gw.data_ptr<float>());
  return {gx, gw};
}

// dL/dx and dL/dw of the conv from dL/dy (fp32, or bf16 for a kxk conv whose gradients run in bf16), accumulated
// in fp32 (a kxk conv's bf16 path returns bf16); the caller casts. Without input_grad (a network's first
// conv: 40% of its backward on S1's stem) dL/dx is not computed and comes back empty. A 1x1 stride-1 conv in
// channels_last is two GEMMs on the (pixels, channels) matrices: faster here than ATen's convolution_backward
// (about 12% on S1's shapes). Input gradients go to reused output blocks: a fresh multi-MiB one
// page-faults on every step.
std::tuple<at::Tensor, at::Tensor> conv_grads(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                              int64_t stride, int64_t padding, int64_t groups, bool input_grad) {
  const bool pointwise = is_pointwise(weight, stride, padding, groups);
  const auto fmt = activation_format(x);
  if (pointwise && fmt == at::MemoryFormat::ChannelsLast && dy.is_contiguous(fmt)) {
    const int64_t cin = x.size(1), cout = weight.size(0), rows = x.numel() / cin;
    const at::Tensor dy_rows = dy.permute({0, 2, 3, 1}).reshape({rows, cout});
    if (pointwise_grads_path(at::kFloat) != PointwiseGrads::kAten)
      return pointwise_conv_grads<float>(rows_of(dy_rows.data_ptr<float>(), cout), x, weight, input_grad);
    const at::Tensor x_rows = converted(x, at::kFloat, fmt).permute({0, 2, 3, 1}).reshape({rows, cin});
    at::Tensor gx = input_grad ? empty_output(x.sizes(), x.options().dtype(at::kFloat), fmt) : skipped_input_grad(x);
    if (input_grad) {
      at::Tensor gx_rows = gx.permute({0, 2, 3, 1}).view({rows, cin});
      at::mm_out(gx_rows, dy_rows, weight.to(at::kFloat).reshape({cout, cin}));
    }
    return {gx, at::mm(dy_rows.t(), x_rows).view(weight.sizes())};
  }
  if (!pointwise && fmt == at::MemoryFormat::ChannelsLast && dy.is_contiguous(fmt)) {
    const DenseConvShape s = kxk_conv_shape(x, weight, stride, padding, groups);
    const KxkGrads path = kxk_grads_path(s, x.scalar_type());
    if (path == KxkGrads::kBrgemm) {
      auto [dense_gx, gw] =
          brgemm_dense_grads(converted(dy, at::kFloat, fmt), converted(x, at::kFloat, fmt), weight, s, input_grad);
      return {input_grad ? dense_gx : skipped_input_grad(x), gw};
    }
    if (path == KxkGrads::kDepthwise) return depthwise_conv_grads(dy, x, weight, s, input_grad);
    if (path == KxkGrads::kAtenBf16) {
      auto [bf16_gx, gw] =
          aten_conv_grads(converted(dy, at::kBFloat16, fmt), x, weight, stride, padding, groups, input_grad);
      return {input_grad ? bf16_gx : skipped_input_grad(x), gw};
    }
  }
  auto [aten_gx, gw] =
      aten_conv_grads(converted(dy, at::kFloat, fmt), converted(x, at::kFloat, fmt), weight.to(at::kFloat), stride,
                      padding, groups, input_grad);
  return {input_grad ? aten_gx : skipped_input_grad(x), gw};
}

// g = relu ? grad_out * (out > 0) : grad_out for n values (exact in any dtype). A product, as the reference's, so a
// NaN or infinite grad_out where out <= 0 gives NaN instead of being masked to 0.
template <typename T>
inline fVec masked_grad(const T* grad_out, const T* out, bool relu, int64_t n) {
  fVec g = load_n(grad_out, n);
  if (relu) g = g * fVec::blendv(fVec(0.f), fVec(1.f), load_n(out, n) > fVec(0.f));
  return g;
}

using NamedTensor = std::pair<const at::Tensor*, const char*>;

// (N, C_out, H_out, W_out) of the conv, from arguments check_conv_train_args accepted.
std::vector<int64_t> conv_output_shape(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding) {
  return {x.size(0), weight.size(0), (x.size(2) + 2 * padding - weight.size(2)) / stride + 1,
          (x.size(3) + 2 * padding - weight.size(3)) / stride + 1};
}

// grad_out and out: 4-D, x's dtype, the conv output's shape.
void check_grad_and_out(const char* op, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x,
                        at::IntArrayRef shape) {
  for (const NamedTensor& t : {NamedTensor{&grad_out, "grad_out"}, NamedTensor{&out, "out"}}) {
    check_float_tensor(*t.first, op, t.second, 4);
    check_same_dtype(*t.first, x, op, t.second);
    check_shape(*t.first, shape, op, t.second);
  }
}

// The residual (4-D, like's dtype and shape; like is the argument like_name or has its dtype) in layout fmt, or an
// undefined tensor without one.
at::Tensor checked_residual(const char* op, const std::optional<at::Tensor>& residual, const at::Tensor& like,
                            const char* like_name, at::MemoryFormat fmt) {
  if (!residual.has_value() || !residual->defined()) return {};
  check_float_tensor(*residual, op, "residual", 4);
  TORCH_CHECK(residual->scalar_type() == like.scalar_type(), op, ": 'residual' has dtype ", residual->scalar_type(),
              " but '", like_name, "' has ", like.scalar_type(), "; they must match");
  check_shape(*residual, like.sizes(), op, "residual");
  return residual->contiguous(fmt);
}

// scale = gamma / sqrt(var + eps) and shift = beta - mean * scale per channel (fp32 outputs), rounded step by step in
// fp32 as the reference's eager ops do; the forward and conv_bn_train_output share it, so a recomputed output is
// the forward's bit for bit.
void bn_scale_shift(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& bn_weight,
                    const at::Tensor& bn_bias, double eps, const at::Tensor& scale, const at::Tensor& shift) {
  const at::Tensor gamma = bn_weight.to(at::kFloat).contiguous(), beta = bn_bias.to(at::kFloat).contiguous();
  const float *m = mean.data_ptr<float>(), *v = var.data_ptr<float>(), *g = gamma.data_ptr<float>(),
              *b = beta.data_ptr<float>();
  float *sp = scale.data_ptr<float>(), *tp = shift.data_ptr<float>();
  for (int64_t ch = 0; ch < mean.numel(); ++ch) {
    sp[ch] = g[ch] * (1.f / std::sqrt(v[ch] + static_cast<float>(eps)));
    tp[ch] = b[ch] - m[ch] * sp[ch];
  }
}

// out = act(y * scale + shift (+ residual)) in one pass; y, residual and out in l's layout.
template <typename T>
void normalise(const ChannelLayout& l, const T* yp, const at::Tensor& scale, const at::Tensor& shift, const T* rp,
               bool relu, T* op_) {
  const fVec zero(0.f);
  map_per_channel(l, ChannelParams<2>{{scale.data_ptr<float>(), shift.data_ptr<float>()}},
                  [=](int64_t i, int64_t n, const fVec* pv) {
                    fVec v = load_n(yp + i, n) * pv[0] + pv[1];  // not fused, as the reference
                    // The reference rounds the normalised value to x's dtype before adding the residual.
                    if (rp) v = round_to<T>(v) + load_n(rp + i, n);
                    if (relu) v = at::vec::maximum(v, zero);
                    store_n(v, op_ + i, n);
                  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    int64_t stride, int64_t padding, int64_t groups, double eps, bool relu, const std::optional<at::Tensor>& residual,
    bool keep_conv_output) {
  constexpr const char* op = "shvit cpp conv_bn_train";
  check_conv_train_args(op, x, weight, stride, padding, groups);
  const int64_t c = weight.size(0);
  check_channel_vector(bn_weight, op, "bn_weight", c);
  check_channel_vector(bn_bias, op, "bn_bias", c);
  TORCH_CHECK(eps >= 0, op, ": 'eps' must be >= 0, got ", eps);
  const at::Tensor y = conv_raw(x, weight, stride, padding, groups);
  const auto fmt = activation_format(x);
  const ChannelLayout l{fmt == at::MemoryFormat::ChannelsLast, y.size(0), c, y.size(2) * y.size(3)};
  TORCH_CHECK(l.count() >= 2, op, ": training BatchNorm needs more than one value per channel, got conv output ",
              y.sizes());
  const at::Tensor res = checked_residual(op, residual, y, "x", fmt);
  // Over few values per channel the mean is ATen's fp32 sum over (N, H, W), the reference's own reduction; from
  // kFp32Count on, one pass sums d = y - s and d^2 about a value s near the channel's mean in fp32 blocks into fp64
  // totals. ATen's mean alone took 0.18 ms of S1's 0.55 ms 128 -> 256 bf16 1x1 forward (batch 16, 14 x 14) on two
  // threads, twice its one-thread time, and on a map a two-thread conv had just written, 85 us against 16 (depthwise,
  // 128 channels at 14 x 14, fp32; AMD Zen 5, 2026-12-04).
  const bool fp32_stats = stats_in_fp32_blocks(l.count());
  const at::Tensor mean = fp32_stats ? at::empty({c}, y.options().dtype(at::kFloat))
                                     : at::mean(y, {0, 2, 3}, false, at::kFloat);
  at::Tensor var = at::empty_like(mean), scale = at::empty_like(mean), shift = at::empty_like(mean);
  // Normalised in place unless y is kept: y is this call's own buffer, and a fresh one costs page faults on the
  // large stem maps.
  const at::Tensor out = keep_conv_output ? empty_output(y.sizes(), y.options(), fmt) : y;
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_conv_bn_train", [&] {
    using T = scalar_t;
    const T* yp = y.data_ptr<T>();
    float *mp = mean.data_ptr<float>(), *vp = var.data_ptr<float>();
    const double count = static_cast<double>(l.count());
    // Sums of d = y - s and d^2, so var = E[d^2] - E[d]^2. fp64 sums about s = the mean (E[d] ~ 0: the fp32 mean's
    // rounding) give the exact variance to fp64 rounding, which rounds to fp32 as torch.var's fp64 Welford does.
    // fp32_stats: s is the mean of the channel's first 16 values, a fraction of a standard deviation from the mean but
    // for outlying data, so E[d^2] - E[d]^2 cancels little; mean = s + E[d].
    std::vector<float> first;
    if (fp32_stats) {
      first.resize(c);
      const int64_t k = std::min<int64_t>(16, l.count());
      for (int64_t ch = 0; ch < c; ++ch) {
        double sum = 0;
        for (int64_t j = 0; j < k; ++j)  // the j-th value of the channel: image j / plane, pixel j % plane
          sum += static_cast<double>(
              yp[l.channels_last ? j * c + ch : ((j / l.plane) * c + ch) * l.plane + j % l.plane]);
        first[ch] = static_cast<float>(sum / k);
      }
    }
    const float* about = fp32_stats ? first.data() : mp;
    std::vector<double> sums(2 * c);
    reduce_per_channel_in<2>(fp32_stats, l, ChannelParams<1>{{about}}, [yp](int64_t i, int64_t n, const fVec* pv,
                                                                          auto* v) {
      using V = std::remove_pointer_t<decltype(v)>;
      const V d = as_acc<V>(load_n(yp + i, n)) - as_acc<V>(pv[0]);
      v[0] = d;
      v[1] = d * d;
    }, sums.data());
    for (int64_t ch = 0; ch < c; ++ch) {
      const double d = sums[ch] / count;
      if (fp32_stats) mp[ch] = static_cast<float>(about[ch] + d);
      vp[ch] = static_cast<float>(std::max(sums[c + ch] / count - d * d, 0.0));
    }
    bn_scale_shift(mean, var, bn_weight, bn_bias, eps, scale, shift);
    normalise(l, yp, scale, shift, res.defined() ? res.data_ptr<T>() : nullptr, relu, out.data_ptr<T>());
  });
  return {out, mean, var, keep_conv_output ? y : at::empty({0}, y.options())};
}

at::Tensor conv_bn_train_output(const at::Tensor& conv_output, const at::Tensor& bn_weight,
                                const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, double eps,
                                bool relu, const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "shvit cpp conv_bn_train_output";
  check_float_tensor(conv_output, op, "conv_output", 4);
  const int64_t c = conv_output.size(1);
  check_channel_vector(bn_weight, op, "bn_weight", c);
  check_channel_vector(bn_bias, op, "bn_bias", c);
  for (const NamedTensor& t : {NamedTensor{&mean, "mean"}, NamedTensor{&var, "var"}}) {
    check_channel_vector(*t.first, op, t.second, c);
    TORCH_CHECK(t.first->scalar_type() == at::kFloat, op, ": '", t.second, "' must be float32 (the forward's "
                "statistics), got ", t.first->scalar_type());
  }
  TORCH_CHECK(eps >= 0, op, ": 'eps' must be >= 0, got ", eps);
  const auto fmt = activation_format(conv_output);
  const at::Tensor y = conv_output.contiguous(fmt);
  const at::Tensor res = checked_residual(op, residual, y, "conv_output", fmt);
  const at::Tensor out = empty_output(y.sizes(), y.options(), fmt);
  if (y.numel() == 0) return out;
  const ChannelLayout l{fmt == at::MemoryFormat::ChannelsLast, y.size(0), c, y.size(2) * y.size(3)};
  const at::Tensor scale = at::empty({c}, mean.options()), shift = at::empty({c}, mean.options());
  bn_scale_shift(mean.contiguous(), var.contiguous(), bn_weight, bn_bias, eps, scale, shift);
  SHVIT_DISPATCH_FLOAT_BF16(y.scalar_type(), "shvit_conv_bn_train_output", [&] {
    normalise(l, y.data_ptr<scalar_t>(), scale, shift, res.defined() ? res.data_ptr<scalar_t>() : nullptr, relu,
              out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& out, int64_t stride,
    int64_t padding, int64_t groups, double eps, bool relu, bool has_residual, bool input_grad,
    const std::optional<at::Tensor>& conv_output) {
  constexpr const char* op = "shvit cpp conv_bn_train_backward";
  check_conv_train_args(op, x, weight, stride, padding, groups);
  const int64_t c = weight.size(0);
  for (const NamedTensor& t : {NamedTensor{&bn_weight, "bn_weight"}, NamedTensor{&bn_bias, "bn_bias"},
                               NamedTensor{&mean, "mean"}, NamedTensor{&var, "var"}})
    check_channel_vector(*t.first, op, t.second, c);
  TORCH_CHECK(eps >= 0, op, ": 'eps' must be >= 0, got ", eps);
  const auto fmt = activation_format(x);
  const std::vector<int64_t> y_shape = conv_output_shape(x, weight, stride, padding);
  check_grad_and_out(op, grad_out, out, x, y_shape);
  const bool kept = conv_output.has_value() && conv_output->defined();
  if (kept) {
    check_float_tensor(*conv_output, op, "conv_output", 4);
    check_same_dtype(*conv_output, x, op, "conv_output");
    check_shape(*conv_output, y_shape, op, "conv_output");
  }
  const at::Tensor y = kept ? conv_output->contiguous(fmt) : conv_raw(x, weight, stride, padding, groups);
  const at::Tensor go = grad_out.contiguous(fmt), outc = out.contiguous(fmt);
  const ChannelLayout l{fmt == at::MemoryFormat::ChannelsLast, y.size(0), c, y.size(2) * y.size(3)};
  const at::Tensor mean_f = mean.to(at::kFloat).contiguous();
  (void)var;  // recomputed in fp64 from y below
  // The masked gradient is the residual's gradient; without a residual it is not written (the op returns it empty).
  at::Tensor g = has_residual ? empty_output(go.sizes(), go.options(), fmt) : at::empty({0}, go.options());
  // A 1x1 channels_last conv on the micro-kernel GEMMs takes dy chunk by chunk as it is computed (still in cache);
  // else dy is one tensor, overwriting a recomputed y (this call's own buffer) when both have dy's dtype.
  const PointwiseGrads grads_path = is_pointwise(weight, stride, padding, groups) && l.channels_last
                                        ? pointwise_grads_path(x.scalar_type())
                                        : PointwiseGrads::kAten;
  const bool dy_in_chunks = grads_path != PointwiseGrads::kAten;
  // A kxk conv whose gradients run in bf16 takes dy in bf16.
  const bool dy_bf16 =
      !dy_in_chunks && !is_pointwise(weight, stride, padding, groups) && l.channels_last &&
      kxk_grads_path(kxk_conv_shape(x, weight, stride, padding, groups), x.scalar_type()) ==
          KxkGrads::kAtenBf16;
  const auto dy_dtype = dy_bf16 ? at::kBFloat16 : at::kFloat;
  at::Tensor dy;
  if (!dy_in_chunks)
    dy = y.scalar_type() == dy_dtype && !kept ? y : empty_output(go.sizes(), go.options().dtype(dy_dtype), fmt);
  at::Tensor gx, gw;
  // dy = gamma invstd (g - mean(g) - x_hat mean(g x_hat)) cancels to a small fraction of g where g lies close to
  // the span of 1 and x_hat (BatchNorm over a few values per channel: over two it is exactly eps-sized). fp32
  // statistics then leave errors many times the reference's (whose rounding happens to cancel consistently), so
  // below kFp32Count values per channel the statistics and dy are computed in fp64 from y and g: then dy's error is
  // y's own rounding. From kFp32Count on, random-like gradients no longer sit near that span: the sums run in fp32
  // blocks into fp64 totals and dy is computed in fp32 from per-channel fp64 coefficients (the op accuracy suite's
  // 288-value cases hold the tolerance rule in fp32 and bf16). S4's 224 -> 448 bf16 1x1 backward (batch 16, 16 x 16)
  // took 5.33 ms with the fp64 passes, 4.60 without (AMD Zen 5, 2026-12-04); in fp32, one thread, S1's depthwise
  // 128-channel 14 x 14 backward 506 -> 370 us, 1x1 128 -> 256 2.34 -> 2.12 ms.
  // sums: [0, c) sum(g), [c, 2c) sum(g (y - mean_f)), [2c, 3c) sum(y - mean_f), [3c, 4c) sum((y - mean_f)^2).
  const bool fp32_passes = stats_in_fp32_blocks(l.count());
  std::vector<double> sums(4 * c), mean64(c), invstd(c), a(c), b(c), d(c);
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_conv_bn_train_backward", [&] {
    using T = scalar_t;
    const T *yp = y.data_ptr<T>(), *gp = go.data_ptr<T>(), *outp = outc.data_ptr<T>();
    const ChannelParams<1> mean_param{{mean_f.data_ptr<float>()}};
    reduce_per_channel_in<4>(fp32_passes, l, mean_param, [=](int64_t i, int64_t n, const fVec* pv, auto* v) {
      using V = std::remove_pointer_t<decltype(v)>;
      const V gv = as_acc<V>(masked_grad(gp + i, outp + i, relu, n)),
              dev = as_acc<V>(load_n(yp + i, n)) - as_acc<V>(pv[0]);
      v[0] = gv;
      v[1] = gv * dev;
      v[2] = dev;
      v[3] = dev * dev;
    }, sums.data());
    const at::Tensor gamma = bn_weight.to(at::kDouble).contiguous();
    const double count = static_cast<double>(l.count());
    for (int64_t ch = 0; ch < c; ++ch) {
      const double shift = sums[2 * c + ch] / count;  // the exact mean minus the fp32 one
      const double var64 = std::max(sums[3 * c + ch] / count - shift * shift, 0.0);
      mean64[ch] = static_cast<double>(mean_f.data_ptr<float>()[ch]) + shift;
      invstd[ch] = 1.0 / std::sqrt(var64 + eps);
      sums[c + ch] = (sums[c + ch] - shift * sums[ch]) * invstd[ch];  // now sum(g x_hat)
      a[ch] = gamma.data_ptr<double>()[ch] * invstd[ch];
      b[ch] = sums[ch] / count;
      d[ch] = sums[c + ch] / count;
    }
    T* g_out = g.data_ptr<T>();
    // Captures by value (here and below): pointers read through the caller's frame were reloaded for every vector.
    auto run = [&](const auto& params, auto values) {
      if (!dy_in_chunks) {
        auto write_dy = [&](auto* dyp) {
          map_per_channel(l, params,
                          [values, dyp](int64_t i, int64_t n, const auto* pv) { values(i, n, pv, dyp + i); });
        };
        if (dy_bf16) write_dy(dy.data_ptr<BFloat16>());
        else write_dy(dy.data_ptr<float>());
        return;
      }
      auto dy_rows = [&](int64_t r0, int64_t nr, auto* buffer) {
        map_rows(l, params, r0, r0 + nr, [values, buffer, r0, c](int64_t i, int64_t n, const auto* pv) {
          values(i, n, pv, buffer + (i - r0 * c));
        });
        return static_cast<const std::remove_pointer_t<decltype(buffer)>*>(buffer);
      };
      if (grads_path == PointwiseGrads::kBrgemmBf16)
        std::tie(gx, gw) = pointwise_conv_grads<BFloat16>(dy_rows, x, weight, input_grad);
      else
        std::tie(gx, gw) = pointwise_conv_grads<float>(dy_rows, x, weight, input_grad);
    };
    if (fp32_passes) {
      // dy = A g - B - D ((y - mean_f) - shift), x_hat = ((y - mean_f) - shift) invstd: A = a, B = a b, D = a d invstd.
      std::vector<float> shift_f(c), coef_a(c), coef_b(c), coef_d(c);
      for (int64_t ch = 0; ch < c; ++ch) {
        shift_f[ch] = static_cast<float>(mean64[ch] - static_cast<double>(mean_f.data_ptr<float>()[ch]));
        coef_a[ch] = static_cast<float>(a[ch]);
        coef_b[ch] = static_cast<float>(a[ch] * b[ch]);
        coef_d[ch] = static_cast<float>(a[ch] * d[ch] * invstd[ch]);
      }
      const ChannelParams<5> params{{mean_f.data_ptr<float>(), shift_f.data(), coef_a.data(), coef_b.data(),
                                     coef_d.data()}};
      run(params, [=](int64_t i, int64_t n, const fVec* pv, auto* dy_out) {
        const fVec gv = masked_grad(gp + i, outp + i, relu, n);
        if (has_residual) store_n(gv, g_out + i, n);
        const fVec dev = (load_n(yp + i, n) - pv[0]) - pv[1];
        store_n(pv[2] * gv - pv[3] - pv[4] * dev, dy_out, n);
      });
    } else {
      // dy = a (g - b - x_hat d), x_hat = (y - mean) invstd, in fp64.
      const ChannelParams<5, double> params{{mean64.data(), invstd.data(), a.data(), b.data(), d.data()}};
      run(params, [=](int64_t i, int64_t n, const dVec* pv, auto* dy_out) {
        const fVec gv = masked_grad(gp + i, outp + i, relu, n);
        if (has_residual) store_n(gv, g_out + i, n);
        const dVec x_hat = (widen(load_n(yp + i, n)) - pv[0]) * pv[1];
        store_n(narrow(pv[2] * (widen(gv) - pv[3] - x_hat * pv[4])), dy_out, n);
      });
    }
  });
  if (!dy_in_chunks) std::tie(gx, gw) = conv_grads(dy, x.contiguous(fmt), weight, stride, padding, groups, input_grad);
  return {input_grad ? converted(gx, x.scalar_type(), fmt) : gx,
          gw.to(weight.scalar_type()).contiguous(activation_format(weight)),
          as_param_grad(sums, c, c, bn_weight.scalar_type()), as_param_grad(sums, 0, c, bn_bias.scalar_type()), g};
}

std::vector<std::string> kxk_grads_choices() {
  std::lock_guard<std::mutex> lock(kxk_choices_mutex());
  std::vector<std::string> out;
  for (const auto& [k, v] : kxk_choices()) {
    std::ostringstream line;
    line << "batch " << k[0] << " " << k[3] << "x" << k[1] << "x" << k[2] << " -> " << k[6] << "x" << k[4] << "x"
         << k[5] << " k" << k[7] << "x" << k[8] << " s" << k[9] << " g" << k[11] << (k[13] ? " bf16" : " fp32")
         << " threads " << k[12] << ": " << kxk_grads_name(v);
    out.push_back(line.str());
  }
  return out;
}

std::string pointwise_grads(const std::string& dtype) {
  TORCH_CHECK(dtype == "float32" || dtype == "bfloat16", "pointwise_grads: 'dtype' must be 'float32' or 'bfloat16', got '",
              dtype, "'");
  switch (pointwise_grads_path(dtype == "bfloat16" ? at::kBFloat16 : at::kFloat)) {
    case PointwiseGrads::kAten: return "aten";
    case PointwiseGrads::kBrgemm: return "brgemm";
    default: return "brgemm_bf16";
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bias_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    int64_t stride, int64_t padding, int64_t groups, bool relu, const std::optional<at::Tensor>& residual,
    const at::Tensor& out) {
  constexpr const char* op = "shvit cpp conv_bias_act_backward";
  (void)residual;  // additive: only shapes the ReLU mask, which `out` already holds
  check_conv_train_args(op, x, weight, stride, padding, groups);
  const int64_t c = weight.size(0);
  if (bias.has_value() && bias->defined()) check_channel_vector(*bias, op, "bias", c);
  const std::vector<int64_t> out_shape = conv_output_shape(x, weight, stride, padding);
  check_grad_and_out(op, grad_out, out, x, out_shape);
  const auto fmt = activation_format(x);
  const at::Tensor go = grad_out.contiguous(fmt), outc = out.contiguous(fmt);
  const ChannelLayout l{fmt == at::MemoryFormat::ChannelsLast, out_shape[0], c, out_shape[2] * out_shape[3]};
  at::Tensor g = empty_output(go.sizes(), go.options(), fmt);
  std::vector<double> sums(c);
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_conv_bias_act_backward", [&] {
    using T = scalar_t;
    const T *gp = go.data_ptr<T>(), *outp = outc.data_ptr<T>();
    T* g_out = g.data_ptr<T>();
    map_per_channel(l, ChannelParams<0>{}, [=](int64_t i, int64_t n, const fVec*) {
      store_n(masked_grad(gp + i, outp + i, relu, n), g_out + i, n);
    });
    reduce_per_channel<1, float>(l, ChannelParams<0>{}, [=](int64_t i, int64_t n, const fVec*, fVec* v) {
      v[0] = load_n(g_out + i, n);
    }, sums.data());
  });
  auto [gx, gw] = conv_grads(converted(g, at::kFloat, fmt), x.contiguous(fmt), weight, stride, padding, groups, true);
  const auto bias_dtype = (bias.has_value() && bias->defined()) ? bias->scalar_type() : weight.scalar_type();
  return {converted(gx, x.scalar_type(), fmt), gw.to(weight.scalar_type()).contiguous(activation_format(weight)),
          as_param_grad(sums, 0, c, bias_dtype), g};
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
