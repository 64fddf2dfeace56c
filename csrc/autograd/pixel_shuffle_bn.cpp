// Autograd of uresnet_ops::pixel_shuffle_bn where the compiled kernels run it (csrc/routing.h):
// the forward is the public op one dispatch below autograd (its CPU/CUDA kernel, or its fake
// kernel while torch.compile traces), the backward the compiled backward op. Where Python chose
// another backend, the call goes to uresnet_ops::_pixel_shuffle_bn_python and its Python autograd.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../pixel_shuffle_bn.h"

namespace uresnet {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class PixelShuffleBNFunction : public torch::autograd::Function<PixelShuffleBNFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t r,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool training, double eps,
                               c10::string_view activation, double negative_slope) {
    static const auto op = op_handle<PixelShuffleBNSignature>("uresnet_ops::pixel_shuffle_bn");
    at::Tensor out, mean, var;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, mean, var) =
          op.call(x, r, weight, bias, running_mean, running_var, training, eps, activation, negative_slope);
    }
    ctx->mark_non_differentiable({mean, var});  // statistics, not a function to differentiate
    ctx->set_materialize_grads(false);          // no zeros for them in the backward
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, var});
    ctx->saved_data["r"] = r;
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<PixelShuffleBNBackwardSignature>("uresnet_ops::_pixel_shuffle_bn_native_backward");
    const at::Tensor none;
    if (!grads[0].defined()) return variable_list(10);  // out took no gradient
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
    const at::Tensor grad_out = grads[0].contiguous(grads[0].suggest_memory_format());
    auto [grad_x, grad_weight, grad_bias] =
        op.call(grad_out, x, ctx->saved_data["r"].toInt(), optional(weight), optional(bias), saved[3], saved[4],
                ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(),
                ctx->saved_data["activation"].toStringRef(), ctx->saved_data["negative_slope"].toDouble());
    record_native_run(OpId::PixelShuffleBN, 1, x.device().type());
    return {grad_x, none, weight.defined() ? grad_weight : none, bias.defined() ? grad_bias : none,
            none, none, none, none, none, none};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_bn_autograd(
    const at::Tensor& x, int64_t r, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double eps, c10::string_view activation, double negative_slope) {
  return autograd_route(
      OpId::PixelShuffleBN, x, records_grad(x, weight, bias),
      [&] {
        return pixel_shuffle_bn_python(x, r, weight, bias, running_mean, running_var, training, eps, activation,
                                       negative_slope);
      },
      [&] {
        static const auto op = op_handle<PixelShuffleBNSignature>("uresnet_ops::pixel_shuffle_bn");
        return op.call(x, r, weight, bias, running_mean, running_var, training, eps, activation, negative_slope);
      },
      [&] {
        const auto out = PixelShuffleBNFunction::apply(x, r, weight, bias, running_mean, running_var, training, eps,
                                                       activation, negative_slope);
        return std::make_tuple(out[0], out[1], out[2]);
      });
}

}  // namespace
}  // namespace uresnet

TORCH_LIBRARY_IMPL(uresnet_ops, Autograd, m) { m.impl("pixel_shuffle_bn", &uresnet::pixel_shuffle_bn_autograd); }
