// uresnet_ops::shuffle_upsample, the native side: the schemas of its kernel ops, its argument
// checks, and the composition that makes the op of the stage kernels of csrc/cpu/shuffle_upsample.cpp
// and csrc/cuda/shuffle_upsample.cu (docs/design.md §3.2). The stage kernels are the first half of
// the EUCB block, conv3x3_grouped(upsample(x)), with the upsample fused into the convolution; the
// composition adds the rest: BatchNorm folded into the conv weights, the channel shuffle folded into
// the 1x1 conv's weight columns, the 1x1 conv as one batched GEMM.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/channel_shuffle.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"
#include "pixel_shuffle_bn.h"
#include "routing.h"

namespace uresnet {

// ---- schemas ------------------------------------------------------------------------------
// csrc/ops.cpp defines the kernel ops from these. The op's native twin takes the public op's
// arguments, in its order, and returns what it returns: uresnet_ops/shuffle_upsample.py writes that
// schema again, because the public op must exist without this extension; tests/test_schemas.py
// checks that the two agree. The stage kernels are ops too, so that tests reach each one alone;
// their arguments are the public op's only in part (tests/test_schemas.py checks the types of the
// ones they share by name).

// Returns (out, mean, var): the BatchNorm statistics it normalised with.
inline constexpr const char* kShuffleUpsampleNativeSchema =
    "_shuffle_upsample_native(Tensor x, Tensor dw_weight, Tensor? pw_weight, Tensor? pw_bias, Tensor? bn_weight, "
    "Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, bool training, float eps, int scale_factor, "
    "str mode, int shuffle_groups, str activation, float negative_slope) -> (Tensor, Tensor, Tensor)";
// Returns one gradient per tensor parameter, None ones as their neutral value (pw_weight: an
// empty (0, C, 1, 1) conv).
inline constexpr const char* kShuffleUpsampleNativeBackwardSchema =
    "_shuffle_upsample_native_backward(Tensor grad_out, Tensor x, Tensor dw_weight, Tensor? pw_weight, "
    "Tensor? pw_bias, Tensor? bn_weight, Tensor? bn_bias, Tensor mean, Tensor var, bool training, float eps, "
    "int scale_factor, str mode, int shuffle_groups, str activation, float negative_slope) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)";

// The op names that argument errors start with (as in csrc/pixel_shuffle_bn.h).
inline constexpr char kShuffleUpsample[] = "shuffle_upsample";
inline constexpr char kShuffleUpsampleBackward[] = "shuffle_upsample_backward";
inline constexpr char kShuffleUpsampleNative[] = "uresnet_ops::_shuffle_upsample_native";
inline constexpr char kShuffleUpsampleNativeBackward[] = "uresnet_ops::_shuffle_upsample_native_backward";

// The stage kernels:

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


// ---- the public op's argument checks --------------------------------------------------------
// With the front end's messages (uresnet_ops/shuffle_upsample.py, _common.check_tensor and
// check_batch_norm_args): where the extension is built, the front end leaves these to C++.

// A tensor argument as _common.check_tensor checks it: floating, of x's device (and dtype).
inline void check_tensor_arg(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                             int64_t ndim, bool same_dtype) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": argument '", name,
                   "' must be a floating-point tensor (float32, float64, float16 or bfloat16), got dtype ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(ndim < 0 || t.dim() == ndim, op, ": argument '", name, "' must be ", ndim, "-D, got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": argument '", name, "' is on ", t.device(), " but 'x' is on ",
                    x.device());
  TORCH_CHECK_TYPE(!same_dtype || t.scalar_type() == x.scalar_type(), op, ": argument '", name, "' has dtype ",
                   t.scalar_type(), " but 'x' has ", x.scalar_type());
}

