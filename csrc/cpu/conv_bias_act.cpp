// conv_bias_act forward: out = act(conv2d(x, weight, bias) + residual), BN already folded into weight/bias.
//
// * 1x1 (groups 1): a GEMM per tile of output pixels, the bias / residual / ReLU applied to the tile while it is
//   still in cache; bf16 channels_last on AVX512_BF16 pair products: pair_conv's tiles over all pixels.
// * dense kxk (groups 1), channels_last: bf16 on AVX512_BF16 pair products register-blocked (pair_conv); else
//   3 input channels by a register-resident weight kernel; otherwise fp32 register-blocked
//   (blocked_conv_channels_last), bf16 one GEMM per kernel row; im2col + GEMM where neither fits (NCHW, bf16 with
//   odd kw * c_in).
// * depthwise 3x3 pad 1, stride 1 or 2: a direct stencil, fp32 accumulation, same fused epilogue.
// Both layouts are computed natively (NCHW and channels_last); the output keeps the input's layout.
#include "ops.h"

#include <atomic>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

namespace {

constexpr const char* kOp = "shvit cpp conv_bias_act";

struct ConvShape {
  int64_t batch, c_in, h, w, c_out, kh, kw, out_h, out_w, stride, pad;
  int64_t k_gemm() const { return c_in * kh * kw; }
  bool pointwise() const { return kh == 1 && kw == 1 && stride == 1 && pad == 0; }
};

// ---------------------------------------------------------------------------------------------------------------
// GEMM convolutions (groups == 1)
// ---------------------------------------------------------------------------------------------------------------

// One row of the channels_last im2col matrix: for output pixel (n, oh, ow), the (kh, kw, c_in) patch.
template <typename T>
void im2col_row_channels_last(const T* x, const ConvShape& s, int64_t pixel, T* row) {
  const int64_t ow = pixel % s.out_w, oh = (pixel / s.out_w) % s.out_h, n = pixel / (s.out_w * s.out_h);
  for (int64_t i = 0; i < s.kh; ++i) {
    const int64_t ih = oh * s.stride - s.pad + i;
    for (int64_t j = 0; j < s.kw; ++j, row += s.c_in) {
      const int64_t iw = ow * s.stride - s.pad + j;
      if (ih < 0 || ih >= s.h || iw < 0 || iw >= s.w) {
        std::fill(row, row + s.c_in, T(0));
      } else {
        std::copy_n(x + ((n * s.h + ih) * s.w + iw) * s.c_in, s.c_in, row);
      }
    }
  }
}

// weight_nk: (c_out, k_col[, 1, 1]) in either layout (MatB::assign_weight), columns in (kh, kw, c_in) order; k_col
// may exceed the patch size by one zero column (bf16 needs an even K), the matching im2col column staying zero.
template <typename T>
void gemm_conv_channels_last(const T* x, const at::Tensor& weight_nk, int64_t k_col, const float* bias, const T* residual,
                             bool relu, T* out, const ConvShape& s) {
  const int64_t rows = s.batch * s.out_h * s.out_w, c_out = s.c_out;
  const bool direct = s.pointwise();
  const int64_t tile = rows_per_tile(rows, (direct ? 0 : k_col) + c_out);
  if constexpr (std::is_same_v<T, float>) {
    if (direct && f32_tiles_usable()) {
      const F32Weight w = f32_weight(weight_nk, bias);
      at::parallel_for(0, ceil_div(rows, tile), 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r0 = t * tile, nr = std::min(tile, rows - r0);
          f32_rows(x + r0 * k_col, nr, k_col, w, residual ? residual + r0 * c_out : nullptr, relu, out + r0 * c_out);
        }
      });
      return;
    }
  }
  MatB<T> weights;
  weights.assign_weight(weight_nk);
  at::parallel_for(0, ceil_div(rows, tile), 1, [&](int64_t t0, int64_t t1) {
    MatmulThreadGuard guard;
    std::vector<T> col(direct ? 0 : tile * k_col, T(0));
    const Scratch<float> acc_buf(std::is_same<T, float>::value ? 0 : tile * c_out);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile, nr = std::min(tile, rows - r0);
      const T* a = x + r0 * k_col;
      if (!direct) {
        for (int64_t r = 0; r < nr; ++r) im2col_row_channels_last(x, s, r0 + r, col.data() + r * k_col);
        a = col.data();
      }
      T* out_tile = out + r0 * c_out;
      float* acc = acc_buf.empty() ? reinterpret_cast<float*>(out_tile) : acc_buf.data();
      matmul(nr, a, k_col, weights, acc, c_out);
      for (int64_t r = 0; r < nr; ++r)
        epilogue_run(acc + r * c_out, bias, 0.f, residual ? residual + (r0 + r) * c_out : nullptr, relu,
                     out_tile + r * c_out, c_out);
    }
  });
}

// bf16 dense kxk convolution in channels_last without im2col (fp32 takes blocked_conv_channels_last, which keeps
// the sum in registers; here the micro-kernel's VNNI bf16 products win). For output row oh and kernel row i, the (kw, c_in) patch
// of output pixel ow is the kw * c_in consecutive values of input row ih starting at pixel ow * stride - pad, so the
// input row itself is the GEMM's A with lda = stride * c_in (rows overlap when kw > stride): one accumulating GEMM
// per kernel row. Pixels whose patch crosses the left or right border are computed directly from fp32 weights.
// w_rows: (kh, kw * c_in, c_out) in T (B of each kernel row); w_f: the same in fp32.
template <typename T>
void row_conv_channels_last(const T* x, const T* w_rows, const float* w_f, const float* bias, const T* residual,
                            bool relu, T* out, const ConvShape& s) {
  const int64_t c = s.c_in, c_out = s.c_out, k_row = s.kw * c;
  // Output columns whose whole patch lies inside the row.
  const int64_t ow_lo = std::min(s.out_w, ceil_div(s.pad, s.stride));
  const int64_t last_inside = s.w - s.kw + s.pad;  // ow * stride may not exceed this
  const int64_t ow_hi = last_inside < 0 ? ow_lo : std::max(ow_lo, std::min(s.out_w, last_inside / s.stride + 1));
  std::vector<MatB<T>> kernel_rows(s.kh);
  for (int64_t i = 0; i < s.kh; ++i) kernel_rows[i].assign(w_rows + i * k_row * c_out, k_row, c_out, c_out);
  const bool fp32 = std::is_same<T, float>::value;
  at::parallel_for(0, s.batch * s.out_h, 1, [&](int64_t r0, int64_t r1) {
    MatmulThreadGuard guard;
    const Scratch<float> acc_buf(fp32 ? 0 : s.out_w * c_out);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.out_h, oh = r % s.out_h;
      const T* x_n = x + n * s.h * s.w * c;
      T* out_row = out + r * s.out_w * c_out;
      float* acc = fp32 ? reinterpret_cast<float*>(out_row) : acc_buf.data();
      const int64_t i_lo = std::max<int64_t>(0, s.pad - oh * s.stride);
      const int64_t i_hi = std::min<int64_t>(s.kh, s.h + s.pad - oh * s.stride);
      if (ow_hi > ow_lo) {
        if (i_lo >= i_hi) std::fill(acc + ow_lo * c_out, acc + ow_hi * c_out, 0.f);
        for (int64_t i = i_lo; i < i_hi; ++i) {
          const T* a = x_n + ((oh * s.stride - s.pad + i) * s.w + ow_lo * s.stride - s.pad) * c;
          matmul(ow_hi - ow_lo, a, s.stride * c, kernel_rows[i], acc + ow_lo * c_out, c_out, i > i_lo);
        }
      }
      auto border_pixel = [&](int64_t ow) {
        const int64_t j_lo = std::max<int64_t>(0, s.pad - ow * s.stride);
        const int64_t j_hi = std::min<int64_t>(s.kw, s.w + s.pad - ow * s.stride);
        for (int64_t co = 0; co < c_out; co += kVec) {
          const int64_t count = std::min(kVec, c_out - co);
          fVec sum(0.f);
          for (int64_t i = i_lo; i < i_hi; ++i)
            for (int64_t j = j_lo; j < j_hi; ++j) {
              const T* px = x_n + ((oh * s.stride - s.pad + i) * s.w + ow * s.stride - s.pad + j) * c;
              const float* wp = w_f + ((i * s.kw + j) * c) * c_out + co;
              for (int64_t ci = 0; ci < c; ++ci)
                sum = at::vec::fmadd(fVec(static_cast<float>(px[ci])), load_f(wp + ci * c_out, count), sum);
            }
          store_f(sum, acc + ow * c_out + co, count);
        }
      };
      for (int64_t ow = 0; ow < ow_lo; ++ow) border_pixel(ow);
      for (int64_t ow = ow_hi; ow < s.out_w; ++ow) border_pixel(ow);
      for (int64_t ow = 0; ow < s.out_w; ++ow)
        epilogue_run(acc + ow * c_out, bias, 0.f, residual ? residual + (r * s.out_w + ow) * c_out : nullptr, relu,
                     out_row + ow * c_out, c_out);
    }
  });
}

// Dense kxk convolution in channels_last, register-blocked: each call of the micro-kernel below keeps a tile of
// output pixels x one channel block (1 to 4 channel vectors) in vector registers over the whole (kh, kw, c_in) sum,
// reading the inputs of a kernel row in place (pixel ow's kw * c_in patch starts at ow * stride * c_in of the padded
// row) and the block's weights as one contiguous stream. A GEMM micro-kernel gets only a kernel row's
// K = kw * c_in per call and must add into C in memory between kernel rows; for the stem's 16 -> 32 that ran at half
// of the 1x1 convolutions' speed. Input rows are copied into zero-padded rows, so no pixel is a border case.
// A tile holds pixels x vectors accumulators, the block's weight vectors and one broadcast input: AVX-512's 32
// registers take 14 x 2 (or 14 x 1), 8 x 3 or 6 x 4, AVX2's 16 take 6 x 2 (channel blocks of 2 vectors only).
constexpr int kMaxBlockVecs = kVec >= 16 ? 4 : 2;
constexpr int max_tile_pixels(int vecs) { return kVec >= 16 ? (vecs == 4 ? 6 : vecs == 3 ? 8 : 14) : 6; }

