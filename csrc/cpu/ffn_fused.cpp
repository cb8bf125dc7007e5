// ffn_fused forward: out = x + W2 relu(W1 x + b1) + b2 (1x1 convs, BN folded), tiled over pixels so each tile's
// hidden activation (tile x 2C) lives only in a per-thread buffer; the full hidden tensor is never written.
#include "ops.h"

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

namespace {

constexpr const char* kOp = "shvit cpp ffn_fused";

// The forward kernels take T (the storage dtype) and C, the dtype the GEMMs multiply: T, or float for bf16 when
// bf16_widened() (operands widened once, exactly, and the hidden activation kept in fp32).

// Hidden activation of a tile: relu(acc + b1), rounded to T as the reference's hidden tensor is. With C = float it
// stays in the fp32 accumulator (rounded in place, so the second GEMM reads it without another pass); otherwise it
// is stored in T.
template <typename T, typename C>
const C* activate_hidden(float* acc, C* hidden_buf, const float* b1_run, const float* b1_rows, int64_t rows,
                         int64_t cols) {
  if constexpr (std::is_same_v<C, float>) {
    const fVec zero(0.f);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = acc + r * cols;
      const fVec bias_splat(b1_rows ? b1_rows[r] : 0.f);
      int64_t i = 0;
      for (; i + kVec <= cols; i += kVec) {
        const fVec v = load_f(row + i) + (b1_run ? load_f(b1_run + i) : bias_splat);
        store_f(round_to<T>(at::vec::maximum(v, zero)), row + i);
      }
      if (i < cols) {
        const fVec v = load_f(row + i, cols - i) + (b1_run ? load_f(b1_run + i, cols - i) : bias_splat);
        store_f(round_to<T>(at::vec::maximum(v, zero)), row + i, cols - i);
      }
    }
    return acc;
  } else {
    for (int64_t r = 0; r < rows; ++r)
      epilogue_run(acc + r * cols, b1_run, b1_rows ? b1_rows[r] : 0.f, static_cast<const C*>(nullptr), true,
                   hidden_buf + r * cols, cols);
    return hidden_buf;
  }
}

// rows x cols of src (leading dimension ld) as C, contiguous: src itself when C is T, else widened into buf.
template <typename T, typename C>
const C* as_compute(const T* src, int64_t rows, int64_t cols, int64_t ld, std::vector<C>& buf, int64_t* ld_out) {
  if constexpr (std::is_same_v<T, C>) {
    *ld_out = ld;
    return src;
  } else {
    widen_matrix(src, rows, cols, ld, buf);
    *ld_out = cols;
    return buf.data();
  }
}

// A weight (rows, cols, 1, 1) as the contiguous row-major (rows, cols) matrix in C that the NCHW kernels take as A
// (widened when C is float and the weight bf16), built once per weight version.
template <typename C>
at::Tensor weight_matrix(const at::Tensor& w) {
  const at::ScalarType dtype = std::is_same_v<C, float> ? at::kFloat : at::kBFloat16;
  return derived_weight(w, dtype == at::kFloat ? "A fp32" : "A bf16",
                        [&] { return contiguous_matrix(w.reshape({w.size(0), -1}).to(dtype)); });
}

// channels_last: x is a (pixels, C) row-major matrix; hidden tile (rows, H) = x_tile W1^T, with w1 (H, C) and
// w2 (C, H) as stored.
template <typename T, typename C>
void ffn_channels_last(const T* x, const at::Tensor& w1, const float* b1, const at::Tensor& w2, const float* b2, T* out,
                       const BottleneckShape& s) {
  const int64_t rows = s.batch * s.pixels, c = s.c, hd = s.hidden;
  const int64_t tile = rows_per_tile(rows, hd + c);
  const bool fp32 = std::is_same<T, float>::value;
  MatB<C> w1_kn, w2_kn;
  w1_kn.assign_weight(w1);
  w2_kn.assign_weight(w2);
  at::parallel_for(0, ceil_div(rows, tile), 1, [&](int64_t t0, int64_t t1) {
    MatmulThreadGuard guard;
    const Scratch<float> hidden_acc(tile * hd), out_acc(fp32 ? 0 : tile * c);
    const Scratch<C> hidden_buf(std::is_same_v<C, float> ? 0 : tile * hd);
    std::vector<C> x_buf;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile, nr = std::min(tile, rows - r0);
      int64_t ldx = 0;
      const C* x_tile = as_compute<T, C>(x + r0 * c, nr, c, c, x_buf, &ldx);
      matmul(nr, x_tile, ldx, w1_kn, hidden_acc.data(), hd);
      const C* hidden = activate_hidden<T, C>(hidden_acc.data(), hidden_buf.data(), b1, nullptr, nr, hd);
      T* out_tile = out + r0 * c;
      float* acc = fp32 ? reinterpret_cast<float*>(out_tile) : out_acc.data();
      matmul(nr, hidden, hd, w2_kn, acc, c);
      for (int64_t r = 0; r < nr; ++r)
        epilogue_run(acc + r * c, b2, 0.f, x + (r0 + r) * c, false, out_tile + r * c, c);
    }
  });
}