inline void check_vector_arg(const char* op, const char* name, const std::optional<at::Tensor>& t,
                             const at::Tensor& x, int64_t size, bool same_dtype = false) {
  if (!has(t)) return;
  check_tensor_arg(op, name, *t, x, -1, same_dtype);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == size, op, ": argument '", name, "' must have shape (", size,
                    ",), got ", t->sizes());
}

// Checks shared by forward and backward (the op's tensors and configuration).
inline void check_shuffle_upsample_input(const char* op, const at::Tensor& x, const at::Tensor& dw,
                                         const std::optional<at::Tensor>& pw, const std::optional<at::Tensor>& pw_bias,
                                         const std::optional<at::Tensor>& bn_weight,
                                         const std::optional<at::Tensor>& bn_bias, double eps, int64_t s,
                                         c10::string_view mode, int64_t groups, c10::string_view activation) {
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), op,
                   ": argument 'x' must be a floating-point tensor (float32, float64, float16 or bfloat16), got dtype ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": argument 'x' must be 4-D, got shape ", x.sizes());
  const int64_t c = x.size(1);
  check_tensor_arg(op, "dw_weight", dw, x, 4, true);
  TORCH_CHECK_VALUE(dw.size(0) == c && dw.size(2) == 3 && dw.size(3) == 3 && dw.size(1) >= 1 && c % dw.size(1) == 0,
                    op, ": argument 'dw_weight' must have shape (C_in, C_in/groups, 3, 3) with C_in = ", c,
                    " divisible by its second dim, got ", dw.sizes());
  if (has(pw)) {
    check_tensor_arg(op, "pw_weight", *pw, x, 4, true);
    TORCH_CHECK_VALUE(pw->size(1) == c && pw->size(2) == 1 && pw->size(3) == 1, op,
                      ": argument 'pw_weight' must have shape (C_out, ", c, ", 1, 1), got ", pw->sizes());
  }
  TORCH_CHECK_VALUE(has(pw) || !has(pw_bias), op, ": argument 'pw_bias' needs 'pw_weight'");
  if (has(pw)) check_vector_arg(op, "pw_bias", pw_bias, x, pw->size(0), true);
  TORCH_CHECK_VALUE(s >= 1, op, ": argument 'scale_factor' must be a positive int, got ", s);
  TORCH_CHECK_VALUE(mode == "nearest" || mode == "bilinear", op,
                    ": argument 'mode' must be one of ['nearest', 'bilinear'], got '", mode, "'");
  TORCH_CHECK_VALUE(mode == "nearest" || s == 2, op, ": mode 'bilinear' supports scale_factor=2 only, got ", s);
  TORCH_CHECK_VALUE(groups >= 1 && c % groups == 0, op,
                    ": argument 'shuffle_groups' must be a positive divisor of C_in = ", c, ", got ", groups);
  check_vector_arg(op, "bn_weight", bn_weight, x, c);
  check_vector_arg(op, "bn_bias", bn_bias, x, c);
  TORCH_CHECK_VALUE(eps >= 0, op, ": argument 'eps' must be a non-negative float, got ", eps);
  parse_activation(activation, op);
}

// Every check of the forward's arguments.
inline void check_shuffle_upsample_args(const char* op, const at::Tensor& x, const at::Tensor& dw,
                                        const std::optional<at::Tensor>& pw, const std::optional<at::Tensor>& pw_bias,
                                        const std::optional<at::Tensor>& bn_weight,
                                        const std::optional<at::Tensor>& bn_bias,
                                        const std::optional<at::Tensor>& running_mean,
                                        const std::optional<at::Tensor>& running_var, bool training, double eps,
                                        int64_t s, c10::string_view mode, int64_t groups,
                                        c10::string_view activation) {
  check_shuffle_upsample_input(op, x, dw, pw, pw_bias, bn_weight, bn_bias, eps, s, mode, groups, activation);
  const int64_t c = x.size(1);
  check_vector_arg(op, "running_mean", running_mean, x, c);
  check_vector_arg(op, "running_var", running_var, x, c);
  TORCH_CHECK_VALUE(has(running_mean) == has(running_var), op,
                    ": 'running_mean' and 'running_var' must both be given or both be None");
  TORCH_CHECK_VALUE(training || has(running_mean), op,
                    ": eval mode (training=False) needs 'running_mean' and 'running_var'");
  const int64_t count = x.size(0) * x.size(2) * x.size(3) * s * s;
  TORCH_CHECK_VALUE(!training || count != 1, op, ": expected more than 1 value per channel when training, got ",
                    count, " (batch statistics of one value are undefined)");
}

