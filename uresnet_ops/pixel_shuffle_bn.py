"""PixelShuffle + BatchNorm (+ activation) as one op (docs/design.md §3.1).

out = act(batch_norm(pixel_shuffle(x, r))). Output channel c reads input channels
[c*r*r, (c+1)*r*r), so kernels compute statistics on x in its own layout and do the shuffle in
the normalising write.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends
from ._common import (activation_backward, apply_activation, batch_norm_backward, batch_norm_forward,
                      check_batch_norm_args, check_momentum, check_tensor, memory_format, normalize, parse_activation,
                      stat_dtype, update_running_stats)
from ._library import (compiled_kernels, define_op, op_to_call, register_autograd, register_fake,
                       register_native_backends)

# --- schema ---------------------------------------------------------------------------------------

OP = "pixel_shuffle_bn"
_ARGS = ("Tensor x, int upscale_factor, Tensor? weight, Tensor? bias, Tensor? running_mean, "
         "Tensor? running_var, bool training, float eps, str activation, float negative_slope")
# Returns (out, mean, var): the statistics it normalised with, for the running-stat update and backward.
define_op(OP, f"({_ARGS}) -> (Tensor, Tensor, Tensor)")
_CHECKED_BY_KERNEL = compiled_kernels(OP)
define_op(OP + "_backward", "(Tensor grad_out, Tensor x, int upscale_factor, Tensor? weight, Tensor? bias, "
          "Tensor mean, Tensor var, bool training, float eps, str activation, float negative_slope) "
          "-> (Tensor, Tensor, Tensor)")


# --- front end ------------------------------------------------------------------------------------

def pixel_shuffle_bn(x, upscale_factor, weight=None, bias=None, running_mean=None, running_var=None,
                     training=True, momentum=0.1, eps=1e-5, activation="relu"):
    """``act(F.batch_norm(F.pixel_shuffle(x, r), running_mean, running_var, weight, bias,
    training, momentum, eps))`` in one pass; running statistics are updated in place."""
    r = upscale_factor
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{OP}: argument 'upscale_factor' must be a positive int, got {r!r}")
    check_momentum(OP, momentum)
    if not _CHECKED_BY_KERNEL:  # else the op's compiled kernel checks the tensors, with the same messages
        check_tensor(OP, "x", x, ndim=4)
        if x.shape[1] % (r * r):
            raise ValueError(f"{OP}: x has {x.shape[1]} channels, which is not divisible by "
                             f"upscale_factor**2 = {r * r}")
        channels = x.shape[1] // (r * r)
        check_batch_norm_args(OP, x, channels, weight, bias, running_mean, running_var, training,
                              _count(x, r), eps)
    act, slope = parse_activation(activation, OP)
    out, mean, var = op_to_call(OP)(
        x, r, weight, bias, running_mean, running_var, bool(training), float(eps), act, slope)
    if training:
        update_running_stats(running_mean, running_var, mean, var, _count(x, r), momentum)
    return out


def _count(x, r):
    """Values per output channel: N * H*r * W*r."""
    return x.shape[0] * x.shape[2] * x.shape[3] * r * r


# --- fake kernels ---------------------------------------------------------------------------------

@register_fake(OP)
def _fake(x, r, weight, bias, running_mean, running_var, training, eps, activation, negative_slope):
    n, c, h, w = x.shape
    out = x.new_empty((n, c // (r * r), h * r, w * r)).contiguous(memory_format=memory_format(x))
    stats = x.new_empty((c // (r * r),), dtype=stat_dtype(x))
    return out, stats, torch.empty_like(stats)


@register_fake(OP + "_backward", f"_{OP}_native_backward")  # the compiled autograd's backward
def _fake_backward(grad_out, x, r, weight, bias, mean, var, training, eps, activation, negative_slope):
    return torch.empty_like(x), _param_like(weight, x, mean.shape[0]), _param_like(bias, x, mean.shape[0])


def _param_like(param, x, channels):
    return torch.empty(channels, dtype=x.dtype, device=x.device) if param is None else torch.empty_like(param)


# --- autograd -------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    x, r, weight, bias, _, _, training, eps, activation, slope = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)  # statistics, not a function to differentiate
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.args = (r, training, eps, activation, slope)
    ctx.backend = backends.last_used(OP)  # the one that ran (not one that declined)


def _backward(ctx, grad_out, _grad_mean, _grad_var):
    x, weight, bias, mean, var = ctx.saved_tensors
    r, training, eps, activation, slope = ctx.args
    with backends.use_backend(ctx.backend, OP):
        grad_x, grad_weight, grad_bias = torch.ops.uresnet_ops.pixel_shuffle_bn_backward(
            grad_out.contiguous(memory_format=memory_format(grad_out)), x, r, weight, bias, mean, var,
            training, eps, activation, slope)
    return (grad_x, None, grad_weight if weight is not None else None,
            grad_bias if bias is not None else None, None, None, None, None, None, None)


register_autograd(OP, _backward, _setup_context)


# --- reference backend ----------------------------------------------------------------------------
# The reference chain (reference.pixel_shuffle_bn) at the op's schema: it returns the statistics
# it normalised with and updates nothing; the backward by ATen's formulas.

def _reference_forward(x, r, weight, bias, running_mean, running_var, training, eps, activation, slope):
    y, mean, var = batch_norm_forward(F.pixel_shuffle(x, r), weight, bias, running_mean, running_var, training, eps)
    return apply_activation(y, activation, slope).contiguous(memory_format=memory_format(x)), mean, var


def _reference_backward(grad_out, x, r, weight, bias, mean, var, training, eps, activation, slope):
    if x.numel() == 0:  # ATen's batch-norm backward divides by zero on an empty batch (SIGFPE)
        channels = mean.shape[0]
        param_dtype = x.dtype if weight is None else weight.dtype
        zeros = torch.zeros(channels, dtype=param_dtype, device=x.device)
        return torch.empty_like(x, memory_format=memory_format(x)), zeros, zeros.clone()
    shuffled = F.pixel_shuffle(x, r)
    if activation != "none":
        pre_activation = normalize(shuffled, mean, var, weight, bias, eps)
        grad_out = activation_backward(grad_out, pre_activation, activation, slope)
    grad_shuffled, grad_weight, grad_bias = batch_norm_backward(
        grad_out, shuffled, weight, mean, var, training, eps, x.dtype if weight is None else weight.dtype)
    grad_x = F.pixel_unshuffle(grad_shuffled, r).contiguous(memory_format=memory_format(x))
    return grad_x, grad_weight, grad_bias


backends.register_backend(OP, "reference", ("cpu", "cuda"), _reference_forward, _reference_backward)


# --- native backends (cpu, cuda) ------------------------------------------------------------------
# csrc/cpu/pixel_shuffle_bn.cpp, csrc/cuda/pixel_shuffle_bn.cu: the compiled ops are the backends.

register_native_backends(OP)


# --- triton backend -------------------------------------------------------------------------------
# Registered by uresnet_ops/triton/pixel_shuffle_bn.py, where Triton imports.