// channels_last on register-tile kernels with the epilogue in registers (rows_of: pair_rows on bf16 pair products,
// f32_rows on fp32 FMAs): per tile of pixels, hidden = relu(x W1^T + b1) in T into a per-thread buffer, then
// out = x + hidden W2^T + b2; the same roundings as the brgemm path above (bit-identical where the accumulation order
// matches). w1, w2: the weights packed for rows_of.
template <typename T, typename Packed, typename RowsOf>
void ffn_channels_last_tiles(const T* x, const Packed& w1, const Packed& w2, T* out, const BottleneckShape& s,
                             RowsOf rows_of) {
  const int64_t rows = s.batch * s.pixels, c = s.c, hd = s.hidden;
  const int64_t tile = rows_per_tile(rows, hd + c);
  at::parallel_for(0, ceil_div(rows, tile), 1, [&](int64_t t0, int64_t t1) {
    const Scratch<T> hidden(tile * hd);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile, nr = std::min(tile, rows - r0);
      rows_of(x + r0 * c, nr, c, w1, nullptr, true, hidden.data());
      rows_of(hidden.data(), nr, hd, w2, x + r0 * c, false, out + r0 * c);
    }
  });
}

// NCHW: per image, x is a (C, pixels) matrix; hidden tile (H, cols) = W1 x[:, tile]. w1 (H, C) and w2 (C, H) are
// contiguous matrices in C.
template <typename T, typename C>
void ffn_nchw(const T* x, const C* w1, const float* b1, const C* w2, const float* b2, T* out, const BottleneckShape& s) {
  const int64_t c = s.c, hd = s.hidden, pixels = s.pixels;
  const int64_t tile = pixels_per_tile(pixels, hd + c);
  const int64_t tiles_per_image = ceil_div(pixels, tile);
  const bool fp32 = std::is_same<T, float>::value;
  at::parallel_for(0, s.batch * tiles_per_image, 1, [&](int64_t t0, int64_t t1) {
    MatmulThreadGuard guard;
    MatB<C> x_tile, hidden_tile;
    const Scratch<float> hidden_acc(hd * tile), out_acc(fp32 ? 0 : c * tile);
    const Scratch<C> hidden_buf(std::is_same_v<C, float> ? 0 : hd * tile);
    std::vector<C> x_buf;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / tiles_per_image, p0 = (t % tiles_per_image) * tile, np = std::min(tile, pixels - p0);
      const T* x_n = x + n * c * pixels + p0;
      T* out_n = out + n * c * pixels + p0;
      int64_t ldx = 0;
      const C* x_c = as_compute<T, C>(x_n, c, np, pixels, x_buf, &ldx);
      x_tile.assign(x_c, c, np, ldx);
      matmul(hd, w1, c, x_tile, hidden_acc.data(), np);
      const C* hidden = activate_hidden<T, C>(hidden_acc.data(), hidden_buf.data(), nullptr, b1, hd, np);
      float* acc = fp32 ? reinterpret_cast<float*>(out_n) : out_acc.data();
      const int64_t ldc = fp32 ? pixels : np;
      hidden_tile.assign(hidden, hd, np, np);
      matmul(c, w2, hd, hidden_tile, acc, ldc);
      for (int64_t ch = 0; ch < c; ++ch)
        epilogue_run(acc + ch * ldc, nullptr, b2[ch], x_n + ch * pixels, false, out_n + ch * pixels, np);
    }
  });
}

