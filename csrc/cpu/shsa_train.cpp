// shsa_train forward and backward: GroupNorm(1) with affine, the qkv 1x1 conv with BatchNorm batch statistics over
// (B, tokens), attention, relu(cat[ya, x[:, P:]]).
//
// The forward reproduces the reference to the bit (fp32 and bf16): tests/test_train.py's lock-step parity, before it
// let a few steps miss (2026-12-04), failed on ANY last-ulp difference in this op's output (a +-1 ulp change of 8% of
// the reference's own outputs broke it in 2 of 3 seeds: gradients that are zero by construction, e.g. of BatchNorm
// biases feeding the batch-normalised head on 1x1 maps, were compared noise against noise). So the steps whose
// rounding depends on an ATen kernel's internal order -- the GroupNorm reductions, the qkv GEMM, the BatchNorm mean,
// the attention GEMMs and softmax -- call those ATen ops on tensors laid out as the reference's are; the rest is
// fused here: GroupNorm's normalise + affine (one pass, rounding where the reference rounds), the BatchNorm variance
// (two-pass in fp64, which is torch.var's fp64 Welford result to the bit but for near-ties), normalise, and the
// ReLU / concatenation epilogue.
//
// The backward computes raw = W xg exactly as the forward does (for fp32, the forward's raw to the bit), so r_hat is
// consistent with the forward's mean / var: with a few values per channel the BatchNorm backward cancels to the last
// bit, and an ulp of difference there cost 5x the reference's error in grad qkv_weight. Then per image, in fp32:
// attention backward (shared with shsa_fused), BatchNorm backward (its sums per image, fp64 across images in image
// order), dW (per-chunk partials in chunk order), GroupNorm's affine and backward.
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

// Round fp32 values to T and back (no-op for fp32).
template <typename T>
inline fVec round_to(const fVec& v) {
  if (std::is_same<T, float>::value) return v;
  T tmp[kVec];
  store_f(v, tmp);
  return load_f(tmp);
}

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

// GroupNorm(1) of x[:, :P] and its affine as the reference computes them: its ATen ops for the statistics (same
// views, same reductions), then one pass for xg = round(round((xa - mean) rstd) gn_w + gn_b), rounding to `dtype`
// where the reference rounds. Everything (B, P, tokens) in the reference's layout: token-major per image for
// channels_last input (tokens > 1), channel-major otherwise.
struct GroupNormed {
  at::Tensor centred, rstd, xg;  // xa - mean (fp32), 1/sigma (B, 1, 1) fp32, xg in dtype
  bool token_major;
};

