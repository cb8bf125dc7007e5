// Entry points of the CPU kernels; each takes the positional arguments of the matching shvit:: op schema.
#pragma once

#include "common.h"

#include <string>

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t stride, int64_t padding, int64_t groups, bool relu,
                         const std::optional<at::Tensor>& residual);

// SHViT's stem: four 3x3 stride-2 convs (BN folded), ReLU after the first three.
at::Tensor patch_embed(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                       const at::Tensor& b2, const at::Tensor& w3, const at::Tensor& b3, const at::Tensor& w4,
                       const at::Tensor& b4, bool out_channels_last);

at::Tensor ffn_fused(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                     const at::Tensor& b2);

at::Tensor shsa_fused(const at::Tensor& x, const at::Tensor& qkv_weight, const at::Tensor& qkv_bias, int64_t qk_dim,
                      double gn_eps);

at::Tensor squeeze_excite(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                          const at::Tensor& b2);

at::Tensor pooled_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_fused_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& b2);

std::tuple<at::Tensor, at::Tensor, at::Tensor> shsa_fused_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const at::Tensor& qkv_weight,
                                                                   const at::Tensor& qkv_bias, const at::Tensor& out,
                                                                   int64_t qk_dim, double gn_eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> shsa_train(const at::Tensor& x, const at::Tensor& gn_weight,
                                                          const at::Tensor& gn_bias, const at::Tensor& qkv_weight,
                                                          const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                                                          int64_t qk_dim, double gn_eps, double bn_eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shsa_train_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gn_weight, const at::Tensor& gn_bias,
    const at::Tensor& qkv_weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& out, int64_t qk_dim, double gn_eps, double bn_eps);

// The GEMMs the 1x1 channels_last conv gradients of a Conv+BN in `dtype` ("float32" or "bfloat16") run on: "brgemm"
// (the micro-kernel in fp32), "brgemm_bf16" (the micro-kernel on bf16 pairs) or "aten" (ATen's mm in fp32); fp32's
// choice is measured once per process unless SHVIT_CPU_POINTWISE_GRADS forces one.
std::string pointwise_grads(const std::string& dtype);
// The path each kxk Conv+BN gradient shape timed fastest at its first call ("batch N CxHxW -> ... : path").
std::vector<std::string> kxk_grads_choices();
// What bf16 channels_last dense kxk convolutions (and 1x1 ones with even c_in) run on: "pairs" (register-blocked
// VDPBF16PS, AVX512_BF16 with bf16 products "dot"), "rows" (a brgemm per kernel row; 3 input channels widened to
// fp32; 1x1 on brgemm tiles) or "fp32" (widened).
std::string dense_conv_bf16();
// Channel blocks of the fp32 register-blocked dense kxk convolutions (channels_last; bf16 widened): "auto" (each
// shape's fastest plan, timed on one output row at its first call), "pairs" (two vectors per block), "threes" or
// "fours" (that many vectors per block, then one block of the rest; AVX-512 builds). SHVIT_CPU_DENSE_CONV_BLOCKS
// sets the mode at start-up; set_dense_conv_blocks returns the previous one.
std::string dense_conv_blocks();
std::string set_dense_conv_blocks(const std::string& mode);
// Vectors per channel block the mode gives a convolution of this shape (empty: "auto" has not timed it yet).
std::vector<int64_t> dense_conv_channel_blocks(int64_t c_in, int64_t c_out, int64_t h, int64_t w, int64_t kernel,
                                               int64_t stride, int64_t padding);
// Whether bf16 takes the pair kernels where they can run (default) or ATen's micro-kernel paths, which tests keep
// checking on processors that have the instructions; returns the previous setting.
bool set_pair_kernels(bool on);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bias_act_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    int64_t stride, int64_t padding, int64_t groups, bool relu, const std::optional<at::Tensor>& residual,
    const at::Tensor& out);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    int64_t stride, int64_t padding, int64_t groups, double eps, bool relu, const std::optional<at::Tensor>& residual,
    bool keep_conv_output);

// A training Conv+BN's output recomputed from its conv output, the forward's statistics and its residual.
at::Tensor conv_bn_train_output(const at::Tensor& conv_output, const at::Tensor& bn_weight,
                                const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, double eps,
                                bool relu, const std::optional<at::Tensor>& residual);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_train_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& out, int64_t stride,
    int64_t padding, int64_t groups, double eps, bool relu, bool has_residual, bool input_grad,
    const std::optional<at::Tensor>& conv_output);

constexpr int64_t kMaxImageChannels = 4;

// One image's channels planes (each pixels long, NCHW) at src interleaved into channels_last at dst, on the calling
// thread; 2 to kMaxImageChannels channels of element_size 2 or 4 bytes.
void image_to_channels_last(const void* src, void* dst, int64_t channels, int64_t pixels, int64_t element_size);

// x (N, C, H, W), contiguous NCHW with at most kMaxImageChannels channels, copied to channels_last at copy speed;
// nullopt for any other x (ATen's copy serves those as well).
std::optional<at::Tensor> to_channels_last(const at::Tensor& x);

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
