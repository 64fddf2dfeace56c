// uresnet_ops::shuffle_upsample, the native side: the schemas of its stage kernel ops and their
// argument checks, shared by csrc/cpu/shuffle_upsample.cpp and csrc/cuda/shuffle_upsample.cu.
// The kernels are the first half of the EUCB block, conv3x3_grouped(upsample(x)), with the
// upsample fused into the convolution; uresnet_ops/shuffle_upsample.py composes the rest
// (BatchNorm folding, channel shuffle, the 1x1 conv). docs/design.md §3.2.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

#include "common.h"

namespace uresnet {

// ---- schemas ------------------------------------------------------------------------------
// csrc/ops.cpp defines the kernel ops from these. They are stages of the public op, not the op
// itself, so their arguments are its own only in part; tests/test_schemas.py checks that an
// argument they share by name with uresnet_ops::shuffle_upsample(_backward) has its type.

// (out, mean, var): out = act(conv3x3_grouped(upsample(x), weight) + bias) and empty mean/var;
// with stats, only the BatchNorm batch statistics of the conv output and an empty out.
inline constexpr const char* kShuffleUpsampleConvNativeSchema =
    "_shuffle_upsample_conv_native(Tensor x, Tensor weight, Tensor? bias, int scale_factor, str mode, "
    "str activation, float negative_slope, bool stats) -> (Tensor, Tensor, Tensor)";
// (grad_x, grad_weight) of the conv alone.
inline constexpr const char* kShuffleUpsampleConvNativeBackwardSchema =
    "_shuffle_upsample_conv_native_backward(Tensor grad, Tensor x, Tensor weight, int scale_factor, str mode) "
    "-> (Tensor, Tensor)";
// The backward through BatchNorm + activation with the conv output recomputed from x: pass 1
// sums BatchNorm's two per-channel reductions (and writes y if asked), pass 2 forms the
// conv-output gradient on the fly and runs the transposed conv on it. Pass 1 returns (y, sums),
// pass 2 (grad_x, grad_weight).
inline constexpr const char* kShuffleUpsampleBNSumsNativeSchema =
    "_shuffle_upsample_bn_sums_native(Tensor grad, Tensor x, Tensor weight, Tensor scale, Tensor shift, "
    "Tensor mean, int scale_factor, str mode, str activation, float negative_slope, bool write_y) "
    "-> (Tensor, Tensor)";
inline constexpr const char* kShuffleUpsampleBNBackwardNativeSchema =
    "_shuffle_upsample_bn_backward_native(Tensor grad, Tensor x, Tensor weight, Tensor scale, Tensor shift, "
    "Tensor mean, Tensor centered, Tensor constant, int scale_factor, str mode, str activation, "
    "float negative_slope) -> (Tensor, Tensor)";

// ---- argument checks ----------------------------------------------------------------------

// Checks shared by the CPU and CUDA upsample-conv kernels; returns true for mode "bilinear".
inline bool check_upsample_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t s,
                                c10::string_view mode) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": argument 'x' must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), op, ": argument 'x' must be float32, float64, float16 or "
              "bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) >= 1 &&
                  x.size(1) % weight.size(1) == 0 && weight.size(2) == 3 && weight.size(3) == 3,
              op, ": argument 'weight' must have shape (C, C/groups, 3, 3) with C = ", x.size(1), ", got ",
              weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == stat_dtype(x) && weight.device() == x.device(), op,
              ": argument 'weight' must be ", stat_dtype(x), " on ", x.device(), " (the accumulation type), got ",
              weight.scalar_type(), " on ", weight.device());
  TORCH_CHECK_VALUE(mode == "nearest" || mode == "bilinear", op, ": argument 'mode' must be 'nearest' or 'bilinear', got '",
              mode, "'");
  TORCH_CHECK_VALUE(s >= 1, op, ": argument 'scale_factor' must be >= 1, got ", s);
  TORCH_CHECK_VALUE(mode == "nearest" || s == 2, op, ": mode 'bilinear' supports scale_factor 2 only, got ", s);
  return mode == "bilinear";
}

// A (C,) per-channel vector in the accumulation type, as the bias and the BatchNorm terms are.
inline void check_upsample_conv_vector(const char* op, const char* name, const at::Tensor& v, const at::Tensor& x) {
  check_channel_param(op, name, v, x, x.size(1));
  TORCH_CHECK_TYPE(v.scalar_type() == stat_dtype(x), op, ": argument '", name, "' must be ", stat_dtype(x), ", got ",
              v.scalar_type());
}

inline void check_upsample_conv_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (has(bias)) check_upsample_conv_vector(op, "bias", *bias, x);
}

inline void check_upsample_conv_grad(const char* op, const at::Tensor& grad, const at::Tensor& x, int64_t s) {
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == x.size(0) && grad.size(1) == x.size(1) &&
                  grad.size(2) == x.size(2) * s && grad.size(3) == x.size(3) * s,
              op, ": argument 'grad' must have shape (", x.size(0), ", ", x.size(1), ", ", x.size(2) * s, ", ",
              x.size(3) * s, "), got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type() && grad.device() == x.device(), op,
              ": argument 'grad' must have x's dtype and device (", x.scalar_type(), ", ", x.device(), "), got ",
              grad.scalar_type(), ", ", grad.device());
}

}  // namespace uresnet