// prefetch .. prefetch_end: input the next output row reads, requested a line per step so that the loads overlap
// this row's arithmetic; one burst of requests per row stalled on the few line-fill buffers (two interleaved runs:
// 16 -> 32 at 112 px 1.12-1.14x, 32 -> 64 at 56 1.05-1.06x; Intel Xeon family 6 model 207, 2026-12-01). Advanced past
// what was requested.
template <int MB, int NV>
inline void conv_tile(const float* const* rows, int64_t offset, int64_t kh, int64_t k_row, int64_t step, const float* w,
                      float* acc_out, int64_t ld_acc, const char*& prefetch, const char* prefetch_end) {
  constexpr int64_t kBlock = NV * kVec;
  const char* next_line = prefetch;
  fVec acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = fVec(0.f);
  for (int64_t i = 0; i < kh; ++i, w += k_row * kBlock) {
    if (rows[i] == nullptr) continue;  // kernel row in the top / bottom padding
    const float* a = rows[i] + offset;
    for (int64_t k = 0; k < k_row; ++k) {
      if (next_line < prefetch_end) {
        __builtin_prefetch(next_line);
        next_line += 64;
      }
      fVec b[NV];
      for (int v = 0; v < NV; ++v) b[v] = fVec::loadu(w + k * kBlock + v * kVec);
      for (int m = 0; m < MB; ++m) {
        const fVec a_mk(a[m * step + k]);
        for (int v = 0; v < NV; ++v) acc[m][v] = at::vec::fmadd(a_mk, b[v], acc[m][v]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v].store(acc_out + m * ld_acc + v * kVec);
  prefetch = next_line;
}

using ConvTileFn = void (*)(int64_t width, const float* const* rows, int64_t offset, int64_t kh, int64_t k_row,
                            int64_t step, const float* w, float* acc_out, int64_t ld_acc, const char*& prefetch,
                            const char* prefetch_end);

template <int NV, int... MB>
void conv_tile_width(std::integer_sequence<int, MB...>, int64_t width, const float* const* rows, int64_t offset,
                     int64_t kh, int64_t k_row, int64_t step, const float* w, float* acc_out, int64_t ld_acc,
                     const char*& prefetch, const char* prefetch_end) {
  // One instantiation per width 1..max_tile_pixels(NV); the fold expression calls the one that matches.
  ((width == MB + 1 ? conv_tile<MB + 1, NV>(rows, offset, kh, k_row, step, w, acc_out, ld_acc, prefetch, prefetch_end)
                    : void()),
   ...);
}

template <int NV>
void conv_tile_of_width(int64_t width, const float* const* rows, int64_t offset, int64_t kh, int64_t k_row,
                        int64_t step, const float* w, float* acc_out, int64_t ld_acc, const char*& prefetch,
                        const char* prefetch_end) {
  conv_tile_width<NV>(std::make_integer_sequence<int, max_tile_pixels(NV)>{}, width, rows, offset, kh, k_row, step, w,
                      acc_out, ld_acc, prefetch, prefetch_end);
}

template <int... NV>
ConvTileFn conv_tile_fn_impl(std::integer_sequence<int, NV...>, int vecs) {
  ConvTileFn fn = nullptr;
  ((vecs == NV + 1 ? (fn = conv_tile_of_width<NV + 1>, 0) : 0), ...);
  return fn;
}

// The tile kernel of a channel block of `vecs` vectors (1..kMaxBlockVecs).
inline ConvTileFn conv_tile_fn(int vecs) {
  return conv_tile_fn_impl(std::make_integer_sequence<int, kMaxBlockVecs>{}, vecs);
}

// The n values at v followed by zeros up to padded (a bias for kernels that store whole channel blocks).
inline std::vector<float> zero_padded(const float* v, int64_t n, int64_t padded) {
  std::vector<float> out(padded, 0.f);
  std::copy_n(v, n, out.data());
  return out;
}

// The kh input rows an output row reads, as zero-padded copies (S: their storage type) in a ring of kh slots:
// input row ih lives in slot ih % kh (the rows one output row reads are consecutive, so their slots differ), and the
// next output row reuses the kh - stride rows it shares with this one. Padding columns, and channels past c_in when
// c_store is larger, are zeroed once; copy(src, dst) writes the c_in-channel row at src into a slot's interior.
template <typename S>
class PaddedRows {
 public:
  PaddedRows(const ConvShape& s, int64_t c_store)
      : s_(s), c_store_(c_store), width_((s.w + 2 * s.pad) * c_store), data_(s.kh * width_, S(0.f)),
        slot_row_(s.kh, -1), rows_(s.kh) {}

  // The kh rows of output row oh of image n (nullptr for a row in the top / bottom padding).
  template <typename T, typename Copy>
  const S* const* gather(const T* x, int64_t n, int64_t oh, Copy copy) {
    for (int64_t i = 0; i < s_.kh; ++i) {
      const int64_t ih = oh * s_.stride - s_.pad + i;
      if (ih < 0 || ih >= s_.h) {
        rows_[i] = nullptr;
        continue;
      }
      const int64_t slot = ih % s_.kh;
      S* slot_data = data_.data() + slot * width_;
      if (slot_row_[slot] != n * s_.h + ih) {
        copy(x + (n * s_.h + ih) * s_.w * s_.c_in, slot_data + s_.pad * c_store_);
        slot_row_[slot] = n * s_.h + ih;
      }
      rows_[i] = slot_data;
    }
    return rows_.data();
  }

 private:
  const ConvShape& s_;
  int64_t c_store_, width_;
  std::vector<S> data_;
  std::vector<int64_t> slot_row_;  // n * h + ih held by each slot
  std::vector<const S*> rows_;
};

// The input rows [first, last) of output row oh that the row above it did not read (in memory, consecutive).
inline std::pair<int64_t, int64_t> new_input_rows(const ConvShape& s, int64_t oh) {
  const int64_t top = oh * s.stride - s.pad;
  return {std::max<int64_t>(0, top + std::max<int64_t>(0, s.kh - s.stride)), std::min(s.h, top + s.kh)};
}

// The tiles of an output row for a channel block of `vecs` vectors, fn(first column, width): tiles of equal width
// (56 = 4 x 14; 64 = 12 + 4 x 13, not 4 x 14 + 8: a narrow remainder tile has too few independent accumulators to
// hide the FMA latency).
template <typename Fn>
inline void for_each_row_tile(int64_t out_w, int vecs, Fn fn) {
  const int64_t tiles = ceil_div(out_w, max_tile_pixels(vecs));
  for (int64_t t = 0, ow = 0; t < tiles; ++t) {
    const int64_t width = (out_w - ow) / (tiles - t);
    fn(ow, width);
    ow += width;
  }
}

// The input columns [first, last] a tile of output columns [ow, ow + width) reads, before clamping to the row.
inline std::pair<int64_t, int64_t> tile_columns(const ConvShape& s, int64_t ow, int64_t width) {
  return {ow * s.stride - s.pad, (ow + width - 1) * s.stride - s.pad + s.kw - 1};
}

// Which input columns the plan's tiles that reach into the padding read: [0, left_end) and [right_begin, w). Only
// those are copied into the padded rows when the other tiles read the input rows in place.
inline std::pair<int64_t, int64_t> border_columns(const ConvShape& s, const std::vector<int>& plan) {
  int64_t left_end = 0, right_begin = s.w;
  for (const int vecs : plan)
    for_each_row_tile(s.out_w, vecs, [&](int64_t ow, int64_t width) {
      const auto [first, last] = tile_columns(s, ow, width);
      if (first < 0) left_end = std::max(left_end, std::min(last + 1, s.w));
      if (last >= s.w) right_begin = std::min(right_begin, std::max<int64_t>(first, 0));
    });
  return {left_end, std::max(left_end, right_begin)};
}

// One output row's accumulators (out_w x c_pad, c_pad the plan's channels) from its kh input rows, per channel block
// of plan (vectors per block). rows: zero-padded copies (column 0 is input column -pad); in_place (optional): the
// input rows themselves, read by the tiles whose patches lie inside them. w_blocks: pack_conv_blocks(plan).
inline void conv_row(const float* const* rows, const float* const* in_place, const std::vector<int>& plan,
                     const float* w_blocks, float* acc, int64_t c_pad, const ConvShape& s, const char*& prefetch,
                     const char* prefetch_end) {
  const int64_t k_row = s.kw * s.c_in, step = s.stride * s.c_in;
  const float* w = w_blocks;
  float* acc_b = acc;
  for (const int vecs : plan) {
    const ConvTileFn tile = conv_tile_fn(vecs);
    for_each_row_tile(s.out_w, vecs, [&](int64_t ow, int64_t width) {
      const auto [first, last] = tile_columns(s, ow, width);
      if (in_place && first >= 0 && last < s.w) {
        tile(width, in_place, first * s.c_in, s.kh, k_row, step, w, acc_b + ow * c_pad, c_pad, prefetch, prefetch_end);
      } else {
        tile(width, rows, ow * step, s.kh, k_row, step, w, acc_b + ow * c_pad, c_pad, prefetch, prefetch_end);
      }
    });
    w += s.kh * k_row * vecs * kVec;
    acc_b += vecs * kVec;
  }
}

inline int64_t plan_channels(const std::vector<int>& plan) {
  int64_t vecs = 0;
  for (const int v : plan) vecs += v;
  return vecs * kVec;
}

// The kh input rows of output row oh of image n, copied (bf16 widened) into zero-padded fp32 rows; fp32 rows only
// in columns [0, left_end) and [right_begin, w) when given (the rest is read in place).
template <typename T>
const float* const* gather_float_rows(PaddedRows<float>& padded, const T* x, int64_t n, int64_t oh,
                                      const ConvShape& s, int64_t left_end = -1, int64_t right_begin = -1) {
  return padded.gather(x, n, oh, [&](const T* src, float* dst) {
    if constexpr (std::is_same_v<T, float>) {
      if (left_end < 0) {
        std::copy_n(src, s.w * s.c_in, dst);
      } else {
        std::copy_n(src, left_end * s.c_in, dst);
        std::copy_n(src + right_begin * s.c_in, (s.w - right_begin) * s.c_in, dst + right_begin * s.c_in);
      }
    } else {
      at::vec::convert(src, dst, s.w * s.c_in);
    }
  });
}

// The kh input rows of output row oh of image n in place (nullptr in the padding).
inline void input_rows(const float* x, int64_t n, int64_t oh, const ConvShape& s, std::vector<const float*>& rows) {
  for (int64_t i = 0; i < s.kh; ++i) {
    const int64_t ih = oh * s.stride - s.pad + i;
    rows[i] = ih < 0 || ih >= s.h ? nullptr : x + (n * s.h + ih) * s.w * s.c_in;
  }
}

// w_blocks: pack_conv_blocks(weight, s, plan). bf16 input rows are widened as they are copied into the padded rows
// (bf16_widened()).
template <typename T>
void blocked_conv_channels_last(const T* x, const float* w_blocks, const std::vector<int>& plan, const float* bias,
                                const T* residual, bool relu, T* out, const ConvShape& s) {
  const int64_t c = s.c_in, c_pad = plan_channels(plan);
  // fp32 rows are read in place by the tiles inside them: copying whole rows into the padded ones took 5% of the
  // 16 -> 32 stem layer's time.
  constexpr bool kInPlace = std::is_same_v<T, float>;
  const auto [left_end, right_begin] = kInPlace ? border_columns(s, plan) : std::pair<int64_t, int64_t>{-1, -1};
  at::parallel_for(0, s.batch * s.out_h, 1, [&](int64_t r0, int64_t r1) {
    PaddedRows<float> padded(s, c);
    std::vector<float> acc(s.out_w * c_pad);
    std::vector<const float*> in_place(s.kh);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.out_h, oh = r % s.out_h;
      const float* const* rows = gather_float_rows(padded, x, n, oh, s, left_end, right_begin);
      if constexpr (kInPlace) input_rows(x, n, oh, s, in_place);
      // The input rows the next output row adds: consecutive in memory, and from memory (stem maps are 6-13 MB).
      const char* prefetch = nullptr;
      const char* prefetch_end = nullptr;
      if (r + 1 < r1 && (r + 1) % s.out_h != 0) {
        const auto [first, last] = new_input_rows(s, oh + 1);
        if (first < last) {
          prefetch = reinterpret_cast<const char*>(x + (n * s.h + first) * s.w * c);
          prefetch_end = reinterpret_cast<const char*>(x + (n * s.h + last) * s.w * c);
        }
      }
      conv_row(rows, kInPlace ? in_place.data() : nullptr, plan, w_blocks, acc.data(), c_pad, s, prefetch,
               prefetch_end);
      for (int64_t ow = 0; ow < s.out_w; ++ow)
        epilogue_run(acc.data() + ow * c_pad, bias, 0.f, residual ? residual + (r * s.out_w + ow) * s.c_out : nullptr,
                     relu, out + (r * s.out_w + ow) * s.c_out, s.c_out);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Channel blocks of the register-blocked dense convolution. How wide a block should be depends on c_out and out_w:
// a block's vectors must cover c_out (S4's 112 channels are 7 vectors: 4 + 3 exactly, 2 + 2 + 2 + 2 computes 128)
// and out_w must split into wide tiles (16 pixels: two 8-pixel tiles of 3 vectors, or 6 + 5 + 5 of 4). One image
// in cache, Intel Xeon family 6 model 167, 2026-12-03, against blocks of two vectors: 56 -> 112 at 64 px 1.15-1.18x
// as 4 + 3, 28 -> 56 at 128 px 1.05-1.10x as 4, but 64 -> 128 at 28 px 0.93-0.95x as 4 + 4. So "auto" times the
// plans on one output row the first time a shape runs (every plan sums each output in the same order: the results
// are bit-identical whichever runs) and keeps the fastest: S4's fused forward 1.02x (one thread) / 1.03x (two), S1's
// the same, in-process against "pairs".
// ---------------------------------------------------------------------------------------------------------------
// A forced mode's value is the width, in vectors, of its blocks (block_plan takes it as such).
constexpr int kPlanAuto = 0, kPlanPairs = 2, kPlanThrees = 3, kPlanFours = 4;

int parse_plan_mode(const std::string& mode, const char* what) {
  if (mode == "auto") return kPlanAuto;
  if (mode == "pairs") return kPlanPairs;
  if (mode == "threes") return kPlanThrees;
  if (mode == "fours") return kPlanFours;
  TORCH_CHECK(false, what, " must be 'auto', 'pairs', 'threes' or 'fours', got '", mode, "'");
  return kPlanAuto;
}

std::atomic<int>& plan_mode() {
  static std::atomic<int> value([] {
    const char* env = std::getenv("SHVIT_CPU_DENSE_CONV_BLOCKS");
    return env && *env ? parse_plan_mode(env, "SHVIT_CPU_DENSE_CONV_BLOCKS") : kPlanAuto;
  }());
  return value;
}

// Vectors per block for c_out channels: blocks of `first` vectors while as many remain, then one of the rest;
// "pairs" pads the last block to two vectors (as before plans existed).
std::vector<int> block_plan(int first, int64_t c_out) {
  std::vector<int> plan;
  for (int64_t left = ceil_div(c_out, kVec); left > 0; left -= plan.back())
    plan.push_back(first == kPlanPairs ? 2 : static_cast<int>(std::min<int64_t>(first, left)));
  return plan;
}

std::string plan_name(const std::vector<int>& plan) {
  std::string name;
  for (const int v : plan) name += (name.empty() ? "" : ",") + std::to_string(v);
  return name;
}

// (kh, kw, c_in, block width) fp32 per block of plan, the blocks one after another, zero past c_out.
at::Tensor pack_conv_blocks(const at::Tensor& weight, const ConvShape& s, const std::vector<int>& plan) {
  const int64_t c_pad = plan_channels(plan);
  const at::Tensor taps = at::constant_pad_nd(weight.to(at::kFloat), {0, 0, 0, 0, 0, 0, 0, c_pad - s.c_out})
                              .permute({2, 3, 1, 0});  // (kh, kw, c_in, c_pad)
  std::vector<at::Tensor> blocks;
  int64_t co = 0;
  for (const int vecs : plan) {
    blocks.push_back(taps.slice(3, co, co + vecs * kVec).contiguous().reshape({-1}));
    co += vecs * kVec;
  }
  return at::cat(blocks);
}

struct MeasuredPlans {
  std::mutex mutex;
  std::unordered_map<std::string, std::vector<int>> by_shape;
};

MeasuredPlans& measured_plans() {
  static MeasuredPlans plans;
  return plans;
}

std::string plan_key(const ConvShape& s) {
  return std::to_string(s.c_in) + " " + std::to_string(s.c_out) + " " + std::to_string(s.h) + " " +
         std::to_string(s.w) + " " + std::to_string(s.kh) + " " + std::to_string(s.kw) + " " +
         std::to_string(s.stride) + " " + std::to_string(s.pad);
}

std::vector<std::vector<int>> candidate_plans(int64_t c_out) {
  std::vector<std::vector<int>> plans{block_plan(kPlanPairs, c_out)};
  if (kMaxBlockVecs >= 4) {
    for (const int first : {kPlanFours, kPlanThrees}) {
      std::vector<int> plan = block_plan(first, c_out);
      if (std::find(plans.begin(), plans.end(), plan) == plans.end()) plans.push_back(std::move(plan));
    }
  }
  return plans;
}

// The fastest candidate on output row out_h / 2 of the first image, best of five alternating runs; another plan
// must beat pairs by 3% (as autotune asks of a backend over the fixed order's first), so near-ties do not flip
// between processes.
template <typename T>
std::vector<int> time_plans(const T* x, const at::Tensor& weight, const ConvShape& s) {
  const std::vector<std::vector<int>> plans = candidate_plans(s.c_out);
  if (plans.size() == 1) return plans[0];
  std::vector<at::Tensor> packed;
  int64_t c_pad_max = 0;
  for (const auto& plan : plans) {
    packed.push_back(pack_conv_blocks(weight, s, plan));
    c_pad_max = std::max(c_pad_max, plan_channels(plan));
  }
  PaddedRows<float> padded(s, s.c_in);
  const float* const* rows = gather_float_rows(padded, x, 0, s.out_h / 2, s);
  std::vector<float> acc(s.out_w * c_pad_max);
  std::vector<double> best(plans.size(), 1e30);
  for (int round = 0; round < 5; ++round) {
    for (size_t i = 0; i < plans.size(); ++i) {
      const char* no_prefetch = nullptr;
      const auto start = std::chrono::steady_clock::now();
      conv_row(rows, nullptr, plans[i], packed[i].data_ptr<float>(), acc.data(), plan_channels(plans[i]), s,
               no_prefetch, nullptr);
      best[i] = std::min(best[i], seconds_since(start));
    }
  }
  size_t fastest = 0;
  for (size_t i = 1; i < plans.size(); ++i)
    if (best[i] < 0.97 * best[0] && best[i] < best[fastest]) fastest = i;
  return plans[fastest];
}

// The channel blocks for this convolution: the forced mode's, else the shape's measured plan (timed now if new).
template <typename T>
std::vector<int> conv_block_plan(const T* x, const at::Tensor& weight, const ConvShape& s) {
  const int mode = plan_mode().load();
  if (mode != kPlanAuto) return block_plan(mode, s.c_out);
  MeasuredPlans& cache = measured_plans();
  const std::string key = plan_key(s);
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    const auto it = cache.by_shape.find(key);
    if (it != cache.by_shape.end()) return it->second;
  }
  std::vector<int> plan = time_plans(x, weight, s);
  std::lock_guard<std::mutex> lock(cache.mutex);
  return cache.by_shape.emplace(key, std::move(plan)).first->second;  // a concurrent first call's plan wins
}

std::atomic<bool>& pair_kernels_on() {
  static std::atomic<bool> on{true};
  return on;
}

// Channel vectors per block of the pair kernels for n output channels: one for n <= 16 (a stem's first layer), else
// two.
inline int pair_vecs(int64_t n) { return n <= 16 ? 1 : 2; }

#if defined(CPU_CAPABILITY_AVX512)
// bf16 dense kxk convolution in channels_last on AVX512_BF16 pair products (VDPBF16PS: 16 lanes, each adding the
// products of two consecutive K values), register-blocked as blocked_conv_channels_last: a tile of up to
// pair_tile_pixels<V> output pixels x V channel vectors stays in registers over the whole (kh, kw, c_in) sum.
// Input rows are copied into zero-padded bf16 rows with c_in rounded up to even (the 3-channel first stem layer
// gets a zero fourth channel), so every pixel's kernel-row patch is kw * c_pad / 2 whole pairs, broadcast in place.
// The row GEMMs on ATen's brgemm (row_conv_channels_last) ran the stem's layers at 15-53% of the pair peak.
// 14 x 2 or 16 x 1 accumulators at a runtime pixel stride (28 x 1 measured slower on the 3 -> 16 layer: its 28 pixel
// offsets no longer fit in general registers).
// kStep > 0: the pixel stride in the padded rows known at compile time (kFirstLayerStep, the 3-channel first layer
// at stride 2), so every pixel's pair is a fixed displacement from one pointer: no pixel offsets in registers, which
// lets one channel vector take 28 pixels (S1's 3 -> 16 layer ran at 30% of the pair peak with 16 pixels).
template <int V, int kStep = 0>
constexpr int pair_tile_pixels = V == 1 ? (kStep > 0 ? 28 : 16) : 14;
constexpr int kFirstLayerStep = 8;  // 3 channels padded to 4, stride 2

template <typename T>
bool pair_conv_usable() {
  static const bool usable = __builtin_cpu_supports("avx512bf16");
  return std::is_same_v<T, BFloat16> && usable && pair_kernels_on().load(std::memory_order_relaxed) && !bf16_widened();
}

// A bf16 pair read in place (any alignment, any type the row holds).
typedef int32_t __attribute__((may_alias, aligned(2))) bf16_pair;

// One pair of K values of every pixel's patch: its place in the padded input row (of pixel 0) and the offset of its
// weight vectors in a channel block. A flat list over the kernel rows inside the image: nested loops over kernel
// rows and pairs made the compiler keep the accumulators in memory between kernel rows.
struct PairStep {
  const BFloat16* a;
  int64_t w;
};

// Where a tile's results go: bias (fp32, zero-padded to whole blocks), residual and out at the tile's first pixel
// and channel block, the channels left from that block on, and the pixel stride (c_out).
struct PairOut {
  const float* bias;
  const BFloat16* residual;
  BFloat16* out;
  int64_t channels, ld;
  bool relu;
};

template <int V, int MB, int kStep>
__attribute__((target("avx512bf16"))) inline void pair_conv_tile(const PairStep* steps, int64_t n_steps,
                                                                  int64_t offset, int64_t runtime_step,
                                                                  const BFloat16* w, const PairOut& o) {
  const int64_t step = kStep > 0 ? kStep : runtime_step;
  // fVec accumulators (as conv_tile's) stay in registers; raw __m512 arrays were kept on the stack.
  fVec acc[MB][V];
#pragma GCC unroll 32
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) acc[m][v] = fVec(0.f);
  // do-while: n_steps >= 1 (every output row reads an input row), and a zero-trip path made the compiler keep acc in
  // memory (zeroed by rep stos on every call).
  int64_t j = 0;
  do {
    const BFloat16* a = steps[j].a + offset;
    // Opaque to the optimiser: else it hoists offset + m * kStep into one register (or stack slot) per pixel.
    if constexpr (kStep > 0) asm("" : "+r"(a));
    __m512bh b[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(w + steps[j].w + v * 32);
#pragma GCC unroll 32
    for (int m = 0; m < MB; ++m) {
      const __m512bh a_mk = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const bf16_pair*>(a + m * step));
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[m][v] = fVec(_mm512_dpbf16_ps(acc[m][v], a_mk, b[v]));
    }
  } while (++j < n_steps);
  // The epilogue from registers, in epilogue_run's order: + bias, + residual, ReLU (a max with 0 or -inf), rounded to
  // bf16 by VCVTNE2PS2BF16 (round to nearest even, as epilogue_run; it also flushes fp32 subnormals to zero, as the
  // dot products already do), a pixel's channel vectors in one store. Branch-free inside the unrolled loops: branches
  // there made the compiler keep acc in memory. (ATen's bf16 rounding and a masked store per vector took a third of
  // the 3 -> 16 stem layer's tile time.)
  const fVec floor(o.relu ? 0.f : -std::numeric_limits<float>::infinity());
  const int64_t n = std::min<int64_t>(16 * V, o.channels);
  const fVec bias0 = fVec::loadu(o.bias);
  if constexpr (V == 2) {
    const fVec bias1 = fVec::loadu(o.bias + 16);
    const __mmask32 mask = static_cast<__mmask32>((uint64_t(1) << n) - 1);
#pragma GCC unroll 32
    for (int m = 0; m < MB; ++m) {
      fVec lo = acc[m][0] + bias0, hi = acc[m][1] + bias1;
      if (o.residual) {
        const __m512i r = _mm512_maskz_loadu_epi16(mask, o.residual + m * o.ld);
        lo = lo + bf16_to_f(_mm512_castsi512_si256(r));
        hi = hi + bf16_to_f(_mm512_extracti64x4_epi64(r, 1));
      }
      const __m512bh packed = _mm512_cvtne2ps_pbh(at::vec::maximum(hi, floor), at::vec::maximum(lo, floor));
      _mm512_mask_storeu_epi16(o.out + m * o.ld, mask, (__m512i)packed);
    }
  } else {
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
#pragma GCC unroll 32
    for (int m = 0; m < MB; ++m) {
      fVec v = acc[m][0] + bias0;
      if (o.residual) v = v + bf16_to_f(_mm256_maskz_loadu_epi16(mask, o.residual + m * o.ld));
      const __m256bh packed = _mm512_cvtneps_pbh(at::vec::maximum(v, floor));
      _mm256_mask_storeu_epi16(o.out + m * o.ld, mask, (__m256i)packed);
    }
  }
}

template <int V, int kStep, int... MB>
__attribute__((target("avx512bf16"))) inline void pair_conv_tile_dispatch(std::integer_sequence<int, MB...>,
    int64_t width, const PairStep* steps, int64_t n_steps, int64_t offset, int64_t step, const BFloat16* w,
    const PairOut& o) {
  ((width == MB + 1 ? pair_conv_tile<V, MB + 1, kStep>(steps, n_steps, offset, step, w, o) : void()), ...);
}

// One channel block of an output row on Vt-vector tiles of equal width (a narrow remainder tile has too few
// independent accumulators to hide the latency); w_block: the block's packed weights, c0 its first channel.
template <int Vt, int kStep>
__attribute__((target("avx512bf16"))) void pair_conv_block(const PairStep* steps, int64_t n_steps,
                                                           const BFloat16* w_block, int64_t step, int64_t out_w,
                                                           const float* bias_blocked, const BFloat16* row_residual,
                                                           BFloat16* row_out, int64_t c0, int64_t c_out, bool relu) {
  constexpr int kPixels = pair_tile_pixels<Vt, kStep>;
  const int64_t tiles = ceil_div(out_w, kPixels);
  for (int64_t t = 0, ow = 0; t < tiles; ++t) {
    const int64_t width = (out_w - ow) / (tiles - t), at = ow * c_out + c0;
    const PairOut o{bias_blocked + c0, row_residual ? row_residual + at : nullptr, row_out + at, c_out - c0, c_out,
                    relu};
    pair_conv_tile_dispatch<Vt, kStep>(std::make_integer_sequence<int, kPixels>{}, width, steps, n_steps, ow * step,
                                       step, w_block, o);
    ow += width;
  }
}

// One output row (row_out: its first pixel's output, row_residual likewise), every channel block; step is kStep
// when that is given.
template <int V, int kStep = 0>
__attribute__((target("avx512bf16"))) void pair_conv_row(const PairStep* steps, int64_t n_steps,
                                                         const BFloat16* w_blocks, int64_t block_size, int64_t blocks,
                                                         int64_t step, int64_t out_w, const float* bias_blocked,
                                                         const BFloat16* row_residual, BFloat16* row_out,
                                                         int64_t c_out, bool relu) {
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t c0 = b * V * 16;
    // A last block of at most 16 channels (336 = 10.5 blocks, S4's stage 2; 112, its third stem layer) runs its first
    // channel vector only (the second is all padding), bit-identical. Interleaved, one thread, Zen 5: S4's 56 -> 112
    // stem layer 1.06x, 1x1 336 -> 336 1.02x, 896 -> 336 1.03x; S4's bf16 forward 1.02x (0.92..1.12, a noisy hour).
    auto block = V == 2 && c_out - c0 <= 16 ? pair_conv_block<1, kStep> : pair_conv_block<V, kStep>;
    block(steps, n_steps, w_blocks + b * block_size, step, out_w, bias_blocked, row_residual, row_out, c0, c_out, relu);
  }
}

// dst = the pixels 3-channel pixels at src with a zero fourth channel; eight pixels per permute (a copy per pixel
// took longer than the 3 -> 16 stem layer's arithmetic).
inline void three_to_four_channels(const BFloat16* src, int64_t pixels, BFloat16* dst) {
  alignas(64) static constexpr int16_t kIndex[32] = {0,  1,  2,  0, 3,  4,  5,  0, 6,  7,  8,  0, 9,  10, 11, 0,
                                                     12, 13, 14, 0, 15, 16, 17, 0, 18, 19, 20, 0, 21, 22, 23, 0};
  const __m512i index = _mm512_load_si512(kIndex);
  int64_t p = 0;
  for (; p + 8 <= pixels; p += 8) {
    const __m512i v = _mm512_maskz_loadu_epi16(0xFFFFFF, src + p * 3);
    _mm512_storeu_si512(dst + p * 4, _mm512_maskz_permutexvar_epi16(0x77777777, index, v));
  }
  for (; p < pixels; ++p) {
    std::copy_n(src + p * 3, 3, dst + p * 4);
    dst[p * 4 + 3] = BFloat16(0.f);
  }
}

// w_blocks: (c_out / (16 V) rounded up, kh, kw * c_pad / 2, 16 V, 2) bf16, zero past c_out and c_in.
template <int V>
void pair_conv_channels_last(const BFloat16* x, const BFloat16* w_blocks, int64_t c_pad, const float* bias,
                             const BFloat16* residual, bool relu, BFloat16* out, const ConvShape& s) {
  const int64_t c = s.c_in, pairs_row = s.kw * c_pad / 2, step = s.stride * c_pad;
  const int64_t blocks = ceil_div(s.c_out, int64_t(16 * V));
  const std::vector<float> bias_blocked = zero_padded(bias, s.c_out, blocks * 16 * V);
  at::parallel_for(0, s.batch * s.out_h, 1, [&](int64_t r0, int64_t r1) {
    PaddedRows<BFloat16> padded(s, c_pad);
    std::vector<PairStep> steps(s.kh * pairs_row);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.out_h, oh = r % s.out_h;
      const BFloat16* const* rows = padded.gather(x, n, oh, [&](const BFloat16* src, BFloat16* dst) {
        if (c == c_pad) {
          std::copy_n(src, s.w * c, dst);
        } else if (c == 3) {
          three_to_four_channels(src, s.w, dst);
        } else {
          for (int64_t iw = 0; iw < s.w; ++iw) std::copy_n(src + iw * c, c, dst + iw * c_pad);
        }
      });
      // The input rows two output rows ahead will add, requested now: the hardware prefetchers restart at every
      // 4 KiB page, which the 3 -> 16 stem layer's 2.7 KB of new input per output row crosses every other row, and
      // the row copies above then waited on memory for as long as the arithmetic took.
      if (r + 2 < r1 && (r + 2) / s.out_h == n) {
        const auto [first, last] = new_input_rows(s, oh + 2);
        const char* begin = reinterpret_cast<const char*>(x + (n * s.h + first) * s.w * c);
        const char* end = reinterpret_cast<const char*>(x + (n * s.h + last) * s.w * c);
        for (const char* line = begin; line < end; line += 64) __builtin_prefetch(line);
      }
      // Written through a local pointer and count: push_back kept the vector's end in memory, and each step's two
      // scalar stores read back as one vector stalled store forwarding (16% of the 32 -> 64 stem layer's time).
      PairStep* step_out = steps.data();
      int64_t n_steps = 0;
      for (int64_t i = 0; i < s.kh; ++i) {
        if (!rows[i]) continue;
        const BFloat16* row = rows[i];
        const int64_t w0 = i * pairs_row * V * 32;
        for (int64_t k = 0; k < pairs_row; ++k) step_out[n_steps++] = PairStep{row + 2 * k, w0 + k * V * 32};
      }
      const int64_t at = r * s.out_w * s.c_out;
      auto row_kernel = step == kFirstLayerStep ? pair_conv_row<V, kFirstLayerStep> : pair_conv_row<V>;
      row_kernel(step_out, n_steps, w_blocks, s.kh * pairs_row * V * 32, blocks, step, s.out_w, bias_blocked.data(),
                 residual ? residual + at : nullptr, out + at, s.c_out, relu);
    }
  });
}

// The same convolution on AMX tiles (amx_rows): per output row, its kernel rows' patches read in place from the padded
// input rows, pixels step values apart.
void amx_conv_channels_last(const BFloat16* x, const at::Tensor& weight, int64_t c_pad, const float* bias,
                            const BFloat16* residual, bool relu, BFloat16* out, const ConvShape& s) {
  const int64_t c = s.c_in, step = s.stride * c_pad;
  const AmxWeight w = amx_weight(weight, c_pad, bias);
  at::parallel_for(0, s.batch * s.out_h, 1, [&](int64_t r0, int64_t r1) {
    PaddedRows<BFloat16> padded(s, c_pad);
    std::vector<AmxSegment> segments(s.kh);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.out_h, oh = r % s.out_h;
      const BFloat16* const* rows = padded.gather(x, n, oh, [&](const BFloat16* src, BFloat16* dst) {
        if (c == c_pad) {
          std::copy_n(src, s.w * c, dst);
        } else if (c == 3) {
          three_to_four_channels(src, s.w, dst);
        } else {
          for (int64_t iw = 0; iw < s.w; ++iw) std::copy_n(src + iw * c, c, dst + iw * c_pad);
        }
      });
      int64_t n_segments = 0;
      for (int64_t i = 0; i < s.kh; ++i)
        if (rows[i]) segments[n_segments++] = AmxSegment{rows[i], i};
      const int64_t at = r * s.out_w * s.c_out;
      amx_rows(segments.data(), n_segments, s.out_w, step, w, residual ? residual + at : nullptr, relu, out + at);
    }
  });
}

// (c_out, c_in, kh, kw) -> (block, kh, kw * c_pad / 2 pairs, 16 V channels, 2) bf16, zero-padded past c_out and c_in.
at::Tensor pair_blocks(const at::Tensor& weight, int64_t c_pad, int V) {
  const int64_t c_out = weight.size(0), c_in = weight.size(1), kh = weight.dim() == 4 ? weight.size(2) : 1,
                kw = weight.dim() == 4 ? weight.size(3) : 1, blocks = ceil_div(c_out, int64_t(16 * V));
  return derived_weight(weight, V == 1 ? "pair blocks 16" : "pair blocks 32", [&] {
    return at::constant_pad_nd(weight.reshape({c_out, c_in, kh, kw}), {0, 0, 0, 0, 0, c_pad - c_in, 0, blocks * 16 * V - c_out})
        .reshape({blocks, 16 * V, c_pad, kh, kw})
        .permute({0, 3, 4, 2, 1})
        .reshape({blocks, kh, kw * c_pad / 2, 2, 16 * V})
        .transpose(3, 4)
        .contiguous();
  });
}

void pair_conv(const float*, const at::Tensor&, const float*, const float*, bool, float*, const ConvShape&) {}
void pair_conv(const BFloat16* x, const at::Tensor& weight, const float* bias, const BFloat16* residual, bool relu,
               BFloat16* out, const ConvShape& s) {
  if (s.pointwise()) {
    // A 1x1 convolution's patches are the input pixels themselves: all N * H * W of them are one long row, read in
    // place in chunks of about 8 tiles (per output row, the last stages' 4- to 14-pixel rows left too few
    // accumulators: 0.56-0.89x the brgemm tiles there). Even c_in only (the caller's condition): pairs must not
    // straddle pixels. A whole number of chunks per thread: S1's last stage (256 pixels) ran as chunks of 112, 112
    // and 32 pixels, one thread doing two thirds of it (balanced: S1's bf16 forward 1.03x / 1.04x on two threads).
    const PairWeight w = pair_weight(weight, bias);
    const int64_t pixels = s.batch * s.h * s.w;
    const int64_t tile = w.amx ? 32 : w.vecs == 1 ? pair_tile_pixels<1> : pair_tile_pixels<2>;
    const int64_t tiles = ceil_div(pixels, tile), threads = at::get_num_threads();
    const int64_t chunks = ceil_div(ceil_div(tiles, int64_t(8)), threads) * threads;
    const int64_t chunk = ceil_div(tiles, chunks) * tile;
    at::parallel_for(0, ceil_div(pixels, chunk), 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t p0 = q * chunk;
        pair_rows(x + p0 * s.c_in, std::min(chunk, pixels - p0), s.c_in, w, residual ? residual + p0 * s.c_out : nullptr,
                  relu, out + p0 * s.c_out);
      }
    });
    return;
  }
  const int64_t c_pad = s.c_in + s.c_in % 2;
  if (amx_usable()) {
    amx_conv_channels_last(x, weight, c_pad, bias, residual, relu, out, s);
    return;
  }
  const int V = pair_vecs(s.c_out);
  const at::Tensor w_blocks = pair_blocks(weight, c_pad, V);
  auto kernel = V == 1 ? pair_conv_channels_last<1> : pair_conv_channels_last<2>;
  kernel(x, w_blocks.data_ptr<BFloat16>(), c_pad, bias, residual, relu, out, s);
}

