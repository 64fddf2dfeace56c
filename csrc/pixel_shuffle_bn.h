// uresnet_ops::pixel_shuffle_bn, the native side: the schemas of its kernel ops and their plan
// (argument checks, output allocation, the per-channel BatchNorm math), shared by
// csrc/cpu/pixel_shuffle_bn.cpp and csrc/cuda/pixel_shuffle_bn.cu.
//   out = act(batch_norm(pixel_shuffle(x, r))); docs/design.md §3.1.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/empty.h>
#include <c10/util/safe_numerics.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>

#include "common.h"
#include "routing.h"

namespace uresnet {

// ---- schemas ------------------------------------------------------------------------------
// csrc/ops.cpp defines the kernel ops from these. They take the public op's arguments, in its
// order, and return what it returns: uresnet_ops/pixel_shuffle_bn.py writes that schema again,
// because the public op must exist without this extension; tests/test_schemas.py checks that
// the two agree.

// Returns (out, mean, var): the statistics it normalised with.
inline constexpr const char* kPixelShuffleBNNativeSchema =
    "_pixel_shuffle_bn_native(Tensor x, int upscale_factor, Tensor? weight, Tensor? bias, "
    "Tensor? running_mean, Tensor? running_var, bool training, float eps, str activation, "
    "float negative_slope) -> (Tensor, Tensor, Tensor)";
// Returns (grad_x, grad_weight, grad_bias).
inline constexpr const char* kPixelShuffleBNNativeBackwardSchema =
    "_pixel_shuffle_bn_native_backward(Tensor grad_out, Tensor x, int upscale_factor, Tensor? weight, "
    "Tensor? bias, Tensor mean, Tensor var, bool training, float eps, str activation, float negative_slope) "
    "-> (Tensor, Tensor, Tensor)";

// The op names that argument errors start with: the public op's, and the kernel op's (called
// directly, past the public op, by the backends that compose it).
inline constexpr char kPixelShuffleBN[] = "pixel_shuffle_bn";
inline constexpr char kPixelShuffleBNBackward[] = "pixel_shuffle_bn_backward";
inline constexpr char kPixelShuffleBNNative[] = "uresnet_ops::_pixel_shuffle_bn_native";
inline constexpr char kPixelShuffleBNNativeBackward[] = "uresnet_ops::_pixel_shuffle_bn_native_backward";

// ---- forward -------------------------------------------------------------------------------

struct PixelShuffleBNPlan {
  at::Tensor out;    // (N, C, H*r, W*r) in x.suggest_memory_format()
  at::Tensor mean;   // stat dtype, (C,): copy of running_mean (eval) or batch mean (training, set by the kernel)
  at::Tensor var;    // stat dtype, (C,): copy of running_var (eval) or biased batch variance (training)
  at::Tensor scale;  // weight * rsqrt(var + eps), stat dtype (= opmath type of x), contiguous
  at::Tensor shift;  // bias - mean * scale
  Activation act;
  int64_t channels;    // C (output channels)
  bool channels_last;  // out is laid out NHWC (else NCHW-contiguous)
};

// Checks shared by forward and backward; returns C (output channels).
inline int64_t check_pixel_shuffle_bn_input(const char* op, const at::Tensor& x, int64_t r) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": argument 'x' must be a 4-D (N, C*r*r, H, W) tensor, got ", x.dim(),
                    "-D with shape ", x.sizes());
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), op,
                   ": argument 'x' must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(r >= 1, op, ": argument 'upscale_factor' must be >= 1, got ", r);
  int64_t rr = 0, out_h = 0, out_w = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(r, r, &rr) && !c10::mul_overflows(x.size(2), r, &out_h) &&
                        !c10::mul_overflows(x.size(3), r, &out_w),
                    op, ": argument 'upscale_factor' = ", r, " is too large for x of shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) % rr == 0, op, ": x has ", x.size(1),
                    " channels, which is not divisible by upscale_factor**2 = ", rr);
  return x.size(1) / rr;
}

