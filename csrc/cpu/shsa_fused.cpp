// shsa_fused forward, one image per at::parallel_for task, everything for that image in fp32 per-thread buffers:
// GroupNorm(1) statistics of the first P channels (mean subtracted before squaring), the qkv GEMM on the centred
// slice with 1/sigma and the bias applied in its epilogue, scores, an fp32 softmax, v A^T, then
// relu(cat[ya, x[:, P:]]) written straight into the output in the input's layout.
//
// Also the per-image pieces declared in shsa_core.h, which shsa_train.cpp shares.
#include "ops.h"
#include "shsa_core.h"

#include <limits>

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {
namespace shsa {

Shape check_input(const char* op, const at::Tensor& x, const at::Tensor& qkv_weight, int64_t qk_dim, double gn_eps) {
  check_float_tensor(x, op, "x", 4);
  TORCH_CHECK(x.numel() > 0, op, ": 'x' must not be empty, got shape ", x.sizes());
  check_float_tensor(qkv_weight, op, "qkv_weight", 4);
  check_same_dtype(qkv_weight, x, op, "qkv_weight");
  TORCH_CHECK(qk_dim >= 1, op, ": 'qk_dim' must be >= 1, got ", qk_dim);
  TORCH_CHECK(gn_eps >= 0, op, ": 'gn_eps' must be >= 0, got ", gn_eps);
  const Shape s{x.size(0), x.size(1), qkv_weight.size(1), qk_dim, x.size(2) * x.size(3)};
  TORCH_CHECK(s.p >= 1 && s.p <= s.c, op, ": partial dim P = qkv_weight.shape[1] = ", s.p,
              " must be in [1, channels of 'x' = ", s.c, "]");
  check_shape(qkv_weight, {s.rows_qkv(), s.p, 1, 1}, op, "qkv_weight");
  return s;
}

void check_like_x(const char* op, const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_float_tensor(t, op, name, 4);
  check_same_dtype(t, x, op, name);
  check_shape(t, x.sizes(), op, name);
}

float sum_of(const float* v, int64_t n) {
  return at::vec::reduce_all<float>([](const fVec& a, const fVec& b) { return a + b; }, v, n);
}

float dot_of(const float* a, const float* b, int64_t n) {
  return at::vec::map2_reduce_all<float>([](const fVec& x, const fVec& y) { return x * y; },
                                         [](const fVec& x, const fVec& y) { return x + y; }, a, b, n);
}

void softmax_rows(float* scores, int64_t rows, int64_t n, float scale) {
  const fVec lowest(-std::numeric_limits<float>::infinity()), zero(0.f);
  for (int64_t t = 0; t < rows; ++t) {
    float* row = scores + t * n;
    fVec top = lowest;
    for (int64_t i = 0; i < n; i += kVec) {
      const int64_t m = std::min(kVec, n - i);
      top = at::vec::maximum(top, m == kVec ? fVec::loadu(row + i) : fVec::set(lowest, fVec::loadu(row + i, m), m));
    }
    const fVec shift(at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, top));
    fVec sum = zero;
    for (int64_t i = 0; i < n; i += kVec) {
      const int64_t m = std::min(kVec, n - i);
      const fVec e = ((fVec::loadu(row + i, m) - shift) * fVec(scale)).exp();
      e.store(row + i, m);
      sum = sum + (m == kVec ? e : fVec::set(zero, e, m));
    }
    const fVec inv(1.f / at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, sum));
    for (int64_t i = 0; i < n; i += kVec) {
      const int64_t m = std::min(kVec, n - i);
      (fVec::loadu(row + i, m) * inv).store(row + i, m);
    }
  }
}

template <typename A, typename T>
void store_attended(const A* ya, bool ya_token_major, const Shape& s, const T* x_n, bool channels_last, T* out_n) {
  const int64_t n = s.tokens, p = s.p, c = s.c;
  if (channels_last) {
    for (int64_t t = 0; t < n; ++t) {
      if (ya_token_major) {
        relu_copy(ya + t * p, out_n + t * c, p);
      } else {
        for (int64_t ch = 0; ch < p; ++ch) out_n[t * c + ch] = static_cast<T>(std::max(static_cast<float>(ya[ch * n + t]), 0.f));
      }
      relu_copy(x_n + t * c + p, out_n + t * c + p, c - p);
    }
  } else {
    TORCH_INTERNAL_ASSERT(!ya_token_major, "store_attended: NCHW output takes channel-major ya");
    relu_copy(ya, out_n, p * n);
    relu_copy(x_n + p * n, out_n + p * n, (c - p) * n);
  }
}