// Every check of the backward's arguments.
inline void check_shuffle_upsample_backward_args(
    const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& dw,
    const std::optional<at::Tensor>& pw, const std::optional<at::Tensor>& pw_bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, double eps, int64_t s, c10::string_view mode, int64_t groups,
    c10::string_view activation) {
  check_shuffle_upsample_input(op, x, dw, pw, pw_bias, bn_weight, bn_bias, eps, s, mode, groups, activation);
  const int64_t c_out = has(pw) ? pw->size(0) : x.size(1);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == c_out &&
                        grad_out.size(2) == x.size(2) * s && grad_out.size(3) == x.size(3) * s,
                    op, ": argument 'grad_out' must have shape (", x.size(0), ", ", c_out, ", ", x.size(2) * s, ", ",
                    x.size(3) * s, "), got ", grad_out.sizes());
  check_tensor_arg(op, "grad_out", grad_out, x, 4, true);
  check_vector_arg(op, "mean", mean, x, x.size(1));
  check_vector_arg(op, "var", var, x, x.size(1));
}

// ---- the composition ----------------------------------------------------------------------
// The op made of one device's stage kernels. The forward runs the conv with BatchNorm folded into
// its weights and a bias (in training after a statistics-only pass: recomputing the conv is
// cheaper than storing it), its epilogue writing the activation; the channel shuffle is folded
// into the 1x1 conv's weight columns and the 1x1 conv runs as one batched GEMM written straight
// into the output. The backward recomputes the conv output from x instead of saving it.

struct ShuffleUpsampleKernels {
  // (x, weight, bias, scale_factor, mode, activation, negative_slope, stats) -> (out, mean, var), as
  // the op _shuffle_upsample_conv_native.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*conv)(const at::Tensor&, const at::Tensor&,
                                                         const std::optional<at::Tensor>&, int64_t, c10::string_view,
                                                         c10::string_view, double, bool);
  // (grad, x, weight, scale_factor, mode) -> (grad_x, grad_weight), as _shuffle_upsample_conv_native_backward.
  std::tuple<at::Tensor, at::Tensor> (*conv_backward)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      int64_t, c10::string_view);
  // CPU: the backward through BatchNorm + activation in two passes that recompute the conv output
  // z from x (_shuffle_upsample_bn_sums_native, _shuffle_upsample_bn_backward_native), so that no
  // tensor of z's size is kept. Without them (CUDA), z is recomputed once and BatchNorm +
  // activation and its backward run as pixel_shuffle_bn's native kernels with upscale factor 1.
  std::tuple<at::Tensor, at::Tensor> (*bn_sums)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                c10::string_view, c10::string_view, double, bool) = nullptr;
  std::tuple<at::Tensor, at::Tensor> (*bn_backward)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&, int64_t, c10::string_view,
                                                    c10::string_view, double) = nullptr;
  // CPU: run the conv + 1x1 GEMM over batch slices of about this many bytes of conv output, so that
  // the intermediate stays in cache and is never allocated at full size; 0: the whole batch.
  int64_t chunk_bytes = 0;
};

// pw as a (C_out, C) matrix acting on the unshuffled channels:
// conv1x1(channel_shuffle(y, groups), pw) == conv1x1(y, result).
inline at::Tensor shuffled_pointwise_weight(const at::Tensor& pw, int64_t groups) {
  return at::channel_shuffle(pw, pw.size(1) / groups).flatten(1);
}

