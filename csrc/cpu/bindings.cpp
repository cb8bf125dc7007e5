// Python bindings of one CPU-capability build (no TORCH_LIBRARY registrations, so the DEFAULT / AVX2 / AVX512
// modules can be imported side by side; shvit_kernels.backends.cpp picks one).
#include <torch/extension.h>

#include "ops.h"

#define SHVIT_STRINGIFY_(x) #x
#define SHVIT_STRINGIFY(x) SHVIT_STRINGIFY_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace k = shvit_cpu;
  m.attr("CPU_CAPABILITY") = SHVIT_STRINGIFY(CPU_CAPABILITY);
  m.def("gemm_provider", &k::gemm_provider, "Which GEMM the kernels call: 'mkl' or 'aten'");
  m.def("bf16_products", &k::bf16_products, "How bf16 GEMMs multiply: 'auto', 'dot' (bf16 pairs) or 'fp32' (widened)");
  m.def("set_bf16_products", &k::set_bf16_products, "Set 'auto', 'dot' or 'fp32'; returns the previous mode");
  m.def("bf16_widened", &k::bf16_widened, "Whether bf16 GEMMs multiply in fp32 now ('auto' measured on first use)");
  m.def("pointwise_grads", &k::pointwise_grads, "1x1 Conv+BN gradient GEMMs: 'brgemm', 'brgemm_bf16' or 'aten'",
        py::arg("dtype") = "float32");
  m.def("kxk_grads_choices", &k::kxk_grads_choices, "Each kxk Conv+BN gradient shape's timed path");
  m.def("fp32_gemm", &k::fp32_gemm, "fp32 channels_last 1x1 GEMMs: 'auto', 'tiles' or 'brgemm'");
  m.def("set_fp32_gemm", &k::set_fp32_gemm, "Set 'auto', 'tiles' or 'brgemm'; returns the previous mode");
  m.def("fp32_tiles_active", &k::f32_tiles_usable, "Whether fp32 1x1 GEMMs run on the tiles now ('auto' measured)");
  m.def("set_pair_kernels", &k::set_pair_kernels,
        "bf16 on the AVX512_BF16 pair kernels where they run (True, default) or ATen's micro-kernel paths; returns the "
        "previous setting (tests)");
  m.def("set_amx_tiles", &k::set_amx_tiles,
        "bf16 pair kernels on AMX tiles where the processor has them (True, default) or on VDPBF16PS; returns the "
        "previous setting (tests, measurements)");
  m.def("bf16_pair_unit", &k::bf16_pair_unit, "What the bf16 pair kernels multiply on: 'amx', 'avx512_bf16' or 'none'");
  m.def("dense_conv_bf16", &k::dense_conv_bf16, "bf16 channels_last dense convs: 'pairs', 'rows' or 'fp32'");
  m.def("dense_conv_blocks", &k::dense_conv_blocks, "fp32 dense conv channel blocks: 'auto', 'pairs', "
        "'threes' or 'fours'");
  m.def("set_dense_conv_blocks", &k::set_dense_conv_blocks, "Set the dense conv block mode; returns the previous one");
  m.def("dense_conv_channel_blocks", &k::dense_conv_channel_blocks,
        "Vectors per channel block for (c_in, c_out, h, w, kernel, stride, padding) in the current mode ([]: untimed)");
  m.def("peak_gflops", &k::peak_gflops, "One core's measured peak: 'fp32_fma' or 'bf16_dot' (0: none here)");
  m.def("release_cached_outputs", &k::release_cached_outputs, "Free the cached output blocks; returns the bytes");
  m.def("cached_output_bytes", &k::cached_output_bytes, "Bytes of output blocks cached for reuse");
  m.def("idle_output_allocations", &k::idle_output_allocations,
        "Allocations after which a cached block no call took is freed (on the next miss)");
  m.def("set_output_cache_limit", &k::set_output_cache_limit,
        "Most bytes of output blocks kept for reuse (0: none); frees blocks over it, returns the previous limit");
  m.def("derived_weight_count", &k::derived_weight_count, "Packed weight copies remembered for reuse");
  m.def("clear_derived_weights", &k::clear_derived_weights, "Forget every packed weight copy; returns how many");
  m.def("to_channels_last", &k::to_channels_last,
        "A contiguous NCHW x with at most 4 channels copied to channels_last; None for other x");
  m.def("conv_bias_act", &k::conv_bias_act, "shvit::conv_bias_act forward");
  m.def("conv_bias_act_backward", &k::conv_bias_act_backward, "shvit::conv_bias_act_backward");
  m.def("conv_bn_train", &k::conv_bn_train, "shvit::conv_bn_train forward");
  m.def("conv_bn_train_backward", &k::conv_bn_train_backward, "shvit::conv_bn_train_backward");
  m.def("conv_bn_train_output", &k::conv_bn_train_output, "shvit::conv_bn_train_output");
  m.def("patch_embed", &k::patch_embed, "shvit::patch_embed forward");
  m.def("ffn_fused", &k::ffn_fused, "shvit::ffn_fused forward");
  m.def("ffn_fused_backward", &k::ffn_fused_backward, "shvit::ffn_fused_backward");
  m.def("squeeze_excite", &k::squeeze_excite, "shvit::squeeze_excite forward");
  m.def("pooled_linear", &k::pooled_linear, "shvit::pooled_linear forward");
  m.def("shsa_fused", &k::shsa_fused, "shvit::shsa_fused forward");
  m.def("shsa_fused_backward", &k::shsa_fused_backward, "shvit::shsa_fused_backward");
  m.def("shsa_train", &k::shsa_train, "shvit::shsa_train forward");
  m.def("shsa_train_backward", &k::shsa_train_backward, "shvit::shsa_train_backward");
}