template <int V>
void pair_rows_impl(const BFloat16* a, int64_t rows, int64_t lda, const PairWeight& w, const BFloat16* residual,
                    bool relu, BFloat16* out) {
  const int64_t pairs = w.k / 2, blocks = w.blocks.size(0);
  std::vector<PairStep> steps(pairs);
  for (int64_t k = 0; k < pairs; ++k) steps[k] = {a + 2 * k, k * V * 32};
  pair_conv_row<V>(steps.data(), pairs, w.blocks.data_ptr<BFloat16>(), pairs * V * 32, blocks, lda, rows, w.bias.data(),
                   residual, out, w.n, relu);
}
#else
template <typename T>
bool pair_conv_usable() { return false; }
template <typename T>
void pair_conv(const T*, const at::Tensor&, const float*, const T*, bool, T*, const ConvShape&) {}
#endif

}  // namespace

bool pair_products_usable() { return pair_conv_usable<BFloat16>(); }

bool set_pair_kernels(bool on) { return pair_kernels_on().exchange(on); }

PairWeight pair_weight(const at::Tensor& weight, const float* bias) {
  TORCH_CHECK(pair_products_usable(), "pair_weight: bf16 pair products are not usable here");
  PairWeight w;
  w.n = weight.size(0), w.k = weight.size(1), w.vecs = pair_vecs(w.n);
  TORCH_CHECK(w.k % 2 == 0 && weight.numel() == w.n * w.k, "pair_weight: expects an (n, k, 1, 1) weight with even k, got ",
              weight.sizes());
  if (amx_usable()) {
    w.amx = amx_weight(weight, w.k, bias);
    return w;
  }
#if defined(CPU_CAPABILITY_AVX512)
  w.blocks = pair_blocks(weight, w.k, w.vecs).reshape({-1, w.k / 2, 16 * w.vecs, 2});
#endif
  w.bias.assign(w.blocks.size(0) * 16 * w.vecs, 0.f);
  std::copy_n(bias, w.n, w.bias.data());
  return w;
}