namespace {
// dst (cols x rows) = scale * src (rows x cols)^T.
void transpose(const float* src, int64_t rows, int64_t cols, float scale, float* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j] * scale;
}
}  // namespace

template <typename T>
void attend_backward_image(const float* qkv, const T* go_n, const T* out_n, bool channels_last, const Shape& s,
                           AttendBackScratch& b, float* g_qkv, T* gx_n) {
  const int64_t n = s.tokens, p = s.p, qk = s.qk, c = s.c;
  const float scale = 1.f / std::sqrt(static_cast<float>(qk));
  const float *q = qkv, *k = qkv + qk * n, *v = qkv + 2 * qk * n;
  // Every product below is C = A B with row-major operands (B through the brgemm micro-kernel); transposed operands
  // are copied: q^T, g_ya^T and dS^T.
  MatB<float>& bop = b.b_op;
  float *attn = b.attn.data(), *q_t = b.q_t.data();
  transpose(q, qk, n, scale, q_t);
  bop.assign(k, qk, n, n);
  matmul(n, q_t, qk, bop, attn, n);  // scale q^T k (queries x keys)
  softmax_rows(attn, n, n, 1.f);
  // g = grad_out masked by the ReLU (exact): the first P channels to fp32 (both orientations), the rest straight
  // into grad_x.
  float *g_ya = b.g_ya.data(), *g_ya_t = b.g_ya_t.data();
  // grad_out * (out > 0) as the reference's product: a NaN / infinite grad_out where out <= 0 gives NaN.
  auto masked = [&](int64_t i) { return static_cast<float>(out_n[i]) > 0.f ? go_n[i] : T(static_cast<float>(go_n[i]) * 0.f); };
  if (channels_last) {
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t ch = 0; ch < p; ++ch) g_ya_t[t * p + ch] = g_ya[ch * n + t] = static_cast<float>(masked(t * c + ch));
      for (int64_t ch = p; ch < c; ++ch) gx_n[t * c + ch] = masked(t * c + ch);
    }
  } else {
    for (int64_t i = 0; i < p * n; ++i) g_ya[i] = static_cast<float>(masked(i));
    transpose(g_ya, p, n, 1.f, g_ya_t);
    for (int64_t i = p * n; i < c * n; ++i) gx_n[i] = masked(i);
  }
  float *g_attn = b.g_attn.data(), *g_attn_t = b.g_attn_t.data();
  bop.assign(attn, n, n, n);
  matmul(p, g_ya, n, bop, g_qkv + 2 * qk * n, n);  // dv = g A
  bop.assign(v, p, n, n);
  matmul(n, g_ya_t, p, bop, g_attn, n);  // dA = g^T v (queries x keys)
  // dS = A (dA - rowsum(dA A)), times scale for dq and dk.
  for (int64_t t = 0; t < n; ++t) {
    float *ga = g_attn + t * n, *a = attn + t * n;
    const float dot = dot_of(ga, a, n);
    at::vec::map2([dot, scale](const fVec& x, const fVec& y) { return y * (x - fVec(dot)) * fVec(scale); }, ga, ga,
                  a, n);
  }
  transpose(g_attn, n, n, 1.f, g_attn_t);
  bop.assign(g_attn_t, n, n, n);
  matmul(qk, k, n, bop, g_qkv, n);  // dq = k dS^T
  bop.assign(g_attn, n, n, n);
  matmul(qk, q, n, bop, g_qkv + qk * n, n);  // dk = q dS
}

template <typename T>
void group_norm_backward_store(float* g_xn, const float* xn, float rstd, const Shape& s, bool channels_last, T* gx_n) {
  const int64_t n = s.tokens, p = s.p, c = s.c;
  const float count = static_cast<float>(p * n);
  const float m1 = sum_of(g_xn, p * n) / count;
  const float m2 = dot_of(g_xn, xn, p * n) / count;
  at::vec::map2([=](const fVec& g, const fVec& xh) { return fVec(rstd) * (g - fVec(m1) - xh * fVec(m2)); }, g_xn,
                g_xn, xn, p * n);
  if (channels_last) {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t ch = 0; ch < p; ++ch) gx_n[t * c + ch] = static_cast<T>(g_xn[ch * n + t]);
  } else {
    at::vec::convert(g_xn, gx_n, p * n);
  }
}

