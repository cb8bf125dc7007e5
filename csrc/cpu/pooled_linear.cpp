// pooled_linear forward: out = mean_hw(x) W^T + b, a classifier head after global average pooling. Each thread
// takes a run of images: their channel means in fp32, rounded to x's dtype as the reference's mean is, then one
// product with W^T over those images (the weight read once per thread, packed once per weight version). As one op
// the head is one step of a fused model's replayed forward: as ATen's mean and a linear call after it, S1's head
// took about 0.75 ms of its batch-16 forward on one thread, mostly Python and ATen running out of cold caches.
#include "ops.h"

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

namespace {
constexpr const char* kOp = "shvit cpp pooled_linear";
}  // namespace

at::Tensor pooled_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_float_tensor(x, kOp, "x", 4);
  TORCH_CHECK(x.numel() > 0, kOp, ": 'x' must not be empty, got shape ", x.sizes());
  check_float_tensor(weight, kOp, "weight", 2);
  check_same_dtype(weight, x, kOp, "weight");
  const int64_t batch = x.size(0), c = x.size(1), plane = x.size(2) * x.size(3), k = weight.size(0);
  check_shape(weight, {k, c}, kOp, "weight");
  check_channel_vector(bias, kOp, "bias", k);
  const auto fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor bias_f = float_vector(bias);
  at::Tensor out = empty_output({batch, k}, x.options(), at::MemoryFormat::Contiguous);
  const float inv_count = 1.f / static_cast<float>(plane);
  MatB<float> wt;  // W^T (c x k) in fp32
  wt.assign_weight(weight);
  const float* bp = bias_f.data_ptr<float>();
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_pooled_linear", [&] {
    using T = scalar_t;
    const T* xp = xc.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, batch, 1, [&](int64_t n0, int64_t n1) {
      MatmulThreadGuard guard;
      const int64_t images = n1 - n0;
      std::vector<float> mean(images * c), logits(images * k);
      for (int64_t n = n0; n < n1; ++n) {
        float* m = mean.data() + (n - n0) * c;
        channel_sums(xp + n * c * plane, channels_last, c, plane, m);
        for (int64_t ch = 0; ch < c; ++ch) m[ch] = static_cast<float>(static_cast<T>(m[ch] * inv_count));
      }
      matmul(images, mean.data(), c, wt, logits.data(), k);
      for (int64_t i = 0; i < images; ++i)
        epilogue_run(logits.data() + i * k, bp, 0.f, static_cast<const T*>(nullptr), false, op + (n0 + i) * k, k);
    });
  });
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