// Forward in compute type C (see above).
template <typename T, typename C>
void ffn_forward(const at::Tensor& xc, const at::Tensor& w1, const float* b1, const at::Tensor& w2, const float* b2,
                 at::Tensor& out, bool channels_last, const BottleneckShape& s) {
  if (channels_last) {
    if constexpr (std::is_same_v<C, BFloat16>) {
      if (pair_products_usable() && s.c % 2 == 0 && s.hidden % 2 == 0) {
        ffn_channels_last_tiles(xc.data_ptr<BFloat16>(), pair_weight(w1, b1), pair_weight(w2, b2),
                                out.data_ptr<BFloat16>(), s, pair_rows);
        return;
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      if (f32_tiles_usable()) {
        ffn_channels_last_tiles(xc.data_ptr<float>(), f32_weight(w1, b1), f32_weight(w2, b2), out.data_ptr<float>(),
                                s, f32_rows);
        return;
      }
    }
    ffn_channels_last<T, C>(xc.data_ptr<T>(), w1, b1, w2, b2, out.data_ptr<T>(), s);
  } else {
    const at::Tensor w1c = weight_matrix<C>(w1), w2c = weight_matrix<C>(w2);
    ffn_nchw<T, C>(xc.data_ptr<T>(), w1c.data_ptr<C>(), b1, w2c.data_ptr<C>(), b2, out.data_ptr<T>(), s);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward. Written once over "logical" pixel-major matrices (rows = pixels): channels_last stores them row-major,
// NCHW column-major (one image's (C, pixels) plane is a column-major (pixels, C) matrix), and a column-major
// product C = A B is the row-major C^T = B^T A^T, so the cm flag only swaps the GEMM operands.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void gemm_mode(bool cm, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float beta, const T* a, int64_t lda,
               const T* b, int64_t ldb, float* c, int64_t ldc) {
  if (cm) return gemm(tb, ta, n, m, k, 1.f, b, ldb, a, lda, beta, c, ldc);
  gemm(ta, tb, m, n, k, 1.f, a, lda, b, ldb, beta, c, ldc);
}

// acc[ch] += sum over the r rows of the logical (r, chans) matrix m.
template <typename T>
void add_channel_sums(bool cm, const T* m, int64_t r, int64_t chans, int64_t ld, float* acc) {
  if (cm) {
    for (int64_t ch = 0; ch < chans; ++ch) {
      fVec v(0.f);
      int64_t i = 0;
      for (; i + kVec <= r; i += kVec) v = v + load_f(m + ch * ld + i);
      float tail = 0.f;
      for (; i < r; ++i) tail += static_cast<float>(m[ch * ld + i]);
      acc[ch] += at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return a + b; }, v) + tail;
    }
    return;
  }
  for (int64_t i = 0; i < r; ++i) {
    int64_t j = 0;
    for (; j + kVec <= chans; j += kVec) store_f(load_f(acc + j) + load_f(m + i * ld + j), acc + j);
    if (j < chans) store_f(load_f(acc + j, chans - j) + load_f(m + i * ld + j, chans - j), acc + j, chans - j);
  }
}

template <typename T>
struct FfnGrads {
  const T *g, *x, *w1, *w2;  // w1 (H, C), w2 (C, H) in the mode's storage order
  const float *w1f, *b1;     // w1 in fp32 for the fp32 grad_hidden GEMM
  T* grad_x;
};

// Copies between one tile of rows [r0, r0 + r) of the logical (B * pixels, C) matrix and a column-major (r, C)
// buffer, for NCHW, where a tile may span images: to_buf gathers, otherwise scatters.
template <typename T>
void nchw_tile_copy(T* act, T* buf, int64_t r0, int64_t r, int64_t c, int64_t pixels, bool to_buf) {
  for (int64_t i = r0; i < r0 + r;) {
    const int64_t n = i / pixels, p = i % pixels, len = std::min(pixels - p, r0 + r - i);
    for (int64_t ch = 0; ch < c; ++ch) {
      T* a = act + (n * c + ch) * pixels + p;
      T* bb = buf + ch * r + (i - r0);
      if (to_buf) std::copy(a, a + len, bb); else std::copy(bb, bb + len, a);
    }
    i += len;
  }
}

