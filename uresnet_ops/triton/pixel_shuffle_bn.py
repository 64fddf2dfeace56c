"""Triton kernels of pixel_shuffle_bn: training statistics (on x in its own layout), the
normalising write with the shuffle folded into its indexing (eval: one read, one write), and the
backward (two per-channel sums, then one elementwise pass). Partial results per program are
merged by a few tiny torch ops (float64), with no host sync."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import memory_format, scale_shift
from ._common import activation_grad, apply_activation, register_triton_backend


@triton.jit
def _program_index(axis: tl.constexpr, WIDE: tl.constexpr):
    # 64-bit index math only where an offset can reach 2**31 (WIDE): on the GPU each 64-bit
    # division or remainder is a call of a ~40-instruction routine, a 32-bit one a few instructions.
    pid = tl.program_id(axis)
    if WIDE:
        pid = pid.to(tl.int64)
    return pid


@triton.jit
def _eval_forward_kernel(x_ptr, out_ptr, scale_ptr, shift_ptr, total, C, H, W,
                         sxn, sxc, sxh, sxw, son, soc, soh, sow, negative_slope,
                         R, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # One program per BLOCK output elements, in logical (n, c, oh, ow) order.
    idx = _program_index(0, WIDE) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    ow = idx % (W * R)
    oh = (idx // (W * R)) % (H * R)
    c = (idx // (W * R * H * R)) % C
    n = idx // (W * R * H * R * C)
    src_c = c * (R * R) + (oh % R) * R + (ow % R)
    x = tl.load(x_ptr + n * sxn + src_c * sxc + (oh // R) * sxh + (ow // R) * sxw, mask=mask, other=0.0)
    y = x.to(tl.float32) * tl.load(scale_ptr + c, mask=mask) + tl.load(shift_ptr + c, mask=mask)
    y = apply_activation(y, ACTIVATION, negative_slope)
    tl.store(out_ptr + n * son + c * soc + oh * soh + ow * sow, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_offsets(c, e, H, W, sxn, sxc, sxh, sxw, son, soc, soh, sow, R):
    # Element e of output channel c: e = ((n * R*R + kk) * H + h) * W + w; offsets into x and grad_out.
    w = e % W
    h = (e // W) % H
    kk = (e // (W * H)) % (R * R)
    n = e // (W * H * R * R)
    x_off = n * sxn + (c * (R * R) + kk) * sxc + h * sxh + w * sxw
    o_off = n * son + c * soc + (h * R + kk // R) * soh + (w * R + kk % R) * sow
    return x_off, o_off


@triton.jit
def _stats_kernel(x_ptr, part_ptr, M, per, S, H, W, sxn, sxc, sxh, sxw,
                  R, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # Program (c, s): count, sum and sum of squares of x - x_first over its slice of channel c.
    # The shift by the channel's first value keeps float32 sums accurate far from zero.
    c = _program_index(0, WIDE)
    s = _program_index(1, WIDE)
    # (Named results: a reused `_` would be a loop-carried variable whose type changes, which
    # the interpreter accepts and the sm_90 compiler rejects.)
    first, _unused = _channel_offsets(c, 0, H, W, sxn, sxc, sxh, sxw, 0, 0, 0, 0, R)
    shift = tl.load(x_ptr + first).to(tl.float32)
    lo = s * per
    hi = tl.minimum(lo + per, M)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(lo, hi, BLOCK):
        e = start + tl.arange(0, BLOCK)
        mask = e < hi
        x_off, _o_off = _channel_offsets(c, e, H, W, sxn, sxc, sxh, sxw, 0, 0, 0, 0, R)
        v = tl.where(mask, tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32) - shift, 0.0)
        acc1 += v
        acc2 += v * v
    base = (c * S + s) * 4
    tl.store(part_ptr + base, tl.maximum(hi - lo, 0).to(tl.float32))
    tl.store(part_ptr + base + 1, tl.sum(acc1, axis=0))
    tl.store(part_ptr + base + 2, tl.sum(acc2, axis=0))
    tl.store(part_ptr + base + 3, shift)


@triton.jit
def _backward_sums_kernel(dy_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, part_ptr, M, per, S, H, W,
                          sxn, sxc, sxh, sxw, son, soc, soh, sow, negative_slope,
                          R, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # Program (c, s): sum(dy') and sum(dy' * (x - mean)) over its slice of channel c.
    c = _program_index(0, WIDE)
    s = _program_index(1, WIDE)
    sc = tl.load(scale_ptr + c)
    sh = tl.load(shift_ptr + c)
    mu = tl.load(mean_ptr + c)
    lo = s * per
    hi = tl.minimum(lo + per, M)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(lo, hi, BLOCK):
        e = start + tl.arange(0, BLOCK)
        mask = e < hi
        x_off, o_off = _channel_offsets(c, e, H, W, sxn, sxc, sxh, sxw, son, soc, soh, sow, R)
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(mask, activation_grad(dy, x * sc + sh, ACTIVATION, negative_slope), 0.0)
        acc1 += g
        acc2 += g * (x - mu)
    base = (c * S + s) * 2
    tl.store(part_ptr + base, tl.sum(acc1, axis=0))
    tl.store(part_ptr + base + 1, tl.sum(acc2, axis=0))


@triton.jit
def _backward_input_kernel(dy_ptr, x_ptr, gx_ptr, coef_ptr, total, C, H, W, sxn, sxc, sxh, sxw,
                           son, soc, soh, sow, sgn, sgc, sgh, sgw, negative_slope,
                           R, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # grad_x = a * dy' + b * x + d per channel, over x's elements in logical (n, k, h, w) order.
    idx = _program_index(0, WIDE) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    w = idx % W
    h = (idx // W) % H
    k = (idx // (W * H)) % (C * R * R)
    n = idx // (W * H * C * R * R)
    c = k // (R * R)
    kk = k % (R * R)
    x = tl.load(x_ptr + n * sxn + k * sxc + h * sxh + w * sxw, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + n * son + c * soc + (h * R + kk // R) * soh + (w * R + kk % R) * sow,
                 mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(coef_ptr + c, mask=mask)
    sh = tl.load(coef_ptr + C + c, mask=mask)
    a = tl.load(coef_ptr + 2 * C + c, mask=mask)
    b = tl.load(coef_ptr + 3 * C + c, mask=mask)
    d = tl.load(coef_ptr + 4 * C + c, mask=mask)
    g = activation_grad(dy, x * sc + sh, ACTIVATION, negative_slope)
    tl.store(gx_ptr + n * sgn + k * sgc + h * sgh + w * sgw, (a * g + b * x + d).to(gx_ptr.dtype.element_ty),
             mask=mask)


# 4 elements per thread (4 warps): with 8 per thread (1024 at 4 warps, int64 offsets), and
# also at 1024 with 8 warps, the backward sums spilled registers on sm_90
# (scripts/gpu_resources.py checks every configuration).
_BLOCK = 512
_NUM_WARPS = 4
_INT32_LIMIT = 2 ** 31


def _wide(*tensors) -> bool:
    """Whether an index or offset into any of ``tensors`` (or a block past its end) can reach
    2**31, so the kernels need 64-bit index math."""
    return any(t.numel() + _BLOCK >= _INT32_LIMIT
               or sum((d - 1) * abs(st) for d, st in zip(t.shape, t.stride())) + _BLOCK >= _INT32_LIMIT
               for t in tensors)


def _split(m, c, device):
    """(programs per channel, elements per program): one program per channel under the CPU
    interpreter (each program costs ~1 ms there); enough to fill the GPU otherwise."""
    if device.type == "cpu":
        splits = 1
    else:
        splits = max(1, min(triton.cdiv(m, 8 * _BLOCK), max(1, 1024 // max(c, 1))))
    per = triton.cdiv(triton.cdiv(m, splits), _BLOCK) * _BLOCK
    return triton.cdiv(m, per), per


def _batch_stats(x, r, c):
    n, _, h, w = x.shape
    m = n * r * r * h * w
    if m == 0:
        zeros = torch.zeros(c, dtype=torch.float32, device=x.device)
        return zeros, zeros.clone()
    splits, per = _split(m, c, x.device)
    part = torch.empty((c, splits, 4), dtype=torch.float32, device=x.device)
    _stats_kernel[(c, splits)](x, part, m, per, splits, h, w, *x.stride(), R=r, BLOCK=_BLOCK,
                               WIDE=_wide(x), num_warps=_NUM_WARPS)
    part = part.double()
    mean_shifted = part[:, :, 1].sum(1) / m
    var = (part[:, :, 2].sum(1) / m - mean_shifted ** 2).clamp_min(0)
    return (part[:, 0, 3] + mean_shifted).float(), var.float()


def _forward(x, r, weight, bias, running_mean, running_var, training, eps, activation, slope):
    if x.dtype == torch.float64:
        return NotImplemented  # Triton's float64 support varies by GPU; the reference covers it
    n, cr, h, w = x.shape
    c = cr // (r * r)
    if training:
        mean, var = _batch_stats(x, r, c)
    else:
        mean, var = running_mean.float().clone(), running_var.float().clone()
    scale, shift = scale_shift(mean, var, weight, bias, eps)
    out = torch.empty((n, c, h * r, w * r), dtype=x.dtype, device=x.device,
                      memory_format=memory_format(x))
    total = out.numel()
    if total:
        _eval_forward_kernel[(triton.cdiv(total, _BLOCK),)](
            x, out, scale, shift, total, c, h, w, *x.stride(), *out.stride(), slope,
            R=r, ACTIVATION=activation, BLOCK=_BLOCK, WIDE=_wide(x, out), num_warps=_NUM_WARPS)
    return out, mean, var


def _backward(grad_out, x, r, weight, bias, mean, var, training, eps, activation, slope):
    if x.dtype == torch.float64:
        return NotImplemented
    n, cr, h, w = x.shape
    c = cr // (r * r)
    m = n * r * r * h * w
    mean, var = mean.float(), var.float()
    invstd = torch.rsqrt(var + eps)
    scale, shift = scale_shift(mean, var, weight, bias, eps)
    grad_x = torch.empty_like(x, memory_format=memory_format(x))
    if m:
        splits, per = _split(m, c, x.device)
        part = torch.empty((c, splits, 2), dtype=torch.float32, device=x.device)
        _backward_sums_kernel[(c, splits)](grad_out, x, scale, shift, mean, part, m, per, splits, h, w,
                                           *x.stride(), *grad_out.stride(), slope,
                                           R=r, ACTIVATION=activation, BLOCK=_BLOCK,
                                           WIDE=_wide(x, grad_out), num_warps=_NUM_WARPS)
        s1, s2 = part.double().sum(1).float().t().contiguous()
    else:
        s1 = s2 = torch.zeros_like(mean)
    grad_w = s2 * invstd
    if training and m:
        k2 = grad_w * invstd / m
        b, d = -scale * k2, scale * (k2 * mean - s1 / m)
    else:
        b = d = torch.zeros_like(scale)
    if m:
        coef = torch.stack([scale, shift, scale, b, d]).contiguous()
        _backward_input_kernel[(triton.cdiv(x.numel(), _BLOCK),)](
            grad_out, x, grad_x, coef, x.numel(), c, h, w, *x.stride(), *grad_out.stride(), *grad_x.stride(),
            slope, R=r, ACTIVATION=activation, BLOCK=_BLOCK, WIDE=_wide(x, grad_out, grad_x),
            num_warps=_NUM_WARPS)
    param_dtype = x.dtype if weight is None else weight.dtype
    return grad_x, grad_w.to(param_dtype), s1.to(param_dtype)


register_triton_backend("pixel_shuffle_bn", _forward, _backward)
