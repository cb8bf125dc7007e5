// shsa_fused forward, one image per at::parallel_for task, everything for that image in fp32 per-thread buffers:
// GroupNorm(1) statistics of the first P channels (mean subtracted before squaring), the qkv GEMM on the centred
// slice with 1/sigma and the bias applied in its epilogue, scores, an fp32 softmax, v A^T, then
// relu(cat[ya, x[:, P:]]) written straight into the output in the input's layout.
#include "ops.h"

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

namespace {

constexpr const char* kOp = "shvit cpp shsa_fused";

struct ShsaShape {
  int64_t batch, c, p, qk, tokens;
  int64_t rows_qkv() const { return 2 * qk + p; }
};

struct ShsaScratch {
  std::vector<float> xa, qkv_t, scores, ya;
  explicit ShsaScratch(const ShsaShape& s)
      : xa(s.p * s.tokens), qkv_t(s.tokens * s.rows_qkv()), scores(s.tokens * s.tokens), ya(s.p * s.tokens) {}
};

ShsaShape check_shsa_args(const char* op, const at::Tensor& x, const at::Tensor& qkv_weight,
                          const at::Tensor& qkv_bias, int64_t qk_dim, double gn_eps) {
  check_float_tensor(x, op, "x", 4);
  TORCH_CHECK(x.numel() > 0, op, ": 'x' must not be empty, got shape ", x.sizes());
  check_float_tensor(qkv_weight, op, "qkv_weight", 4);
  check_same_dtype(qkv_weight, x, op, "qkv_weight");
  TORCH_CHECK(qk_dim >= 1, op, ": 'qk_dim' must be >= 1, got ", qk_dim);
  TORCH_CHECK(gn_eps >= 0, op, ": 'gn_eps' must be >= 0, got ", gn_eps);
  const ShsaShape s{x.size(0), x.size(1), qkv_weight.size(1), qk_dim, x.size(2) * x.size(3)};
  TORCH_CHECK(s.p >= 1 && s.p <= s.c, op, ": partial dim P = qkv_weight.shape[1] = ", s.p,
              " must be in [1, channels of 'x' = ", s.c, "]");
  check_shape(qkv_weight, {s.rows_qkv(), s.p, 1, 1}, op, "qkv_weight");
  check_float_tensor(qkv_bias, op, "qkv_bias", 1);
  check_shape(qkv_bias, {s.rows_qkv()}, op, "qkv_bias");
  return s;
}

float sum_of(const float* v, int64_t n) {
  return at::vec::reduce_all<float>([](const fVec& a, const fVec& b) { return a + b; }, v, n);
}

void softmax_row(float* row, int64_t n) {
  const float top = at::vec::reduce_all<float>([](const fVec& a, const fVec& b) { return at::vec::maximum(a, b); }, row, n);
  at::vec::map([top](const fVec& v) { return (v - fVec(top)).exp(); }, row, row, n);
  const float inv = 1.f / sum_of(row, n);
  at::vec::map([inv](const fVec& v) { return v * fVec(inv); }, row, row, n);
}

// The attended slice of one image as fp32, centred on its mean; returns 1/sigma. Token-major (tokens x P) for
// channels_last input, channel-major (P x tokens) for NCHW, i.e. whichever copy reads the input contiguously.
template <typename T>
float centred_slice(const T* x_n, bool channels_last, const ShsaShape& s, double eps, float* xa) {
  const int64_t count = s.p * s.tokens;
  if (channels_last) {
    for (int64_t t = 0; t < s.tokens; ++t) at::vec::convert(x_n + t * s.c, xa + t * s.p, s.p);
  } else {
    at::vec::convert(x_n, xa, count);
  }
  const float mean = sum_of(xa, count) / count;
  at::vec::map([mean](const fVec& v) { return v - fVec(mean); }, xa, xa, count);
  const float sq = at::vec::map_reduce_all<float>([](const fVec& v) { return v * v; },
                                                  [](const fVec& a, const fVec& b) { return a + b; }, xa, count);
  return 1.f / std::sqrt(sq / count + static_cast<float>(eps));
}

template <typename T>
void shsa_image(const T* x_n, bool channels_last, const ShsaShape& s, const float* w, const float* bias, double eps,
                T* out_n, ShsaScratch& buf) {
  const int64_t n = s.tokens, p = s.p, r = s.rows_qkv(), qk = s.qk;
  const float rstd = centred_slice(x_n, channels_last, s, eps, buf.xa.data());
  // qkv^T (tokens x R) = xa^T W^T, then * 1/sigma + bias.
  float* qkv_t = buf.qkv_t.data();
  gemm(!channels_last, true, n, r, p, 1.f, buf.xa.data(), channels_last ? p : n, w, p, 0.f, qkv_t, r);
  for (int64_t t = 0; t < n; ++t)
    at::vec::map2([rstd](const fVec& a, const fVec& b) { return at::vec::fmadd(a, fVec(rstd), b); }, qkv_t + t * r,
                  qkv_t + t * r, bias, r);
  // scores (queries x keys) = scale q^T k, softmax over keys.
  float* scores = buf.scores.data();
  gemm(false, true, n, n, qk, 1.f / std::sqrt(static_cast<float>(qk)), qkv_t, r, qkv_t + qk, r, 0.f, scores, n);
  for (int64_t t = 0; t < n; ++t) softmax_row(scores + t * n, n);
  const float* v_t = qkv_t + 2 * qk;  // (tokens x P), leading dim R
  float* ya = buf.ya.data();
  if (channels_last) {
    // ya^T (tokens x P) = A v^T: each token's P outputs are contiguous, as in the output.
    gemm(false, false, n, p, n, 1.f, scores, n, v_t, r, 0.f, ya, p);
    for (int64_t t = 0; t < n; ++t) {
      epilogue_run(ya + t * p, nullptr, 0.f, static_cast<const T*>(nullptr), true, out_n + t * s.c, p);
      relu_copy(x_n + t * s.c + p, out_n + t * s.c + p, s.c - p);
    }
  } else {
    // ya (P x tokens) = v A^T: each channel's plane is contiguous.
    gemm(true, true, p, n, n, 1.f, v_t, r, scores, n, 0.f, ya, n);
    for (int64_t ch = 0; ch < p; ++ch)
      epilogue_run(ya + ch * n, nullptr, 0.f, static_cast<const T*>(nullptr), true, out_n + ch * n, n);
    relu_copy(x_n + p * n, out_n + p * n, (s.c - p) * n);
  }
}


// ---------------------------------------------------------------------------------------------------------------
// Backward: per image, everything recomputed in fp32 from x in channel-major (rows x tokens) buffers: the
// GroupNorm'd slice xn, qkv, the softmax; then dv = g A, dA = g^T v, dS = A (dA - rowsum(dA A)), dq, dk, the
// weight / bias grads (per-chunk partial sums) and GroupNorm's backward through W^T dqkv.
// ---------------------------------------------------------------------------------------------------------------
struct ShsaBackScratch {
  std::vector<float> tmp, xn, qkv, attn, g_ya, g_attn, g_qkv, g_xn;
  explicit ShsaBackScratch(const ShsaShape& s)
      : tmp(s.p * s.tokens), xn(s.p * s.tokens), qkv(s.rows_qkv() * s.tokens), attn(s.tokens * s.tokens),
        g_ya(s.p * s.tokens), g_attn(s.tokens * s.tokens), g_qkv(s.rows_qkv() * s.tokens), g_xn(s.p * s.tokens) {}
};

template <typename T>
void shsa_backward_image(const T* x_n, const T* go_n, const T* out_n, bool channels_last, const ShsaShape& s,
                         const float* w, const float* bias, double eps, T* gx_n, ShsaBackScratch& b, float* dw,
                         float* db) {
  const int64_t n = s.tokens, p = s.p, r = s.rows_qkv(), qk = s.qk, c = s.c;
  const float scale = 1.f / std::sqrt(static_cast<float>(qk));
  // xn (P x tokens) = (xa - mu) / sigma.
  const float rstd = centred_slice(x_n, channels_last, s, eps, channels_last ? b.tmp.data() : b.xn.data());
  if (channels_last)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t ch = 0; ch < p; ++ch) b.xn[ch * n + t] = b.tmp[t * p + ch];
  float* xn = b.xn.data();
  at::vec::map([rstd](const fVec& v) { return v * fVec(rstd); }, xn, xn, p * n);
  float* qkv = b.qkv.data();
  gemm(false, false, r, n, p, 1.f, w, p, xn, n, 0.f, qkv, n);
  for (int64_t row = 0; row < r; ++row) {
    const float bv = bias[row];
    at::vec::map([bv](const fVec& v) { return v + fVec(bv); }, qkv + row * n, qkv + row * n, n);
  }
  const float *q = qkv, *k = qkv + qk * n, *v = qkv + 2 * qk * n;
  float* attn = b.attn.data();
  gemm(true, false, n, n, qk, scale, q, n, k, n, 0.f, attn, n);
  for (int64_t t = 0; t < n; ++t) softmax_row(attn + t * n, n);
  // g = grad_out masked by the ReLU (exact): the first P channels to fp32, the rest straight into grad_x.
  float* g_ya = b.g_ya.data();
  const fVec zero(0.f);
  auto masked = [&](int64_t i) { return static_cast<float>(out_n[i]) > 0.f ? go_n[i] : T(0.f); };
  if (channels_last) {
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t ch = 0; ch < p; ++ch) g_ya[ch * n + t] = static_cast<float>(masked(t * c + ch));
      for (int64_t ch = p; ch < c; ++ch) gx_n[t * c + ch] = masked(t * c + ch);
    }
  } else {
    for (int64_t i = 0; i < p * n; ++i) g_ya[i] = static_cast<float>(masked(i));
    for (int64_t i = p * n; i < c * n; ++i) gx_n[i] = masked(i);
  }
  float *g_qkv = b.g_qkv.data(), *g_attn = b.g_attn.data();
  gemm(false, false, p, n, n, 1.f, g_ya, n, attn, n, 0.f, g_qkv + 2 * qk * n, n);  // dv
  gemm(true, false, n, n, p, 1.f, g_ya, n, v, n, 0.f, g_attn, n);                  // dA (queries x keys)
  for (int64_t t = 0; t < n; ++t) {
    float *ga = g_attn + t * n, *a = attn + t * n;
    const float dot = at::vec::map2_reduce_all<float>([](const fVec& x, const fVec& y) { return x * y; },
                                                      [](const fVec& x, const fVec& y) { return x + y; }, ga, a, n);
    at::vec::map2([dot](const fVec& x, const fVec& y) { return y * (x - fVec(dot)); }, ga, ga, a, n);
  }
  gemm(false, true, qk, n, n, scale, k, n, g_attn, n, 0.f, g_qkv, n);           // dq = scale k dS^T
  gemm(false, false, qk, n, n, scale, q, n, g_attn, n, 0.f, g_qkv + qk * n, n);  // dk = scale q dS
  gemm(false, true, r, p, n, 1.f, g_qkv, n, xn, n, 1.f, dw, p);
  for (int64_t row = 0; row < r; ++row) db[row] += sum_of(g_qkv + row * n, n);
  // GroupNorm backward: rstd (g - mean(g) - xn mean(g xn)) with g = W^T dqkv.
  float* g_xn = b.g_xn.data();
  gemm(true, false, p, n, r, 1.f, w, p, g_qkv, n, 0.f, g_xn, n);
  const float count = static_cast<float>(p * n);
  const float m1 = sum_of(g_xn, p * n) / count;
  const float m2 = at::vec::map2_reduce_all<float>([](const fVec& x, const fVec& y) { return x * y; },
                                                   [](const fVec& x, const fVec& y) { return x + y; }, g_xn, xn,
                                                   p * n) / count;
  at::vec::map2([=](const fVec& g, const fVec& xh) { return fVec(rstd) * (g - fVec(m1) - xh * fVec(m2)); }, g_xn,
                g_xn, xn, p * n);
  if (channels_last) {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t ch = 0; ch < p; ++ch) gx_n[t * c + ch] = static_cast<T>(g_xn[ch * n + t]);
  } else {
    at::vec::convert(g_xn, gx_n, p * n);
  }
}

}  // namespace