void pair_rows(const BFloat16* a, int64_t rows, int64_t lda, const PairWeight& w, const BFloat16* residual, bool relu,
               BFloat16* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if (w.amx) {
    const AmxSegment segment{a, 0};
    amx_rows(&segment, 1, rows, lda, *w.amx, residual, relu, out);
    return;
  }
  (w.vecs == 1 ? pair_rows_impl<1> : pair_rows_impl<2>)(a, rows, lda, w, residual, relu, out);
#else
  (void)a, (void)rows, (void)lda, (void)w, (void)residual, (void)relu, (void)out;
  TORCH_CHECK(false, "pair_rows: bf16 pair products are not usable in this build");
#endif
}

namespace {

// Dense kxk channels_last without im2col: register-blocked in fp32 (bf16 widened when bf16_widened()), else bf16
// one GEMM per kernel row on bf16 pair products (needs an even kw * c_in).
template <typename T>
void dense_conv_channels_last(const T* x, const at::Tensor& weight, const float* bias, const T* residual, bool relu,
                              T* out, const ConvShape& s) {
  if (std::is_same_v<T, float> || bf16_widened()) {
    const std::vector<int> plan = conv_block_plan(x, weight, s);
    const std::string kind = "dense conv channel blocks fp32 " + plan_name(plan);
    const at::Tensor w_blocks = derived_weight(weight, kind.c_str(), [&] { return pack_conv_blocks(weight, s, plan); });
    blocked_conv_channels_last(x, w_blocks.data_ptr<float>(), plan, bias, residual, relu, out, s);
  } else {
    const auto kernel_rows = [&] { return weight.permute({2, 3, 1, 0}).contiguous(); };  // (kh, kw, c_in, c_out)
    const at::Tensor w_rows = derived_weight(weight, "dense conv kernel rows", kernel_rows);
    const at::Tensor w_f = derived_weight(weight, "dense conv kernel rows fp32", [&] { return w_rows.to(at::kFloat); });
    row_conv_channels_last<T>(x, w_rows.data_ptr<T>(), w_f.data_ptr<float>(), bias, residual, relu, out, s);
  }
}

// Where a tile of pixels x channel vectors goes: out (and residual) at its first pixel and channel, the channels
// stored from there (the last vector masked), the pixel stride; ReLU as a max with 0 or -inf.
template <typename T>
struct TileStore {
  T* out;
  const T* residual;
  int64_t channels, ld;
  float floor;
  // Whether a tile of V vectors is stored whole, with no residual to add.
  template <int V>
  bool whole() const {
    return residual == nullptr && channels >= V * kVec;
  }
  template <int V>
  inline void finish(fVec (&acc)[V], int p) const {
    for (int v = 0; v < V; ++v) {
      const int64_t n = std::min<int64_t>(kVec, channels - v * kVec), at = p * ld + v * kVec;
      fVec r = acc[v];
      if (residual) r = r + load_f(residual + at, n);
      store_f(at::vec::maximum(r, fVec(floor)), out + at, n);
    }
  }
};

// A tile of P pixels x V channel vectors of the few-input-channel convolution below, in registers over its K taps:
// per tap, V weight vectors are loaded and each pixel's input is broadcast once for all V (as the FMA's memory
// operand where V is 1). KSTEP: the pixel stride in floats when it is a compile-time constant (0: step_rt), so the
// broadcasts address the KH input rows by immediate offsets. Out of line, with the tile's row pointers taken first
// and the tap loop left rolled: inlined into the row loop with all 27 taps unrolled, GCC hoisted every pixel and
// tap's offset into a register of its own, spilled them and most weights to the stack and ran at 0.8-0.9x the old
// kernel (Intel Xeon family 6 model 167, 2026-12-03).
template <int V, int P, int KSTEP, int KH, int KW, int C, typename T>
__attribute__((noinline)) void small_cin_tile(const float* const* rows, int64_t col, int64_t step_rt, const float* w,
                                              int64_t w_block, const float* bias, const TileStore<T>& o) {
  const int64_t step = KSTEP ? KSTEP : step_rt;
  fReg acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < V; ++v) acc[p][v] = fVec::loadu(bias + v * kVec);
  const float* tile_rows[KH];
  for (int i = 0; i < KH; ++i) tile_rows[i] = rows[i] + col;
#pragma GCC unroll 1
  for (int i = 0; i < KH; ++i) {
    const float* a = tile_rows[i];
    const float* wi = w + i * KW * C * kVec;
#pragma GCC unroll 3
    for (int j = 0; j < KW * C; ++j) {
      fVec wv[V];
      for (int v = 0; v < V; ++v) wv[v] = fVec::loadu(wi + v * w_block + j * kVec);
      for (int p = 0; p < P; ++p) {
        const fVec a_pj(a[p * step + j]);
        for (int v = 0; v < V; ++v) acc[p][v] = at::vec::fmadd(a_pj, wv[v], fVec(acc[p][v]));
      }
    }
  }
  if (o.template whole<V>()) {
    // Branch-free over the unrolled pixels: a branch in this epilogue made GCC keep acc in memory, zeroed on every
    // call by a `rep stos` (3 -> 16 at 224 px ran at half the FMA rate).
    const fVec floor(o.floor);
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < V; ++v) store_f(at::vec::maximum(fVec(acc[p][v]), floor), o.out + p * o.ld + v * kVec);
  } else {
    for (int p = 0; p < P; ++p) {
      fVec pixel[V];
      for (int v = 0; v < V; ++v) pixel[v] = acc[p][v];
      o.finish(pixel, p);
    }
  }
}