GroupNormed group_norm_affine(const at::Tensor& xc, const Shape& s, const at::Tensor& gn_w, const at::Tensor& gn_b,
                              double eps, at::ScalarType dtype) {
  const at::Tensor xf = xc.narrow(1, 0, s.p).reshape({s.batch, s.p, s.tokens}).to(at::kFloat);
  GroupNormed g;
  g.centred = xf - xf.mean({1, 2}, true);
  g.rstd = at::rsqrt(g.centred.square().mean({1, 2}, true) + eps).contiguous();
  g.token_major = s.tokens > 1 && g.centred.stride(1) == 1;
  TORCH_INTERNAL_ASSERT(g.centred.is_non_overlapping_and_dense());
  g.xg = at::empty_strided(g.centred.sizes(), g.centred.strides(), g.centred.options().dtype(dtype));
  const int64_t n = s.tokens, p = s.p;
  const float *cp = g.centred.data_ptr<float>(), *rp = g.rstd.data_ptr<float>();
  const float *gw = gn_w.data_ptr<float>(), *gb = gn_b.data_ptr<float>();
  SHVIT_DISPATCH_FLOAT_BF16(dtype, "shvit_shsa_group_norm", [&] {
    using T = scalar_t;
    T* xg = g.xg.data_ptr<T>();
    at::parallel_for(0, s.batch, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float* c = cp + i * p * n;
        T* out = xg + i * p * n;
        const fVec r(rp[i]);
        // Runs of P channels (token-major) or of one channel's tokens (channel-major).
        const int64_t runs = g.token_major ? n : p, len = g.token_major ? p : n;
        for (int64_t j = 0; j < runs; ++j)
          for (int64_t k = 0; k < len; k += kVec) {
            const int64_t m = std::min(kVec, len - k);
            const fVec w = g.token_major ? load_f(gw + k, m) : fVec(gw[j]);
            const fVec b = g.token_major ? load_f(gb + k, m) : fVec(gb[j]);
            const fVec xn = round_to<T>(load_f(c + j * len + k, m) * r);
            store_f(xn * w + b, out + j * len + k, m);
          }
      }
    });
  });
  return g;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void shsa_train_forward(const at::Tensor& xc, bool channels_last, const Shape& s, const at::Tensor& qkv_weight,
                        const at::Tensor& gn_w, const at::Tensor& gn_b, const at::Tensor& bn_w,
                        const at::Tensor& bn_b, double gn_eps, double bn_eps, at::Tensor& out, at::Tensor& mean,
                        at::Tensor& var) {
  const int64_t n = s.tokens, p = s.p, r = s.rows_qkv(), qk = s.qk, batch = s.batch;
  const GroupNormed g = group_norm_affine(xc, s, gn_w, gn_b, gn_eps, xc.scalar_type());
  const at::Tensor raw = at::matmul(qkv_weight.reshape({r, p}), g.xg).to(at::kFloat).contiguous();  // (B, R, N)
  mean = raw.mean({0, 2});
  // var: sums per image, fp64 across images in image order; pass 1 the fp64 mean, pass 2 centred squares.
  const float* rp = raw.data_ptr<float>();
  std::vector<double> parts(batch * r), mean64(r), sumsq(batch * r);
  auto per_image = [&](auto body) {
    at::parallel_for(0, batch, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t c = 0; c < r; ++c) body(i, c, rp + (i * r + c) * n);
    });
  };
  per_image([&](int64_t i, int64_t c, const float* row) { parts[i * r + c] = sum_f64<1>(row, n, 0.0); });
  const double count = static_cast<double>(batch * n);
  const std::vector<double> total = combine(parts, batch, r);
  for (int64_t c = 0; c < r; ++c) mean64[c] = total[c] / count;
  per_image([&](int64_t i, int64_t c, const float* row) { sumsq[i * r + c] = sum_f64<2>(row, n, mean64[c]); });
  const std::vector<double> sq = combine(sumsq, batch, r);
  const float *bw = bn_w.data_ptr<float>(), *bb = bn_b.data_ptr<float>(), *mp = mean.data_ptr<float>();
  float* vp = var.data_ptr<float>();
  std::vector<float> scale(r), shift(r);
  for (int64_t c = 0; c < r; ++c) {
    vp[c] = static_cast<float>(sq[c] / count);
    scale[c] = bw[c] * (1.f / std::sqrt(vp[c] + static_cast<float>(bn_eps)));
    shift[c] = bb[c] - mp[c] * scale[c];
  }
  // qkv = round(raw scale + shift), (B, R, N) in T.
  at::Tensor qkv = at::empty({batch, r, n}, xc.options());
  T* qp = qkv.data_ptr<T>();
  per_image([&](int64_t i, int64_t c, const float* row) {
    const fVec a(scale[c]), b(shift[c]);
    T* dst = qp + (i * r + c) * n;
    for (int64_t t = 0; t < n; t += kVec) {
      const int64_t m = std::min(kVec, n - t);
      store_f(load_f(row + t, m) * a + b, dst + t, m);
    }
  });
  // Attention through the reference's ATen ops (their GEMM and softmax rounding).
  const at::Tensor q = qkv.narrow(1, 0, qk), k = qkv.narrow(1, qk, qk), v = qkv.narrow(1, 2 * qk, p);
  const at::Tensor scores = at::matmul(q.transpose(1, 2), k) * std::pow(static_cast<double>(qk), -0.5);
  const at::Tensor attn = at::_softmax(scores.to(at::kFloat), -1, false).to(xc.scalar_type());
  const at::Tensor ya = at::matmul(v, attn.transpose(1, 2)).contiguous();  // (B, P, N)
  const T *yp = ya.data_ptr<T>(), *xp = xc.data_ptr<T>();
  T* op_ = out.data_ptr<T>();
  at::parallel_for(0, batch, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      shsa::store_attended(yp + i * p * n, false, s, xp + i * s.image(), channels_last, op_ + i * s.image());
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
                              const GroupNormed& gn, const at::Tensor& raw, const BackwardParams& prm, T* gx,
                              float* dw_parts, int64_t chunks, std::vector<double>& g_bn, std::vector<double>& g_gn) {
  const int64_t n = s.tokens, p = s.p, r = s.rows_qkv(), batch = s.batch, image = s.image();
  const float *centred = gn.centred.data_ptr<float>(), *rstd = gn.rstd.data_ptr<float>();
  const float *xg_all = gn.xg.data_ptr<float>(), *raw_all = raw.data_ptr<float>();
  // Kept between the passes, per image: xn (P x tokens), r_hat and g_qkv (R x tokens).
  std::vector<float> xn_all(batch * p * n), r_hat_all(batch * r * n), g_all(batch * r * n);
  std::vector<double> parts(batch * 3 * r);  // per image: sum(g_qkv), sum(g_qkv r_hat), sum(r_hat)

  // (A) xn, r_hat, qkv; attention backward; BatchNorm's sums.
  at::parallel_for(0, batch, 1, [&](int64_t i0, int64_t i1) {
    MatmulThreadGuard guard;
    std::vector<float> qkv(r * n);
    shsa::AttendBackScratch scratch(s);
    for (int64_t i = i0; i < i1; ++i) {
      float *xn = xn_all.data() + i * p * n, *r_hat = r_hat_all.data() + i * r * n, *g = g_all.data() + i * r * n;
      const float* c_i = centred + i * p * n;
      for (int64_t ch = 0; ch < p; ++ch)
        for (int64_t t = 0; t < n; ++t) xn[ch * n + t] = c_i[gn.token_major ? t * p + ch : ch * n + t] * rstd[i];
      for (int64_t c = 0; c < r; ++c) {
        const fVec m(prm.mean[c]), is(prm.invstd[c]), a(prm.bw[c]), b(prm.bb[c]);
        at::vec::map([&](const fVec& v) { return (v - m) * is; }, r_hat + c * n, raw_all + (i * r + c) * n, n);
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
    std::vector<float> g_xg(p * n), xg_t(gn.token_major ? 0 : n * p);
    for (int64_t k = k0; k < k1; ++k) {
      float* dw = dw_parts + k * r * p;
      for (int64_t i = k * batch / chunks; i < (k + 1) * batch / chunks; ++i) {
        const float *xn = xn_all.data() + i * p * n, *r_hat = r_hat_all.data() + i * r * n;
        const float* xg = xg_all + i * p * n;
        float* g = g_all.data() + i * r * n;
        for (int64_t c = 0; c < r; ++c) {
          const fVec a(coef[c]), mg(mean_g[c]), mgr(mean_gr[c]);
          at::vec::map2([&](const fVec& gv, const fVec& rh) { return a * (gv - mg - rh * mgr); }, g + c * n, g + c * n,
                        r_hat + c * n, n);
        }
        // dW += g_raw xg^T and g_xg = W^T g_raw through the brgemm micro-kernel (xg^T: token-major xg).
        if (!gn.token_major)
          for (int64_t ch = 0; ch < p; ++ch)
            for (int64_t t = 0; t < n; ++t) xg_t[t * p + ch] = xg[ch * n + t];
        xg_kn.assign(gn.token_major ? xg : xg_t.data(), n, p, p);
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
  at::Tensor mean, var = at::empty({s.rows_qkv()}, x.options().dtype(at::kFloat));
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
  const GroupNormed gn = group_norm_affine(xc, s, gw, gb, gn_eps, at::kFloat);
  const at::Tensor raw = at::matmul(w, gn.xg).contiguous();
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
                             fmt == at::MemoryFormat::ChannelsLast, s, gn, raw, prm, grad_x.data_ptr<scalar_t>(),
                             dw_parts.data_ptr<float>(), chunks, g_bn, g_gn);
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