// Batch slices [begin, end) whose conv output (C * H*s * W*s values) is about chunk_bytes each.
inline std::vector<std::pair<int64_t, int64_t>> batch_slices(const at::Tensor& x, int64_t s, int64_t chunk_bytes) {
  const int64_t n = x.size(0);
  if (chunk_bytes <= 0 || n == 0) return {{0, n}};
  const int64_t sample = std::max<int64_t>(x.size(1) * x.size(2) * x.size(3) * s * s * x.element_size(), 1);
  const int64_t step = std::max<int64_t>(1, chunk_bytes / sample);
  std::vector<std::pair<int64_t, int64_t>> slices;
  for (int64_t i = 0; i < n; i += step) slices.emplace_back(i, std::min(i + step, n));
  return slices;
}

// out = conv1x1(y, w, bias) for NCHW-contiguous y as one batched GEMM written straight into out
// (NCHW: (N, C_out, H*W) = w @ y; channels_last: (N, H*W, C_out) = y^T @ w^T).
inline void pointwise_into(const at::Tensor& y, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                           at::Tensor out) {
  const int64_t n = y.size(0), c = y.size(1), hw = y.size(2) * y.size(3), c_out = w.size(0);
  const at::Tensor y3 = y.view({n, c, hw});
  if (out.is_contiguous()) {
    at::Tensor out3 = out.view({n, c_out, hw});
    const at::Tensor w_b = w.expand({n, c_out, c});
    if (has(bias)) at::baddbmm_out(out3, bias->view({1, -1, 1}), w_b, y3);
    else at::bmm_out(out3, w_b, y3);
  } else {
    at::Tensor out3 = out.permute({0, 2, 3, 1}).view({n, hw, c_out});
    const at::Tensor w_t = w.t().expand({n, c, c_out});
    if (has(bias)) at::baddbmm_out(out3, bias->view({1, 1, -1}), y3.mT(), w_t);
    else at::bmm_out(out3, y3.mT(), w_t);
  }
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffle_upsample_fused(
    const ShuffleUpsampleKernels& k, const char* op, const at::Tensor& x, const at::Tensor& dw,
    const std::optional<at::Tensor>& pw, const std::optional<at::Tensor>& pw_bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double eps, int64_t s, c10::string_view mode, int64_t groups, c10::string_view activation, double slope) {
  check_shuffle_upsample_args(op, x, dw, pw, pw_bias, bn_weight, bn_bias, running_mean, running_var, training, eps,
                              s, mode, groups, activation);
  const at::Tensor dw_acc = dw.to(stat_dtype(x));
  at::Tensor mean, var;
  if (training) {
    std::tie(std::ignore, mean, var) = k.conv(x, dw_acc, std::nullopt, s, mode, "none", slope, true);
  } else {
    mean = at::empty({x.size(1)}, dw_acc.options()).copy_(*running_mean);
    var = at::empty({x.size(1)}, dw_acc.options()).copy_(*running_var);
  }
  // BatchNorm folded into the conv: its epilogue writes the activation directly.
  auto [scale, shift] = scale_shift(mean, var, bn_weight, bn_bias, eps);
  const at::Tensor folded = dw_acc.mul(scale.view({-1, 1, 1, 1}));
  const auto fmt = x.suggest_memory_format();
  if (!has(pw)) {
    const at::Tensor y = std::get<0>(k.conv(x, folded, shift, s, mode, activation, slope, false));
    return {at::channel_shuffle(y, groups).contiguous(fmt), mean, var};
  }
  at::Tensor out = at::empty({x.size(0), pw->size(0), x.size(2) * s, x.size(3) * s}, x.options().memory_format(fmt));
  const at::Tensor pw_matrix = shuffled_pointwise_weight(*pw, groups);
  for (const auto& [begin, end] : batch_slices(x, s, k.chunk_bytes)) {
    const at::Tensor y = std::get<0>(k.conv(x.slice(0, begin, end), folded, shift, s, mode, activation, slope, false));
    pointwise_into(y, pw_matrix, pw_bias, out.slice(0, begin, end));
  }
  return {out, mean, var};
}

// The 1x1 conv's side of the backward: the gradient of its (unshuffled) input y, and its weight
// and bias gradients, the weight's accumulated over batch slices of y.
class PointwiseGrads {
 public:
  PointwiseGrads(const at::Tensor& grad_out, const std::optional<at::Tensor>& pw, int64_t groups)
      : grad_out_(grad_out), pw_(has(pw) ? *pw : at::Tensor()), groups_(groups), g3_(grad_out.flatten(2)) {
    if (pw_.defined()) {
      grad_w_ = at::zeros({pw_.size(0), pw_.size(1)},
                          g3_.options().dtype(c10::promoteTypes(g3_.scalar_type(), at::kFloat)));
    }
  }

  // The gradient of y, NCHW-contiguous.
  at::Tensor grad_input(int64_t c) const {
    if (!pw_.defined()) return at::channel_shuffle(grad_out_, c / groups_).contiguous();  // the inverse permutation
    const int64_t n = grad_out_.size(0);
    const at::Tensor w_t = shuffled_pointwise_weight(pw_, groups_).t().contiguous();
    return at::bmm(w_t.expand({n, c, w_t.size(1)}), g3_).view({n, c, grad_out_.size(2), grad_out_.size(3)});
  }

  // grad_w += the sum over samples [begin, end) of grad_out[i] @ y[i]^T: accumulating GEMMs, no
  // (N, C_out, C) intermediate; half: products in the input dtype, the batch sum in float32.
  void add(int64_t begin, int64_t end, const at::Tensor& y) {
    if (!pw_.defined()) return;
    const at::Tensor g3 = g3_.slice(0, begin, end), y3 = y.flatten(2);
    if (g3.scalar_type() == at::kFloat || g3.scalar_type() == at::kDouble) {
      for (int64_t i = 0; i < g3.size(0); ++i) grad_w_.addmm_(g3[i], y3[i].mT());
    } else {
      grad_w_.add_(at::bmm(g3, y3.mT()).sum({0}, false, at::kFloat));
    }
  }

  // (grad_pw, grad_pw_bias); without pw, those of the empty (0, C, 1, 1) conv.
  std::pair<at::Tensor, at::Tensor> result(int64_t c) const {
    if (!pw_.defined()) return {at::zeros({0, c, 1, 1}, grad_out_.options()), at::zeros({0}, grad_out_.options())};
    const at::Tensor grad_pw = at::channel_shuffle(grad_w_.to(pw_.scalar_type()).view_as(pw_), groups_);  // pw's order
    return {grad_pw, grad_out_.sum({0, 2, 3})};
  }

 private:
  at::Tensor grad_out_, pw_;
  int64_t groups_;
  at::Tensor g3_, grad_w_;  // grad_out as (N, C_out, H*W), a view in either layout; grad_pw in float32+
};

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shuffle_upsample_fused_backward(
    const ShuffleUpsampleKernels& k, const char* op, const at::Tensor& grad_out, const at::Tensor& x,
    const at::Tensor& dw, const std::optional<at::Tensor>& pw, const std::optional<at::Tensor>& pw_bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean,
    const at::Tensor& var, bool training, double eps, int64_t s, c10::string_view mode, int64_t groups,
    c10::string_view activation, double slope) {
  check_shuffle_upsample_backward_args(op, grad_out, x, dw, pw, pw_bias, bn_weight, bn_bias, mean, var, eps, s, mode,
                                       groups, activation);
  const int64_t c = x.size(1);
  const auto param_dtype = has(bn_weight) ? bn_weight->scalar_type() : x.scalar_type();
  const auto param_opts = x.options().dtype(param_dtype);
  if (x.numel() == 0) {  // ATen's batch-norm backward divides by zero on an empty batch
    return {at::zeros(x.sizes(), x.options().memory_format(x.suggest_memory_format())), at::zeros_like(dw),
            has(pw) ? at::zeros_like(*pw) : at::zeros({0, c, 1, 1}, x.options()),
            at::zeros({has(pw) ? pw->size(0) : 0}, x.options()), at::zeros({c}, param_opts), at::zeros({c}, param_opts)};
  }
  const at::Tensor dw_acc = dw.to(stat_dtype(x));
  const at::Tensor mu = mean.to(dw_acc.scalar_type()), v = var.to(dw_acc.scalar_type());
  auto [scale, shift] = scale_shift(mu, v, bn_weight, bn_bias, eps);
  PointwiseGrads pointwise(grad_out, pw, groups);
  at::Tensor grad_x, grad_dw, grad_bn_weight, grad_bn_bias;
  if (k.bn_backward != nullptr) {
    // Two passes through BatchNorm, z recomputed from x in each: no tensor of the conv output's
    // size is kept but grad_y.
    const at::Tensor grad_y = pointwise.grad_input(c);
    at::Tensor sums = at::zeros({2, c}, scale.options());
    for (const auto& [begin, end] : batch_slices(x, s, k.chunk_bytes)) {  // y a slice at a time
      auto [y, part_sums] = k.bn_sums(grad_y.slice(0, begin, end), x.slice(0, begin, end), dw_acc, scale, shift, mu,
                                      s, mode, activation, slope, has(pw));
      sums.add_(part_sums);
      pointwise.add(begin, end, y);
    }
    const at::Tensor sum_grad = sums[0], sum_grad_centered = sums[1];
    const at::Tensor invstd = v.add(eps).rsqrt();
    at::Tensor centered, constant;
    if (training) {  // BatchNorm's backward through the batch statistics
      const double count = static_cast<double>(grad_y.numel() / c);
      centered = scale.mul(invstd).mul_(invstd).mul_(sum_grad_centered).mul_(-1.0 / count);
      constant = scale.mul(sum_grad).mul_(-1.0 / count);
    } else {
      centered = at::zeros_like(scale), constant = at::zeros_like(scale);
    }
    std::tie(grad_x, grad_dw) = k.bn_backward(grad_y, x, dw_acc, scale, shift, mu, centered, constant, s, mode,
                                              activation, slope);
    grad_bn_weight = sum_grad_centered.mul(invstd).to(param_dtype);
    grad_bn_bias = sum_grad.to(param_dtype);
  } else {
    static const auto normalize = op_handle<PixelShuffleBNSignature>("uresnet_ops::_pixel_shuffle_bn_native");
    static const auto normalize_backward =
        op_handle<PixelShuffleBNBackwardSignature>("uresnet_ops::_pixel_shuffle_bn_native_backward");
    at::Tensor z = std::get<0>(k.conv(x, dw_acc, std::nullopt, s, mode, "none", slope, false));  // recomputed
    if (has(pw)) {  // y = act(BatchNorm(z)) is needed only for the 1x1 conv's weight gradient
      pointwise.add(0, x.size(0),
                    std::get<0>(normalize.call(z, 1, bn_weight, bn_bias, mu, v, false, eps, activation, slope)));
    }
    at::Tensor grad_y = pointwise.grad_input(c);
    at::Tensor grad_z;
    std::tie(grad_z, grad_bn_weight, grad_bn_bias) =
        normalize_backward.call(grad_y, z, 1, bn_weight, bn_bias, mu, v, training, eps, activation, slope);
    z.reset(), grad_y.reset();  // lower peak memory: freed before the conv backward allocates
    std::tie(grad_x, grad_dw) = k.conv_backward(grad_z.contiguous(), x, dw_acc, s, mode);
  }
  auto [grad_pw, grad_pw_bias] = pointwise.result(c);
  return {grad_x.contiguous(x.suggest_memory_format()), grad_dw.to(dw.scalar_type()), grad_pw, grad_pw_bias,
          grad_bn_weight, grad_bn_bias};
}

// ---- the public ops' CPU/CUDA kernels (csrc/routing.h) ---------------------------------------

using ShuffleUpsampleSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, bool, double, int64_t, c10::string_view, int64_t, c10::string_view, double);
using ShuffleUpsampleBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                                    at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, bool, double, int64_t, c10::string_view, int64_t, c10::string_view, double);