// Dense convolution with few input channels (a stem's first layer, 3 -> 16..32 channels), channels_last: as a GEMM
// its K = kh * kw * c_in is too short to feed a micro-kernel, so pixels broadcast their inputs against the weight
// vectors, 16 pixels per tile on one channel vector and 8 on two (where more than 16 channels remain; with one per
// pass, 3 -> 28 broadcast every input twice), so that many independent accumulators hide the FMA latency.
// 3 -> 16 at 224 px, one thread, batch 16: 1.26 -> 1.00 ms with the whole-tile row ends and register accumulators
// (AMD Zen 5, family 26 model 2, 2026-12-04).
// Against the one-vector kernel with all 27 weight vectors in registers, in-process A/B, one thread: 3 -> 16 at 224
// px 1.21-1.30x, 3 -> 28 at 256 px 1.36-1.42x (Intel Xeon family 6 model 167, 2026-12-03). bf16 input rows are
// widened to fp32 once per output row.
template <int KH, int KW, int C, typename T>
void small_cin_conv_channels_last(const T* x, const float* w_blocks, const float* bias, const T* residual, bool relu,
                                  T* out, const ConvShape& s) {
  constexpr int K = KH * KW * C, kPixels = 8;
  constexpr bool kFloat = std::is_same<T, float>::value;
  const int64_t c_out = s.c_out, row = s.w * C, step = s.stride * C, blocks = ceil_div(c_out, kVec);
  const int64_t w_block = K * kVec;  // w_blocks: (blocks, KH, KW, C, kVec), zero past c_out
  const float floor = relu ? 0.f : -std::numeric_limits<float>::infinity();
  const std::vector<float> bias_blocked = zero_padded(bias, c_out, blocks * kVec);
  // Output columns whose patch lies inside the row.
  const int64_t ow_lo = std::min(s.out_w, ceil_div(s.pad, s.stride));
  const int64_t last_inside = s.w - KW + s.pad;
  const int64_t ow_hi = last_inside < 0 ? ow_lo : std::max(ow_lo, std::min(s.out_w, last_inside / s.stride + 1));
  at::parallel_for(0, s.batch * s.out_h, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> widened(kFloat ? 0 : KH * row);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.out_h, oh = r % s.out_h, ih0 = oh * s.stride - s.pad;
      const float* rows[KH];  // input row ih0 + i in fp32, nullptr in the padding
      for (int i = 0; i < KH; ++i) {
        const int64_t ih = ih0 + i;
        if (ih < 0 || ih >= s.h) {
          rows[i] = nullptr;
          continue;
        }
        const T* src = x + (n * s.h + ih) * row;
        if constexpr (kFloat) {
          rows[i] = src;
        } else {
          at::vec::convert(src, widened.data() + i * row, row);
          rows[i] = widened.data() + i * row;
        }
      }
      bool rows_inside = true;
      for (int i = 0; i < KH; ++i) rows_inside = rows_inside && rows[i];
      const int64_t inner_lo = rows_inside ? ow_lo : s.out_w, inner_hi = rows_inside ? ow_hi : s.out_w;
      // One block of Vt channel vectors from channel co (w: its weights) over the whole output row.
      auto block = [&](auto v_c, int64_t co, const float* w) {
        constexpr int Vt = decltype(v_c)::value;
        const float* block_bias = bias_blocked.data() + co;
        auto store_at = [&](int64_t ow) {
          const int64_t at = (r * s.out_w + ow) * c_out + co;
          return TileStore<T>{out + at, residual ? residual + at : nullptr, std::min<int64_t>(Vt * kVec, c_out - co),
                              c_out, floor};
        };
        auto bordered = [&](int64_t ow) {
          const int64_t iw0 = ow * s.stride - s.pad;
          fVec acc[Vt];
          for (int v = 0; v < Vt; ++v) acc[v] = fVec::loadu(block_bias + v * kVec);
          for (int i = 0; i < KH; ++i)
            for (int j = 0; j < KW; ++j) {
              const int64_t iw = iw0 + j;
              if (!rows[i] || iw < 0 || iw >= s.w) continue;
              for (int ci = 0; ci < C; ++ci) {
                const fVec a(rows[i][iw * C + ci]);
                const int64_t k = (i * KW + j) * C + ci;
                for (int v = 0; v < Vt; ++v)
                  acc[v] = at::vec::fmadd(a, fVec::loadu(w + v * w_block + k * kVec), acc[v]);
              }
            }
          store_at(ow).finish(acc, 0);
        };
        auto interior = [&](int64_t& ow, auto kstep_c) {
          constexpr int KS = decltype(kstep_c)::value, kTile = Vt == 1 ? 2 * kPixels : kPixels;
          auto tile = [&](auto pixels_c, int64_t at) {
            small_cin_tile<Vt, decltype(pixels_c)::value, KS, KH, KW, C>(rows, (at * s.stride - s.pad) * C, step, w,
                                                                         w_block, block_bias, store_at(at));
          };
          const int64_t first = ow;
          for (; ow + kTile <= inner_hi; ow += kTile) tile(std::integral_constant<int, kTile>{}, ow);
          // The row's rest as one more whole tile ending at inner_hi, over pixels already stored (computed again, to
          // the same values): the narrow tiles that finished each row ran at a fraction of the FMA rate.
          if (ow < inner_hi && inner_hi - first >= kTile && !residual) {
            tile(std::integral_constant<int, kTile>{}, inner_hi - kTile);
            ow = inner_hi;
          }
          for (; ow + kPixels / 2 <= inner_hi; ow += kPixels / 2) tile(std::integral_constant<int, kPixels / 2>{}, ow);
          for (; ow < inner_hi; ++ow) tile(std::integral_constant<int, 1>{}, ow);
        };
        int64_t ow = 0;
        for (; ow < inner_lo; ++ow) bordered(ow);
        if (s.stride == 2) {
          interior(ow, std::integral_constant<int, 2 * C>{});
        } else if (s.stride == 1) {
          interior(ow, std::integral_constant<int, C>{});
        } else {
          interior(ow, std::integral_constant<int, 0>{});
        }
        for (; ow < s.out_w; ++ow) bordered(ow);
      };
      for (int64_t b = 0; b < blocks;) {  // two vectors wherever more than 16 channels remain
        if (blocks - b >= 2) {
          block(std::integral_constant<int, 2>{}, b * kVec, w_blocks + b * w_block);
          b += 2;
        } else {
          block(std::integral_constant<int, 1>{}, b * kVec, w_blocks + b * w_block);
          b += 1;
        }
      }
    }
  });
}

