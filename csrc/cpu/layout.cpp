// NCHW -> channels_last for images with few channels (a model's input). ATen's permuted copy moves a 3-channel
// image at a third of copy speed (S1's 16 x 3 x 224 x 224 input: 2.3 ms, 4.3 ms inside a forward, against 0.7 ms
// for a plain copy, Xeon 6/207, one thread); interleaving the planes a block of pixels at a time runs at copy speed.
#include "ops.h"

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kPixelBlock = 4096;

// kC channels as a template argument: each pixel's kC values are written together, one sequential output stream.
// Pixels [p0, p1) of one image's planes (pixels apart) at src into its interleaved copy at dst.
template <int kC, typename E>
void interleave_pixels(const E* src, E* dst, int64_t pixels, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p)
#pragma GCC unroll 4
    for (int ch = 0; ch < kC; ++ch) dst[p * kC + ch] = src[ch * pixels + p];
}

// One instantiation per channel count and element size (a copy moves bits: fp32 as uint32_t, bf16 / fp16 as
// uint16_t); 2 to kMaxImageChannels channels.
template <typename E>
void interleave_image_block(const E* src, E* dst, int64_t channels, int64_t pixels, int64_t p0, int64_t p1) {
  static_assert(kMaxImageChannels == 4, "one interleave_pixels instantiation per channel count");
  if (channels == 2) return interleave_pixels<2>(src, dst, pixels, p0, p1);
  if (channels == 3) return interleave_pixels<3>(src, dst, pixels, p0, p1);
  interleave_pixels<4>(src, dst, pixels, p0, p1);
}

template <typename E>
void interleave_planes(const E* src, E* dst, int64_t channels, int64_t batch, int64_t pixels) {
  const int64_t blocks = ceil_div(pixels, kPixelBlock);
  at::parallel_for(0, batch * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / blocks, p0 = (t % blocks) * kPixelBlock, p1 = std::min(pixels, p0 + kPixelBlock);
      interleave_image_block(src + n * channels * pixels, dst + n * channels * pixels, channels, pixels, p0, p1);
    }
  });
}

}  // namespace

void image_to_channels_last(const void* src, void* dst, int64_t channels, int64_t pixels, int64_t element_size) {
  TORCH_CHECK(channels >= 2 && channels <= kMaxImageChannels && (element_size == 2 || element_size == 4),
              "shvit image_to_channels_last: 2 to ", kMaxImageChannels, " channels of 2 or 4 bytes, got ", channels,
              " of ", element_size);
  if (element_size == 4) {
    interleave_image_block(static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), channels, pixels, 0, pixels);
  } else {
    interleave_image_block(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), channels, pixels, 0, pixels);
  }
}

std::optional<at::Tensor> to_channels_last(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "shvit to_channels_last: 'x' must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  const int64_t c = x.size(1);
  const auto dtype = x.scalar_type();
  // Anything else ATen's copy does as well: more channels (its blocked transpose), other dtypes, other strides.
  // One channel is channels_last already.
  const bool copied_dtype = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  if (c < 2 || c > kMaxImageChannels || x.numel() == 0 || !x.is_contiguous() ||
      x.is_contiguous(at::MemoryFormat::ChannelsLast) || !copied_dtype || x.device().type() != at::kCPU)
    return std::nullopt;
  at::Tensor out = empty_output(x.sizes(), x.options(), at::MemoryFormat::ChannelsLast);
  const int64_t pixels = x.size(2) * x.size(3);
  if (x.element_size() == 4) {
    const auto* src = static_cast<const uint32_t*>(x.data_ptr());
    interleave_planes(src, static_cast<uint32_t*>(out.data_ptr()), c, x.size(0), pixels);
  } else {
    const auto* src = static_cast<const uint16_t*>(x.data_ptr());
    interleave_planes(src, static_cast<uint16_t*>(out.data_ptr()), c, x.size(0), pixels);
  }
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