at::Tensor shsa_fused(const at::Tensor& x, const at::Tensor& qkv_weight, const at::Tensor& qkv_bias, int64_t qk_dim,
                      double gn_eps) {
  const ShsaShape s = check_shsa_args(kOp, x, qkv_weight, qkv_bias, qk_dim, gn_eps);
  const auto fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor w = qkv_weight.reshape({s.rows_qkv(), s.p}).to(at::kFloat).contiguous();
  const at::Tensor b = qkv_bias.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(xc, xc.options().memory_format(fmt));
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_shsa_fused", [&] {
    const scalar_t* x_ptr = xc.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, s.batch, 1, [&](int64_t i0, int64_t i1) {
      ShsaScratch buf(s);
      for (int64_t i = i0; i < i1; ++i)
        shsa_image(x_ptr + i * s.c * s.tokens, channels_last, s, w.data_ptr<float>(), b.data_ptr<float>(), gn_eps,
                   out_ptr + i * s.c * s.tokens, buf);
    });
  });
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

std::tuple<at::Tensor, at::Tensor, at::Tensor> shsa_fused_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& qkv_weight,
                                                                   const at::Tensor& qkv_bias, const at::Tensor& out,
                                                                   int64_t qk_dim, double gn_eps) {
  constexpr const char* op = "shvit cpp shsa_fused_backward";
  const ShsaShape s = check_shsa_args(op, x, qkv_weight, qkv_bias, qk_dim, gn_eps);
  for (const auto& t : {std::make_pair(&grad_out, "grad_out"), std::make_pair(&out, "out")}) {
    check_float_tensor(*t.first, op, t.second, 4);
    check_same_dtype(*t.first, x, op, t.second);
    check_shape(*t.first, x.sizes(), op, t.second);
  }
  const auto fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt), go = grad_out.contiguous(fmt), oc = out.contiguous(fmt);
  const at::Tensor w = qkv_weight.reshape({s.rows_qkv(), s.p}).to(at::kFloat).contiguous();
  const at::Tensor bias = qkv_bias.to(at::kFloat).contiguous();
  at::Tensor grad_x = at::empty_like(xc, xc.options().memory_format(fmt));
  // One chunk of images per thread with its own partial dW / db, summed in chunk order (scheduling-independent).
  const int64_t chunks = std::min<int64_t>(s.batch, at::get_num_threads()), part = s.rows_qkv() * (s.p + 1);
  at::Tensor parts = at::zeros({chunks, part}, x.options().dtype(at::kFloat));
  const int64_t image = s.c * s.tokens;
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_shsa_fused_backward", [&] {
    const scalar_t *xp = xc.data_ptr<scalar_t>(), *gp = go.data_ptr<scalar_t>(), *op_ = oc.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
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
