// Torch binding of the CUDA kernels: argument checks (errors name the argument), output and workspace
// allocation, fp32 staging of the small parameters, and the calls into the C launch API on the current
// stream. Each function takes the op schema's arguments in order and returns the op's outputs. Every argument
// is checked before the device guard and the first allocation: on the H200 an argument error raised after
// the guard crashed the process (2026-11-30 and 2026-12-04), where errors raised before it did not.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <string>

#include "shvit_cuda.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

shvit_dtype dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return SHVIT_F32;
    case at::kHalf: return SHVIT_F16;
    case at::kBFloat16: return SHVIT_BF16;
    default: break;
  }
  TORCH_CHECK(false, "shvit cuda: unsupported dtype ", t.scalar_type());
  return SHVIT_F32;
}

void check_cuda(const std::string& op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.is_cuda(), op, ": '", name, "' must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": '", name, "' is on ", t.device(), " but 'x' is on ", x.device());
}

void check_activation(const std::string& op, const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), op, ": 'x' must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": 'x' must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, op, ": 'x' must not be empty, got shape ", x.sizes());
  const auto s = x.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, op,
              ": 'x' must be float32, float16 or bfloat16, got ", s);
}

// An activation-shaped tensor (grad_out, out, residual): same device, shape and dtype as expected.
Tensor like_activation(const std::string& op, const char* name, const Tensor& t, const Tensor& x, at::IntArrayRef shape) {
  check_cuda(op, name, t, x);
  TORCH_CHECK(t.sizes() == shape, op, ": '", name, "' must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), op, ": '", name, "' must be floating point, got ", t.scalar_type());
  return t.scalar_type() == x.scalar_type() ? t : t.to(x.scalar_type());
}

Tensor param_f32(const std::string& op, const char* name, const Tensor& t, const Tensor& x, int64_t numel) {
  check_cuda(op, name, t, x);
  TORCH_CHECK(t.is_floating_point(), op, ": '", name, "' must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, op, ": '", name, "' must have ", numel, " elements, got shape ", t.sizes());
  return t.to(at::kFloat).contiguous().reshape({numel});
}

at::MemoryFormat format_of(const Tensor& x) { return x.suggest_memory_format(); }

Tensor empty_like_format(at::IntArrayRef shape, const Tensor& x) {
  return at::empty(shape, x.options().memory_format(format_of(x)));
}

shvit_view view4(const Tensor& t) {
  return shvit_view{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

void check_launch(const std::string& op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ---------------------------------------------------------------------------------------------------------
// Depthwise 3x3 conv family
// ---------------------------------------------------------------------------------------------------------
struct Dw {
  shvit_dw_shape shape;
  Tensor w32;  // keeps shape.weight alive
  std::vector<int64_t> out_shape;
};

Dw dw_setup(const std::string& op, const Tensor& x, const Tensor& weight, int64_t stride, int64_t padding,
            int64_t groups) {
  check_activation(op, x);
  check_cuda(op, "weight", weight, x);
  const int64_t c = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == c && weight.size(1) == 1 && weight.size(2) == 3 && weight.size(3) == 3,
              op, ": 'weight' must have shape (", c, ", 1, 3, 3) (depthwise 3x3), got ", weight.sizes());
  TORCH_CHECK(groups == c, op, ": 'groups' must equal the channels (", c, ") for the depthwise kernel, got ", groups);
  TORCH_CHECK(padding == 1, op, ": 'padding' must be 1, got ", padding);
  TORCH_CHECK(stride == 1 || stride == 2, op, ": 'stride' must be 1 or 2, got ", stride);
  const int64_t h = x.size(2), w = x.size(3);
  const int64_t oh = (h + 2 - 3) / stride + 1, ow = (w + 2 - 3) / stride + 1;
  TORCH_CHECK(x.size(0) < (1 << 30) && c < (1 << 30) && h < (1 << 30) && w < (1 << 30), op, ": 'x' shape too large");
  Dw d;
  d.w32 = weight.to(at::kFloat).contiguous().reshape({c, 9});
  d.shape = shvit_dw_shape{static_cast<int>(x.size(0)), static_cast<int>(c), static_cast<int>(h), static_cast<int>(w),
                           static_cast<int>(oh), static_cast<int>(ow), static_cast<int>(stride), dtype_of(x),
                           format_of(x) == at::MemoryFormat::ChannelsLast ? 1 : 0, d.w32.data_ptr<float>()};
  d.out_shape = {x.size(0), c, oh, ow};
  return d;
}

Tensor conv_bias_act(const Tensor& x, const Tensor& weight, const OptTensor& bias, int64_t stride, int64_t padding,
                     int64_t groups, bool relu, const OptTensor& residual) {
  const std::string op = "shvit cuda conv_bias_act";
  Dw d = dw_setup(op, x, weight, stride, padding, groups);
  Tensor shift = bias ? param_f32(op, "bias", *bias, x, x.size(1)) : Tensor();
  Tensor res = residual ? like_activation(op, "residual", *residual, x, d.out_shape) : Tensor();
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = empty_like_format(d.out_shape, x);
  check_launch(op, shvit_dw_forward(&d.shape, view4(x), nullptr, bias ? shift.data_ptr<float>() : nullptr,
                                    residual ? view4(res) : shvit_view{}, relu, view4(out), stream()));
  return out;
}

std::tuple<Tensor, Tensor, Tensor> conv_bn_train(const Tensor& x, const Tensor& weight, const Tensor& bn_weight,
                                                 const Tensor& bn_bias, int64_t stride, int64_t padding, int64_t groups,
                                                 double eps, bool relu, const OptTensor& residual) {
  const std::string op = "shvit cuda conv_bn_train";
  Dw d = dw_setup(op, x, weight, stride, padding, groups);
  const int64_t c = x.size(1);
  Tensor gamma = param_f32(op, "bn_weight", bn_weight, x, c), beta = param_f32(op, "bn_bias", bn_bias, x, c);
  Tensor res = residual ? like_activation(op, "residual", *residual, x, d.out_shape) : Tensor();
  const c10::cuda::CUDAGuard guard(x.device());
  auto f32 = x.options().dtype(at::kFloat);
  Tensor partials = at::empty({shvit_dw_stats_workspace(&d.shape)}, f32);
  Tensor mean = at::empty({c}, f32), var = at::empty({c}, f32);
  check_launch(op, shvit_dw_stats(&d.shape, view4(x), partials.data_ptr<float>(), mean.data_ptr<float>(),
                                  var.data_ptr<float>(), stream()));
  Tensor scale = gamma * at::rsqrt(var + eps);
  Tensor shift = beta - mean * scale;
  Tensor out = empty_like_format(d.out_shape, x);
  check_launch(op, shvit_dw_forward(&d.shape, view4(x), scale.data_ptr<float>(), shift.data_ptr<float>(),
                                    residual ? view4(res) : shvit_view{}, relu, view4(out), stream()));
  return {out, mean, var};
}

// Shared by both backwards; bn_* undefined for conv_bias_act. Returns (grad_x, wsum (C, 10), sums (2, C), g).
std::tuple<Tensor, Tensor, Tensor, Tensor> dw_backward(const std::string& op, const Tensor& grad_out_in,
                                                       const Tensor& x, const Tensor& weight, const Tensor& out_in,
                                                       int64_t stride, int64_t padding, int64_t groups, bool relu,
                                                       const Tensor& gamma, const Tensor& mean, const Tensor& var,
                                                       double eps) {
  Dw d = dw_setup(op, x, weight, stride, padding, groups);
  Tensor grad_out = like_activation(op, "grad_out", grad_out_in, x, d.out_shape);
  Tensor out = like_activation(op, "out", out_in, x, d.out_shape);
  const c10::cuda::CUDAGuard guard(x.device());
  auto f32 = x.options().dtype(at::kFloat);
  const int64_t c = x.size(1);
  const bool bn = gamma.defined();
  Tensor g = empty_like_format(d.out_shape, x);
  Tensor grad_x = empty_like_format(x.sizes(), x);
  Tensor wsum = at::empty({c, 10}, f32), sums = at::empty({2, c}, f32);
  Tensor dy = bn ? at::empty({grad_out.numel()}, f32) : Tensor();
  Tensor partials = at::empty({shvit_dw_backward_workspace(&d.shape)}, f32);
  const shvit_dw_bn bnp{bn ? gamma.data_ptr<float>() : nullptr, bn ? mean.data_ptr<float>() : nullptr,
                        bn ? var.data_ptr<float>() : nullptr, static_cast<float>(eps)};
  check_launch(op, shvit_dw_backward(&d.shape, view4(x), view4(grad_out), view4(out), relu, bnp, sums.data_ptr<float>(),
                                     view4(g), bn ? dy.data_ptr<float>() : nullptr, wsum.data_ptr<float>(),
                                     partials.data_ptr<float>(), view4(grad_x), stream()));
  return {grad_x, wsum, sums, g};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bias_act_backward(const Tensor& grad_out, const Tensor& x,
                                                                  const Tensor& weight, const OptTensor& bias,
                                                                  int64_t stride, int64_t padding, int64_t groups,
                                                                  bool relu, const OptTensor& /*residual*/,
                                                                  const Tensor& out) {
  const std::string op = "shvit cuda conv_bias_act_backward";
  auto [grad_x, wsum, sums, g] =
      dw_backward(op, grad_out, x, weight, out, stride, padding, groups, relu, Tensor(), Tensor(), Tensor(), 0.0);
  Tensor grad_w = wsum.narrow(1, 0, 9).reshape(weight.sizes()).to(weight.scalar_type());
  Tensor grad_b = wsum.select(1, 9).to(bias ? bias->scalar_type() : weight.scalar_type());
  return {grad_x, grad_w, grad_b, g};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_train_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& bn_weight, const Tensor& bn_bias,
    const Tensor& mean, const Tensor& var, const Tensor& out, int64_t stride, int64_t padding, int64_t groups,
    double eps, bool relu, bool has_residual, bool input_grad) {
  const std::string op = "shvit cuda conv_bn_train_backward";
  check_activation(op, x);
  const int64_t c = x.size(1);
  Tensor gamma = param_f32(op, "bn_weight", bn_weight, x, c);
  Tensor mean32 = param_f32(op, "mean", mean, x, c), var32 = param_f32(op, "var", var, x, c);
  auto [grad_x, wsum, sums, g] =
      dw_backward(op, grad_out, x, weight, out, stride, padding, groups, relu, gamma, mean32, var32, eps);
  Tensor grad_w = wsum.narrow(1, 0, 9).reshape(weight.sizes()).to(weight.scalar_type());
  Tensor grad_gamma = (sums[1] * at::rsqrt(var32 + eps)).to(bn_weight.scalar_type());
  Tensor grad_beta = sums[0].to(bn_bias.scalar_type());
  // Computed in the same pass as the others; the op's contract is an empty tensor for a gradient not asked for.
  if (!input_grad) grad_x = at::empty({0}, grad_x.options());
  if (!has_residual) g = at::empty({0}, g.options());
  return {grad_x, grad_w, grad_gamma, grad_beta, g};
}

// ---------------------------------------------------------------------------------------------------------
// SHSA
// ---------------------------------------------------------------------------------------------------------
// The kernels address token n = h * W + w as n * token_stride: true for NCHW-contiguous and channels_last.
Tensor token_addressable(const Tensor& t, const Tensor& x) {
  const bool ok = t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.size(3) * t.stride(3);
  return ok ? t : t.contiguous(format_of(x));
}

shvit_view token_view(const Tensor& t) {
  const int64_t ts = t.size(3) == 1 ? t.stride(2) : t.stride(3);
  return shvit_view{t.data_ptr(), t.stride(0), t.stride(1), 0, ts};
}

struct Shsa {
  shvit_shsa_shape shape;
  Tensor x, w32, b32, gw32, gb32;
};

Shsa shsa_setup(const std::string& op, const Tensor& x_in, const Tensor& qkv_weight, int64_t qk_dim, double gn_eps) {
  check_activation(op, x_in);
  check_cuda(op, "qkv_weight", qkv_weight, x_in);
  TORCH_CHECK(qk_dim == SHVIT_SHSA_QK, op, ": 'qk_dim' must be ", SHVIT_SHSA_QK, ", got ", qk_dim);
  TORCH_CHECK(qkv_weight.dim() == 4 && qkv_weight.size(2) == 1 && qkv_weight.size(3) == 1, op,
              ": 'qkv_weight' must have shape (2*qk_dim + P, P, 1, 1), got ", qkv_weight.sizes());
  const int64_t p = qkv_weight.size(1), o = 2 * qk_dim + p;
  TORCH_CHECK(qkv_weight.size(0) == o, op, ": 'qkv_weight' must have shape (", o, ", ", p, ", 1, 1), got ",
              qkv_weight.sizes());
  TORCH_CHECK(p >= 1 && p <= SHVIT_SHSA_MAX_P, op, ": partial dim P = ", p, " must be in [1, ", SHVIT_SHSA_MAX_P, "]");
  TORCH_CHECK(p <= x_in.size(1), op, ": partial dim P = ", p, " exceeds the channels of 'x' (", x_in.size(1), ")");
  const int64_t n = x_in.size(2) * x_in.size(3);
  TORCH_CHECK(x_in.size(0) <= 65535 * 1024 && n < (1 << 30), op, ": 'x' shape ", x_in.sizes(), " is too large");
  Shsa s;
  s.x = token_addressable(x_in, x_in);
  s.w32 = qkv_weight.to(at::kFloat).contiguous().reshape({o, p});
  s.shape = shvit_shsa_shape{static_cast<int>(x_in.size(0)), static_cast<int>(x_in.size(1)), static_cast<int>(p),
                             static_cast<int>(n), dtype_of(x_in), static_cast<float>(gn_eps), s.w32.data_ptr<float>(),
                             nullptr, nullptr, nullptr};
  return s;
}

void set_gn(const std::string& op, Shsa& s, const Tensor& gn_weight, const Tensor& gn_bias) {
  s.gw32 = param_f32(op, "gn_weight", gn_weight, s.x, s.shape.p);
  s.gb32 = param_f32(op, "gn_bias", gn_bias, s.x, s.shape.p);
  s.shape.gn_weight = s.gw32.data_ptr<float>();
  s.shape.gn_bias = s.gb32.data_ptr<float>();
}

Tensor shsa_forward(const std::string& op, Shsa& s, bool train, const Tensor& bn_w, const Tensor& bn_b, double bn_eps,
                    Tensor* mean, Tensor* var) {
  auto f32 = s.x.options().dtype(at::kFloat);
  Tensor ws = at::empty({shvit_shsa_forward_workspace(&s.shape, train)}, f32);
  Tensor out = empty_like_format(s.x.sizes(), s.x);
  check_launch(op, shvit_shsa_forward(&s.shape, token_view(s.x), token_view(out), train,
                                      train ? bn_w.data_ptr<float>() : nullptr, train ? bn_b.data_ptr<float>() : nullptr,
                                      static_cast<float>(bn_eps), train ? mean->data_ptr<float>() : nullptr,
                                      train ? var->data_ptr<float>() : nullptr, ws.data_ptr<float>(), stream()));
  return out;
}

Tensor shsa_fused(const Tensor& x, const Tensor& qkv_weight, const Tensor& qkv_bias, int64_t qk_dim, double gn_eps) {
  const std::string op = "shvit cuda shsa_fused";
  Shsa s = shsa_setup(op, x, qkv_weight, qk_dim, gn_eps);
  s.b32 = param_f32(op, "qkv_bias", qkv_bias, x, qkv_weight.size(0));
  s.shape.qkv_bias = s.b32.data_ptr<float>();
  const c10::cuda::CUDAGuard guard(x.device());
  return shsa_forward(op, s, false, Tensor(), Tensor(), 0.0, nullptr, nullptr);
}

std::tuple<Tensor, Tensor, Tensor> shsa_train(const Tensor& x, const Tensor& gn_weight, const Tensor& gn_bias,
                                              const Tensor& qkv_weight, const Tensor& bn_weight, const Tensor& bn_bias,
                                              int64_t qk_dim, double gn_eps, double bn_eps) {
  const std::string op = "shvit cuda shsa_train";
  Shsa s = shsa_setup(op, x, qkv_weight, qk_dim, gn_eps);
  set_gn(op, s, gn_weight, gn_bias);
  const int64_t o = qkv_weight.size(0);
  Tensor bw = param_f32(op, "bn_weight", bn_weight, x, o), bb = param_f32(op, "bn_bias", bn_bias, x, o);
  const c10::cuda::CUDAGuard guard(x.device());
  auto f32 = x.options().dtype(at::kFloat);
  Tensor mean = at::empty({o}, f32), var = at::empty({o}, f32);
  Tensor out = shsa_forward(op, s, true, bw, bb, bn_eps, &mean, &var);
  return {out, mean, var};
}

// Returns grad_x and the fp32 gradient buffers.
// grad_out and out checked (shsa_activations) before the caller's device guard.
std::pair<Tensor, Tensor> shsa_activations(const std::string& op, const Shsa& s, const Tensor& grad_out,
                                           const Tensor& out) {
  return {token_addressable(like_activation(op, "grad_out", grad_out, s.x, s.x.sizes()), s.x),
          token_addressable(like_activation(op, "out", out, s.x, s.x.sizes()), s.x)};
}

Tensor shsa_backward(const std::string& op, Shsa& s, const Tensor& grad_out, const Tensor& out, bool train,
                     const Tensor& bn_w, const Tensor& bn_b, const Tensor& mean, const Tensor& var, double bn_eps,
                     const shvit_shsa_grads& grads) {
  auto f32 = s.x.options().dtype(at::kFloat);
  Tensor ws = at::empty({shvit_shsa_backward_workspace(&s.shape, train)}, f32);
  Tensor grad_x = empty_like_format(s.x.sizes(), s.x);
  check_launch(op, shvit_shsa_backward(&s.shape, token_view(grad_out), token_view(s.x), token_view(out), train,
                                       train ? bn_w.data_ptr<float>() : nullptr, train ? bn_b.data_ptr<float>() : nullptr,
                                       train ? mean.data_ptr<float>() : nullptr, train ? var.data_ptr<float>() : nullptr,
                                       static_cast<float>(bn_eps), grads, token_view(grad_x), ws.data_ptr<float>(),
                                       stream()));
  return grad_x;
}

std::tuple<Tensor, Tensor, Tensor> shsa_fused_backward(const Tensor& grad_out, const Tensor& x, const Tensor& qkv_weight,
                                                       const Tensor& qkv_bias, const Tensor& out, int64_t qk_dim,
                                                       double gn_eps) {
  const std::string op = "shvit cuda shsa_fused_backward";
  Shsa s = shsa_setup(op, x, qkv_weight, qk_dim, gn_eps);
  const int64_t o = qkv_weight.size(0);
  s.b32 = param_f32(op, "qkv_bias", qkv_bias, x, o);
  s.shape.qkv_bias = s.b32.data_ptr<float>();
  auto [g, y] = shsa_activations(op, s, grad_out, out);
  const c10::cuda::CUDAGuard guard(x.device());
  auto f32 = x.options().dtype(at::kFloat);
  Tensor gw = at::empty({o, s.shape.p}, f32), gb = at::empty({o}, f32);
  shvit_shsa_grads grads{gw.data_ptr<float>(), gb.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr};
  Tensor grad_x = shsa_backward(op, s, g, y, false, Tensor(), Tensor(), Tensor(), Tensor(), 0.0, grads);
  return {grad_x, gw.reshape(qkv_weight.sizes()).to(qkv_weight.scalar_type()), gb.to(qkv_bias.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> shsa_train_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& gn_weight, const Tensor& gn_bias, const Tensor& qkv_weight,
    const Tensor& bn_weight, const Tensor& bn_bias, const Tensor& mean, const Tensor& var, const Tensor& out,
    int64_t qk_dim, double gn_eps, double bn_eps) {
  const std::string op = "shvit cuda shsa_train_backward";
  Shsa s = shsa_setup(op, x, qkv_weight, qk_dim, gn_eps);
  set_gn(op, s, gn_weight, gn_bias);
  const int64_t o = qkv_weight.size(0), p = s.shape.p;
  Tensor bw = param_f32(op, "bn_weight", bn_weight, x, o), bb = param_f32(op, "bn_bias", bn_bias, x, o);
  Tensor m32 = param_f32(op, "mean", mean, x, o), v32 = param_f32(op, "var", var, x, o);
  auto [g, y] = shsa_activations(op, s, grad_out, out);
  const c10::cuda::CUDAGuard guard(x.device());
  auto f32 = x.options().dtype(at::kFloat);
  Tensor gw = at::empty({o, p}, f32), gbw = at::empty({o}, f32), gbb = at::empty({o}, f32);
  Tensor ggw = at::empty({p}, f32), ggb = at::empty({p}, f32);
  shvit_shsa_grads grads{gw.data_ptr<float>(), nullptr, gbw.data_ptr<float>(), gbb.data_ptr<float>(),
                         ggw.data_ptr<float>(), ggb.data_ptr<float>()};
  Tensor grad_x = shsa_backward(op, s, g, y, true, bw, bb, m32, v32, bn_eps, grads);
  return {grad_x,
          ggw.to(gn_weight.scalar_type()),
          ggb.to(gn_bias.scalar_type()),
          gw.reshape(qkv_weight.sizes()).to(qkv_weight.scalar_type()),
          gbw.to(bn_weight.scalar_type()),
          gbb.to(bn_bias.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "shvit_kernels CUDA kernels (depthwise 3x3 Conv+BN, SHSA); arguments follow the shvit:: op schemas";
  m.def("conv_bias_act", &conv_bias_act);
  m.def("conv_bias_act_backward", &conv_bias_act_backward);
  m.def("conv_bn_train", &conv_bn_train);
  m.def("conv_bn_train_backward", &conv_bn_train_backward);
  m.def("shsa_fused", &shsa_fused);
  m.def("shsa_fused_backward", &shsa_fused_backward);
  m.def("shsa_train", &shsa_train);
  m.def("shsa_train_backward", &shsa_train_backward);
}