// Every check of the forward's arguments; returns C (output channels).
inline int64_t check_pixel_shuffle_bn_args(const char* op, const at::Tensor& x, int64_t r,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& running_mean,
                                           const std::optional<at::Tensor>& running_var, bool training, double eps,
                                           c10::string_view activation) {
  const int64_t channels = check_pixel_shuffle_bn_input(op, x, r);
  TORCH_CHECK_VALUE(eps >= 0, op, ": argument 'eps' must be non-negative, got ", eps);
  TORCH_CHECK_VALUE(has(running_mean) == has(running_var), op,
                    ": 'running_mean' and 'running_var' must both be given or both be None");
  TORCH_CHECK_VALUE(training || has(running_mean), op,
                    ": argument 'running_mean' is required in eval mode (training=False), got None");
  if (has(running_mean)) {
    check_channel_param(op, "running_mean", *running_mean, x, channels);
    check_channel_param(op, "running_var", *running_var, x, channels);
  }
  if (has(weight)) check_channel_param(op, "weight", *weight, x, channels);
  if (has(bias)) check_channel_param(op, "bias", *bias, x, channels);
  const int64_t count = x.numel() / std::max<int64_t>(channels, 1);
  TORCH_CHECK_VALUE(!training || count != 1, op, ": expected more than 1 value per channel when training, got ",
                    count, " (batch statistics of one value are undefined)");
  parse_activation(activation, op);
  return channels;
}

// Per-channel BatchNorm math on C-long tensors. On CPU it runs as plain loops: each ATen op on
// a tiny tensor costs about a microsecond, and the twenty of them were most of a small shape's
// time (1x64x8x8: 24 of the backward's 50 us under the profiler). On CUDA it stays tiny ATen ops.

// Calls f(T{}) with T the C++ type of stat dtype st (float or double).
template <typename F>
C10_ALWAYS_INLINE void with_stat_type(at::ScalarType st, const F& f) {
  if (st == at::kDouble) f(double{});
  else f(float{});
}

// p's values as a contiguous CPU tensor of dtype st (p itself when it already is one).
inline at::Tensor as_stat(const at::Tensor& p, at::ScalarType st) { return p.to(st).contiguous(); }

// scale = weight * rsqrt(var + eps), shift = bias - mean * scale (stat dtype, on x's device).
inline std::pair<at::Tensor, at::Tensor> scale_shift(const at::Tensor& mean, const at::Tensor& var,
                                                     const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& bias, double eps) {
  if (mean.is_cpu()) {
    const auto st = mean.scalar_type();
    const int64_t C = mean.numel();
    const at::Tensor m = as_stat(mean, st), v = as_stat(var, st);
    const at::Tensor w = has(weight) ? as_stat(*weight, st) : at::Tensor();
    const at::Tensor b = has(bias) ? as_stat(*bias, st) : at::Tensor();
    at::Tensor scale = at::empty({C}, m.options()), shift = at::empty({C}, m.options());
    with_stat_type(st, [&](auto zero) {
      using T = decltype(zero);
      const T *mp = m.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
      const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
      const T* bp = b.defined() ? b.const_data_ptr<T>() : nullptr;
      T *sp = scale.mutable_data_ptr<T>(), *hp = shift.mutable_data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) {
        const T sc = T(1) / std::sqrt(vp[c] + static_cast<T>(eps)) * (wp ? wp[c] : T(1));
        sp[c] = sc, hp[c] = (bp ? bp[c] : T(0)) - mp[c] * sc;
      }
    });
    return {scale, shift};
  }
  at::Tensor scale = var.add(eps).rsqrt_();
  if (has(weight)) scale.mul_(*weight);
  at::Tensor shift = has(bias) ? at::addcmul(bias->to(mean.scalar_type()), mean, scale, /*value=*/-1)
                               : mean.mul(scale).neg_();
  return {scale.contiguous(), shift.contiguous()};
}

// Checks every argument and allocates the output. In eval it also computes mean/var (copies of
// the running statistics) and scale/shift; in training the kernel computes the batch statistics
// and then scale_shift. The write kernels only do out = act(x * scale + shift) with the
// shuffle folded into the indexing.
inline PixelShuffleBNPlan plan_pixel_shuffle_bn(const char* op, const at::Tensor& x, int64_t r,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& running_mean,
                                                const std::optional<at::Tensor>& running_var, bool training,
                                                double eps, c10::string_view activation) {
  const int64_t channels =
      check_pixel_shuffle_bn_args(op, x, r, weight, bias, running_mean, running_var, training, eps, activation);

  PixelShuffleBNPlan plan;
  plan.act = parse_activation(activation, op);
  plan.channels = channels;
  const auto stat_opts = x.options().dtype(stat_dtype(x));
  if (!training) {
    plan.mean = at::empty({channels}, stat_opts).copy_(*running_mean);
    plan.var = at::empty({channels}, stat_opts).copy_(*running_var);
    std::tie(plan.scale, plan.shift) = scale_shift(plan.mean, plan.var, weight, bias, eps);
  }
  plan.out = at::empty({x.size(0), channels, x.size(2) * r, x.size(3) * r},
                       x.options().memory_format(x.suggest_memory_format()));
  plan.channels_last = !plan.out.is_contiguous();
  return plan;
}