#define SHVIT_SHSA_INSTANTIATE(T)                                                                                   \
  template void store_attended<float, T>(const float*, bool, const Shape&, const T*, bool, T*);                    \
  template void attend_backward_image<T>(const float*, const T*, const T*, bool, const Shape&, AttendBackScratch&, \
                                         float*, T*);                                                              \
  template void group_norm_backward_store<T>(float*, const float*, float, const Shape&, bool, T*);
SHVIT_SHSA_INSTANTIATE(float)
SHVIT_SHSA_INSTANTIATE(BFloat16)
template void store_attended<BFloat16, BFloat16>(const BFloat16*, bool, const Shape&, const BFloat16*, bool, BFloat16*);
#undef SHVIT_SHSA_INSTANTIATE

}  // namespace shsa

namespace {

constexpr const char* kOp = "shvit cpp shsa_fused";
using shsa::Shape;

Shape check_shsa_args(const char* op, const at::Tensor& x, const at::Tensor& qkv_weight, const at::Tensor& qkv_bias,
                      int64_t qk_dim, double gn_eps) {
  const Shape s = shsa::check_input(op, x, qkv_weight, qk_dim, gn_eps);
  check_float_tensor(qkv_bias, op, "qkv_bias", 1);
  check_shape(qkv_bias, {s.rows_qkv()}, op, "qkv_bias");
  return s;
}

// The attended slice of one image as fp32, centred on its mean (mean subtracted before squaring); returns 1/sigma.
// Token-major (tokens x P) for channels_last input, channel-major (P x tokens) for NCHW, i.e. whichever copy reads
// the input contiguously.
template <typename T>
float centred_slice(const T* x_n, bool channels_last, const Shape& s, double eps, float* xa) {
  const int64_t count = s.p * s.tokens;
  if (channels_last) {
    for (int64_t t = 0; t < s.tokens; ++t) at::vec::convert(x_n + t * s.c, xa + t * s.p, s.p);
  } else {
    at::vec::convert(x_n, xa, count);
  }
  const float mean = shsa::sum_of(xa, count) / count;
  at::vec::map([mean](const fVec& v) { return v - fVec(mean); }, xa, xa, count);
  const float sq = at::vec::map_reduce_all<float>([](const fVec& v) { return v * v; },
                                                  [](const fVec& a, const fVec& b) { return a + b; }, xa, count);
  return 1.f / std::sqrt(sq / count + static_cast<float>(eps));
}

struct ShsaScratch {
  Scratch<float> xa, qkv_t, k_t, scores, ya;  // each written in full before it is read
  explicit ShsaScratch(const Shape& s)
      : xa(s.p * s.tokens), qkv_t(s.tokens * s.rows_qkv()), k_t(s.qk * s.tokens), scores(s.tokens * s.tokens),
        ya(s.p * s.tokens) {}
};


// w_t: W^T (P x R, row-major).
template <typename T>
void shsa_image(const T* x_n, bool channels_last, const Shape& s, const MatB<float>& w_t, const float* bias,
                double eps, T* out_n, ShsaScratch& buf) {
  const int64_t n = s.tokens, p = s.p, r = s.rows_qkv(), qk = s.qk;
  const float rstd = centred_slice(x_n, channels_last, s, eps, buf.xa.data());
  // qkv^T (tokens x R) = xa^T W^T, then * 1/sigma + bias.
  float* qkv_t = buf.qkv_t.data();
  if (channels_last) matmul(n, buf.xa.data(), p, w_t, qkv_t, r);
  else gemm(true, false, n, r, p, 1.f, buf.xa.data(), n, w_t.data, w_t.ld, 0.f, qkv_t, r);
  for (int64_t t = 0; t < n; ++t)
    at::vec::map2([rstd](const fVec& a, const fVec& b) { return at::vec::fmadd(a, fVec(rstd), b); }, qkv_t + t * r,
                  qkv_t + t * r, bias, r);
  // scores (queries x keys) = q^T k, then softmax over keys of scale * scores.
  float* scores = buf.scores.data();
  float* k_t = buf.k_t.data();
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < qk; ++j) k_t[j * n + t] = qkv_t[t * r + qk + j];
  MatB<float> kb;
  kb.assign(k_t, qk, n, n);
  matmul(n, qkv_t, r, kb, scores, n);
  shsa::softmax_rows(scores, n, n, 1.f / std::sqrt(static_cast<float>(qk)));
  const float* v_t = qkv_t + 2 * qk;  // (tokens x P), leading dim R
  float* ya = buf.ya.data();
  if (channels_last) {
    // ya^T (tokens x P) = A v^T: each token's P outputs are contiguous, as in the output.
    MatB<float> vb;
    vb.assign(v_t, n, p, r);
    matmul(n, scores, n, vb, ya, p);
  } else {
    // ya (P x tokens) = v A^T: each channel's plane is contiguous.
    gemm(true, true, p, n, n, 1.f, v_t, r, scores, n, 0.f, ya, n);
  }
  shsa::store_attended(ya, channels_last, s, x_n, channels_last, out_n);
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: per image, everything recomputed in fp32 from x in channel-major (rows x tokens) buffers: the
// GroupNorm'd slice xn, qkv, the softmax; then dv = g A, dA = g^T v, dS = A (dA - rowsum(dA A)), dq, dk, the
// weight / bias grads (per-chunk partial sums) and GroupNorm's backward through W^T dqkv.
// ---------------------------------------------------------------------------------------------------------------
struct ShsaBackScratch {
  std::vector<float> tmp, xn, qkv, g_qkv, g_xn;
  shsa::AttendBackScratch attend;
  explicit ShsaBackScratch(const Shape& s)
      : tmp(s.p * s.tokens), xn(s.p * s.tokens), qkv(s.rows_qkv() * s.tokens), g_qkv(s.rows_qkv() * s.tokens),
        g_xn(s.p * s.tokens), attend(s) {}
};

// xn = (xa - mu) / sigma, channel-major (P x tokens) whatever the layout; returns 1/sigma.
template <typename T>
float normalized_slice(const T* x_n, bool channels_last, const Shape& s, double eps, float* tmp, float* xn) {
  const int64_t n = s.tokens, p = s.p;
  const float rstd = centred_slice(x_n, channels_last, s, eps, channels_last ? tmp : xn);
  if (channels_last)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t ch = 0; ch < p; ++ch) xn[ch * n + t] = tmp[t * p + ch];
  at::vec::map([rstd](const fVec& v) { return v * fVec(rstd); }, xn, xn, p * n);
  return rstd;
}

