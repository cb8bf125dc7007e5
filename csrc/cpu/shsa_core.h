// Per-image pieces of the SHSA kernels shared by shsa_fused (shsa_fused.cpp) and shsa_train (shsa_train.cpp): argument
// checks, the output epilogue relu(cat[ya, x[:, P:]]), the attention backward and GroupNorm(1)'s backward. All work
// on fp32 per-thread buffers; T is the storage dtype of the activations (float or BFloat16).
#pragma once

#include "common.h"

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {
namespace shsa {

struct Shape {
  int64_t batch, c, p, qk, tokens;
  int64_t rows_qkv() const { return 2 * qk + p; }
  int64_t image() const { return c * tokens; }
};

// x (4-D, non-empty), qkv_weight (2 qk_dim + P, P, 1, 1) in x's dtype, qk_dim >= 1, gn_eps >= 0; P from the weight.
Shape check_input(const char* op, const at::Tensor& x, const at::Tensor& qkv_weight, int64_t qk_dim, double gn_eps);
// A 4-D tensor of x's dtype and shape (grad_out, out).
void check_like_x(const char* op, const at::Tensor& t, const at::Tensor& x, const char* name);

float sum_of(const float* v, int64_t n);
float dot_of(const float* a, const float* b, int64_t n);
// softmax(scale row) over each of `rows` rows of n values, in place; explicit vectors: the at::vec map / reduce
// helpers' per-call cost was most of it at SHViT's 16-49 keys.
void softmax_rows(float* scores, int64_t rows, int64_t n, float scale);

// out_n = relu(cat[ya, x_n[P:]]) for one image in the input's layout; ya (fp32 or T) is channel-major (P x tokens),
// or token-major (tokens x P) when ya_token_major (channels_last output only).
template <typename A, typename T>
void store_attended(const A* ya, bool ya_token_major, const Shape& s, const T* x_n, bool channels_last, T* out_n);

struct AttendBackScratch {
  std::vector<float> q_t, attn, g_ya, g_ya_t, g_attn, g_attn_t;
  MatB<float> b_op;
  explicit AttendBackScratch(const Shape& s)
      : q_t(s.tokens * s.qk), attn(s.tokens * s.tokens), g_ya(s.p * s.tokens), g_ya_t(s.tokens * s.p),
        g_attn(s.tokens * s.tokens), g_attn_t(s.tokens * s.tokens) {}
};

// Backward of relu(cat[v softmax(scale q^T k)^T, x[P:]]) from the recomputed channel-major fp32 qkv
// (R x tokens): g_qkv (R x tokens), and the pass-through channels' gradient (grad_out masked by out > 0, exact)
// written into gx_n. Its GEMMs go through matmul: construct a MatmulThreadGuard in the calling task.
template <typename T>
void attend_backward_image(const float* qkv, const T* go_n, const T* out_n, bool channels_last, const Shape& s,
                           AttendBackScratch& b, float* g_qkv, T* gx_n);

// GroupNorm(1) backward, rstd (g - mean(g) - xn mean(g xn)) from g = dL/dxn (channel-major, overwritten), into the
// first P channels of gx_n in the input's layout.
template <typename T>
void group_norm_backward_store(float* g_xn, const float* xn, float rstd, const Shape& s, bool channels_last, T* gx_n);

}  // namespace shsa
}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
