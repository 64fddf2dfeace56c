// Autograd of uresnet_ops::multi_dilation_conv2d where the compiled kernels run it
// (csrc/routing.h), as csrc/autograd/pixel_shuffle_bn.cpp: the forward is the public op one
// dispatch below autograd, the backward the compiled backward op; where Python chose another
// backend, the call goes to uresnet_ops::_multi_dilation_conv2d_python and its Python autograd.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../multi_dilation_conv2d.h"

namespace uresnet {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class MultiDilationConv2dFunction : public torch::autograd::Function<MultiDilationConv2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::IntArrayRef dilations, at::TensorList biases, c10::string_view activation,
                               double negative_slope) {
    static const auto op = op_handle<MultiDilationConv2dSignature>("uresnet_ops::multi_dilation_conv2d");
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = op.call(x, weights, dilations, biases, activation, negative_slope);
    }
    std::vector<at::Tensor> saved{x};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), biases.begin(), biases.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["branches"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["dilations"] = dilations.vec();
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<MultiDilationConv2dBackwardSignature>(
        "uresnet_ops::_multi_dilation_conv2d_native_backward");
    const auto saved = ctx->get_saved_variables();
    const auto branches = ctx->saved_data["branches"].toInt();
    const at::Tensor& x = saved[0];
    const std::vector<at::Tensor> weights(saved.begin() + 1, saved.begin() + 1 + branches);
    const std::vector<at::Tensor> biases(saved.begin() + 1 + branches, saved.end());
    const at::Tensor grad_out = grads[0].contiguous(grads[0].suggest_memory_format());
    auto [grad_x, grad_weights, grad_biases] =
        op.call(grad_out, x, weights, ctx->saved_data["dilations"].toIntVector(), biases,
                ctx->saved_data["activation"].toStringRef(), ctx->saved_data["negative_slope"].toDouble());
    record_native_run(OpId::MultiDilationConv2d, 1, x.device().type());
    // One gradient per forward input, a Tensor[]'s tensors one by one: x, weights, dilations,
    // biases, activation, negative_slope.
    variable_list result{grad_x};
    result.insert(result.end(), grad_weights.begin(), grad_weights.end());
    result.emplace_back();
    result.insert(result.end(), grad_biases.begin(), grad_biases.end());
    result.resize(result.size() + 2);
    return result;
  }
};

at::Tensor multi_dilation_conv2d_autograd(const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations,
                                          at::TensorList biases, c10::string_view activation,
                                          double negative_slope) {
  return autograd_route(
      OpId::MultiDilationConv2d, x, records_grad(x, weights, biases),
      [&] { return multi_dilation_conv2d_python(x, weights, dilations, biases, activation, negative_slope); },
      [&] {
        static const auto op = op_handle<MultiDilationConv2dSignature>("uresnet_ops::multi_dilation_conv2d");
        return op.call(x, weights, dilations, biases, activation, negative_slope);
      },
      [&] { return MultiDilationConv2dFunction::apply(x, weights, dilations, biases, activation, negative_slope)[0]; });
}

}  // namespace
}  // namespace uresnet

TORCH_LIBRARY_IMPL(uresnet_ops, Autograd, m) {
  m.impl("multi_dilation_conv2d", &uresnet::multi_dilation_conv2d_autograd);
}