template <typename T>
void shsa_backward_image(const T* x_n, const T* go_n, const T* out_n, bool channels_last, const Shape& s,
                         const float* w, const float* bias, double eps, T* gx_n, ShsaBackScratch& b, float* dw,
                         float* db) {
  const int64_t n = s.tokens, p = s.p, r = s.rows_qkv();
  float* xn = b.xn.data();
  const float rstd = normalized_slice(x_n, channels_last, s, eps, b.tmp.data(), xn);
  float* qkv = b.qkv.data();
  gemm(false, false, r, n, p, 1.f, w, p, xn, n, 0.f, qkv, n);
  for (int64_t row = 0; row < r; ++row) {
    const float bv = bias[row];
    at::vec::map([bv](const fVec& v) { return v + fVec(bv); }, qkv + row * n, qkv + row * n, n);
  }
  float* g_qkv = b.g_qkv.data();
  shsa::attend_backward_image(qkv, go_n, out_n, channels_last, s, b.attend, g_qkv, gx_n);
  gemm(false, true, r, p, n, 1.f, g_qkv, n, xn, n, 1.f, dw, p);
  for (int64_t row = 0; row < r; ++row) db[row] += shsa::sum_of(g_qkv + row * n, n);
  // GroupNorm backward with g = W^T dqkv.
  float* g_xn = b.g_xn.data();
  gemm(true, false, p, n, r, 1.f, w, p, g_qkv, n, 0.f, g_xn, n);
  shsa::group_norm_backward_store(g_xn, xn, rstd, s, channels_last, gx_n);
}

}  // namespace

