// C launch API of the CUDA kernels. Plain pointers and sizes, no torch types: the .cu files compile with
// nvcc alone (CI checks them on machines without a GPU), and bindings.cpp is the only torch-aware layer.
//
// Conventions: activations are strided 4-D views (element strides, so NCHW and channels_last are both just
// strides); every per-channel parameter and statistic is fp32 and contiguous; fp32 workspaces are contiguous
// (B, C, N). Every launcher enqueues on `stream`, returns the launch error and never synchronises.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { SHVIT_F32 = 0, SHVIT_F16 = 1, SHVIT_BF16 = 2 } shvit_dtype;

// A strided 4-D activation view (data may be NULL for an absent optional tensor).
typedef struct {
  void* data;
  int64_t sn, sc, sh, sw;
} shvit_view;

// ------------------------------------------------------------------------------------------------------------
// Depthwise 3x3 conv (groups == channels, padding 1, stride 1 or 2) with per-channel affine, residual, ReLU.
// ------------------------------------------------------------------------------------------------------------
typedef struct {
  int n, c, h, w, oh, ow, stride;
  shvit_dtype dtype;
  int channels_last;    // picks the thread mapping (channel-fastest when set); strides give the addresses
  const float* weight;  // (C, 9) fp32
} shvit_dw_shape;

// out = act((conv(x) * scale + shift) + residual); scale may be NULL (1).
cudaError_t shvit_dw_forward(const shvit_dw_shape* s, shvit_view x, const float* scale, const float* shift,
                             shvit_view residual, int relu, shvit_view out, cudaStream_t stream);

// Batch statistics of conv(x) over (N, OH, OW): fp32 mean and biased var (C each). `partials` must hold
// shvit_dw_stats_workspace(s) floats.
int64_t shvit_dw_stats_workspace(const shvit_dw_shape* s);
cudaError_t shvit_dw_stats(const shvit_dw_shape* s, shvit_view x, float* partials, float* mean, float* var,
                           cudaStream_t stream);

// Backward. g = relu ? grad_out * (out > 0) : grad_out is written to `g` (activation dtype).
// Without BN (bn_weight NULL): dy = g. With BN (train): dy = k (g - s1/M - (y - mean) invstd^2 s2/M) with
// k = bn_weight * invstd, s1 = sum g, s2 = sum g (y - mean) (both returned in sums[0:C], sums[C:2C], which the
// call fills), y = conv(x) recomputed.
// wsum (C x 10, written here) receives per channel the 9 weight-gradient taps and sum(dy).
// dy_ws: fp32 workspace of the output's size (dense, NHWC when channels_last else NCHW), used only with BN.
// partials: shvit_dw_backward_workspace(s) floats of per-tile sums, so every reduction over the batch is done
// in a fixed order (the results do not change from run to run). grad_x is written in full.
typedef struct {
  const float* bn_weight;  // NULL: conv_bias_act backward
  const float* mean;
  const float* var;
  float eps;
} shvit_dw_bn;

int64_t shvit_dw_backward_workspace(const shvit_dw_shape* s);
cudaError_t shvit_dw_backward(const shvit_dw_shape* s, shvit_view x, shvit_view grad_out, shvit_view out, int relu,
                              shvit_dw_bn bn, float* sums, shvit_view g, float* dy_ws, float* wsum, float* partials,
                              shvit_view grad_x, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------------------
// SHSA (Q = 16 query/key channels, P <= 128 value channels, any N = H*W). Activation views use sn as the
// token stride: the token n = h*W + w sits at n*sn, which holds for NCHW-contiguous and channels_last
// (bindings.cpp makes any other layout contiguous first).
// ------------------------------------------------------------------------------------------------------------
#define SHVIT_SHSA_QK 16
#define SHVIT_SHSA_MAX_P 128

typedef struct {
  int b, c, p, n;  // batch, channels, partial dim, tokens
  shvit_dtype dtype;
  float gn_eps;
  const float* qkv_weight;  // (2Q+P, P) fp32
  const float* qkv_bias;    // (2Q+P) fp32 or NULL
  const float* gn_weight;   // (P) fp32 or NULL (fused: folded into qkv_weight)
  const float* gn_bias;     // (P) fp32 or NULL
} shvit_shsa_shape;

// Views below: data + (sn = batch stride, sc = channel stride, sw = token stride; sh unused).
// Workspaces (fp32, contiguous) by size in floats:
int64_t shvit_shsa_forward_workspace(const shvit_shsa_shape* s, int train);
int64_t shvit_shsa_backward_workspace(const shvit_shsa_shape* s, int train);

// Forward. train: BatchNorm on the raw qkv with batch statistics (mean/var outputs, C = 2Q+P each).
cudaError_t shvit_shsa_forward(const shvit_shsa_shape* s, shvit_view x, shvit_view out, int train,
                               const float* bn_weight, const float* bn_bias, float bn_eps, float* mean, float* var,
                               float* workspace, cudaStream_t stream);

// Backward. grads (fp32, written here; sums over the batch in a fixed order): grad_w (2Q+P, P),
// grad_qkv_bias (2Q+P) [fused] or grad_bn_weight, grad_bn_bias (2Q+P) and grad_gn_weight, grad_gn_bias (P)
// [train]. grad_x in full.
typedef struct {
  float* grad_w;
  float* grad_bias;     // fused only
  float* grad_bn_w;     // train only
  float* grad_bn_b;
  float* grad_gn_w;
  float* grad_gn_b;
} shvit_shsa_grads;

cudaError_t shvit_shsa_backward(const shvit_shsa_shape* s, shvit_view grad_out, shvit_view x, shvit_view out,
                                int train, const float* bn_weight, const float* bn_bias, const float* mean,
                                const float* var, float bn_eps, shvit_shsa_grads grads, shvit_view grad_x,
                                float* workspace, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
