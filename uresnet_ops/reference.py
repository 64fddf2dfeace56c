"""The ground truth: each op as its reference chain, the plain ``torch.nn.functional`` calls it
means (docs/design.md §3.1-§3.3). Every backend is tested against these functions (in float64).
The backend named "reference" runs the same chain at the op's schema (each op file's "reference
backend" section: it also returns the statistics it normalised with, and has a backward by
ATen's formulas); "reference" means this chain throughout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import apply_activation, parse_activation


def pixel_shuffle_bn(x, upscale_factor, weight=None, bias=None, running_mean=None, running_var=None,
                     training=True, momentum=0.1, eps=1e-5, activation="relu"):
    name, slope = parse_activation(activation, "reference.pixel_shuffle_bn")
    y = F.batch_norm(F.pixel_shuffle(x, upscale_factor), running_mean, running_var, weight, bias,
                     training, momentum, eps)
    return apply_activation(y, name, slope)


def shuffle_upsample(x, dw_weight, pw_weight, pw_bias=None, bn_weight=None, bn_bias=None,
                     running_mean=None, running_var=None, training=True, momentum=0.1, eps=1e-5,
                     scale_factor=2, mode="nearest", shuffle_groups=1, activation="relu"):
    name, slope = parse_activation(activation, "reference.shuffle_upsample")
    y = upsample_conv3x3(x, dw_weight, scale_factor, mode)
    y = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    y = F.channel_shuffle(apply_activation(y, name, slope), shuffle_groups)
    return y if pw_weight is None else F.conv2d(y, pw_weight, pw_bias)


def multi_dilation_conv2d(x, weights, dilations, biases=None, activation="none"):
    name, slope = parse_activation(activation, "reference.multi_dilation_conv2d")
    biases = [None] * len(weights) if biases is None else biases
    return torch.cat([apply_activation(F.conv2d(x, w, b, padding=d * (w.shape[-1] - 1) // 2, dilation=d), name, slope)
                      for w, b, d in zip(weights, biases, dilations)], dim=1)


def upsample_conv3x3(x, dw_weight, scale_factor, mode):
    """The first half of shuffle_upsample: upsample, then the depthwise/grouped 3x3 conv."""
    up = F.interpolate(x, scale_factor=scale_factor, mode=mode,
                       align_corners=False if mode == "bilinear" else None)
    return F.conv2d(up, dw_weight, padding=1, groups=x.shape[1] // dw_weight.shape[1])