// NCHW: per image and tile of output pixels, out[n][:, tile] = W (c_out x k_col) @ col (k_col x tile); as above,
// k_col may carry one zero row of padding.
template <typename T>
void gemm_conv_nchw(const T* x, const T* weight, int64_t k_col, const float* bias, const T* residual, bool relu, T* out,
                    const ConvShape& s) {
  const int64_t pixels = s.out_h * s.out_w, k = s.k_gemm(), c_out = s.c_out, in_plane = s.h * s.w;
  const bool direct = s.pointwise();
  const int64_t tile = pixels_per_tile(pixels, (direct ? 0 : k_col) + c_out);
  const int64_t tiles_per_image = ceil_div(pixels, tile);
  at::parallel_for(0, s.batch * tiles_per_image, 1, [&](int64_t t0, int64_t t1) {
    MatmulThreadGuard guard;
    MatB<T> b_tile;
    std::vector<T> col(direct ? 0 : k_col * tile);
    const Scratch<float> acc_buf(std::is_same<T, float>::value ? 0 : c_out * tile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / tiles_per_image, p0 = (t % tiles_per_image) * tile, np = std::min(tile, pixels - p0);
      const T* x_n = x + n * s.c_in * in_plane;
      if (direct) {
        b_tile.assign(x_n + p0, k, np, in_plane);
      } else {
        for (int64_t c = 0; c < s.c_in; ++c)
          for (int64_t i = 0; i < s.kh; ++i)
            for (int64_t j = 0; j < s.kw; ++j) {
              T* row = col.data() + ((c * s.kh + i) * s.kw + j) * np;
              for (int64_t p = 0; p < np; ++p) {
                const int64_t oh = (p0 + p) / s.out_w, ow = (p0 + p) % s.out_w;
                const int64_t ih = oh * s.stride - s.pad + i, iw = ow * s.stride - s.pad + j;
                row[p] = (ih < 0 || ih >= s.h || iw < 0 || iw >= s.w) ? T(0) : x_n[(c * s.h + ih) * s.w + iw];
              }
            }
        std::fill(col.begin() + k * np, col.begin() + k_col * np, T(0));
        b_tile.assign(col.data(), k_col, np, np);
      }
      T* out_n = out + n * c_out * pixels + p0;
      float* acc = acc_buf.empty() ? reinterpret_cast<float*>(out_n) : acc_buf.data();
      const int64_t ldc = acc_buf.empty() ? pixels : np;
      matmul(c_out, weight, k_col, b_tile, acc, ldc);
      for (int64_t c = 0; c < c_out; ++c)
        epilogue_run(acc + c * ldc, nullptr, bias[c], residual ? residual + (n * c_out + c) * pixels + p0 : nullptr,
                     relu, out_n + c * pixels, np);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Depthwise 3x3, padding 1
// ---------------------------------------------------------------------------------------------------------------

template <bool kFull, typename T>
inline fVec load_channels(const T* p, int64_t count) {
  return kFull ? load_f(p) : load_f(p, count);
}

// One output row segment [ow0, ow0 + kOut) for kBlocks vectors of channels from c0: every input vector is loaded
// once per kernel row and feeds the (up to three) outputs it touches, and the kBlocks * kOut accumulators stay in
// registers as independent FMA chains (one pixel's nine taps in a row were a latency-bound chain: 4x4 and 7x7
// rows, which had no interior group of four, ran at a fifth of the FMA rate). Taps outside the image are skipped.
template <int kOut, int kStride, int kBlocks, bool kFull, typename T>
inline void depthwise_segment(const T* const* in_rows, const float* taps, const fVec* bias, const T* residual, bool relu,
                              T* out, int64_t c, int64_t w, int64_t ow0, int64_t count) {
  constexpr int kIn = (kOut - 1) * kStride + 3;  // input columns the segment reads
  fVec acc[kBlocks][kOut];
#pragma GCC unroll 2
  for (int b = 0; b < kBlocks; ++b)
#pragma GCC unroll 8
    for (int o = 0; o < kOut; ++o) acc[b][o] = bias[b];
  const int64_t iw0 = ow0 * kStride - 1;
  // Only the first column (the left padding) and the last (the right padding, or past an odd row for stride 2) can
  // fall outside the row: two flags instead of a bounds check per column.
  const bool skip_first = iw0 < 0, skip_last = iw0 + kIn - 1 >= w;
  for (int i = 0; i < 3; ++i) {
    if (!in_rows[i]) continue;
    fVec wt[kBlocks][3];
#pragma GCC unroll 2
    for (int b = 0; b < kBlocks; ++b)
#pragma GCC unroll 3
      for (int j = 0; j < 3; ++j) wt[b][j] = load_channels<kFull>(taps + (i * 3 + j) * c + b * kVec, count);
#pragma GCC unroll 32
    for (int q = 0; q < kIn; ++q) {
      const int64_t iw = iw0 + q;
      if ((q == 0 && skip_first) || (q == kIn - 1 && skip_last)) continue;
#pragma GCC unroll 2
      for (int b = 0; b < kBlocks; ++b) {
        const fVec v = load_channels<kFull>(in_rows[i] + iw * c + b * kVec, count);
#pragma GCC unroll 3
        for (int j = 0; j < 3; ++j) {
          const int o = (q - j) / kStride;  // output column fed by input column q through tap j
          if (q >= j && (q - j) % kStride == 0 && o < kOut) acc[b][o] = at::vec::fmadd(v, wt[b][j], acc[b][o]);
        }
      }
    }
  }
  const fVec zero(0.f);
#pragma GCC unroll 2
  for (int b = 0; b < kBlocks; ++b)
#pragma GCC unroll 8
    for (int o = 0; o < kOut; ++o) {
      const int64_t offset = (ow0 + o) * c + b * kVec;
      fVec v = acc[b][o];
      if (residual) v = v + load_channels<kFull>(residual + offset, count);
      if (relu) v = at::vec::maximum(v, zero);
      if (kFull) store_f(v, out + offset); else store_f(v, out + offset, count);
    }
}

constexpr int kSegment = 8;  // outputs per segment: 2 blocks x 8 = 16 accumulators, 6 taps, loads: < 32 registers

// A row segment of n (1..kSegment) outputs: n as a template argument, so the loops above unroll completely.
template <int kStride, int kBlocks, bool kFull, typename T>
void depthwise_segment_n(int n, const T* const* in_rows, const float* taps, const fVec* bias, const T* residual,
                         bool relu, T* out, int64_t c, int64_t w, int64_t ow0, int64_t count) {
  switch (n) {
#define SHVIT_DW_SEGMENT(N) \
  case N: return depthwise_segment<N, kStride, kBlocks, kFull>(in_rows, taps, bias, residual, relu, out, c, w, ow0, count);
    SHVIT_DW_SEGMENT(1) SHVIT_DW_SEGMENT(2) SHVIT_DW_SEGMENT(3) SHVIT_DW_SEGMENT(4)
    SHVIT_DW_SEGMENT(5) SHVIT_DW_SEGMENT(6) SHVIT_DW_SEGMENT(7) SHVIT_DW_SEGMENT(8)
#undef SHVIT_DW_SEGMENT
    default: TORCH_CHECK(false, "shvit depthwise: bad segment length ", n);
  }
}

// One output row, kBlocks channel vectors from c0, in segments of at most kSegment outputs of near-equal length
// (a 14-wide row is two of 7, not 8 + 6).
template <int kStride, int kBlocks, bool kFull, typename T>
void depthwise_row_blocks(const T* const* in_rows, const float* taps, const float* bias, const T* residual, bool relu,
                          T* out, const ConvShape& s, int64_t c0, int64_t count) {
  fVec b[kBlocks];
  for (int k = 0; k < kBlocks; ++k) b[k] = load_channels<kFull>(bias + c0 + k * kVec, count);
  const T* rows[3];
  for (int i = 0; i < 3; ++i) rows[i] = in_rows[i] ? in_rows[i] + c0 : nullptr;
  const int64_t segments = ceil_div(s.out_w, kSegment);
  for (int64_t g = 0, ow0 = 0; g < segments; ++g) {
    const int64_t n = (s.out_w - ow0) / (segments - g);
    depthwise_segment_n<kStride, kBlocks, kFull>(static_cast<int>(n), rows, taps + c0, b, residual ? residual + c0 : nullptr,
                                                 relu, out + c0, s.c_in, s.w, ow0, count);
    ow0 += n;
  }
}

template <int kStride, typename T>
void depthwise_channels_last_stride(const T* x, const float* taps, const float* bias, const T* residual, bool relu,
                                    T* out, const ConvShape& s) {
  const int64_t c = s.c_in;
  at::parallel_for(0, s.batch * s.out_h, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.out_h, oh = r % s.out_h;
      const T* rows[3];
      for (int i = 0; i < 3; ++i) {
        const int64_t ih = oh * kStride - 1 + i;
        rows[i] = (ih >= 0 && ih < s.h) ? x + (n * s.h + ih) * s.w * c : nullptr;
      }
      const int64_t out_row = r * s.out_w * c;
      const T* res_row = residual ? residual + out_row : nullptr;
      int64_t c0 = 0;
      for (; c0 + 2 * kVec <= c; c0 += 2 * kVec)
        depthwise_row_blocks<kStride, 2, true>(rows, taps, bias, res_row, relu, out + out_row, s, c0, kVec);
      for (; c0 + kVec <= c; c0 += kVec)
        depthwise_row_blocks<kStride, 1, true>(rows, taps, bias, res_row, relu, out + out_row, s, c0, kVec);
      if (c0 < c) depthwise_row_blocks<kStride, 1, false>(rows, taps, bias, res_row, relu, out + out_row, s, c0, c - c0);
    }
  });
}

// taps: (9, C) fp32, so one tap's weights for a block of channels are one vector load.
template <typename T>
void depthwise_channels_last(const T* x, const float* taps, const float* bias, const T* residual, bool relu, T* out,
                             const ConvShape& s) {
  if (s.stride == 1) return depthwise_channels_last_stride<1>(x, taps, bias, residual, relu, out, s);
  TORCH_CHECK(s.stride == 2, "shvit depthwise: stride must be 1 or 2, got ", s.stride);
  depthwise_channels_last_stride<2>(x, taps, bias, residual, relu, out, s);
}

// NCHW: each (image, channel) plane is widened into a zero-bordered fp32 copy, so the stencil needs no bounds
// checks; stride 1 vectorises along the row.
template <typename T>
void depthwise_nchw(const T* x, const float* taps, const float* bias, const T* residual, bool relu, T* out,
                    const ConvShape& s) {
  const int64_t pw = s.w + 2, ph = s.h + 2, c = s.c_in, out_plane = s.out_h * s.out_w;
  at::parallel_for(0, s.batch * c, 1, [&](int64_t q0, int64_t q1) {
    std::vector<float> padded(ph * pw + kVec, 0.f), row(s.out_w);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t ch = q % c;
      const T* plane = x + q * s.h * s.w;
      for (int64_t i = 0; i < s.h; ++i)
        for (int64_t j = 0; j < s.w; ++j) padded[(i + 1) * pw + j + 1] = static_cast<float>(plane[i * s.w + j]);
      float w9[9];
      for (int t = 0; t < 9; ++t) w9[t] = taps[t * c + ch];
      for (int64_t oh = 0; oh < s.out_h; ++oh) {
        const float* top = padded.data() + oh * s.stride * pw;
        if (s.stride == 1) {
          for (int64_t ow = 0; ow < s.out_w; ow += kVec) {
            const int64_t m = std::min(kVec, s.out_w - ow);
            fVec acc(0.f);
            for (int i = 0; i < 3; ++i)
              for (int j = 0; j < 3; ++j) acc = at::vec::fmadd(fVec::loadu(top + i * pw + ow + j, m), fVec(w9[i * 3 + j]), acc);
            acc.store(row.data() + ow, m);
          }
        } else {
          for (int64_t ow = 0; ow < s.out_w; ++ow) {
            const float* p = top + ow * s.stride;
            float acc = 0.f;
            for (int i = 0; i < 3; ++i)
              for (int j = 0; j < 3; ++j) acc += p[i * pw + j] * w9[i * 3 + j];
            row[ow] = acc;
          }
        }
        const int64_t o = q * out_plane + oh * s.out_w;
        epilogue_run(row.data(), nullptr, bias[ch], residual ? residual + o : nullptr, relu, out + o, s.out_w);
      }
    }
  });
}

enum class ConvKind { kGemm, kDepthwise3x3 };

ConvKind conv_kind(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding, int64_t groups) {
  const int64_t c_in = x.size(1), c_out = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(stride >= 1, kOp, ": 'stride' must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, kOp, ": 'padding' must be >= 0, got ", padding);
  if (groups == 1) {
    TORCH_CHECK(weight.size(1) == c_in, kOp, ": 'weight' ", weight.sizes(), " expects ", weight.size(1),
                " input channels but 'x' has ", c_in);
    return ConvKind::kGemm;
  }
  TORCH_CHECK(groups == c_in && c_out == c_in && weight.size(1) == 1 && kh == 3 && kw == 3 && padding == 1 &&
                  (stride == 1 || stride == 2),
              kOp, ": grouped convolutions are supported only as depthwise 3x3 with padding 1 and stride 1 or 2 ",
              "(groups == channels, weight (C, 1, 3, 3)); got groups=", groups, ", x channels ", c_in, ", weight ",
              weight.sizes(), ", stride ", stride, ", padding ", padding);
  return ConvKind::kDepthwise3x3;
}

// A groups-1 convolution of x (layout: channels_last or NCHW) into out, on the kernel for its shape, dtype and this
// processor (see the file's head).
template <typename T>
void dense_conv_into(const T* x_ptr, const at::Tensor& weight, const float* bias_ptr, const T* res_ptr, bool relu,
                     T* out_ptr, const ConvShape& s, bool channels_last) {
  // bf16 im2col needs an even K (VNNI pairs): pad with one zero tap row.
  const int64_t k = s.k_gemm(), k_col = (!s.pointwise() && std::is_same<T, BFloat16>::value) ? k + k % 2 : k;
  // bf16 row GEMMs read overlapping rows of x in place, which only the VNNI micro-kernel can (even K).
  const bool row_conv = !s.pointwise() && (std::is_same<T, float>::value || bf16_widened() ||
                                           (s.kw * s.c_in % 2 == 0 && bf16_brgemm_usable()));
  if (channels_last && pair_conv_usable<T>() && (!s.pointwise() || s.c_in % 2 == 0)) {
    pair_conv(x_ptr, weight, bias_ptr, res_ptr, relu, out_ptr, s);
  } else if (channels_last && s.c_in == 3 && s.kh == 3 && s.kw == 3) {
    const int64_t blocks = ceil_div(s.c_out, kVec);
    // (block, kh, kw, c_in, kVec), zero past c_out
    const at::Tensor w_blocks = derived_weight(weight, "small conv tap blocks fp32", [&] {
      return at::constant_pad_nd(weight.to(at::kFloat), {0, 0, 0, 0, 0, 0, 0, blocks * kVec - s.c_out})
          .reshape({blocks, kVec, 3, 3, 3})
          .permute({0, 3, 4, 2, 1})
          .contiguous();
    });
    small_cin_conv_channels_last<3, 3, 3, T>(x_ptr, w_blocks.data_ptr<float>(), bias_ptr, res_ptr, relu, out_ptr, s);
  } else if (channels_last && s.pointwise()) {
    gemm_conv_channels_last<T>(x_ptr, weight, k, bias_ptr, res_ptr, relu, out_ptr, s);
  } else if (channels_last && row_conv) {
    dense_conv_channels_last<T>(x_ptr, weight, bias_ptr, res_ptr, relu, out_ptr, s);
  } else if (channels_last) {
    // bf16 with an odd patch size: VNNI needs even K, so im2col into rows padded by one zero tap.
    const at::Tensor w_nk = at::constant_pad_nd(weight.permute({0, 2, 3, 1}).reshape({s.c_out, k}), {0, k_col - k}).contiguous();
    gemm_conv_channels_last<T>(x_ptr, w_nk, k_col, bias_ptr, res_ptr, relu, out_ptr, s);
  } else {
    const at::Tensor w_mk = k_col == k ? contiguous_matrix(weight.reshape({s.c_out, k}))
                                       : at::constant_pad_nd(weight.reshape({s.c_out, k}), {0, k_col - k}).contiguous();
    gemm_conv_nchw<T>(x_ptr, w_mk.data_ptr<T>(), k_col, bias_ptr, res_ptr, relu, out_ptr, s);
  }
}

}  // namespace

std::string dense_conv_blocks() {
  switch (plan_mode().load()) {
    case kPlanPairs: return "pairs";
    case kPlanThrees: return "threes";
    case kPlanFours: return "fours";
    default: return "auto";
  }
}

std::string set_dense_conv_blocks(const std::string& next) {
  const int value = parse_plan_mode(next, "set_dense_conv_blocks: mode");
  TORCH_CHECK(value == kPlanAuto || value == kPlanPairs || kMaxBlockVecs >= 4, "set_dense_conv_blocks: '", next,
              "' needs the AVX-512 build, this one is ", C10_STRINGIZE(CPU_CAPABILITY));
  const std::string previous = dense_conv_blocks();
  plan_mode().store(value);
  return previous;
}

std::vector<int64_t> dense_conv_channel_blocks(int64_t c_in, int64_t c_out, int64_t h, int64_t w, int64_t kernel,
                                               int64_t stride, int64_t padding) {
  const int mode = plan_mode().load();
  std::vector<int> plan;
  if (mode != kPlanAuto) {
    plan = block_plan(mode, c_out);
  } else {
    ConvShape s{1, c_in, h, w, c_out, kernel, kernel, 0, 0, stride, padding};
    MeasuredPlans& cache = measured_plans();
    std::lock_guard<std::mutex> lock(cache.mutex);
    const auto it = cache.by_shape.find(plan_key(s));
    if (it != cache.by_shape.end()) plan = it->second;
  }
  return std::vector<int64_t>(plan.begin(), plan.end());
}

std::string dense_conv_bf16() {
  if (pair_conv_usable<BFloat16>()) return "pairs";
  return bf16_widened() ? "fp32" : "rows";
}

at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t stride, int64_t padding, int64_t groups, bool relu,
                         const std::optional<at::Tensor>& residual) {
  check_float_tensor(x, kOp, "x", 4);
  check_float_tensor(weight, kOp, "weight", 4);
  check_same_dtype(weight, x, kOp, "weight");
  TORCH_CHECK(x.numel() > 0, kOp, ": 'x' must not be empty, got shape ", x.sizes());
  TORCH_CHECK(groups >= 1, kOp, ": 'groups' must be >= 1, got ", groups);
  const ConvKind kind = conv_kind(x, weight, stride, padding, groups);
  ConvShape s{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2), weight.size(3), 0, 0,
              stride, padding};
  s.out_h = (s.h + 2 * padding - s.kh) / stride + 1;
  s.out_w = (s.w + 2 * padding - s.kw) / stride + 1;
  TORCH_CHECK(s.h + 2 * padding >= s.kh && s.w + 2 * padding >= s.kw, kOp, ": input spatial size ", x.sizes().slice(2),
              " is smaller than the kernel ", weight.sizes().slice(2), " with padding ", padding);
  if (bias.has_value() && bias->defined()) {
    check_float_tensor(*bias, kOp, "bias", 1);
    check_shape(*bias, {s.c_out}, kOp, "bias");
  }
  const auto fmt = activation_format(x);
  const std::vector<int64_t> out_shape{s.batch, s.c_out, s.out_h, s.out_w};
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    check_float_tensor(*residual, kOp, "residual", 4);
    check_same_dtype(*residual, x, kOp, "residual");
    check_shape(*residual, out_shape, kOp, "residual");
    res = residual->contiguous(fmt);
  }
  const at::Tensor xc = x.contiguous(fmt), bias_f = bias_as_float(bias, s.c_out, x);
  at::Tensor out = empty_output(out_shape, x.options(), fmt);
  // With one pixel per image the two layouts are the same bytes: take the pixel-row kernels, which read
  // input-major 1x1 weights in place (the NCHW GEMM transposes them per call: S1's 1x1-pixel last stage at 64 px
  // spent 0.9 ms per FFN call on that, Zen 3, 2026-11-30).
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast || (s.h * s.w == 1 && s.out_h * s.out_w == 1);

  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_conv_bias_act", [&] {
    using T = scalar_t;
    const T* x_ptr = xc.data_ptr<T>();
    const T* res_ptr = res.defined() ? res.data_ptr<T>() : nullptr;
    const float* bias_ptr = bias_f.data_ptr<float>();
    T* out_ptr = out.data_ptr<T>();
    if (kind == ConvKind::kDepthwise3x3) {
      const at::Tensor taps = derived_weight(weight, "depthwise taps fp32", [&] {
        return transposed(weight.reshape({s.c_in, 9}).to(at::kFloat)).contiguous();
      });
      auto kernel = channels_last ? depthwise_channels_last<T> : depthwise_nchw<T>;
      kernel(x_ptr, taps.data_ptr<float>(), bias_ptr, res_ptr, relu, out_ptr, s);
    } else {
      dense_conv_into<T>(x_ptr, weight, bias_ptr, res_ptr, relu, out_ptr, s, channels_last);
    }
  });
  return out;
}

