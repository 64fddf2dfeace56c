// Autograd of uresnet_ops::shuffle_upsample where the compiled kernels run it (csrc/routing.h), as
// csrc/autograd/pixel_shuffle_bn.cpp: the forward is the public op one dispatch below autograd, the
// backward the compiled backward op; where Python chose another backend, the call goes to
// uresnet_ops::_shuffle_upsample_python and its Python autograd.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../shuffle_upsample.h"

namespace uresnet {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int kInputs = 15;  // the op's arguments: one gradient (or none) each

class ShuffleUpsampleFunction : public torch::autograd::Function<ShuffleUpsampleFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& dw,
                               const std::optional<at::Tensor>& pw, const std::optional<at::Tensor>& pw_bias,
                               const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool training, double eps, int64_t s,
                               c10::string_view mode, int64_t groups, c10::string_view activation, double slope) {
    static const auto op = op_handle<ShuffleUpsampleSignature>("uresnet_ops::shuffle_upsample");
    at::Tensor out, mean, var;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, mean, var) = op.call(x, dw, pw, pw_bias, bn_weight, bn_bias, running_mean, running_var, training,
                                         eps, s, mode, groups, activation, slope);
    }
    ctx->mark_non_differentiable({mean, var});  // statistics, not a function to differentiate
    ctx->set_materialize_grads(false);          // no zeros for them in the backward
    const at::Tensor none;
    ctx->save_for_backward({x, dw, pw.value_or(none), pw_bias.value_or(none), bn_weight.value_or(none),
                            bn_bias.value_or(none), mean, var});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["scale_factor"] = s;
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["shuffle_groups"] = groups;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = slope;
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<ShuffleUpsampleBackwardSignature>("uresnet_ops::_shuffle_upsample_native_backward");
    if (!grads[0].defined()) return variable_list(kInputs);  // out took no gradient
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor grad_out = grads[0].contiguous(grads[0].suggest_memory_format());
    const auto& d = ctx->saved_data;
    auto grads_ = op.call(grad_out, x, saved[1], optional(saved[2]), optional(saved[3]), optional(saved[4]),
                          optional(saved[5]), saved[6], saved[7], d.at("training").toBool(), d.at("eps").toDouble(),
                          d.at("scale_factor").toInt(), d.at("mode").toStringRef(), d.at("shuffle_groups").toInt(),
                          d.at("activation").toStringRef(), d.at("negative_slope").toDouble());
    record_native_run(OpId::ShuffleUpsample, 1, x.device().type());
    const auto given = [&](int i, const at::Tensor& g) { return saved[i].defined() ? g : at::Tensor(); };
    variable_list result{std::get<0>(grads_), std::get<1>(grads_), given(2, std::get<2>(grads_)),
                         given(3, std::get<3>(grads_)), given(4, std::get<4>(grads_)), given(5, std::get<5>(grads_))};
    result.resize(kInputs);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffle_upsample_autograd(
    const at::Tensor& x, const at::Tensor& dw, const std::optional<at::Tensor>& pw,
    const std::optional<at::Tensor>& pw_bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, int64_t s, c10::string_view mode,
    int64_t groups, c10::string_view activation, double slope) {
  return autograd_route(
      OpId::ShuffleUpsample, x, records_grad(x, dw, pw, pw_bias, bn_weight, bn_bias),
      [&] {
        return shuffle_upsample_python(x, dw, pw, pw_bias, bn_weight, bn_bias, running_mean, running_var, training,
                                       eps, s, mode, groups, activation, slope);
      },
      [&] {
        static const auto op = op_handle<ShuffleUpsampleSignature>("uresnet_ops::shuffle_upsample");
        return op.call(x, dw, pw, pw_bias, bn_weight, bn_bias, running_mean, running_var, training, eps, s, mode,
                       groups, activation, slope);
      },
      [&] {
        const auto out = ShuffleUpsampleFunction::apply(x, dw, pw, pw_bias, bn_weight, bn_bias, running_mean,
                                                        running_var, training, eps, s, mode, groups, activation, slope);
        return std::make_tuple(out[0], out[1], out[2]);
      });
}

}  // namespace
}  // namespace uresnet

TORCH_LIBRARY_IMPL(uresnet_ops, Autograd, m) { m.impl("shuffle_upsample", &uresnet::shuffle_upsample_autograd); }