// Partial sums of one chunk of row tiles: dW1 (H, C), dW2 (C, H) in the mode's storage order, then db1 (H),
// db2 (C). Tiles span images so the dW updates (a full pass over dW each) are amortised over many rows.
template <typename T>
void ffn_backward_chunk(const FfnGrads<T>& a, bool cm, const BottleneckShape& s, int64_t tile, int64_t t0, int64_t t1,
                        float* part) {
  const int64_t c = s.c, hd = s.hidden, rows = s.batch * s.pixels;
  const bool fp32 = std::is_same<T, float>::value;
  auto ld = [cm](int64_t r, int64_t cols) { return cm ? r : cols; };
  float *dw1 = part, *dw2 = part + hd * c, *db1 = dw2 + hd * c, *db2 = db1 + hd;
  std::vector<float> h_acc(tile * hd), gh(tile * hd), gx(tile * c), xf(fp32 ? 0 : tile * c);
  std::vector<T> h_buf(fp32 ? 0 : tile * hd), x_buf(cm ? tile * c : 0), g_buf(x_buf.size()), gx_buf(x_buf.size());
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t r0 = t * tile, r = std::min(tile, rows - r0);
    const T *x = a.x + r0 * c, *g = a.g + r0 * c;
    T* gxo = a.grad_x + r0 * c;
    int64_t ld_act = c;  // x, grad_out, grad_x
    if (cm) {
      nchw_tile_copy(const_cast<T*>(a.x), x_buf.data(), r0, r, c, s.pixels, true);
      nchw_tile_copy(const_cast<T*>(a.g), g_buf.data(), r0, r, c, s.pixels, true);
      x = x_buf.data(), g = g_buf.data(), gxo = gx_buf.data(), ld_act = r;
    }
    // Recompute the hidden activation in the storage dtype, as the forward rounds it.
    gemm_mode(cm, false, true, r, hd, c, 0.f, x, ld_act, a.w1, ld(hd, c), h_acc.data(), ld(r, hd));
    const T* hidden = cm ? activate_hidden<T>(h_acc.data(), h_buf.data(), nullptr, a.b1, hd, r)
                         : activate_hidden<T>(h_acc.data(), h_buf.data(), a.b1, nullptr, r, hd);
    // grad_hidden = (G W2) masked by the ReLU, fp32.
    gemm_mode(cm, false, false, r, hd, c, 0.f, g, ld_act, a.w2, ld(c, hd), gh.data(), ld(r, hd));
    for (int64_t i = 0; i < r * hd; ++i)  // times 0, as the reference's mask: NaN stays NaN
      if (!(static_cast<float>(hidden[i]) > 0.f)) gh[i] *= 0.f;
    // grad_x = G + grad_hidden W1.
    gemm_mode(cm, false, false, r, c, hd, 0.f, gh.data(), ld(r, hd), a.w1f, ld(hd, c), gx.data(), ld(r, c));
    const int64_t runs = cm ? c : r, run = cm ? r : c;
    for (int64_t i = 0; i < runs; ++i)
      epilogue_run(gx.data() + i * run, nullptr, 0.f, g + i * ld_act, false, gxo + i * ld_act, run);
    if (cm) nchw_tile_copy(a.grad_x, gx_buf.data(), r0, r, c, s.pixels, false);
    // dW2 += G^T hidden, dW1 += grad_hidden^T X (fp32 operands), bias grads.
    gemm_mode(cm, true, false, c, hd, r, 1.f, g, ld_act, hidden, ld(r, hd), dw2, ld(c, hd));
    const float* xa = reinterpret_cast<const float*>(x);
    int64_t ld_x = ld_act;
    if (!fp32) {
      for (int64_t i = 0; i < runs; ++i) at::vec::convert(x + i * ld_act, xf.data() + i * run, run);
      xa = xf.data(), ld_x = ld(r, c);
    }
    gemm_mode(cm, true, false, hd, c, r, 1.f, gh.data(), ld(r, hd), xa, ld_x, dw1, ld(hd, c));
    add_channel_sums(cm, gh.data(), r, hd, ld(r, hd), db1);
    add_channel_sums(cm, g, r, c, ld_act, db2);
  }
}

}  // namespace