at::Tensor patch_embed(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                       const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& w4,
                       const at::Tensor& b4, bool out_channels_last) {
  constexpr const char* op = "shvit cpp patch_embed";
  check_float_tensor(x, op, "x", 4);
  TORCH_CHECK(x.numel() > 0, op, ": 'x' must not be empty, got shape ", x.sizes());
  const at::Tensor* weights[4] = {&w1, &w2, &w3, &w4};
  const at::Tensor* biases[4] = {&b1, &b2, &b3, &b4};
  const char* weight_names[4] = {"w1", "w2", "w3", "w4"};
  const char* bias_names[4] = {"b1", "b2", "b3", "b4"};
  // Each layer: 3x3, stride 2, padding 1, on the previous one's channels (the checks as conv_bias_act's).
  ConvShape shapes[4];
  int64_t c = x.size(1), h = x.size(2), w = x.size(3);
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& wi = *weights[i];
    check_float_tensor(wi, op, weight_names[i], 4);
    check_same_dtype(wi, x, op, weight_names[i]);
    check_shape(wi, {wi.size(0), c, 3, 3}, op, weight_names[i]);
    check_channel_vector(*biases[i], op, bias_names[i], wi.size(0));
    shapes[i] = ConvShape{1, c, h, w, wi.size(0), 3, 3, (h - 1) / 2 + 1, (w - 1) / 2 + 1, 2, 1};
    c = wi.size(0), h = shapes[i].out_h, w = shapes[i].out_w;
  }
  const int64_t batch = x.size(0);
  const bool channels_last_in = activation_format(x) == at::MemoryFormat::ChannelsLast;
  // An NCHW image batch (few channels) asked for a channels_last output is interleaved image by image below, into a
  // buffer layer 1 reads while it is in cache, instead of moved whole through memory first.
  const bool planes_in = !channels_last_in && out_channels_last && x.is_contiguous() && x.size(1) >= 2 &&
                         x.size(1) <= kMaxImageChannels;
  // Layer by layer where a thread would have no image of its own, and for an NCHW output (whose convs are GEMMs).
  if (!(channels_last_in || out_channels_last) || batch < at::get_num_threads()) {
    at::Tensor t = x;
    if (out_channels_last) {
      const std::optional<at::Tensor> moved = to_channels_last(x);  // an image batch at copy speed
      t = moved ? *moved : x.contiguous(at::MemoryFormat::ChannelsLast);
    }
    for (int i = 0; i < 4; ++i) t = conv_bias_act(t, *weights[i], *biases[i], 2, 1, 1, i < 3, std::nullopt);
    return t;
  }
  const at::Tensor xc = planes_in ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor bias_f[4];
  for (int i = 0; i < 4; ++i) bias_f[i] = float_vector(*biases[i]);
  at::Tensor out = empty_output({batch, c, h, w}, x.options(), at::MemoryFormat::ChannelsLast);
  // Image by image, all four layers: an image's intermediate maps (S1: 0.4, 0.2, 0.1 MB in bf16) stay in this
  // core's cache, where the batch's (6.4, 3.2, 1.6 MB) went through memory between the layers. The layer kernels'
  // own parallel loops run inline here.
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_patch_embed", [&] {
    using T = scalar_t;
    const T* xp = xc.data_ptr<T>();
    T* op_ = out.data_ptr<T>();
    const int64_t in_image = x.size(1) * x.size(2) * x.size(3), out_image = c * h * w;
    at::parallel_for(0, batch, 1, [&](int64_t n0, int64_t n1) {
      const Scratch<T> image(planes_in ? in_image : 0);
      const Scratch<T> maps[3] = {Scratch<T>(shapes[0].c_out * shapes[0].out_h * shapes[0].out_w),
                                  Scratch<T>(shapes[1].c_out * shapes[1].out_h * shapes[1].out_w),
                                  Scratch<T>(shapes[2].c_out * shapes[2].out_h * shapes[2].out_w)};
      for (int64_t n = n0; n < n1; ++n) {
        const T* in = xp + n * in_image;
        if (planes_in) {
          image_to_channels_last(in, image.data(), x.size(1), x.size(2) * x.size(3), sizeof(T));
          in = image.data();
        }
        for (int i = 0; i < 4; ++i) {
          T* dst = i < 3 ? maps[i].data() : op_ + n * out_image;
          dense_conv_into<T>(in, *weights[i], bias_f[i].data_ptr<float>(), nullptr, i < 3, dst, shapes[i], true);
          in = dst;
        }
      }
    });
  });
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