// uresnet_ops::shuffle_upsample where Python chose another backend, as pixel_shuffle_bn_python:
// the arguments checked as the compiled composition checks them, then the backend registry.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffle_upsample_python(
    const at::Tensor& x, const at::Tensor& dw, const std::optional<at::Tensor>& pw,
    const std::optional<at::Tensor>& pw_bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, int64_t s, c10::string_view mode,
    int64_t groups, c10::string_view activation, double slope) {
  if (!traced(x)) {
    check_shuffle_upsample_args(kShuffleUpsample, x, dw, pw, pw_bias, bn_weight, bn_bias, running_mean, running_var,
                                training, eps, s, mode, groups, activation);
  }
  static const auto python = op_handle<ShuffleUpsampleSignature>("uresnet_ops::_shuffle_upsample_python");
  return python.call(x, dw, pw, pw_bias, bn_weight, bn_bias, running_mean, running_var, training, eps, s, mode, groups,
                     activation, slope);
}

// uresnet_ops::shuffle_upsample on one device: `native` (that device's composition, checking with
// the public op's name) or, where Python chose another backend, the backend registry.
template <ShuffleUpsampleSignature* native>
std::tuple<at::Tensor, at::Tensor, at::Tensor> shuffle_upsample_routed(
    const at::Tensor& x, const at::Tensor& dw, const std::optional<at::Tensor>& pw,
    const std::optional<at::Tensor>& pw_bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, int64_t s, c10::string_view mode,
    int64_t groups, c10::string_view activation, double slope) {
  if (runs_native(OpId::ShuffleUpsample, x)) {
    auto result = native(x, dw, pw, pw_bias, bn_weight, bn_bias, running_mean, running_var, training, eps, s, mode,
                         groups, activation, slope);
    record_native_run(OpId::ShuffleUpsample, 0, x.device().type());
    return result;
  }
  return shuffle_upsample_python(x, dw, pw, pw_bias, bn_weight, bn_bias, running_mean, running_var, training, eps, s,
                                 mode, groups, activation, slope);
}

