// squeeze_excite forward: out = x * sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2). Each thread takes a run of images:
// their channel means, the two small products and the gate in fp32, then each image scaled by its gate.
// The image stays in this core's cache between the two passes, and the neighbouring kernels split the batch the
// same way. Inside S1's bf16 forward (module hooks, Zen 5, batch 16) its two gates took 0.77 / 0.76 ms (one / two
// threads) as ATen's mean, sigmoid and multiply around two conv calls, and take 0.33 / 0.24 ms here.
#include "ops.h"

namespace shvit_cpu {
inline namespace CPU_CAPABILITY {

namespace {

constexpr const char* kOp = "shvit cpp squeeze_excite";

// rows x cols fp32 values in place: act(v + bias[col]); act a vector function.
template <typename Act>
void add_bias_act(float* v, int64_t rows, int64_t cols, const float* bias, Act act) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = v + r * cols;
    int64_t i = 0;
    for (; i + kVec <= cols; i += kVec) act(fVec::loadu(row + i) + fVec::loadu(bias + i)).store(row + i);
    if (i < cols) act(fVec::loadu(row + i, cols - i) + fVec::loadu(bias + i, cols - i)).store(row + i, cols - i);
  }
}

template <typename T>
void squeeze_excite_image(const T* x, bool channels_last, int64_t c, int64_t plane, const float* gate_in,
                          T* out) {
  if (channels_last) {
    for (int64_t p = 0; p < plane; ++p) {
      const T* px = x + p * c;
      T* po = out + p * c;
      int64_t i = 0;
      for (; i + kVec <= c; i += kVec) store_f(load_f(px + i) * fVec::loadu(gate_in + i), po + i);
      if (i < c) store_f(load_f(px + i, c - i) * fVec::loadu(gate_in + i, c - i), po + i, c - i);
    }
    return;
  }
  for (int64_t ch = 0; ch < c; ++ch) {
    const fVec g(gate_in[ch]);
    const T* px = x + ch * plane;
    T* po = out + ch * plane;
    int64_t i = 0;
    for (; i + kVec <= plane; i += kVec) store_f(load_f(px + i) * g, po + i);
    if (i < plane) store_f(load_f(px + i, plane - i) * g, po + i, plane - i);
  }
}

}  // namespace

at::Tensor squeeze_excite(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                          const at::Tensor& b2) {
  const BottleneckShape s = check_bottleneck_args(kOp, x, w1, b1, w2, b2);
  const int64_t batch = s.batch, c = s.c, plane = s.pixels, reduced = s.hidden;
  const auto fmt = activation_format(x);
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor b1f = float_vector(b1), b2f = float_vector(b2);
  at::Tensor out = empty_output(xc.sizes(), xc.options(), fmt);
  const float inv_count = 1.f / static_cast<float>(plane);
  // B operands of the two products over a thread's images, W1^T (c x reduced) and W2^T (reduced x c): fp32, read in
  // place or packed once per weight version. One product per thread's images reads each weight once (per image,
  // the 896-channel gate's 1.6 MB of fp32 weights made it 2.3x slower than ATen's linears).
  MatB<float> w1t, w2t;
  w1t.assign_weight(w1);
  w2t.assign_weight(w2);
  const float *b1p = b1f.data_ptr<float>(), *b2p = b2f.data_ptr<float>();
  SHVIT_DISPATCH_FLOAT_BF16(x.scalar_type(), "shvit_squeeze_excite", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t n0, int64_t n1) {
      MatmulThreadGuard guard;
      const int64_t images = n1 - n0;
      std::vector<float> mean(images * c), hidden(images * reduced), gate(images * c);
      for (int64_t n = n0; n < n1; ++n) {
        float* m = mean.data() + (n - n0) * c;
        channel_sums(xp + n * c * plane, channels_last, c, plane, m);
        for (int64_t ch = 0; ch < c; ++ch) m[ch] *= inv_count;
      }
      matmul(images, mean.data(), c, w1t, hidden.data(), reduced);
      add_bias_act(hidden.data(), images, reduced, b1p, [](const fVec& v) { return at::vec::maximum(v, fVec(0.f)); });
      matmul(images, hidden.data(), reduced, w2t, gate.data(), c);
      const fVec one(1.f);
      add_bias_act(gate.data(), images, c, b2p, [&](const fVec& v) { return one / (one + v.neg().exp()); });
      for (int64_t n = n0; n < n1; ++n)
        squeeze_excite_image(xp + n * c * plane, channels_last, c, plane, gate.data() + (n - n0) * c,
                             op + n * c * plane);
    });
  });
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace shvit_cpu
