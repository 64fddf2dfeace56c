"""Multi-dilation atrous convolution as one op (docs/design.md §3.3).

out = cat([act(conv2d(x, w_b, b_b, padding=d_b * (k_b - 1) // 2, dilation=d_b)) for each branch b]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends, reference
from ._common import activation_backward, autocast_dtype, check_tensor, memory_format, parse_activation
from ._library import define_op, op_to_call, register_autograd, register_fake, register_native_backends

# --- schema ---------------------------------------------------------------------------------------

OP = "multi_dilation_conv2d"
# biases: one per branch, or an empty list for none.
define_op(OP, "(Tensor x, Tensor[] weights, int[] dilations, Tensor[] biases, str activation, "
          "float negative_slope) -> Tensor")
define_op(OP + "_backward", "(Tensor grad_out, Tensor x, Tensor[] weights, int[] dilations, Tensor[] biases, "
          "str activation, float negative_slope) -> (Tensor, Tensor[], Tensor[])")


# --- front end ------------------------------------------------------------------------------------

def multi_dilation_conv2d(x, weights, dilations, biases=None, activation="none"):
    """``torch.cat([act(F.conv2d(x, w, b, padding=d * (w.shape[-1] - 1) // 2, dilation=d))
    for w, b, d in zip(weights, biases, dilations)], dim=1)`` as one op."""
    check_tensor(OP, "x", x, ndim=4)
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError(f"{OP}: argument 'weights' must be a non-empty list of tensors, got {weights!r:.80}")
    if not isinstance(dilations, (list, tuple)) or len(dilations) != len(weights):
        raise ValueError(f"{OP}: argument 'dilations' must be a list with one int per weight "
                         f"({len(weights)}), got {dilations!r}")
    if biases is not None and (not isinstance(biases, (list, tuple)) or len(biases) != len(weights)):
        raise ValueError(f"{OP}: argument 'biases' must be None or a list with one entry per weight "
                         f"({len(weights)}), got {biases!r:.80}")
    cast = autocast_dtype(x)
    if cast is not None:  # as F.conv2d under autocast
        x = x.to(cast)
        weights = [w.to(cast) if isinstance(w, torch.Tensor) else w for w in weights]
        biases = None if biases is None else [b.to(cast) if isinstance(b, torch.Tensor) else b for b in biases]
    for i, (w, d) in enumerate(zip(weights, dilations)):
        check_tensor(OP, f"weights[{i}]", w, ndim=4, like=x, same_dtype=True)
        k = w.shape[-1]
        if w.shape[1] != x.shape[1] or w.shape[2] != k or k % 2 == 0:
            raise ValueError(f"{OP}: argument 'weights[{i}]' must have shape (C_out, {x.shape[1]}, k, k) "
                             f"with odd k, got {tuple(w.shape)}")
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"{OP}: argument 'dilations[{i}]' must be an int >= 1, got {d!r}")
    if biases is not None:
        if all(b is None for b in biases):
            biases = None
        else:
            biases = [torch.zeros(w.shape[0], dtype=x.dtype, device=x.device) if b is None else b
                      for w, b in zip(weights, biases)]
            for i, (w, b) in enumerate(zip(weights, biases)):
                check_tensor(OP, f"biases[{i}]", b, like=x, same_dtype=True, shape=(w.shape[0],))
    act, slope = parse_activation(activation, OP)
    return op_to_call(OP)(x, list(weights), [int(d) for d in dilations], list(biases or []), act, slope)


# --- fake kernels ---------------------------------------------------------------------------------

@register_fake(OP)
def _fake(x, weights, dilations, biases, activation, negative_slope):
    n, _, h, w = x.shape
    out = x.new_empty((n, sum(wt.shape[0] for wt in weights), h, w))
    return out.contiguous(memory_format=memory_format(x))


@register_fake(OP + "_backward", f"_{OP}_native_backward")  # the compiled autograd's backward
def _fake_backward(grad_out, x, weights, dilations, biases, activation, negative_slope):
    return torch.empty_like(x), [torch.empty_like(w) for w in weights], [torch.empty_like(b) for b in biases]


# --- autograd -------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    x, weights, dilations, biases, activation, slope = inputs
    ctx.save_for_backward(x, *weights, *biases)
    ctx.config = (len(weights), dilations, activation, slope)
    ctx.backend = backends.last_used(OP)  # the one that ran (not one that declined)


def _backward(ctx, grad_out):
    x, *params = ctx.saved_tensors
    n, dilations, activation, slope = ctx.config
    with backends.use_backend(ctx.backend, OP):
        grad_x, grad_w, grad_b = torch.ops.uresnet_ops.multi_dilation_conv2d_backward(
            grad_out.contiguous(memory_format=memory_format(grad_out)), x, params[:n], dilations,
            params[n:], activation, slope)
    return grad_x, grad_w, None, grad_b, None, None


register_autograd(OP, _backward, _setup_context)


# --- reference backend ----------------------------------------------------------------------------
# The reference chain (reference.multi_dilation_conv2d) at the op's schema; the backward by
# ATen's formulas.

def _reference_forward(x, weights, dilations, biases, activation, slope):
    out = reference.multi_dilation_conv2d(x, weights, dilations, biases or None, (activation, slope))
    return out.contiguous(memory_format=memory_format(x))


def _reference_backward(grad_out, x, weights, dilations, biases, activation, slope):
    grad_x, grad_weights, grad_biases = torch.zeros_like(x), [], []
    grads = grad_out.split([w.shape[0] for w in weights], dim=1)
    for i, (grad, w, d) in enumerate(zip(grads, weights, dilations)):
        padding = d * (w.shape[-1] - 1) // 2
        if activation != "none":
            pre_activation = F.conv2d(x, w, biases[i] if biases else None, padding=padding, dilation=d)
            grad = activation_backward(grad, pre_activation, activation, slope)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, w, [w.shape[0]] if biases else None, [1, 1], [padding] * 2, [d] * 2,
            False, [0, 0], 1, [True, True, bool(biases)])
        grad_x += gx
        grad_weights.append(gw)
        if biases:
            grad_biases.append(gb)
    return grad_x, grad_weights, grad_biases


backends.register_backend(OP, "reference", ("cpu", "cuda"), _reference_forward, _reference_backward)


# --- native backends (cpu, cuda) ------------------------------------------------------------------
# csrc/cpu/multi_dilation_conv2d.cpp (shifted GEMMs per tap over the valid region) and
# csrc/cuda/multi_dilation_conv2d.cu (implicit GEMMs, WMMA tensor cores for half types): the
# compiled ops are the backends.

# Measured: oneDNN's channels_last convolutions (the reference backend) beat the C++ kernel, so
# by default the cpu backend leaves channels_last input to them; asked for by name, it runs it.
register_native_backends(OP, declines={"cpu": backends.declines_channels_last})


# --- triton backend -------------------------------------------------------------------------------
# Registered by uresnet_ops/triton/multi_dilation_conv2d.py, where Triton imports.
