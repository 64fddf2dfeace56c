"""Channel-shuffle upsampling, the EUCB block, as one op (docs/design.md §3.2).

out = conv1x1(channel_shuffle(act(batch_norm(conv3x3_grouped(upsample(x))))), pw_weight, pw_bias).
``pw_weight=None`` ends the block after the channel shuffle (the inner stages of EUCB*).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
import torch.nn.functional as F

from . import backends
from ._common import (activation_backward, apply_activation, autocast_dtype, batch_norm_backward,
                      batch_norm_forward, check_batch_norm_args, check_momentum, check_tensor, memory_format, normalize,
                      parse_activation, scale_shift, stat_dtype, update_running_stats)
from ._library import (compiled_kernels, define_op, op_to_call, register_autograd, register_fake,
                       register_native_backends)
from .reference import upsample_conv3x3

# --- schema ---------------------------------------------------------------------------------------

OP = "shuffle_upsample"
MODES = ("nearest", "bilinear")
_PARAMS = ("Tensor x, Tensor dw_weight, Tensor? pw_weight, Tensor? pw_bias, Tensor? bn_weight, Tensor? bn_bias")
_CONFIG = ("bool training, float eps, int scale_factor, str mode, int shuffle_groups, str activation, "
           "float negative_slope")
# Returns (out, mean, var): the BatchNorm statistics it normalised with.
define_op(OP, f"({_PARAMS}, Tensor? running_mean, Tensor? running_var, {_CONFIG}) -> (Tensor, Tensor, Tensor)")
_CHECKED_BY_KERNEL = compiled_kernels(OP)
define_op(OP + "_backward", f"(Tensor grad_out, {_PARAMS}, Tensor mean, Tensor var, {_CONFIG}) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


# --- front end ------------------------------------------------------------------------------------

def shuffle_upsample(x, dw_weight, pw_weight, pw_bias=None, bn_weight=None, bn_bias=None,
                     running_mean=None, running_var=None, training=True, momentum=0.1, eps=1e-5,
                     scale_factor=2, mode="nearest", shuffle_groups=1, activation="relu"):
    """``F.conv2d(F.channel_shuffle(act(F.batch_norm(F.conv2d(F.interpolate(x, scale_factor,
    mode), dw_weight, padding=1, groups=C_in // dw_weight.shape[1]), ...)), shuffle_groups),
    pw_weight, pw_bias)`` as one op; running statistics are updated in place."""
    s, g = scale_factor, shuffle_groups
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ValueError(f"{OP}: argument 'scale_factor' must be a positive int, got {s!r}")
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"{OP}: argument 'shuffle_groups' must be a positive int, got {g!r}")
    check_momentum(OP, momentum)
    cast = autocast_dtype(x) if isinstance(x, torch.Tensor) else None
    if cast is not None:  # as F.conv2d under autocast: conv operands in the autocast dtype
        x, dw_weight, pw_weight, pw_bias = (t.to(cast) if isinstance(t, torch.Tensor) else t
                                            for t in (x, dw_weight, pw_weight, pw_bias))
    if not _CHECKED_BY_KERNEL:  # else the op's compiled kernel checks the rest, with the same messages
        _check_args(x, dw_weight, pw_weight, pw_bias, bn_weight, bn_bias, running_mean, running_var, training,
                    eps, s, mode, g)
    act, slope = parse_activation(activation, OP)
    out, mean, var = op_to_call(OP)(
        x, dw_weight, pw_weight, pw_bias, bn_weight, bn_bias, running_mean, running_var,
        bool(training), float(eps), s, mode, g, act, slope)
    if training:
        update_running_stats(running_mean, running_var, mean, var, _count(x, s), momentum)
    return out


def _count(x, s):
    """Values per channel of the BatchNorm: N * H*s * W*s."""
    return x.shape[0] * x.shape[2] * x.shape[3] * s * s


def _check_args(x, dw_weight, pw_weight, pw_bias, bn_weight, bn_bias, running_mean, running_var, training, eps,
                s, mode, g):
    """The tensor and configuration checks, where no compiled kernel makes them
    (csrc/shuffle_upsample.h's check_shuffle_upsample_args, with these messages)."""
    check_tensor(OP, "x", x, ndim=4)
    c_in = x.shape[1]
    check_tensor(OP, "dw_weight", dw_weight, ndim=4, like=x, same_dtype=True)
    if dw_weight.shape[0] != c_in or dw_weight.shape[2:] != (3, 3) or c_in % dw_weight.shape[1]:
        raise ValueError(f"{OP}: argument 'dw_weight' must have shape (C_in, C_in/groups, 3, 3) with "
                         f"C_in = {c_in} divisible by its second dim, got {tuple(dw_weight.shape)}")
    check_tensor(OP, "pw_weight", pw_weight, ndim=4, like=x, same_dtype=True, optional=True)
    if pw_weight is not None and (pw_weight.shape[1] != c_in or pw_weight.shape[2:] != (1, 1)):
        raise ValueError(f"{OP}: argument 'pw_weight' must have shape (C_out, {c_in}, 1, 1), "
                         f"got {tuple(pw_weight.shape)}")
    if pw_weight is None and pw_bias is not None:
        raise ValueError(f"{OP}: argument 'pw_bias' needs 'pw_weight'")
    if pw_bias is not None:
        check_tensor(OP, "pw_bias", pw_bias, like=x, same_dtype=True, shape=(pw_weight.shape[0],))
    if mode not in MODES:
        raise ValueError(f"{OP}: argument 'mode' must be one of {list(MODES)}, got {mode!r}")
    if mode == "bilinear" and s != 2:
        raise ValueError(f"{OP}: mode 'bilinear' supports scale_factor=2 only, got {s}")
    if c_in % g:
        raise ValueError(f"{OP}: argument 'shuffle_groups' must be a positive divisor of C_in = {c_in}, got {g!r}")
    check_batch_norm_args(OP, x, c_in, bn_weight, bn_bias, running_mean, running_var, training, _count(x, s),
                          eps, prefix="bn_")


# --- fake kernels ---------------------------------------------------------------------------------

@register_fake(OP)
def _fake(x, dw_weight, pw_weight, pw_bias, bn_weight, bn_bias, running_mean, running_var,
          training, eps, s, mode, groups, activation, negative_slope):
    n, c, h, w = x.shape
    c_out = c if pw_weight is None else pw_weight.shape[0]
    out = x.new_empty((n, c_out, h * s, w * s)).contiguous(memory_format=memory_format(x))
    stats = x.new_empty((c,), dtype=stat_dtype(x))
    return out, stats, torch.empty_like(stats)


@register_fake(OP + "_backward", f"_{OP}_native_backward")  # the compiled autograd's backward
def _fake_backward(grad_out, x, dw_weight, pw_weight, pw_bias, bn_weight, bn_bias, *config):
    return tuple(torch.empty_like(t) for t in _with_defaults(x, dw_weight, pw_weight, pw_bias, bn_weight, bn_bias))


def _with_defaults(x, dw_weight, pw_weight, pw_bias, bn_weight, bn_bias):
    """The parameters with None replaced by their neutral value (ones/zeros), so the backward
    always returns one tensor per parameter. Without pw_weight, pw stands for an empty conv."""
    c = x.shape[1]
    new = lambda fill, *shape: torch.full(shape, fill, dtype=x.dtype, device=x.device)  # noqa: E731
    pw_weight = new(0.0, 0, c, 1, 1) if pw_weight is None else pw_weight
    pw_bias = new(0.0, pw_weight.shape[0]) if pw_bias is None else pw_bias
    bn_weight = new(1.0, c) if bn_weight is None else bn_weight
    bn_bias = new(0.0, c) if bn_bias is None else bn_bias
    return x, dw_weight, pw_weight, pw_bias, bn_weight, bn_bias


if hasattr(torch.ops.uresnet_ops, "_shuffle_upsample_bn_sums_native"):  # the CPU backward's BatchNorm passes
    @torch.library.register_fake("uresnet_ops::_shuffle_upsample_bn_sums_native")
    def _fake_bn_sums(grad, x, weight, scale, shift, mean, s, mode, activation, slope, write_y):
        y = x.new_empty(grad.shape) if write_y else x.new_empty(0)
        return y, scale.new_empty((2, x.shape[1]))

    @torch.library.register_fake("uresnet_ops::_shuffle_upsample_bn_backward_native")
    def _fake_bn_backward(grad, x, weight, *rest):
        return x.new_empty(x.shape), torch.empty_like(weight)


# --- autograd -------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    x, dw, pw, pw_bias, bn_weight, bn_bias, _, _, *config = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)  # statistics, not a function to differentiate
    ctx.save_for_backward(x, dw, pw, pw_bias, bn_weight, bn_bias, mean, var)
    ctx.config = config
    ctx.backend = backends.last_used(OP)  # the one that ran (not one that declined)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    x, dw, pw, pw_bias, bn_weight, bn_bias, mean, var = ctx.saved_tensors
    with backends.use_backend(ctx.backend, OP):
        grads = torch.ops.uresnet_ops.shuffle_upsample_backward(
            grad_out.contiguous(memory_format=memory_format(grad_out)),
            x, dw, pw, pw_bias, bn_weight, bn_bias, mean, var, *ctx.config)
    given = (x, dw, pw, pw_bias, bn_weight, bn_bias)
    return tuple(g if t is not None else None for g, t in zip(grads, given)) + (None,) * 9


register_autograd(OP, _backward, _setup_context)


# --- reference backend ----------------------------------------------------------------------------
# The reference chain (reference.shuffle_upsample) at the op's schema: it returns the statistics
# it normalised with and updates nothing; the backward by ATen's formulas.

def _reference_forward(x, dw, pw, pw_bias, bn_weight, bn_bias, running_mean, running_var,
                       training, eps, s, mode, groups, activation, slope):
    y, mean, var = batch_norm_forward(upsample_conv3x3(x, dw, s, mode), bn_weight, bn_bias,
                                      running_mean, running_var, training, eps)
    y = F.channel_shuffle(apply_activation(y, activation, slope), groups)
    if pw is not None:
        y = F.conv2d(y, pw, pw_bias)
    return y.contiguous(memory_format=memory_format(x)), mean, var


def _conv_backward(grad, x, weight, padding, dilation, groups, bias):
    return torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if bias else None, [1, 1], [padding] * 2, [dilation] * 2,
        False, [0, 0], groups, [True, True, bias])


def _reference_backward(grad_out, x, dw, pw, pw_bias, bn_weight, bn_bias, mean, var,
                        training, eps, s, mode, groups, activation, slope):
    _, dw, pw, pw_bias, _, _ = _with_defaults(x, dw, pw, pw_bias, bn_weight, bn_bias)
    c, conv_groups = x.shape[1], x.shape[1] // dw.shape[1]
    up = F.interpolate(x, scale_factor=s, mode=mode, align_corners=False if mode == "bilinear" else None)
    conv = F.conv2d(up, dw, padding=1, groups=conv_groups)
    pre_activation = normalize(conv, mean, var, bn_weight, bn_bias, eps)
    if pw.shape[0]:
        shuffled = F.channel_shuffle(apply_activation(pre_activation, activation, slope), groups)
        grad_shuffled, grad_pw, grad_pw_bias = _conv_backward(grad_out, shuffled, pw, 0, 1, 1, True)
    else:
        grad_shuffled, grad_pw, grad_pw_bias = grad_out, torch.zeros_like(pw), torch.zeros_like(pw_bias)
    grad = F.channel_shuffle(grad_shuffled, c // groups)  # the inverse permutation
    grad = activation_backward(grad, pre_activation, activation, slope)
    param_dtype = x.dtype if bn_weight is None else bn_weight.dtype
    grad, grad_bn_weight, grad_bn_bias = batch_norm_backward(grad, conv, bn_weight, mean, var, training, eps,
                                                             param_dtype)
    grad_up, grad_dw, _ = _conv_backward(grad, up, dw, 1, 1, conv_groups, False)
    sizes = dict(output_size=list(up.shape[2:]), input_size=list(x.shape), scales_h=float(s), scales_w=float(s))
    if mode == "nearest":
        grad_x = torch.ops.aten.upsample_nearest2d_backward(grad_up, **sizes)
    else:
        grad_x = torch.ops.aten.upsample_bilinear2d_backward(grad_up, align_corners=False, **sizes)
    return (grad_x.contiguous(memory_format=memory_format(x)), grad_dw, grad_pw, grad_pw_bias,
            grad_bn_weight, grad_bn_bias)


backends.register_backend(OP, "reference", ("cpu", "cuda"), _reference_forward, _reference_backward)


# --- native backends (cpu, cuda) ------------------------------------------------------------------
# csrc/cpu/shuffle_upsample.cpp, csrc/cuda/shuffle_upsample.cu: the compiled ops are the backends,
# the composition of csrc/shuffle_upsample.h around their upsample-conv kernels (as below, plus
# on CPU batch slicing and a backward through BatchNorm in two passes that recompute the conv).

register_native_backends(OP)


# --- the Triton backend's composition -------------------------------------------------------------
# The Triton backend is one composition around two kernels of its own (ConvKernels): the 3x3
# grouped conv of the upsampled input with the upsample fused in (the upsampled tensor is never
# written), with an optional bias + activation epilogue and optional per-channel batch
# statistics; and its backward. Around them: BatchNorm folds into the conv weights and a bias; the
# channel shuffle is folded into the 1x1 conv's weight columns and the 1x1 conv runs as one
# batched GEMM; the backward recomputes the conv output from x instead of saving it, so only the
# inputs are kept for the backward. csrc/shuffle_upsample.h is the same composition in C++.

@dataclasses.dataclass(frozen=True)
class ConvKernels:
    # (x, weight, bias, scale_factor, mode, activation, negative_slope, stats) -> (out, mean, var):
    # out = act(conv3x3_grouped(upsample(x), weight) + bias), NCHW-contiguous in x's dtype, weight
    # and bias in the statistics dtype; or, with stats, only the batch mean and biased variance of
    # the conv output per channel (out empty).
    forward: Callable
    # (grad, x, weight, scale_factor, mode) -> (grad_x NCHW-contiguous, grad_weight)
    backward: Callable


def shuffled_pointwise_weight(pw, groups):
    """``pw`` as a (C_out, C) matrix acting on the unshuffled channels:
    ``conv1x1(channel_shuffle(y, groups), pw) == conv1x1(y, result)``."""
    return F.channel_shuffle(pw, pw.shape[1] // groups).flatten(1)


def _pointwise(y, w, bias, out):
    """``out[:] = F.conv2d(y, w[..., None, None], bias)`` for NCHW-contiguous y as one batched
    GEMM written straight into ``out`` (NCHW or channels_last: the GEMM's (N, H*W, C_out) result)."""
    n, c, h, wd = y.shape
    y3, c_out = y.view(n, c, h * wd), w.shape[0]
    if out.is_contiguous():
        w_b, out3 = w.expand(n, -1, c), out.view(n, c_out, h * wd)
        return torch.bmm(w_b, y3, out=out3) if bias is None else torch.baddbmm(bias.view(1, -1, 1), w_b, y3, out=out3)
    w_t, out3 = w.t().expand(n, c, -1), out.permute(0, 2, 3, 1).view(n, h * wd, c_out)
    return torch.bmm(y3.mT, w_t, out=out3) if bias is None else torch.baddbmm(bias.view(1, 1, -1), y3.mT, w_t, out=out3)


def fused_forward(kernels: ConvKernels, x, dw, pw, pw_bias, bn_weight, bn_bias, running_mean, running_var,
                  training, eps, s, mode, groups, activation, slope):
    dw_acc = dw.to(stat_dtype(x))
    if training:  # a statistics-only pass first: recomputing the conv is cheaper than storing it
        _, mean, var = kernels.forward(x, dw_acc, None, s, mode, "none", slope, True)
    else:
        mean, var = running_mean.to(dw_acc.dtype).clone(), running_var.to(dw_acc.dtype).clone()
    # BatchNorm folded into the conv: the epilogue writes the activation directly.
    scale, shift = scale_shift(mean, var, bn_weight, bn_bias, eps)
    y, _, _ = kernels.forward(x, dw_acc * scale.view(-1, 1, 1, 1), shift, s, mode, activation, slope, False)
    if pw is None:
        return F.channel_shuffle(y, groups).contiguous(memory_format=memory_format(x)), mean, var
    n, _, h, w = x.shape
    out = torch.empty((n, pw.shape[0], h * s, w * s), dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    _pointwise(y, shuffled_pointwise_weight(pw, groups), pw_bias, out)
    return out, mean, var


def fused_backward(kernels: ConvKernels, grad_out, x, dw, pw, pw_bias, bn_weight, bn_bias, mean, var,
                   training, eps, s, mode, groups, activation, slope):
    _, dw_, pw_, pw_bias_, bn_weight_, bn_bias_ = _with_defaults(x, dw, pw, pw_bias, bn_weight, bn_bias)
    if x.numel() == 0:  # ATen's batch-norm backward divides by zero on an empty batch
        return (torch.zeros_like(x, memory_format=memory_format(x)), torch.zeros_like(dw_), torch.zeros_like(pw_),
                torch.zeros_like(pw_bias_), torch.zeros_like(bn_weight_), torch.zeros_like(bn_bias_))
    dw_acc = dw.to(stat_dtype(x))
    scale, shift = scale_shift(mean, var, bn_weight, bn_bias, eps)
    pointwise = _PointwiseGrads(grad_out, pw, pw_, groups)
    z, _, _ = kernels.forward(x, dw_acc, None, s, mode, "none", slope, False)  # recomputed, not saved
    pre = torch.addcmul(shift.view(1, -1, 1, 1), z, scale.view(1, -1, 1, 1)).to(z.dtype)
    if pw is not None:  # y = act(BatchNorm(z)) is needed only for the 1x1 conv's weight gradient
        pointwise.add(apply_activation(pre, activation, slope))
    grad_pre = activation_backward(pointwise.grad_input(x.shape[1]), pre, activation, slope)
    del pre  # lower peak memory
    param_dtype = x.dtype if bn_weight is None else bn_weight.dtype
    grad_z, grad_bn_weight, grad_bn_bias = batch_norm_backward(grad_pre, z, bn_weight, mean, var, training, eps,
                                                               param_dtype)
    del z, grad_pre  # lower peak memory: free them before the conv backward allocates
    grad_x, grad_dw = kernels.backward(grad_z.contiguous(), x, dw_acc, s, mode)
    grad_pw, grad_pw_bias = pointwise.result()
    return (grad_x.contiguous(memory_format=memory_format(x)), grad_dw.to(dw.dtype), grad_pw, grad_pw_bias,
            grad_bn_weight, grad_bn_bias)


class _PointwiseGrads:
    """The 1x1 conv's side of the backward: the gradient of its (unshuffled) input y, and its
    weight and bias gradients."""

    def __init__(self, grad_out, pw, pw_or_empty, groups):
        self.grad_out, self.pw, self.pw_or_empty, self.groups = grad_out, pw, pw_or_empty, groups
        self.g3 = grad_out.flatten(2)  # (N, C_out | C, H*W), a view in either layout
        if pw is not None:
            self.grad_w = self.g3.new_zeros(pw.shape[:2], dtype=torch.promote_types(self.g3.dtype, torch.float32))

    def grad_input(self, c):
        """The gradient of y, NCHW-contiguous."""
        if self.pw is None:
            return F.channel_shuffle(self.grad_out, c // self.groups).contiguous()  # the inverse permutation
        n = self.grad_out.shape[0]
        w_t = shuffled_pointwise_weight(self.pw, self.groups).t().contiguous()
        return torch.bmm(w_t.expand(n, c, -1), self.g3).view(n, c, *self.grad_out.shape[2:])

    def add(self, y):
        """grad_w += sum over the batch of grad_out[i] @ y[i]^T: accumulating GEMMs, no (N, C_out,
        C) intermediate; half: products in the input dtype (tensor cores), the batch sum in float32."""
        g3, y3 = self.g3, y.flatten(2)
        if g3.dtype in (torch.float32, torch.float64):
            for g_i, y_i in zip(g3, y3):
                self.grad_w.addmm_(g_i, y_i.mT)
        else:
            self.grad_w += torch.bmm(g3, y3.mT).sum(0, dtype=torch.float32)

    def result(self):
        """(grad_pw, grad_pw_bias); zeros of the empty conv's shape without pw."""
        if self.pw is None:
            return torch.zeros_like(self.pw_or_empty), self.grad_out.new_zeros(0)
        grad_pw = F.channel_shuffle(self.grad_w.to(self.pw.dtype).view_as(self.pw), self.groups)  # pw's column order
        return grad_pw, self.grad_out.sum((0, 2, 3))


def fused_backend(kernels: ConvKernels) -> tuple[Callable, Callable]:
    """The (forward, backward) of a backend made of ``kernels``."""
    return functools.partial(fused_forward, kernels), functools.partial(fused_backward, kernels)


# --- triton backend -------------------------------------------------------------------------------
# Registered by uresnet_ops/triton/shuffle_upsample.py, where Triton imports: its upsample-conv
# kernels in this composition (fused_backend).
