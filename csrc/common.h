// Shared by the CPU and CUDA kernels: argument checks, activation parsing, and the per-channel
// scale/shift that folds eval-mode BatchNorm into one multiply-add.
// Light headers only (no <torch/extension.h>, not even <ATen/ATen.h>: the tensor methods plus
// the two per-operator headers used below); they dominate the compile time, nvcc's above all.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/empty.h>
#include <c10/macros/Macros.h>
#include <c10/util/safe_numerics.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace uresnet {

// ---- activations ------------------------------------------------------------------------

enum class Activation : int { None = 0, ReLU = 1, LeakyReLU = 2, SiLU = 3 };

inline Activation parse_activation(c10::string_view name, const char* op) {
  if (name == "none") return Activation::None;
  if (name == "relu") return Activation::ReLU;
  if (name == "leaky_relu") return Activation::LeakyReLU;
  if (name == "silu") return Activation::SiLU;
  TORCH_CHECK(false, op, ": argument 'activation' must be one of 'none', 'relu', 'leaky_relu', 'silu', got '",
              name, "'");
}

// NaN propagates through every branch, as in torch.relu / leaky_relu / silu.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T activate(T v, Activation act, T slope) {
  switch (act) {
    case Activation::ReLU: return v < T(0) ? T(0) : v;
    case Activation::LeakyReLU: return v < T(0) ? v * slope : v;
    case Activation::SiLU: return v / (T(1) + std::exp(-v));
    default: return v;
  }
}

// Compile-time activation, for loops that should vectorise (the CPU kernel).
template <Activation A, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T activate(T v, T slope) {
  return activate<T>(v, A, slope);
}

// ---- argument checks --------------------------------------------------------------------

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// float32 for float32/float16/bfloat16 inputs, float64 for float64 inputs.
inline at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_channel_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& x,
                                int64_t channels) {
  TORCH_CHECK(p.dim() == 1 && p.size(0) == channels, op, ": argument '", name, "' must have shape (", channels,
              ",) (one value per output channel), got shape ", p.sizes());
  TORCH_CHECK(p.device() == x.device(), op, ": argument '", name, "' must be on x's device (", x.device(),
              "), got ", p.device());
  TORCH_CHECK(is_supported_float(p.scalar_type()), op, ": argument '", name,
              "' must be float32, float64, float16 or bfloat16, got ", p.scalar_type());
}

// ---- pixel_shuffle + batch_norm (eval) ----------------------------------------------------

struct PixelShuffleBNPlan {
  at::Tensor out;    // (N, C, H*r, W*r) in x.suggest_memory_format()
  at::Tensor mean;   // copy of running_mean, stat dtype, (C,)
  at::Tensor var;    // copy of running_var, stat dtype, (C,)
  at::Tensor scale;  // weight * rsqrt(var + eps), stat dtype (= opmath type of x), contiguous
  at::Tensor shift;  // bias - mean * scale
  Activation act;
  int64_t channels;    // C (output channels)
  bool channels_last;  // out is laid out NHWC (else NCHW-contiguous)
};

// Checks every argument, allocates the output and computes the per-channel scale/shift with a
// few tiny ATen ops on x's device. The kernels then only do out = act(x * scale + shift) with
// the shuffle folded into the indexing.
inline PixelShuffleBNPlan plan_pixel_shuffle_bn(const at::Tensor& x, int64_t r,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& running_mean,
                                                const std::optional<at::Tensor>& running_var, bool training,
                                                double eps, c10::string_view activation) {
  constexpr const char* op = "uresnet_ops::_pixel_shuffle_bn_native";
  TORCH_CHECK(!training, op, ": training=True is not supported: training-mode kernel not implemented in the "
              "native backend yet (use the reference backend, or training=False)");
  TORCH_CHECK(x.dim() == 4, op, ": argument 'x' must be a 4-D (N, C*r*r, H, W) tensor, got ", x.dim(),
              "-D with shape ", x.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()), op,
              ": argument 'x' must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(r >= 1, op, ": argument 'upscale_factor' must be >= 1, got ", r);
  int64_t rr = 0, out_h = 0, out_w = 0;
  TORCH_CHECK(!c10::mul_overflows(r, r, &rr) && !c10::mul_overflows(x.size(2), r, &out_h) &&
                  !c10::mul_overflows(x.size(3), r, &out_w),
              op, ": argument 'upscale_factor' = ", r, " is too large for x of shape ", x.sizes());
  TORCH_CHECK(x.size(1) % rr == 0, op, ": x.size(1) (", x.size(1), ") must be divisible by upscale_factor**2 (",
              rr, ")");
  const int64_t channels = x.size(1) / rr;
  TORCH_CHECK(running_mean.has_value() && running_mean->defined(), op,
              ": argument 'running_mean' is required in eval mode (training=False), got None");
  TORCH_CHECK(running_var.has_value() && running_var->defined(), op,
              ": argument 'running_var' is required in eval mode (training=False), got None");
  check_channel_param(op, "running_mean", *running_mean, x, channels);
  check_channel_param(op, "running_var", *running_var, x, channels);
  const bool has_weight = weight.has_value() && weight->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_weight) check_channel_param(op, "weight", *weight, x, channels);
  if (has_bias) check_channel_param(op, "bias", *bias, x, channels);

  PixelShuffleBNPlan plan;
  plan.act = parse_activation(activation, op);
  plan.channels = channels;
  const auto stat_opts = x.options().dtype(stat_dtype(x));
  plan.mean = at::empty({channels}, stat_opts).copy_(*running_mean);
  plan.var = at::empty({channels}, stat_opts).copy_(*running_var);
  plan.scale = plan.var.add(eps).rsqrt_();
  if (has_weight) plan.scale.mul_(*weight);
  // shift = bias - mean * scale
  plan.shift = has_bias ? at::addcmul(bias->to(stat_opts.dtype()), plan.mean, plan.scale, /*value=*/-1)
                        : plan.mean.mul(plan.scale).neg_();
  plan.out = at::empty({x.size(0), channels, out_h, out_w}, x.options().memory_format(x.suggest_memory_format()));
  plan.channels_last = !plan.out.is_contiguous();
  return plan;
}

}  // namespace uresnet