// ---- backward ------------------------------------------------------------------------------

struct PixelShuffleBNBackwardPlan {
  at::Tensor grad_x;        // like x, in x.suggest_memory_format()
  at::Tensor mean, invstd;  // stat dtype, (C,)
  at::Tensor scale, shift;  // as in the forward: pre-activation = x * scale + shift
  Activation act;
  int64_t channels;
  int64_t count;  // values per channel, N*H*W*r*r
};

// Every check of the backward's arguments; returns C (output channels).
inline int64_t check_pixel_shuffle_bn_backward_args(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                                    int64_t r, const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                    const at::Tensor& var, double eps, c10::string_view activation) {
  const int64_t channels = check_pixel_shuffle_bn_input(op, x, r);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == channels &&
                        grad_out.size(2) == x.size(2) * r && grad_out.size(3) == x.size(3) * r,
                    op, ": argument 'grad_out' must have shape (", x.size(0), ", ", channels, ", ", x.size(2) * r,
                    ", ", x.size(3) * r, "), got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), op, ": argument 'grad_out' must have x's dtype (",
                   x.scalar_type(), "), got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), op, ": argument 'grad_out' must be on x's device (",
                    x.device(), "), got ", grad_out.device());
  TORCH_CHECK_VALUE(eps >= 0, op, ": argument 'eps' must be non-negative, got ", eps);
  check_channel_param(op, "mean", mean, x, channels);
  check_channel_param(op, "var", var, x, channels);
  if (has(weight)) check_channel_param(op, "weight", *weight, x, channels);
  if (has(bias)) check_channel_param(op, "bias", *bias, x, channels);
  parse_activation(activation, op);
  return channels;
}

inline PixelShuffleBNBackwardPlan plan_pixel_shuffle_bn_backward(
    const char* op, const at::Tensor& grad_out, const at::Tensor& x, int64_t r,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& var, double eps, c10::string_view activation) {
  const int64_t channels =
      check_pixel_shuffle_bn_backward_args(op, grad_out, x, r, weight, bias, mean, var, eps, activation);

  PixelShuffleBNBackwardPlan plan;
  plan.act = parse_activation(activation, op);
  plan.channels = channels;
  plan.count = x.numel() / std::max<int64_t>(channels, 1);
  const auto st = stat_dtype(x);
  plan.mean = as_stat(mean, st);
  const at::Tensor v = as_stat(var, st);
  std::tie(plan.scale, plan.shift) = scale_shift(plan.mean, v, weight, bias, eps);
  if (x.is_cpu()) {
    plan.invstd = at::empty({channels}, plan.mean.options());
    with_stat_type(st, [&](auto zero) {
      using T = decltype(zero);
      const T* vp = v.const_data_ptr<T>();
      T* ip = plan.invstd.mutable_data_ptr<T>();
      for (int64_t c = 0; c < channels; ++c) ip[c] = T(1) / std::sqrt(vp[c] + static_cast<T>(eps));
    });
  } else {
    plan.invstd = v.add(eps).rsqrt_();
  }
  plan.grad_x = at::empty(x.sizes(), x.options().memory_format(x.suggest_memory_format()));
  return plan;
}

struct BackwardCoefficients {
  at::Tensor a, b, d;  // grad_x = a * dy' + b * x + d, per channel, stat dtype, contiguous
  at::Tensor grad_weight, grad_bias;
};

