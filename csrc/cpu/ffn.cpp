// ffn_fused forward: out = x + W2 relu(W1 x + b1) + b2 (1x1 convs, BN folded), tiled over pixels so each tile's
// hidden activation (tile x 2C) lives only in a per-thread buffer; the full hidden tensor is never written.
#include "ops.h"

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

namespace {

constexpr const char* kOp = "shvit cpp ffn_fused";

struct FfnShape {
  int64_t batch, c, hidden, pixels;
};

// Hidden activation of a tile in the storage dtype (bf16 rounds it, as the reference does); for fp32 the
// accumulator is activated in place.
template <typename T>
T* activate_hidden(float* acc, T* hidden_buf, const float* b1_run, const float* b1_rows, int64_t rows, int64_t cols) {
  T* hidden = std::is_same<T, float>::value ? reinterpret_cast<T*>(acc) : hidden_buf;
  for (int64_t r = 0; r < rows; ++r)
    epilogue_run(acc + r * cols, b1_run, b1_rows ? b1_rows[r] : 0.f, static_cast<const T*>(nullptr), true,
                 hidden + r * cols, cols);
  return hidden;
}

// channels_last: x is a (pixels, C) row-major matrix; hidden tile (rows, H) = x_tile W1^T. Weights come
// transposed: w1_t (C, H), w2_t (H, C).
template <typename T>
void ffn_channels_last(const T* x, const T* w1_t, const float* b1, const T* w2_t, const float* b2, T* out,
                       const FfnShape& s) {
  const int64_t rows = s.batch * s.pixels, c = s.c, hd = s.hidden;
  const int64_t tile = rows_per_tile(rows, hd + c);
  const bool fp32 = std::is_same<T, float>::value;
  MatB<T> w1_kn, w2_kn;
  w1_kn.assign(w1_t, c, hd, hd);
  w2_kn.assign(w2_t, hd, c, c);
  at::parallel_for(0, ceil_div(rows, tile), 1, [&](int64_t t0, int64_t t1) {
    MatmulThreadGuard guard;
    std::vector<float> hidden_acc(tile * hd), out_acc(fp32 ? 0 : tile * c);
    std::vector<T> hidden_buf(fp32 ? 0 : tile * hd);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tile, nr = std::min(tile, rows - r0);
      matmul(nr, x + r0 * c, c, w1_kn, hidden_acc.data(), hd);
      const T* hidden = activate_hidden<T>(hidden_acc.data(), hidden_buf.data(), b1, nullptr, nr, hd);
      T* out_tile = out + r0 * c;
      float* acc = fp32 ? reinterpret_cast<float*>(out_tile) : out_acc.data();
      matmul(nr, hidden, hd, w2_kn, acc, c);
      for (int64_t r = 0; r < nr; ++r)
        epilogue_run(acc + r * c, b2, 0.f, x + (r0 + r) * c, false, out_tile + r * c, c);
    }
  });
}

// NCHW: per image, x is a (C, pixels) matrix; hidden tile (H, cols) = W1 x[:, tile].
template <typename T>
void ffn_nchw(const T* x, const T* w1, const float* b1, const T* w2, const float* b2, T* out, const FfnShape& s) {
  const int64_t c = s.c, hd = s.hidden, pixels = s.pixels;
  const int64_t tile = pixels_per_tile(pixels, hd + c);
  const int64_t tiles_per_image = ceil_div(pixels, tile);
  const bool fp32 = std::is_same<T, float>::value;
  at::parallel_for(0, s.batch * tiles_per_image, 1, [&](int64_t t0, int64_t t1) {
    MatmulThreadGuard guard;
    MatB<T> x_tile, hidden_tile;
    std::vector<float> hidden_acc(hd * tile), out_acc(fp32 ? 0 : c * tile);
    std::vector<T> hidden_buf(fp32 ? 0 : hd * tile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / tiles_per_image, p0 = (t % tiles_per_image) * tile, np = std::min(tile, pixels - p0);
      const T* x_n = x + n * c * pixels + p0;
      T* out_n = out + n * c * pixels + p0;
      x_tile.assign(x_n, c, np, pixels);
      matmul(hd, w1, c, x_tile, hidden_acc.data(), np);
      const T* hidden = activate_hidden<T>(hidden_acc.data(), hidden_buf.data(), nullptr, b1, hd, np);
      float* acc = fp32 ? reinterpret_cast<float*>(out_n) : out_acc.data();
      const int64_t ldc = fp32 ? pixels : np;
      hidden_tile.assign(hidden, hd, np, np);
      matmul(c, w2, hd, hidden_tile, acc, ldc);
      for (int64_t ch = 0; ch < c; ++ch)
        epilogue_run(acc + ch * ldc, nullptr, b2[ch], x_n + ch * pixels, false, out_n + ch * pixels, np);
    }
  });
}

}  // namespace

at::Tensor ffn_fused(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                     const at::Tensor& b2) {
  check_float_tensor(x, kOp, "x", 4);
  TORCH_CHECK(x.numel() > 0, kOp, ": 'x' must not be empty, got shape ", x.sizes());
  check_float_tensor(w1, kOp, "w1", 4);
  check_float_tensor(w2, kOp, "w2", 4);
  check_same_dtype(w1, x, kOp, "w1");
  check_same_dtype(w2, x, kOp, "w2");
  const FfnShape s{x.size(0), x.size(1), w1.size(0), x.size(2) * x.size(3)};
  check_shape(w1, {s.hidden, s.c, 1, 1}, kOp, "w1");
  check_shape(w2, {s.c, s.hidden, 1, 1}, kOp, "w2");
  check_float_tensor(b1, kOp, "b1", 1);
  check_float_tensor(b2, kOp, "b2", 1);
  check_shape(b1, {s.hidden}, kOp, "b1");
  check_shape(b2, {s.c}, kOp, "b2");
  const auto fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt);
  // channels_last multiplies pixel rows by W^T, NCHW multiplies W by pixel columns.
  const at::Tensor w1c = channels_last ? w1.reshape({s.hidden, s.c}).t().contiguous() : w1.contiguous();
  const at::Tensor w2c = channels_last ? w2.reshape({s.c, s.hidden}).t().contiguous() : w2.contiguous();
  const at::Tensor b1f = b1.to(at::kFloat).contiguous(), b2f = b2.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(xc, xc.options().memory_format(fmt));
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_ffn_fused", [&] {
    auto kernel = channels_last ? ffn_channels_last<scalar_t> : ffn_nchw<scalar_t>;
    kernel(xc.data_ptr<scalar_t>(), w1c.data_ptr<scalar_t>(), b1f.data_ptr<float>(), w2c.data_ptr<scalar_t>(),
           b2f.data_ptr<float>(), out.data_ptr<scalar_t>(), s);
  });
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