// uresnet_ops::shuffle_upsample_backward on one device, as shuffle_upsample_routed.
template <ShuffleUpsampleBackwardSignature* native>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shuffle_upsample_backward_routed(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& dw, const std::optional<at::Tensor>& pw,
    const std::optional<at::Tensor>& pw_bias, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& mean, const at::Tensor& var, bool training,
    double eps, int64_t s, c10::string_view mode, int64_t groups, c10::string_view activation, double slope) {
  if (runs_native(OpId::ShuffleUpsample, x)) {
    auto result = native(grad_out, x, dw, pw, pw_bias, bn_weight, bn_bias, mean, var, training, eps, s, mode, groups,
                         activation, slope);
    record_native_run(OpId::ShuffleUpsample, 1, x.device().type());
    return result;
  }
  check_shuffle_upsample_backward_args(kShuffleUpsampleBackward, grad_out, x, dw, pw, pw_bias, bn_weight, bn_bias,
                                       mean, var, eps, s, mode, groups, activation);
  static const auto python =
      op_handle<ShuffleUpsampleBackwardSignature>("uresnet_ops::_shuffle_upsample_backward_python");
  return python.call(grad_out, x, dw, pw, pw_bias, bn_weight, bn_bias, mean, var, training, eps, s, mode, groups,
                     activation, slope);
}

}  // namespace uresnet
