// What every op's kernels share, CPU and CUDA alike: the activations, the supported dtypes
// and their accumulation ("stat") dtype, the per-channel parameter check. Each op's own checks
// and derived sizes (its "plan") live in csrc/<op>.h, next to its native schemas.
// Light headers only (no <torch/extension.h>, not even <ATen/ATen.h>: the tensor methods plus
// per-operator headers where needed); they dominate the compile time, nvcc's above all.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>

namespace uresnet {

// ---- activations ------------------------------------------------------------------------

enum class Activation : int { None = 0, ReLU = 1, LeakyReLU = 2, SiLU = 3 };

inline Activation parse_activation(c10::string_view name, const char* op) {
  if (name == "none") return Activation::None;
  if (name == "relu") return Activation::ReLU;
  if (name == "leaky_relu") return Activation::LeakyReLU;
  if (name == "silu") return Activation::SiLU;
  TORCH_CHECK_VALUE(false, op, ": argument 'activation' must be one of 'none', 'relu', 'leaky_relu', 'silu', got '",
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

// Gradient through the activation given its input y, as threshold_backward / leaky_relu_backward
// / silu_backward compute it.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T activate_grad(T dy, T y, Activation act, T slope) {
  switch (act) {
    // A select of constants, then a multiply: compiles to a compare mask, not a branch (the sign
    // of y is random, a branch mispredicts half the time).
    case Activation::ReLU: return dy * (y > T(0) ? T(1) : T(0));
    case Activation::LeakyReLU: return dy * (y > T(0) ? T(1) : slope);
    case Activation::SiLU: {
      const T s = T(1) / (T(1) + std::exp(-y));
      return dy * s * (T(1) + y * (T(1) - s));
    }
    default: return dy;
  }
}

template <Activation A, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T activate_grad(T dy, T y, T slope) {
  return activate_grad<T>(dy, y, A, slope);
}

// ---- argument checks --------------------------------------------------------------------

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// float32 for float32/float16/bfloat16 inputs, float64 for float64 inputs.
inline at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The argument checks raise ValueError / TypeError in Python (TORCH_CHECK_VALUE / _TYPE), as the
// Python front ends' own checks do.
inline void check_channel_param(const char* op, const char* name, const at::Tensor& p, const at::Tensor& x,
                                int64_t channels) {
  TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == channels, op, ": argument '", name, "' must have shape (",
                    channels, ",) (one value per output channel), got shape ", p.sizes());
  TORCH_CHECK_VALUE(p.device() == x.device(), op, ": argument '", name, "' must be on x's device (", x.device(),
                    "), got ", p.device());
  TORCH_CHECK_TYPE(is_supported_float(p.scalar_type()), op, ": argument '", name,
                   "' must be float32, float64, float16 or bfloat16, got ", p.scalar_type());
}

// An optional tensor argument that was given (a Tensor? may also arrive as an undefined tensor).
inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace uresnet
