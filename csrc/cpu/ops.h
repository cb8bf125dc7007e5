// Entry points of the CPU kernels; each takes the positional arguments of the matching shvit:: op schema.
#pragma once

#include "common.h"

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

at::Tensor conv_bias_act(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t stride, int64_t padding, int64_t groups, bool relu,
                         const std::optional<at::Tensor>& residual);

at::Tensor ffn_fused(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                     const at::Tensor& b2);

at::Tensor shsa_fused(const at::Tensor& x, const at::Tensor& qkv_weight, const at::Tensor& qkv_bias, int64_t qk_dim,
                      double gn_eps);

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
