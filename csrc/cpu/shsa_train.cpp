// shsa_train forward and backward: GroupNorm(1) with affine, the qkv 1x1 conv with BatchNorm batch statistics over
// (B, tokens), attention, relu(cat[ya, x[:, P:]]).
//
// One image per task, as shsa_fused: GroupNorm, its affine and the qkv GEMM (project_image), then, after the batch
// statistics, the normalised qkv, scores, softmax and v A^T, all in fp32 per-thread buffers, rounded to T where the
// reference rounds (its GroupNorm output, xg, the conv output, qkv, scores, the softmax and ya). Until 2026-12-04 the
// forward called the reference's ATen ops for those steps, to reproduce its bits for a lock-step test that failed on
// any last-ulp difference (it now allows a few steps to miss, tests/test_train.py): 345-677 us per S1 stage-2 call
// (16 x 256 x 7 x 7, fp32, one thread) where the inference kernel takes 156, and no faster on two threads.
// BatchNorm's mean and variance: per-image fp64 sums combined in image order, two passes (exact variance to fp64
// rounding), so the result does not depend on the thread count.
//
// The backward takes raw = W xg from project_image as the forward does (for fp32, the forward's raw to the bit), so
// r_hat is consistent with the forward's mean / var: with a few values per channel the BatchNorm backward cancels to
// the last bit, and an ulp of difference there cost 5x the reference's error in grad qkv_weight. Then per image, in
// fp32: attention backward (shared with shsa_fused), BatchNorm backward (its sums per image, fp64 across images in
// image order), dW (per-chunk partials in chunk order), GroupNorm's affine and backward.
#include "ops.h"
#include "shsa_core.h"

#include <cmath>

// Elementwise steps round one operation at a time like the reference's eager ops (no fused multiply-add).
#pragma GCC optimize("fp-contract=off")

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

