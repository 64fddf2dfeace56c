"""Triton kernel of pixel_shuffle_bn: the eval-mode forward (one read, one write).
The training-mode kernels and the backward come with the fused-kernel issue."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backends
from .._common import memory_format
from . import AVAILABLE, DEVICE_TYPES


@triton.jit
def _apply_activation(y, ACTIVATION: tl.constexpr, negative_slope):
    if ACTIVATION == "relu":
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == "leaky_relu":
        y = tl.where(y >= 0, y, y * negative_slope)
    elif ACTIVATION == "silu":
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _eval_forward_kernel(x_ptr, out_ptr, scale_ptr, shift_ptr, total, C, H, W,
                         sxn, sxc, sxh, sxw, son, soc, soh, sow, negative_slope,
                         R: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    # One program per BLOCK output elements, in logical (n, c, oh, ow) order.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    ow = idx % (W * R)
    oh = (idx // (W * R)) % (H * R)
    c = (idx // (W * R * H * R)) % C
    n = idx // (W * R * H * R * C)
    src_c = c * (R * R) + (oh % R) * R + (ow % R)
    x = tl.load(x_ptr + n * sxn + src_c * sxc + (oh // R) * sxh + (ow // R) * sxw, mask=mask, other=0.0)
    y = x.to(tl.float32) * tl.load(scale_ptr + c, mask=mask) + tl.load(shift_ptr + c, mask=mask)
    y = _apply_activation(y, ACTIVATION, negative_slope)
    tl.store(out_ptr + n * son + c * soc + oh * soh + ow * sow, y.to(out_ptr.dtype.element_ty), mask=mask)


def _forward(x, r, weight, bias, running_mean, running_var, training, eps, activation, slope):
    if training or x.dtype == torch.float64:
        return NotImplemented
    n, cr, h, w = x.shape
    c = cr // (r * r)
    mean, var = running_mean.float(), running_var.float()
    scale = torch.rsqrt(var + eps) * (1.0 if weight is None else weight.float())
    shift = (0.0 if bias is None else bias.float()) - mean * scale
    out = torch.empty((n, c, h * r, w * r), dtype=x.dtype, device=x.device,
                      memory_format=memory_format(x))
    total = out.numel()
    if total:
        block = 1024
        _eval_forward_kernel[(triton.cdiv(total, block),)](
            x, out, scale.contiguous(), shift.contiguous(), total, c, h, w, *x.stride(), *out.stride(), slope,
            R=r, ACTIVATION=activation, BLOCK=block)
    return out, mean.clone(), var.clone()


backends.register_backend("pixel_shuffle_bn", "triton", DEVICE_TYPES, _forward, available=AVAILABLE)
