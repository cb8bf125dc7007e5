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

}  // namespace

at::Tensor shsa_fused(const at::Tensor& x, const at::Tensor& qkv_weight, const at::Tensor& qkv_bias, int64_t qk_dim,
                      double gn_eps) {
  check_float_tensor(x, kOp, "x", 4);
  TORCH_CHECK(x.numel() > 0, kOp, ": 'x' must not be empty, got shape ", x.sizes());
  check_float_tensor(qkv_weight, kOp, "qkv_weight", 4);
  check_same_dtype(qkv_weight, x, kOp, "qkv_weight");
  TORCH_CHECK(qk_dim >= 1, kOp, ": 'qk_dim' must be >= 1, got ", qk_dim);
  TORCH_CHECK(gn_eps >= 0, kOp, ": 'gn_eps' must be >= 0, got ", gn_eps);
  const ShsaShape s{x.size(0), x.size(1), qkv_weight.size(1), qk_dim, x.size(2) * x.size(3)};
  TORCH_CHECK(s.p >= 1 && s.p <= s.c, kOp, ": partial dim P = qkv_weight.shape[1] = ", s.p,
              " must be in [1, channels of 'x' = ", s.c, "]");
  check_shape(qkv_weight, {s.rows_qkv(), s.p, 1, 1}, kOp, "qkv_weight");
  check_float_tensor(qkv_bias, kOp, "qkv_bias", 1);
  check_shape(qkv_bias, {s.rows_qkv()}, kOp, "qkv_bias");
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