namespace {

using shsa::Shape;
using NamedTensor = std::pair<const at::Tensor*, const char*>;

void check_vectors(const char* op, std::initializer_list<NamedTensor> tensors, int64_t n) {
  for (const NamedTensor& t : tensors) check_channel_vector(*t.first, op, t.second, n);
}

Shape check_train_args(const char* op, const at::Tensor& x, const at::Tensor& gn_weight, const at::Tensor& gn_bias,
                       const at::Tensor& qkv_weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                       int64_t qk_dim, double gn_eps, double bn_eps) {
  const Shape s = shsa::check_input(op, x, qkv_weight, qk_dim, gn_eps);
  check_vectors(op, {{&gn_weight, "gn_weight"}, {&gn_bias, "gn_bias"}}, s.p);
  check_vectors(op, {{&bn_weight, "bn_weight"}, {&bn_bias, "bn_bias"}}, s.rows_qkv());
  TORCH_CHECK(bn_eps >= 0, op, ": 'bn_eps' must be >= 0, got ", bn_eps);
  TORCH_CHECK(s.batch * s.tokens >= 2, op, ": training BatchNorm needs more than one value per channel, got 'x' of shape ",
              x.sizes());
  return s;
}

at::Tensor as_float_vector(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// sum((v[t] - shift)^k) for k = 1 or 2 in fp64, over 8 lanes combined in a fixed order (vectorizes, no reassociation).
template <int K>
double sum_f64(const float* v, int64_t n, double shift) {
  double acc[8] = {};
  int64_t t = 0;
  for (; t + 8 <= n; t += 8)
    for (int j = 0; j < 8; ++j) {
      const double d = v[t + j] - shift;
      acc[j] += K == 1 ? d : d * d;
    }
  for (int j = 0; t < n; ++t, ++j) {
    const double d = v[t] - shift;
    acc[j] += K == 1 ? d : d * d;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Sum of per-image partials (images x n) in image order.
std::vector<double> combine(const std::vector<double>& parts, int64_t images, int64_t n) {
  std::vector<double> total(n, 0.0);
  for (int64_t i = 0; i < images; ++i)
    for (int64_t j = 0; j < n; ++j) total[j] += parts[i * n + j];
  return total;
}

// v[0, n) rounded to R's precision in place (nothing for float): where the reference's eager ops round to x's dtype.
template <typename R>
void round_in_place(float* v, int64_t n) {
  if constexpr (!std::is_same_v<R, float>) {
    int64_t i = 0;
    for (; i + kVec <= n; i += kVec) round_to<R>(fVec::loadu(v + i)).store(v + i);
    if (i < n) round_to<R>(fVec::loadu(v + i, n - i)).store(v + i, n - i);
  }
}

// One image's GroupNorm(1) of x_n[:P] and its affine, then the qkv conv before BatchNorm, channel-major fp32:
// xn = (xa - mean) / sigma (P x tokens), xg = xn gn_w + gn_b, raw = W xg (R x tokens; W: R x P row-major fp32), each
// rounded to R where the reference rounds (R = T in the forward; float in the backward, whose reference runs in fp32).
// Statistics as the reference's, mean subtracted before squaring, summed in fp64. Returns 1/sigma.
template <typename R, typename T>
float project_image(const T* x_n, bool channels_last, const Shape& s, const float* gn_w, const float* gn_b,
                    double eps, const float* w, float* xn, float* xg, float* raw) {
  const int64_t n = s.tokens, p = s.p, r = s.rows_qkv(), count = p * n;
  if (channels_last) {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t ch = 0; ch < p; ++ch) xn[ch * n + t] = static_cast<float>(x_n[t * s.c + ch]);
  } else {
    at::vec::convert(x_n, xn, count);
  }
  // fp64 sums: a slice whose |mean| is far above its spread (1e4 against 100 in the tests) lost the backward's
  // tolerance with fp32 ones on the plain build's narrower vectors.
  const float mean = static_cast<float>(sum_f64<1>(xn, count, 0.0) / static_cast<double>(count));
  at::vec::map([mean](const fVec& v) { return v - fVec(mean); }, xn, xn, count);
  const float var = static_cast<float>(sum_f64<2>(xn, count, 0.0) / static_cast<double>(count));
  const float rstd = 1.f / std::sqrt(var + static_cast<float>(eps));
  at::vec::map([rstd](const fVec& v) { return round_to<R>(v * fVec(rstd)); }, xn, xn, count);
  for (int64_t ch = 0; ch < p; ++ch) {
    const fVec a(gn_w[ch]), b(gn_b[ch]);
    at::vec::map([&](const fVec& v) { return round_to<R>(v * a + b); }, xg + ch * n, xn + ch * n, n);
  }
  MatB<float> xg_b;  // the brgemm micro-kernel (MKL's sgemm took a third of this op at SHViT's sizes)
  xg_b.assign(xg, p, n, n);
  matmul(r, w, p, xg_b, raw, n);
  round_in_place<R>(raw, r * n);
  return rstd;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------
struct AttendScratch {
  Scratch<float> xn, xg, qkv, q_t, scores, attn_t, ya;  // each written in full before it is read
  explicit AttendScratch(const Shape& s)
      : xn(s.p * s.tokens), xg(s.p * s.tokens), qkv(s.rows_qkv() * s.tokens), q_t(s.tokens * s.qk),
        scores(s.tokens * s.tokens), attn_t(s.tokens * s.tokens), ya(s.p * s.tokens) {}
};

// relu(cat[v softmax(scale q^T k)^T, x_n[P:]]) of one image from its qkv (R x tokens, channel-major fp32, already
// rounded to T), rounding as the reference's attend does: q^T k and its product with the scale, the softmax, ya.
template <typename T>
void attend_image(const float* qkv, const T* x_n, bool channels_last, const Shape& s, AttendScratch& b, T* out_n) {
  const int64_t n = s.tokens, p = s.p, qk = s.qk;
  const float *q = qkv, *k = qkv + qk * n, *v = qkv + 2 * qk * n;
  const float scale = static_cast<float>(std::pow(static_cast<double>(qk), -0.5));
  float *q_t = b.q_t.data(), *scores = b.scores.data(), *attn_t = b.attn_t.data(), *ya = b.ya.data();
  // Row-major operands for the micro-kernel: q^T and A^T are copied.
  for (int64_t j = 0; j < qk; ++j)
    for (int64_t t = 0; t < n; ++t) q_t[t * qk + j] = q[j * n + t];
  MatB<float> operand;
  operand.assign(k, qk, n, n);
  matmul(n, q_t, qk, operand, scores, n);  // q^T k (queries x keys)
  at::vec::map([scale](const fVec& x) { return round_to<T>(round_to<T>(x) * fVec(scale)); }, scores, scores, n * n);
  shsa::softmax_rows(scores, n, n, 1.f);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < n; ++j) attn_t[j * n + t] = static_cast<float>(static_cast<T>(scores[t * n + j]));
  operand.assign(attn_t, n, n, n);
  matmul(p, v, n, operand, ya, n);  // v A^T (P x tokens)
  shsa::store_attended(ya, false, s, x_n, channels_last, out_n);
}

template <typename T>
void shsa_train_forward(const at::Tensor& xc, bool channels_last, const Shape& s, const at::Tensor& qkv_weight,
                        const at::Tensor& gn_w, const at::Tensor& gn_b, const at::Tensor& bn_w,
                        const at::Tensor& bn_b, double gn_eps, double bn_eps, at::Tensor& out, at::Tensor& mean,
                        at::Tensor& var) {
  const int64_t n = s.tokens, p = s.p, r = s.rows_qkv(), batch = s.batch, image = s.image();
  const at::Tensor w = qkv_weight.reshape({r, p}).to(at::kFloat).contiguous();
  const float *wp = w.data_ptr<float>(), *gw = gn_w.data_ptr<float>(), *gb = gn_b.data_ptr<float>();
  const T* xp = xc.data_ptr<T>();
  // (1) per image: raw = W xg, and its per-channel sum in fp64.
  std::vector<float> raw_all(batch * r * n);
  std::vector<double> parts(batch * r), sumsq(batch * r), mean64(r);
  at::parallel_for(0, batch, 1, [&](int64_t i0, int64_t i1) {
    MatmulThreadGuard guard;
    AttendScratch b(s);
    for (int64_t i = i0; i < i1; ++i) {
      float* raw = raw_all.data() + i * r * n;
      project_image<T>(xp + i * image, channels_last, s, gw, gb, gn_eps, wp, b.xn.data(), b.xg.data(), raw);
      for (int64_t c = 0; c < r; ++c) parts[i * r + c] = sum_f64<1>(raw + c * n, n, 0.0);
    }
  });
  // (2) the batch statistics: mean, then the centred squares per image, both combined in image order.
  const double count = static_cast<double>(batch * n);
  const std::vector<double> total = combine(parts, batch, r);
  for (int64_t c = 0; c < r; ++c) mean64[c] = total[c] / count;
  at::parallel_for(0, batch, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t c = 0; c < r; ++c) sumsq[i * r + c] = sum_f64<2>(raw_all.data() + (i * r + c) * n, n, mean64[c]);
  });
  const std::vector<double> sq = combine(sumsq, batch, r);
  const float *bw = bn_w.data_ptr<float>(), *bb = bn_b.data_ptr<float>();
  float *mp = mean.data_ptr<float>(), *vp = var.data_ptr<float>();
  std::vector<float> scale(r), shift(r);
  for (int64_t c = 0; c < r; ++c) {
    mp[c] = static_cast<float>(mean64[c]);
    vp[c] = static_cast<float>(sq[c] / count);
    scale[c] = bw[c] * (1.f / std::sqrt(vp[c] + static_cast<float>(bn_eps)));
    shift[c] = bb[c] - mp[c] * scale[c];
  }
  // (3) per image: qkv = raw scale + shift in T, then the attention and the output.
  T* op_ = out.data_ptr<T>();
  at::parallel_for(0, batch, 1, [&](int64_t i0, int64_t i1) {
    MatmulThreadGuard guard;
    AttendScratch b(s);
    float* qkv = b.qkv.data();
    for (int64_t i = i0; i < i1; ++i) {
      const float* raw = raw_all.data() + i * r * n;
      for (int64_t c = 0; c < r; ++c) {
        const fVec a(scale[c]), sh(shift[c]);
        at::vec::map([&](const fVec& v) { return round_to<T>(v * a + sh); }, qkv + c * n, raw + c * n, n);
      }
      attend_image(qkv, xp + i * image, channels_last, s, b, op_ + i * image);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------
struct BackwardParams {
  const float *w, *w_t, *gw, *bw, *bb, *mean, *invstd;  // w (R x P), w_t its transpose
};

template <typename T>
void shsa_train_backward_impl(const T* go, const T* x, const T* out, bool channels_last, const Shape& s,
                              const float* gn_b, double gn_eps, const BackwardParams& prm, T* gx, float* dw_parts,
                              int64_t chunks, std::vector<double>& g_bn, std::vector<double>& g_gn) {
  const int64_t n = s.tokens, p = s.p, r = s.rows_qkv(), batch = s.batch, image = s.image();
  // Kept between the passes, per image: xn and xg (P x tokens), raw, r_hat and g_qkv (R x tokens), 1/sigma.
  std::vector<float> xn_all(batch * p * n), xg_all(batch * p * n), raw_all(batch * r * n), r_hat_all(batch * r * n),
      g_all(batch * r * n), rstd(batch);
  std::vector<double> parts(batch * 3 * r);  // per image: sum(g_qkv), sum(g_qkv r_hat), sum(r_hat)

  // (A) xn, raw (as the forward's), r_hat, qkv; attention backward; BatchNorm's sums.
  at::parallel_for(0, batch, 1, [&](int64_t i0, int64_t i1) {
    MatmulThreadGuard guard;
    std::vector<float> qkv(r * n);
    shsa::AttendBackScratch scratch(s);
    for (int64_t i = i0; i < i1; ++i) {
      float *xn = xn_all.data() + i * p * n, *r_hat = r_hat_all.data() + i * r * n, *g = g_all.data() + i * r * n;
      rstd[i] = project_image<float>(x + i * image, channels_last, s, prm.gw, gn_b, gn_eps, prm.w, xn,
                                     xg_all.data() + i * p * n, raw_all.data() + i * r * n);
      for (int64_t c = 0; c < r; ++c) {
        const fVec m(prm.mean[c]), is(prm.invstd[c]), a(prm.bw[c]), b(prm.bb[c]);
        at::vec::map([&](const fVec& v) { return (v - m) * is; }, r_hat + c * n, raw_all.data() + (i * r + c) * n, n);
        at::vec::map([&](const fVec& v) { return v * a + b; }, qkv.data() + c * n, r_hat + c * n, n);
      }
      shsa::attend_backward_image(qkv.data(), go + i * image, out + i * image, channels_last, s, scratch, g,
                                  gx + i * image);
      for (int64_t c = 0; c < r; ++c) {
        parts[i * 3 * r + c] = shsa::sum_of(g + c * n, n);
        parts[i * 3 * r + r + c] = shsa::dot_of(g + c * n, r_hat + c * n, n);
        parts[i * 3 * r + 2 * r + c] = sum_f64<1>(r_hat + c * n, n, 0.0);
      }
    }
  });
  g_bn = combine(parts, batch, 3 * r);  // grad bn_bias, grad bn_weight, sum(r_hat)
  const double count = static_cast<double>(batch * n);
  std::vector<float> coef(r), mean_g(r), mean_gr(r);
  for (int64_t c = 0; c < r; ++c) {
    coef[c] = prm.bw[c] * prm.invstd[c];
    mean_g[c] = static_cast<float>(g_bn[c] / count);
    mean_gr[c] = static_cast<float>(g_bn[r + c] / count);
  }
  // grad gn_bias = W^T sum(g_raw), and sum(g_raw) = coef (sum(g) - count mean(g) - mean(g r_hat) sum(r_hat))
  // = -coef mean(g r_hat) sum(r_hat) exactly: ~0 when mean / var are the batch's statistics, so summing the
  // rounded g_raw (or W^T g_raw) would return only their rounding noise, above the reference's.
  g_gn.assign(2 * p, 0.0);
  for (int64_t c = 0; c < r; ++c) {
    const double sum_g_raw = -static_cast<double>(coef[c]) * (g_bn[r + c] / count) * g_bn[2 * r + c];
    for (int64_t ch = 0; ch < p; ++ch) g_gn[p + ch] += prm.w[c * p + ch] * sum_g_raw;
  }

  // (B) g_raw = coef (g - mean(g) - r_hat mean(g r_hat)), dW, GroupNorm's affine and backward.
  std::vector<double> gn_parts(batch * p);  // per image: sum(g_xg xn)
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    MatmulThreadGuard guard;
    MatB<float> g_kn, xg_kn;
    std::vector<float> g_xg(p * n), xg_t(n * p);
    for (int64_t k = k0; k < k1; ++k) {
      float* dw = dw_parts + k * r * p;
      for (int64_t i = k * batch / chunks; i < (k + 1) * batch / chunks; ++i) {
        const float *xn = xn_all.data() + i * p * n, *r_hat = r_hat_all.data() + i * r * n;
        const float* xg = xg_all.data() + i * p * n;
        float* g = g_all.data() + i * r * n;
        for (int64_t c = 0; c < r; ++c) {
          const fVec a(coef[c]), mg(mean_g[c]), mgr(mean_gr[c]);
          at::vec::map2([&](const fVec& gv, const fVec& rh) { return a * (gv - mg - rh * mgr); }, g + c * n, g + c * n,
                        r_hat + c * n, n);
        }
        // dW += g_raw xg^T and g_xg = W^T g_raw through the brgemm micro-kernel (xg^T: token-major xg).
        for (int64_t ch = 0; ch < p; ++ch)
          for (int64_t t = 0; t < n; ++t) xg_t[t * p + ch] = xg[ch * n + t];
        xg_kn.assign(xg_t.data(), n, p, p);
        matmul(r, g, n, xg_kn, dw, p, /*accumulate=*/true);
        g_kn.assign(g, r, n, n);
        matmul(p, prm.w_t, r, g_kn, g_xg.data(), n);
        for (int64_t ch = 0; ch < p; ++ch) {
          float* row = g_xg.data() + ch * n;
          gn_parts[i * p + ch] = shsa::dot_of(row, xn + ch * n, n);
          const fVec a(prm.gw[ch]);
          at::vec::map([&](const fVec& v) { return v * a; }, row, row, n);
        }
        shsa::group_norm_backward_store(g_xg.data(), xn, rstd[i], s, channels_last, gx + i * image);
      }
    }
  });
  const std::vector<double> g_gn_w = combine(gn_parts, batch, p);
  std::copy(g_gn_w.begin(), g_gn_w.end(), g_gn.begin());  // grad gn_weight, then grad gn_bias
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> shsa_train(const at::Tensor& x, const at::Tensor& gn_weight,
                                                          const at::Tensor& gn_bias, const at::Tensor& qkv_weight,
                                                          const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                                          int64_t qk_dim, double gn_eps, double bn_eps) {
  constexpr const char* op = "shvit cpp shsa_train";
  const Shape s = check_train_args(op, x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, qk_dim, gn_eps, bn_eps);
  const auto fmt = activation_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor out = at::empty_like(xc, xc.options().memory_format(fmt));
  at::Tensor mean = at::empty({s.rows_qkv()}, x.options().dtype(at::kFloat)), var = at::empty_like(mean);
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_shsa_train", [&] {
    shsa_train_forward<scalar_t>(xc, fmt == at::MemoryFormat::ChannelsLast, s, qkv_weight, as_float_vector(gn_weight),
                                 as_float_vector(gn_bias), as_float_vector(bn_weight), as_float_vector(bn_bias), gn_eps,
                                 bn_eps, out, mean, var);
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shsa_train_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gn_weight, const at::Tensor& gn_bias,
    const at::Tensor& qkv_weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& out, int64_t qk_dim, double gn_eps, double bn_eps) {
  constexpr const char* op = "shvit cpp shsa_train_backward";
  const Shape s = check_train_args(op, x, gn_weight, gn_bias, qkv_weight, bn_weight, bn_bias, qk_dim, gn_eps, bn_eps);
  check_vectors(op, {{&mean, "mean"}, {&var, "var"}}, s.rows_qkv());
  shsa::check_like_x(op, grad_out, x, "grad_out");
  shsa::check_like_x(op, out, x, "out");
  const auto fmt = activation_format(x);
  const at::Tensor xc = x.contiguous(fmt), go = grad_out.contiguous(fmt), oc = out.contiguous(fmt);
  const int64_t r = s.rows_qkv(), p = s.p;
  const at::Tensor gw = as_float_vector(gn_weight), gb = as_float_vector(gn_bias);
  const at::Tensor bw = as_float_vector(bn_weight), bb = as_float_vector(bn_bias), mean_f = as_float_vector(mean);
  const at::Tensor w = qkv_weight.reshape({r, p}).to(at::kFloat);
  // fp32 throughout, as the reference's backward; raw as the forward computes it (for fp32 input, its bits).
  const at::Tensor invstd = at::rsqrt(as_float_vector(var) + bn_eps).contiguous();
  const at::Tensor wc = w.contiguous(), w_t = w.t().contiguous();
  const BackwardParams prm{wc.data_ptr<float>(), w_t.data_ptr<float>(),  gw.data_ptr<float>(),    bw.data_ptr<float>(),
                           bb.data_ptr<float>(), mean_f.data_ptr<float>(), invstd.data_ptr<float>()};
  at::Tensor grad_x = at::empty_like(xc, xc.options().memory_format(fmt));
  const int64_t chunks = std::min<int64_t>(s.batch, at::get_num_threads());
  at::Tensor dw_parts = at::zeros({chunks, r * p}, x.options().dtype(at::kFloat));
  std::vector<double> g_bn, g_gn;
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_shsa_train_backward", [&] {
    shsa_train_backward_impl(go.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), oc.data_ptr<scalar_t>(),
                             fmt == at::MemoryFormat::ChannelsLast, s, gb.data_ptr<float>(), gn_eps, prm,
                             grad_x.data_ptr<scalar_t>(), dw_parts.data_ptr<float>(), chunks, g_bn, g_gn);
  });
  return {grad_x,
          as_param_grad(g_gn, 0, p, gn_weight.scalar_type()),
          as_param_grad(g_gn, p, p, gn_bias.scalar_type()),
          dw_parts.sum(0).view(qkv_weight.sizes()).to(qkv_weight.scalar_type()),
          as_param_grad(g_bn, r, r, bn_weight.scalar_type()),
          as_param_grad(g_bn, 0, r, bn_bias.scalar_type())};
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