// From the per-channel sums s1 = sum(dy'), s2 = sum(dy' * (x - mean)) (stat dtype):
// grad_bias = s1, grad_weight = s2 * invstd, and in training
// grad_x = scale * (dy' - s1/M - xhat * grad_weight/M) folded into a * dy' + b * x + d.
inline BackwardCoefficients backward_coefficients(const PixelShuffleBNBackwardPlan& plan, const at::Tensor& s1,
                                                  const at::Tensor& s2, bool training,
                                                  const std::optional<at::Tensor>& weight, const at::Tensor& x) {
  BackwardCoefficients k;
  const auto param_dtype = has(weight) ? weight->scalar_type() : x.scalar_type();
  const bool batch_stats = training && plan.count > 0;
  const double inv_m = batch_stats ? 1.0 / static_cast<double>(plan.count) : 0.0;
  k.a = plan.scale;
  if (x.is_cpu()) {
    const auto st = plan.mean.scalar_type();
    const int64_t C = plan.channels;
    const at::Tensor t1 = as_stat(s1, st), t2 = as_stat(s2, st);
    at::Tensor gw = at::empty({C}, plan.mean.options()), gb = at::empty({C}, plan.mean.options());
    k.b = at::empty({C}, plan.mean.options()), k.d = at::empty({C}, plan.mean.options());
    with_stat_type(st, [&](auto zero) {
      using T = decltype(zero);
      const T *p1 = t1.const_data_ptr<T>(), *p2 = t2.const_data_ptr<T>();
      const T *mean = plan.mean.const_data_ptr<T>(), *invstd = plan.invstd.const_data_ptr<T>(),
              *scale = plan.scale.const_data_ptr<T>();
      T *gwp = gw.mutable_data_ptr<T>(), *gbp = gb.mutable_data_ptr<T>(), *bp = k.b.mutable_data_ptr<T>(),
        *dp = k.d.mutable_data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) {
        gwp[c] = p2[c] * invstd[c], gbp[c] = p1[c];
        const T k2 = gwp[c] * invstd[c] * static_cast<T>(inv_m);  // invstd * sum(dy' xhat) / M
        bp[c] = -k2 * scale[c];
        dp[c] = (k2 * mean[c] - p1[c] * static_cast<T>(inv_m)) * scale[c];
      }
    });
    k.grad_weight = gw.to(param_dtype), k.grad_bias = gb.to(param_dtype);
    return k;
  }
  const at::Tensor gw = s2.mul(plan.invstd);
  k.grad_weight = gw.to(param_dtype);
  k.grad_bias = s1.to(param_dtype);
  if (batch_stats) {
    const at::Tensor k2 = gw.mul(plan.invstd).mul_(inv_m);  // invstd * sum(dy' xhat) / M
    k.b = k2.mul(plan.scale).neg_().contiguous();
    k.d = k2.mul(plan.mean).sub_(s1.mul(inv_m)).mul_(plan.scale).contiguous();
  } else {
    k.b = plan.scale.mul(0);
    k.d = plan.scale.mul(0);
  }
  return k;
}

// ---- the public ops' CPU/CUDA kernels (csrc/routing.h) ---------------------------------------

using PixelShuffleBNSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double, c10::string_view, double);
using PixelShuffleBNBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, int64_t, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, bool, double, c10::string_view, double);

// uresnet_ops::pixel_shuffle_bn where Python chose another backend: the arguments checked as the
// compiled kernel checks them (the public op's errors, whichever backend runs), then the backend
// registry. Both ways in call it: the Autograd kernel and, below autograd, the device kernels.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_bn_python(
    const at::Tensor& x, int64_t r, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double eps, c10::string_view activation, double negative_slope) {
  if (!traced(x)) {
    check_pixel_shuffle_bn_args(kPixelShuffleBN, x, r, weight, bias, running_mean, running_var, training, eps,
                                activation);
  }
  static const auto python = op_handle<PixelShuffleBNSignature>("uresnet_ops::_pixel_shuffle_bn_python");
  return python.call(x, r, weight, bias, running_mean, running_var, training, eps, activation, negative_slope);
}

// uresnet_ops::pixel_shuffle_bn on one device: `native` (that device's kernel, checking with the
// public op's name) or, where Python chose another backend, the backend registry.
template <PixelShuffleBNSignature* native>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_bn_routed(
    const at::Tensor& x, int64_t r, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double eps, c10::string_view activation, double negative_slope) {
  if (runs_native(OpId::PixelShuffleBN, x)) {
    auto result = native(x, r, weight, bias, running_mean, running_var, training, eps, activation, negative_slope);
    record_native_run(OpId::PixelShuffleBN, 0, x.device().type());
    return result;
  }
  return pixel_shuffle_bn_python(x, r, weight, bias, running_mean, running_var, training, eps, activation,
                                 negative_slope);
}

// uresnet_ops::pixel_shuffle_bn_backward on one device, as pixel_shuffle_bn_routed.
template <PixelShuffleBNBackwardSignature* native>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_bn_backward_routed(
    const at::Tensor& grad_out, const at::Tensor& x, int64_t r, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
    c10::string_view activation, double negative_slope) {
  if (runs_native(OpId::PixelShuffleBN, x)) {
    auto result = native(grad_out, x, r, weight, bias, mean, var, training, eps, activation, negative_slope);
    record_native_run(OpId::PixelShuffleBN, 1, x.device().type());
    return result;
  }
  check_pixel_shuffle_bn_backward_args(kPixelShuffleBNBackward, grad_out, x, r, weight, bias, mean, var, eps,
                                       activation);
  static const auto python =
      op_handle<PixelShuffleBNBackwardSignature>("uresnet_ops::_pixel_shuffle_bn_backward_python");
  return python.call(grad_out, x, r, weight, bias, mean, var, training, eps, activation, negative_slope);
}

}  // namespace uresnet
