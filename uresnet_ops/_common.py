"""Pieces shared by the op front ends: argument checks, activations, BatchNorm statistics."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

ACTIVATIONS = ("none", "relu", "leaky_relu", "silu")
# The compiled running-statistics update (csrc/running_stats.cpp), or None without the extension.
_UPDATE = getattr(getattr(torch.ops.uresnet_ops, "_update_running_stats", None), "default", None)
DEFAULT_NEGATIVE_SLOPE = 0.01


def parse_activation(activation, op: str) -> tuple[str, float]:
    """``"relu"`` or ``("leaky_relu", 0.2)`` -> (name, negative_slope)."""
    slope = DEFAULT_NEGATIVE_SLOPE
    name = activation
    if isinstance(activation, (tuple, list)):  # ("leaky_relu", slope); other names ignore the slope
        if len(activation) != 2 or isinstance(activation[1], bool) or not isinstance(activation[1], (int, float)):
            raise ValueError(f"{op}: argument 'activation' as a pair must be ('leaky_relu', slope), got {activation!r}")
        name, slope = activation[0], float(activation[1])
    if name is None:
        name = "none"
    if name not in ACTIVATIONS:
        raise ValueError(f"{op}: argument 'activation' must be one of {list(ACTIVATIONS)} "
                         f"or ('leaky_relu', slope), got {activation!r}")
    return name, slope


def apply_activation(y: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    if activation == "silu":
        return F.silu(y)
    return y


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """BatchNorm statistics are float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """ATen's ``suggest_memory_format``: the layout outputs take (channels_last in, out)."""
    return suggest_memory_format(x)


def check_tensor(op: str, name: str, t, *, ndim: int | None = None, like: torch.Tensor | None = None,
                 same_dtype: bool = False, optional: bool = False, shape: tuple | None = None):
    """Raise a clear error unless ``t`` is a floating tensor of the expected rank/shape,
    on ``like``'s device (and of its dtype when ``same_dtype``)."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: argument '{name}' must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: argument '{name}' must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: argument '{name}' must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: argument '{name}' must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{op}: argument '{name}' is on {t.device} but 'x' is on {like.device}")
        if same_dtype and t.dtype != like.dtype:
            raise TypeError(f"{op}: argument '{name}' has dtype {t.dtype} but 'x' has {like.dtype}")


def check_momentum(op: str, momentum) -> None:
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))):
        raise TypeError(f"{op}: argument 'momentum' must be a float or None, got {type(momentum).__name__}")


def check_batch_norm_args(op: str, x, channels: int, weight, bias, running_mean, running_var,
                          training: bool, count: int, eps, prefix: str = "") -> None:
    """Checks shared by the ops with a BatchNorm (the momentum: :func:`check_momentum`);
    ``count`` is values per channel; ``prefix`` names the affine parameters (``bn_`` for
    ``bn_weight``)."""
    for name, t in ((prefix + "weight", weight), (prefix + "bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        check_tensor(op, name, t, like=x, optional=True, shape=(channels,))
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: 'running_mean' and 'running_var' must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError(f"{op}: eval mode (training=False) needs 'running_mean' and 'running_var'")
    if training and count == 1:
        raise ValueError(f"{op}: expected more than 1 value per channel when training, got "
                         f"{count} (batch statistics of one value are undefined)")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{op}: argument 'eps' must be a non-negative float, got {eps!r}")


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float | None) -> None:
    """In-place running-statistics update exactly as ``F.batch_norm`` does it: exponential
    average with ``momentum`` of the batch mean and the unbiased batch variance. One call of the
    compiled ``_update_running_stats`` where the extension is built: at decoder sizes every ATen
    call costs about as much as the fused kernel."""
    if running_mean is None or count == 0:
        return
    momentum = 0.0 if momentum is None else float(momentum)
    if _UPDATE is not None:
        _UPDATE(running_mean, running_var, mean, var, count, momentum)
        return
    with torch.no_grad():
        unbiased = var * (count / max(count - 1, 1))
        torch._foreach_lerp_([running_mean, running_var],
                             [mean.to(running_mean.dtype), unbiased.to(running_var.dtype)], momentum)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype convolutions run in under an active ``torch.autocast`` for x's device."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def batch_norm_forward(y: torch.Tensor, weight, bias, running_mean, running_var, training: bool, eps: float):
    """``F.batch_norm`` that also returns the statistics it normalised with (float32/64):
    batch mean and biased variance in training, the running statistics in eval."""
    dims = [0, 2, 3]
    if training and y.numel() == 0:  # empty batch: nothing to average (and no update follows)
        mean = var = y.new_zeros(y.shape[1], dtype=stat_dtype(y))
    elif training:
        var, mean = torch.var_mean(y.to(stat_dtype(y)), dim=dims, correction=0)
    else:
        mean, var = running_mean.to(stat_dtype(y)).clone(), running_var.to(stat_dtype(y)).clone()
    # Statistics and parameters in the stat dtype: F.batch_norm rejects float32 ones with float64
    # input (and float64 ones with half input), which the native kernels, and so the ops, accept.
    weight, bias = (None if p is None else p.to(mean.dtype) for p in (weight, bias))
    out = F.batch_norm(y, None if training else mean, None if training else var, weight, bias, training, 0.0, eps)
    return out, mean, var


def scale_shift(mean, var, weight, bias, eps: float):
    """BatchNorm as ``y * scale + shift`` per channel, in the statistics' dtype."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(var.dtype)
    shift = -mean * scale
    return scale, shift if bias is None else shift + bias.to(var.dtype)


def normalize(y, mean, var, weight, bias, eps: float):
    """``(y - mean) / sqrt(var + eps) * weight + bias`` per channel, computed in the statistics'
    precision (float32, float64 for float64 input) and returned in y's dtype."""
    shape = (1, -1, 1, 1)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(var.dtype)
    z = (y.to(var.dtype) - mean.view(shape)) * scale.view(shape)
    return (z if bias is None else z + bias.to(var.dtype).view(shape)).to(y.dtype)


def activation_backward(grad, pre_activation, activation: str, negative_slope: float):
    """Gradient through the activation, given its input."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, pre_activation, 0)
    if activation == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(grad, pre_activation, negative_slope, False)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, pre_activation)
    return grad


def batch_norm_backward(grad, y, weight, mean, var, training: bool, eps: float, param_dtype):
    """(grad_y, grad_weight, grad_bias) of BatchNorm with the given statistics, by ATen's
    own formula; in training the statistics are functions of y. Parameter gradients come
    back in ``param_dtype``."""
    invstd = torch.rsqrt(var + eps)
    weight = None if weight is None else weight.to(var.dtype)  # float32 params, as for half inputs
    grad_y, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        grad, y, weight, None if training else mean, None if training else var,
        mean if training else None, invstd if training else None, training, eps, [True, True, True])
    return grad_y, grad_weight.to(param_dtype), grad_bias.to(param_dtype)

