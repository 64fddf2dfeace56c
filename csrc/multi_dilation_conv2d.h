// uresnet_ops::multi_dilation_conv2d, the native side: the schemas of its kernel ops and the
// branch layout with its argument checks, shared by csrc/cpu/multi_dilation_conv2d.cpp and
// csrc/cuda/multi_dilation_conv2d.cu.
//   out = cat_b act(conv2d(x, w_b, b_b, padding=d_b*(k_b-1)/2, dilation=d_b)); docs/design.md §3.3.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <vector>

#include "common.h"
#include "routing.h"

namespace uresnet {

// ---- schemas ------------------------------------------------------------------------------
// csrc/ops.cpp defines the kernel ops from these. They take the public op's arguments, in its
// order, and return what it returns: uresnet_ops/multi_dilation_conv2d.py writes that schema
// again, because the public op must exist without this extension; tests/test_schemas.py checks
// that the two agree. biases: one per branch, or an empty list for none.

inline constexpr const char* kMultiDilationConv2dNativeSchema =
    "_multi_dilation_conv2d_native(Tensor x, Tensor[] weights, int[] dilations, Tensor[] biases, str activation, "
    "float negative_slope) -> Tensor";
// Returns (grad_x, grad_weights, grad_biases); grad_biases is empty when biases is.
inline constexpr const char* kMultiDilationConv2dNativeBackwardSchema =
    "_multi_dilation_conv2d_native_backward(Tensor grad_out, Tensor x, Tensor[] weights, int[] dilations, "
    "Tensor[] biases, str activation, float negative_slope) -> (Tensor, Tensor[], Tensor[])";

// The op names that argument errors start with (as in csrc/pixel_shuffle_bn.h).
inline constexpr char kMultiDilationConv2d[] = "multi_dilation_conv2d";
inline constexpr char kMultiDilationConv2dBackward[] = "multi_dilation_conv2d_backward";
inline constexpr char kMultiDilationConv2dNative[] = "uresnet_ops::_multi_dilation_conv2d_native";
inline constexpr char kMultiDilationConv2dNativeBackward[] = "uresnet_ops::_multi_dilation_conv2d_native_backward";

// ---- plan ---------------------------------------------------------------------------------

// The branch layout the CPU and CUDA kernels share: branch i writes output channels
// [offsets[i], offsets[i] + widths[i]) of ctot.
struct MultiDilationLayout {
  int64_t cin = 0, ctot = 0;
  std::vector<int64_t> widths, offsets;
  bool has_bias = false;
  Activation act = Activation::None;
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
};

// Checks every argument of a multi_dilation_conv2d kernel (x on `device`) and returns the layout.
inline MultiDilationLayout check_multi_dilation(const char* op, const at::Tensor& x, at::TensorList weights,
                                                at::IntArrayRef dilations, at::TensorList biases,
                                                c10::string_view activation, c10::DeviceType device) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": argument 'x' must be a 4-D (N, C, H, W) tensor, got shape ", x.sizes());
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), op,
              ": argument 'x' must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().type() == device, op, ": argument 'x' must be a ", c10::DeviceTypeName(device),
              " tensor, got ", x.device());
  TORCH_CHECK_VALUE(!weights.empty(), op, ": argument 'weights' must hold at least one branch, got none");
  TORCH_CHECK_VALUE(weights.size() == dilations.size(), op, ": 'weights' has ", weights.size(),
              " branches but 'dilations' has ", dilations.size(), " entries");
  TORCH_CHECK_VALUE(biases.empty() || biases.size() == weights.size(), op, ": 'biases' must be empty or have one entry "
              "per branch (", weights.size(), "), got ", biases.size());
  MultiDilationLayout layout;
  layout.cin = x.size(1);
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    TORCH_CHECK_VALUE(w.dim() == 4 && w.size(1) == layout.cin && w.size(2) == w.size(3) && w.size(2) % 2 == 1, op,
                ": argument 'weights[", i, "]' must have shape (C_out, ", layout.cin, ", k, k) with odd k, got ",
                w.sizes());
    TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type() && w.device() == x.device(), op, ": argument 'weights[", i,
                "]' must have x's dtype and device (", x.scalar_type(), ", ", x.device(), "), got ",
                w.scalar_type(), ", ", w.device());
    TORCH_CHECK_VALUE(dilations[i] >= 1, op, ": argument 'dilations[", i, "]' must be >= 1, got ", dilations[i]);
    if (!biases.empty()) {
      const auto& b = biases[i];
      TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == w.size(0), op, ": argument 'biases[", i, "]' must have shape (",
                  w.size(0), ",), got ", b.sizes());
      TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type() && b.device() == x.device(), op, ": argument 'biases[", i,
                  "]' must have x's dtype and device (", x.scalar_type(), ", ", x.device(), "), got ",
                  b.scalar_type(), ", ", b.device());
    }
    layout.offsets.push_back(layout.ctot);
    layout.widths.push_back(w.size(0));
    layout.ctot += w.size(0);
  }
  layout.has_bias = !biases.empty();
  layout.act = parse_activation(activation, op);
  layout.fmt = x.suggest_memory_format();
  return layout;
}

// ---- the public ops' CPU/CUDA kernels (csrc/routing.h) ---------------------------------------

using MultiDilationConv2dSignature = at::Tensor(const at::Tensor&, at::TensorList, at::IntArrayRef, at::TensorList,
                                                c10::string_view, double);
using MultiDilationConv2dBackwardSignature = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>(
    const at::Tensor&, const at::Tensor&, at::TensorList, at::IntArrayRef, at::TensorList, c10::string_view, double);

// uresnet_ops::multi_dilation_conv2d where Python chose another backend: the backend registry (the
// Python front end checks this op's arguments). Both ways in call it: the Autograd kernel and,
// below autograd, the device kernels.
inline at::Tensor multi_dilation_conv2d_python(const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations,
                                               at::TensorList biases, c10::string_view activation,
                                               double negative_slope) {
  static const auto python = op_handle<MultiDilationConv2dSignature>("uresnet_ops::_multi_dilation_conv2d_python");
  return python.call(x, weights, dilations, biases, activation, negative_slope);
}

// uresnet_ops::multi_dilation_conv2d on one device: `native` (that device's kernel, checking with
// the public op's name) or, where Python chose another backend, the backend registry.
template <MultiDilationConv2dSignature* native>
at::Tensor multi_dilation_conv2d_routed(const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations,
                                        at::TensorList biases, c10::string_view activation, double negative_slope) {
  if (runs_native(OpId::MultiDilationConv2d, x)) {
    auto out = native(x, weights, dilations, biases, activation, negative_slope);
    record_native_run(OpId::MultiDilationConv2d, 0, x.device().type());
    return out;
  }
  return multi_dilation_conv2d_python(x, weights, dilations, biases, activation, negative_slope);
}

// uresnet_ops::multi_dilation_conv2d_backward on one device, as multi_dilation_conv2d_routed.
template <MultiDilationConv2dBackwardSignature* native>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> multi_dilation_conv2d_backward_routed(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations,
    at::TensorList biases, c10::string_view activation, double negative_slope) {
  if (runs_native(OpId::MultiDilationConv2d, x)) {
    auto result = native(grad_out, x, weights, dilations, biases, activation, negative_slope);
    record_native_run(OpId::MultiDilationConv2d, 1, x.device().type());
    return result;
  }
  static const auto python = op_handle<MultiDilationConv2dBackwardSignature>(
      "uresnet_ops::_multi_dilation_conv2d_backward_python");
  return python.call(grad_out, x, weights, dilations, biases, activation, negative_slope);
}

}  // namespace uresnet