at::Tensor shsa_fused(const at::Tensor& x, const at::Tensor& qkv_weight, const at::Tensor& qkv_bias, int64_t qk_dim,
                      double gn_eps) {
  const Shape s = check_shsa_args(kOp, x, qkv_weight, qkv_bias, qk_dim, gn_eps);
  const auto fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt);
  // W^T (P x R): read in place from an fp32 weight stored input-channel major (as shvit.fuse keeps it on the CPU),
  // else transposed once per weight version.
  const at::Tensor w_t_rows = qkv_weight.scalar_type() == at::kFloat && is_input_major(qkv_weight)
                                  ? qkv_weight.reshape({s.rows_qkv(), s.p}).t()
                                  : derived_weight(qkv_weight, "shsa qkv weight fp32 transposed", [&] {
                                      return qkv_weight.reshape({s.rows_qkv(), s.p}).to(at::kFloat).t().contiguous();
                                    });
  const at::Tensor b = float_vector(qkv_bias);
  at::Tensor out = at::empty_like(xc, xc.options().memory_format(fmt));
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_shsa_fused", [&] {
    const scalar_t* x_ptr = xc.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    MatB<float> w_t;
    w_t.assign(w_t_rows.data_ptr<float>(), s.p, s.rows_qkv(), s.rows_qkv());
    at::parallel_for(0, s.batch, 1, [&](int64_t i0, int64_t i1) {
      MatmulThreadGuard guard;
      ShsaScratch buf(s);
      for (int64_t i = i0; i < i1; ++i)
        shsa_image(x_ptr + i * s.image(), channels_last, s, w_t, b.data_ptr<float>(), gn_eps, out_ptr + i * s.image(),
                   buf);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shsa_fused_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& qkv_weight,
                                                                   const at::Tensor& qkv_bias, const at::Tensor& out,
                                                                   int64_t qk_dim, double gn_eps) {
  constexpr const char* op = "shvit cpp shsa_fused_backward";
  const Shape s = check_shsa_args(op, x, qkv_weight, qkv_bias, qk_dim, gn_eps);
  shsa::check_like_x(op, grad_out, x, "grad_out");
  shsa::check_like_x(op, out, x, "out");
  const auto fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt), go = grad_out.contiguous(fmt), oc = out.contiguous(fmt);
  const at::Tensor w = derived_weight(qkv_weight, "shsa qkv weight fp32", [&] {
    return qkv_weight.reshape({s.rows_qkv(), s.p}).to(at::kFloat).contiguous();
  });
  const at::Tensor bias = float_vector(qkv_bias);
  at::Tensor grad_x = at::empty_like(xc, xc.options().memory_format(fmt));
  // One chunk of images per thread with its own partial dW / db, summed in chunk order (scheduling-independent).
  const int64_t chunks = std::min<int64_t>(s.batch, at::get_num_threads()), part = s.rows_qkv() * (s.p + 1);
  at::Tensor parts = at::zeros({chunks, part}, x.options().dtype(at::kFloat));
  const int64_t image = s.image();
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_shsa_fused_backward", [&] {
    const scalar_t *xp = xc.data_ptr<scalar_t>(), *gp = go.data_ptr<scalar_t>(), *op_ = oc.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      MatmulThreadGuard guard;
      ShsaBackScratch buf(s);
      for (int64_t k = k0; k < k1; ++k) {
        float* dw = parts.data_ptr<float>() + k * part;
        for (int64_t i = k * s.batch / chunks; i < (k + 1) * s.batch / chunks; ++i)
          shsa_backward_image(xp + i * image, gp + i * image, op_ + i * image, channels_last, s,
                              w.data_ptr<float>(), bias.data_ptr<float>(), gn_eps, gxp + i * image, buf, dw,
                              dw + s.rows_qkv() * s.p);
      }
    });
  });
  const at::Tensor sums = parts.sum(0);
  const int64_t nw = s.rows_qkv() * s.p;
  return {grad_x, sums.slice(0, 0, nw).view(qkv_weight.sizes()).to(qkv_weight.scalar_type()).clone(),
          sums.slice(0, nw).to(qkv_bias.scalar_type()).clone()};
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
