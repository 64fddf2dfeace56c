"""SyncBatchNorm semantics for the BatchNorm inside the fused ops (docs/design.md §3.1): in
training, every process normalises with the statistics of the whole distributed batch.

pixel_shuffle_bn:
Forward: local per-channel (count, mean, M2) -> all_gather -> merged exactly (Chan's formula,
float64) -> the op normalises with those statistics through its eval-mode path (whatever backend
runs it). Backward: the op's eval-mode backward gives dy'*scale and the local sums
sum(dy') / sum(dy'*xhat); the sums are all-reduced and the batch-statistics terms added.
Parameter gradients stay local, as in ``torch.nn.SyncBatchNorm`` (DDP reduces them).

shuffle_upsample: the upsample + 3x3 conv runs through the op itself in eval mode with unit
statistics (exactly the conv, forward and backward), BatchNorm + activation through
``sync_pixel_shuffle_bn`` with factor 1, then channel shuffle and 1x1 conv in ATen. The conv output
and the activation are materialised (the plain chain's memory), where the fused training op
recomputes the conv instead. multi_dilation_conv2d's per-branch BatchNorm already runs as
``pixel_shuffle_bn`` with factor 1 on the op's output (:func:`uresnet_ops.nn.fused_conv_branches`),
which takes the sync path unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._common import memory_format, parse_activation, stat_dtype, update_running_stats


def sync_active(process_group, sync: bool, training: bool) -> bool:
    """Whether a training-mode call should synchronise its statistics."""
    if not training or not (sync or process_group is not None):
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(process_group) > 1


def sync_pixel_shuffle_bn(x, upscale_factor, weight=None, bias=None, running_mean=None, running_var=None,
                          momentum=0.1, eps=1e-5, activation="relu", process_group=None):
    """Training-mode ``pixel_shuffle_bn`` with batch statistics over every process of
    ``process_group`` (default: the world)."""
    act, slope = parse_activation(activation, "pixel_shuffle_bn")
    return _SyncPixelShuffleBN.apply(x, weight, bias, upscale_factor, running_mean, running_var, momentum,
                                     float(eps), act, slope, process_group)


def sync_shuffle_upsample(x, dw_weight, pw_weight, pw_bias=None, bn_weight=None, bn_bias=None, running_mean=None,
                          running_var=None, momentum=0.1, eps=1e-5, scale_factor=2, mode="nearest", shuffle_groups=1,
                          activation="relu", process_group=None):
    """Training-mode ``shuffle_upsample`` with batch statistics over every process of
    ``process_group`` (default: the world)."""
    from .shuffle_upsample import shuffle_upsample
    c = x.shape[1]
    zeros = torch.zeros(c, dtype=stat_dtype(x), device=x.device)
    conv = shuffle_upsample(x, dw_weight, None, running_mean=zeros, running_var=torch.ones_like(zeros),
                            training=False, eps=0.0, scale_factor=scale_factor, mode=mode, activation="none")
    y = sync_pixel_shuffle_bn(conv, 1, bn_weight, bn_bias, running_mean, running_var, momentum, eps, activation,
                              process_group)
    if shuffle_groups > 1:
        y = F.channel_shuffle(y, shuffle_groups)
    return y if pw_weight is None else F.conv2d(y, pw_weight, pw_bias)


def _channel_view(x, r):
    """x as (N, C, r*r, H, W): output channel c's values are [:, c]."""
    n, cr, h, w = x.shape
    return x.reshape(n, cr // (r * r), r * r, h, w)


class _SyncPixelShuffleBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, r, running_mean, running_var, momentum, eps, act, slope, group):
        channels = x.shape[1] // (r * r)
        sd = stat_dtype(x)
        xv = _channel_view(x, r)
        local_count = xv.numel() // max(channels, 1)
        if local_count:
            var, mean = torch.var_mean(xv.to(sd), dim=(0, 2, 3, 4), correction=0)
        else:
            mean = var = x.new_zeros(channels, dtype=sd)
        local = torch.stack([torch.full_like(mean, local_count), mean, var * local_count]).double()
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        counts, means, m2s = torch.stack(gathered).unbind(1)  # each (world, C)
        total = counts.sum(0)
        g_mean = (counts * means).sum(0) / total
        g_var = (m2s.sum(0) + (counts * (means - g_mean) ** 2).sum(0)) / total
        count = int(total[0].item()) if channels else 0
        if count == 1:
            raise ValueError("pixel_shuffle_bn: expected more than 1 value per channel when training, got 1")
        mean, var = (g_mean.to(sd), g_var.to(sd)) if count else (mean.zero_(), var.zero_())
        out, _, _ = torch.ops.uresnet_ops.pixel_shuffle_bn(x, r, weight, bias, mean, var, False, eps, act, slope)
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.args = (r, eps, act, slope, group, count)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, var = ctx.saved_tensors
        r, eps, act, slope, group, count = ctx.args
        # A float32 unit weight keeps the sums in float32 when the module has no affine weight.
        w = weight if weight is not None else torch.ones_like(mean)
        grad_eval, grad_weight, grad_bias = torch.ops.uresnet_ops.pixel_shuffle_bn_backward(
            grad_out.contiguous(memory_format=memory_format(grad_out)), x, r, w, bias, mean, var, False, eps,
            act, slope)
        sums = torch.stack([grad_bias.to(mean.dtype), grad_weight.to(mean.dtype)])  # sum(dy'), sum(dy' xhat)
        dist.all_reduce(sums, group=group)
        invstd = torch.rsqrt(var + eps)
        scale = invstd * w.to(mean.dtype)
        k1, k2 = sums[0] / count, sums[1] * invstd / count
        b, d = -scale * k2, scale * (k2 * mean - k1)  # grad_x = dy' * scale + b * x + d
        shape = (1, -1, 1, 1, 1)
        xv = _channel_view(x, r).to(mean.dtype)
        grad_x = (_channel_view(grad_eval, r).to(mean.dtype) + xv * b.view(shape) + d.view(shape))
        grad_x = grad_x.reshape(x.shape).to(x.dtype).contiguous(memory_format=memory_format(x))
        return (grad_x, grad_weight if weight is not None else None, grad_bias if bias is not None else None,
                None, None, None, None, None, None, None, None)