at::Tensor ffn_fused(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                     const at::Tensor& b2) {
  const BottleneckShape s = check_bottleneck_args(kOp, x, w1, b1, w2, b2);
  const auto fmt = activation_format(x);
  // One pixel per image: both layouts are the same bytes, and the pixel-row kernel reads input-major weights in
  // place where the NCHW one would copy them per call (see conv_bias_act.cpp).
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast || x.size(2) * x.size(3) == 1;
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor b1f = float_vector(b1), b2f = float_vector(b2);
  at::Tensor out = empty_output(xc.sizes(), xc.options(), fmt);
  const float *b1_ptr = b1f.data_ptr<float>(), *b2_ptr = b2f.data_ptr<float>();
  if (x.scalar_type() == at::kFloat) {
    ffn_forward<float, float>(xc, w1, b1_ptr, w2, b2_ptr, out, channels_last, s);
  } else if (bf16_widened()) {
    ffn_forward<BFloat16, float>(xc, w1, b1_ptr, w2, b2_ptr, out, channels_last, s);
  } else {
    ffn_forward<BFloat16, BFloat16>(xc, w1, b1_ptr, w2, b2_ptr, out, channels_last, s);
  }
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_fused_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2) {
  constexpr const char* op = "shvit cpp ffn_fused_backward";
  const BottleneckShape s = check_bottleneck_args(op, x, w1, b1, w2, b2);
  check_float_tensor(grad_out, op, "grad_out", 4);
  check_same_dtype(grad_out, x, op, "grad_out");
  check_shape(grad_out, x.sizes(), op, "grad_out");
  const auto fmt = activation_format(x);
  const bool cm = fmt != at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt), go = grad_out.contiguous(fmt);
  // Weights stored in the mode's order: row-major logical (H, C) / (C, H) for channels_last, transposed for NCHW.
  const at::Tensor w1m = w1.reshape({s.hidden, s.c}), w2m = w2.reshape({s.c, s.hidden});
  const at::Tensor w1s = cm ? transposed(w1m) : contiguous_matrix(w1m);
  const at::Tensor w2s = cm ? transposed(w2m) : contiguous_matrix(w2m);
  const at::Tensor w1f = w1s.to(at::kFloat).contiguous(), b1f = b1.to(at::kFloat).contiguous();
  at::Tensor grad_x = at::empty_like(xc, xc.options().memory_format(fmt));
  // Tiles of up to 512 rows of the (B * pixels, C) matrix, at least one per thread.
  const int64_t rows = s.batch * s.pixels;
  const int64_t tile = std::min<int64_t>(512, ceil_div(rows, at::get_num_threads()));
  const int64_t tiles = ceil_div(rows, tile);
  const int64_t chunks = std::min<int64_t>(tiles, at::get_num_threads());
  const int64_t part_size = 2 * s.hidden * s.c + s.hidden + s.c;
  at::Tensor parts_t = at::zeros({chunks, part_size}, x.options().dtype(at::kFloat));
  float* parts = parts_t.data_ptr<float>();
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_ffn_fused_backward", [&] {
    const FfnGrads<scalar_t> a{go.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), w1s.data_ptr<scalar_t>(),
                               w2s.data_ptr<scalar_t>(), w1f.data_ptr<float>(), b1f.data_ptr<float>(),
                               grad_x.data_ptr<scalar_t>()};
    // One chunk of tiles per thread with its own partial dW / db (a fixed split, so results do not depend on
    // scheduling), summed in chunk order below.
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        ffn_backward_chunk(a, cm, s, tile, k * tiles / chunks, (k + 1) * tiles / chunks,
                           parts + k * part_size);
    });
  });
  for (int64_t k = 1; k < chunks; ++k)
    for (int64_t i = 0; i < part_size; ++i) parts[i] += parts[k * part_size + i];
  const at::Tensor sums = parts_t[0];
  const int64_t hc = s.hidden * s.c;
  at::Tensor dw1 = sums.slice(0, 0, hc), dw2 = sums.slice(0, hc, 2 * hc);
  dw1 = cm ? dw1.view({s.c, s.hidden}).t() : dw1.view({s.hidden, s.c});
  dw2 = cm ? dw2.view({s.hidden, s.c}).t() : dw2.view({s.c, s.hidden});
  // Separate storage per gradient (outputs of a custom op must not alias one another).
  auto own = [](const at::Tensor& t, at::ScalarType dtype) {
    return t.to(dtype).contiguous().clone(at::MemoryFormat::Contiguous);
  };
  return {grad_x, own(dw1, w1.scalar_type()).view(w1.sizes()), own(sums.slice(0, 2 * hc, 2 * hc + s.hidden), b1.scalar_type()),
          own(dw2, w2.scalar_type()).view(w2.sizes()), own(sums.slice(0, 2 * hc + s.hidden), b2.scalar_type())};
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
