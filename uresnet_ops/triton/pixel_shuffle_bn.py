"""Triton kernels of pixel_shuffle_bn: training statistics (on x in its own layout), the
normalising write with the shuffle folded into its indexing (eval: one read, one write), and the
backward (two per-channel sums, then one elementwise pass). Partial results per program are
merged by a few tiny torch ops (float64), with no host sync."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import memory_format, scale_shift
from ._common import INT32_LIMIT, activation_grad, apply_activation, program_index, reaches, register_triton_backend


# Two tilings, so that the fastest-varying index of every load and store is a tl.arange on a
# stride Triton specialises to 1 (16-byte vectors where it also proves 16-byte alignment):
# - rows (any strides; vectors for NCHW-contiguous tensors with W % 16 == 0 and R a power of
#   two): BLOCK_A output rows (n, c, oh) by BLOCK_B input columns w. Output row oh interleaves
#   the R input rows of channels c*R*R + (oh % R)*R + j (j < R) along ow = w*R + j, so x is a
#   [BLOCK_A, BLOCK_B, RP] tile (RP: R rounded up to a power of two) and out the same values
#   reshaped to [BLOCK_A, BLOCK_B * RP], contiguous along ow when R is a power of two.
# - pixels (R a power of two; vectors for channels_last with C % 16 == 0): BLOCK_A input pixels
#   (n, h, w) by BLOCK_B output channels. A pixel's C*R*R channels are contiguous in x and make
#   R*R output pixels of C contiguous channels: x is [BLOCK_A, BLOCK_B*R*R], out
#   [BLOCK_A, R, R, BLOCK_B] (a transpose in registers/shared memory between the two).

@triton.jit
def _rows_tile(n, c, oh, rmask, w0, H, W, sxn, sxc, sxh, sxw, son, soc, soh, sow,
               R: tl.constexpr, RP: tl.constexpr, BLOCK_B: tl.constexpr):
    # Offsets and masks of x ([BLOCK_A, BLOCK_B, RP]) and out ([BLOCK_A, BLOCK_B * RP]) for
    # output rows (n, c, oh) and input columns w0 + [0, BLOCK_B).
    w = w0 + tl.arange(0, BLOCK_B)
    j = tl.arange(0, RP)
    x_row = n * sxn + (c * (R * R) + (oh % R) * R) * sxc + (oh // R) * sxh
    x_off = x_row[:, None, None] + w[None, :, None] * sxw + j[None, None, :] * sxc
    x_mask = rmask[:, None, None] & (w < W)[None, :, None] & (j < R)[None, None, :]
    q = tl.arange(0, BLOCK_B * RP)
    if R == RP:  # ow = w*R + j is w0*R + q: contiguous
        ow = w0 * R + q
        o_mask = rmask[:, None] & (ow < W * R)[None, :]
    else:
        ow = (w0 + q // RP) * R + q % RP
        o_mask = rmask[:, None] & ((w0 + q // RP) < W)[None, :] & ((q % RP) < R)[None, :]
    o_off = (n * son + c * soc + oh * soh)[:, None] + ow[None, :] * sow
    return x_off, x_mask, o_off, o_mask


@triton.jit
def _rows_to_out(v, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, RP: tl.constexpr):
    return tl.reshape(v, [BLOCK_A, BLOCK_B * RP])


@triton.jit
def _rows_to_x(v, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, RP: tl.constexpr):
    return tl.reshape(v, [BLOCK_A, BLOCK_B, RP])


@triton.jit
def _row_coordinates(t, C, H, R: tl.constexpr):
    # Output row t = (n * C + c) * H*R + oh.
    return t // (H * R * C), (t // (H * R)) % C, t % (H * R)


@triton.jit
def _pixels_tile(p, pmask, c0, C, H, W, sxn, sxc, sxh, sxw, son, soc, soh, sow,
                 R: tl.constexpr, BLOCK_B: tl.constexpr):
    # Offsets and masks of x ([BLOCK_A, BLOCK_B*R*R]) and out ([BLOCK_A, R, R, BLOCK_B]) for
    # input pixels p (flat n, h, w) and output channels c0 + [0, BLOCK_B).
    # Two divisions, not four: with 64-bit indices each is a call of a long routine (and four
    # made triton 3.6's ptxas 12.8 spill in _backward_input_kernel).
    q = p // W
    w = p - q * W
    n = q // H
    h = q - n * H
    k = c0 * (R * R) + tl.arange(0, BLOCK_B * R * R)
    x_off = (n * sxn + h * sxh + w * sxw)[:, None] + k[None, :] * sxc
    x_mask = pmask[:, None] & (k < C * (R * R))[None, :]
    i = tl.arange(0, R)  # the output pixel's row and column offsets in its R x R block
    c = c0 + tl.arange(0, BLOCK_B)
    o_pix = n * son + h * (R * soh) + w * (R * sow)
    o_off = (o_pix[:, None, None, None] + i[None, :, None, None] * soh + i[None, None, :, None] * sow
             + c[None, None, None, :] * soc)
    o_mask = pmask[:, None, None, None] & (c < C)[None, None, None, :]
    return x_off, x_mask, o_off, o_mask


@triton.jit
def _pixels_to_out(v, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, R: tl.constexpr):
    return tl.permute(tl.reshape(v, [BLOCK_A, BLOCK_B, R, R]), [0, 2, 3, 1])


@triton.jit
def _pixels_to_x(v, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, R: tl.constexpr):
    return tl.reshape(tl.permute(v, [0, 3, 1, 2]), [BLOCK_A, BLOCK_B * R * R])


@triton.jit
def _per_input_channel(v, BLOCK_B: tl.constexpr, R: tl.constexpr):
    # [BLOCK_B] values per output channel -> [BLOCK_B*R*R] per input channel (pixels tiling):
    # one load per channel, not one gather per element.
    return tl.reshape(tl.broadcast_to(v[:, None], [BLOCK_B, R * R]), [BLOCK_B * R * R])


@triton.jit
def _eval_forward_kernel(x_ptr, out_ptr, scale_ptr, shift_ptr, count, C, H, W,
                         sxn, sxc, sxh, sxw, son, soc, soh, sow, negative_slope,
                         R: tl.constexpr, RP: tl.constexpr, ACTIVATION: tl.constexpr, PIXELS: tl.constexpr,
                         BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, WIDE: tl.constexpr):
    # One program per tile: count is the number of input pixels (PIXELS) or output rows.
    a = program_index(0, WIDE) * BLOCK_A + tl.arange(0, BLOCK_A)
    b0 = tl.program_id(1) * BLOCK_B
    if PIXELS:
        x_off, x_mask, o_off, o_mask = _pixels_tile(a, a < count, b0, C, H, W, sxn, sxc, sxh, sxw,
                                                    son, soc, soh, sow, R, BLOCK_B)
        x = _pixels_to_out(tl.load(x_ptr + x_off, mask=x_mask, other=0.0), BLOCK_A, BLOCK_B, R)
        c = b0 + tl.arange(0, BLOCK_B)
        sc = tl.load(scale_ptr + c, mask=c < C)[None, None, None, :]
        sh = tl.load(shift_ptr + c, mask=c < C)[None, None, None, :]
    else:
        n, c, oh = _row_coordinates(a, C, H, R)
        x_off, x_mask, o_off, o_mask = _rows_tile(n, c, oh, a < count, b0, H, W, sxn, sxc, sxh, sxw,
                                                  son, soc, soh, sow, R, RP, BLOCK_B)
        x = _rows_to_out(tl.load(x_ptr + x_off, mask=x_mask, other=0.0), BLOCK_A, BLOCK_B, RP)
        sc = tl.load(scale_ptr + c, mask=a < count)[:, None]
        sh = tl.load(shift_ptr + c, mask=a < count)[:, None]
    y = apply_activation(x.to(tl.float32) * sc + sh, ACTIVATION, negative_slope)
    tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _stats_kernel(x_ptr, part_ptr, count, per, S, C, H, W, sxn, sxc, sxh, sxw,
                  R: tl.constexpr, RP: tl.constexpr, PIXELS: tl.constexpr,
                  BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, WIDE: tl.constexpr):
    # Program (g, s): count, sum and sum of squares of x - x_first per channel over the slice
    # [s*per, s*per + per) of count input pixels (PIXELS; channels g*BLOCK_B + [0, BLOCK_B)) or of
    # count output rows (n, oh) of channel g. The shift by the channel's first value keeps
    # float32 sums accurate far from zero.
    g = program_index(0, WIDE)
    s = program_index(1, WIDE)
    lo = s * per
    hi = tl.minimum(lo + per, count)
    if PIXELS:
        c = g * BLOCK_B + tl.arange(0, BLOCK_B)
        first = tl.load(x_ptr + c * (R * R) * sxc, mask=c < C, other=0.0).to(tl.float32)
        shift = _per_input_channel(first, BLOCK_B, R)
        acc1 = tl.zeros([BLOCK_A, BLOCK_B * R * R], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_A, BLOCK_B * R * R], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_A):
            p = start + tl.arange(0, BLOCK_A)
            x_off, x_mask, _o_off, _o_mask = _pixels_tile(p, p < hi, g * BLOCK_B, C, H, W, sxn, sxc, sxh, sxw,
                                                          0, 0, 0, 0, R, BLOCK_B)
            v = tl.where(x_mask, tl.load(x_ptr + x_off, mask=x_mask, other=0.0).to(tl.float32) - shift[None, :], 0.0)
            acc1 += v
            acc2 += v * v
        s1 = tl.sum(tl.reshape(tl.sum(acc1, axis=0), [BLOCK_B, R * R]), axis=1)
        s2 = tl.sum(tl.reshape(tl.sum(acc2, axis=0), [BLOCK_B, R * R]), axis=1)
        n_values = tl.maximum(hi - lo, 0) * (R * R)
    else:
        c = g
        shift = tl.load(x_ptr + c * (R * R) * sxc).to(tl.float32)
        acc1 = tl.zeros([BLOCK_A, BLOCK_B, RP], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_A, BLOCK_B, RP], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_A):
            t = start + tl.arange(0, BLOCK_A)
            for w0 in range(0, W, BLOCK_B):
                x_off, x_mask, _o_off, _o_mask = _rows_tile(t // (H * R), c, t % (H * R), t < hi, w0, H, W,
                                                            sxn, sxc, sxh, sxw, 0, 0, 0, 0, R, RP, BLOCK_B)
                v = tl.where(x_mask, tl.load(x_ptr + x_off, mask=x_mask, other=0.0).to(tl.float32) - shift, 0.0)
                acc1 += v
                acc2 += v * v
        s1 = tl.sum(tl.sum(tl.sum(acc1, axis=2), axis=1), axis=0)
        s2 = tl.sum(tl.sum(tl.sum(acc2, axis=2), axis=1), axis=0)
        first = shift
        n_values = tl.maximum(hi - lo, 0) * W * R
    base = (c * S + s) * 4
    cmask = c < C
    tl.store(part_ptr + base, n_values.to(tl.float32) + tl.zeros_like(s1), mask=cmask)
    tl.store(part_ptr + base + 1, s1, mask=cmask)
    tl.store(part_ptr + base + 2, s2, mask=cmask)
    tl.store(part_ptr + base + 3, first, mask=cmask)


@triton.jit
def _backward_sums_kernel(dy_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, part_ptr, count, per, S, C, H, W,
                          sxn, sxc, sxh, sxw, son, soc, soh, sow, negative_slope,
                          R: tl.constexpr, RP: tl.constexpr, ACTIVATION: tl.constexpr, PIXELS: tl.constexpr,
                          BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, WIDE: tl.constexpr):
    # Program (g, s), slices as in _stats_kernel: sum(dy') and sum(dy' * (x - mean)) per channel.
    g = program_index(0, WIDE)
    s = program_index(1, WIDE)
    lo = s * per
    hi = tl.minimum(lo + per, count)
    if PIXELS:
        c = g * BLOCK_B + tl.arange(0, BLOCK_B)
        sc = _per_input_channel(tl.load(scale_ptr + c, mask=c < C), BLOCK_B, R)[None, :]
        sh = _per_input_channel(tl.load(shift_ptr + c, mask=c < C), BLOCK_B, R)[None, :]
        mu = _per_input_channel(tl.load(mean_ptr + c, mask=c < C), BLOCK_B, R)[None, :]
        acc1 = tl.zeros([BLOCK_A, BLOCK_B * R * R], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_A, BLOCK_B * R * R], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_A):
            p = start + tl.arange(0, BLOCK_A)
            x_off, x_mask, o_off, o_mask = _pixels_tile(p, p < hi, g * BLOCK_B, C, H, W, sxn, sxc, sxh, sxw,
                                                        son, soc, soh, sow, R, BLOCK_B)
            x = tl.load(x_ptr + x_off, mask=x_mask, other=0.0).to(tl.float32)
            dy = _pixels_to_x(tl.load(dy_ptr + o_off, mask=o_mask, other=0.0), BLOCK_A, BLOCK_B, R).to(tl.float32)
            gr = tl.where(x_mask, activation_grad(dy, x * sc + sh, ACTIVATION, negative_slope), 0.0)
            acc1 += gr
            acc2 += gr * (x - mu)
        s1 = tl.sum(tl.reshape(tl.sum(acc1, axis=0), [BLOCK_B, R * R]), axis=1)
        s2 = tl.sum(tl.reshape(tl.sum(acc2, axis=0), [BLOCK_B, R * R]), axis=1)
    else:
        c = g
        sc = tl.load(scale_ptr + c)
        sh = tl.load(shift_ptr + c)
        mu = tl.load(mean_ptr + c)
        acc1 = tl.zeros([BLOCK_A, BLOCK_B, RP], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_A, BLOCK_B, RP], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_A):
            t = start + tl.arange(0, BLOCK_A)
            for w0 in range(0, W, BLOCK_B):
                x_off, x_mask, o_off, o_mask = _rows_tile(t // (H * R), c, t % (H * R), t < hi, w0, H, W,
                                                          sxn, sxc, sxh, sxw, son, soc, soh, sow, R, RP, BLOCK_B)
                x = tl.load(x_ptr + x_off, mask=x_mask, other=0.0).to(tl.float32)
                dy = _rows_to_x(tl.load(dy_ptr + o_off, mask=o_mask, other=0.0), BLOCK_A, BLOCK_B, RP)
                gr = tl.where(x_mask, activation_grad(dy.to(tl.float32), x * sc + sh, ACTIVATION, negative_slope),
                              0.0)
                acc1 += gr
                acc2 += gr * (x - mu)
        s1 = tl.sum(tl.sum(tl.sum(acc1, axis=2), axis=1), axis=0)
        s2 = tl.sum(tl.sum(tl.sum(acc2, axis=2), axis=1), axis=0)
    base = (c * S + s) * 2
    tl.store(part_ptr + base, s1, mask=c < C)
    tl.store(part_ptr + base + 1, s2, mask=c < C)


@triton.jit
def _coefficients(coef_ptr, C, c, mask):
    # Per channel c: BatchNorm's scale and shift, then grad_x = a * dy' + b * x + d.
    return (tl.load(coef_ptr + c, mask=mask), tl.load(coef_ptr + C + c, mask=mask),
            tl.load(coef_ptr + 2 * C + c, mask=mask), tl.load(coef_ptr + 3 * C + c, mask=mask),
            tl.load(coef_ptr + 4 * C + c, mask=mask))


@triton.jit
def _backward_input_kernel(dy_ptr, x_ptr, gx_ptr, coef_ptr, count, C, H, W, sxn, sxc, sxh, sxw,
                           son, soc, soh, sow, sgn, sgc, sgh, sgw, negative_slope,
                           R: tl.constexpr, RP: tl.constexpr, ACTIVATION: tl.constexpr, PIXELS: tl.constexpr,
                           BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, WIDE: tl.constexpr):
    # grad_x = a * dy' + b * x + d per channel, tiled as _eval_forward_kernel (in x's shape).
    a_idx = program_index(0, WIDE) * BLOCK_A + tl.arange(0, BLOCK_A)
    b0 = tl.program_id(1) * BLOCK_B
    if PIXELS:
        x_off, x_mask, o_off, o_mask = _pixels_tile(a_idx, a_idx < count, b0, C, H, W, sxn, sxc, sxh, sxw,
                                                    son, soc, soh, sow, R, BLOCK_B)
        g_off, _m, _o, _om = _pixels_tile(a_idx, a_idx < count, b0, C, H, W, sgn, sgc, sgh, sgw,
                                          0, 0, 0, 0, R, BLOCK_B)
        dy = _pixels_to_x(tl.load(dy_ptr + o_off, mask=o_mask, other=0.0), BLOCK_A, BLOCK_B, R)
        c = b0 + tl.arange(0, BLOCK_B)
        sc, sh, a, b, d = _coefficients(coef_ptr, C, c, c < C)
        sc = _per_input_channel(sc, BLOCK_B, R)[None, :]
        sh = _per_input_channel(sh, BLOCK_B, R)[None, :]
        a = _per_input_channel(a, BLOCK_B, R)[None, :]
        b = _per_input_channel(b, BLOCK_B, R)[None, :]
        d = _per_input_channel(d, BLOCK_B, R)[None, :]
    else:
        n, c, oh = _row_coordinates(a_idx, C, H, R)
        x_off, x_mask, o_off, o_mask = _rows_tile(n, c, oh, a_idx < count, b0, H, W, sxn, sxc, sxh, sxw,
                                                  son, soc, soh, sow, R, RP, BLOCK_B)
        g_off, _m, _o, _om = _rows_tile(n, c, oh, a_idx < count, b0, H, W, sgn, sgc, sgh, sgw,
                                        0, 0, 0, 0, R, RP, BLOCK_B)
        dy = _rows_to_x(tl.load(dy_ptr + o_off, mask=o_mask, other=0.0), BLOCK_A, BLOCK_B, RP)
        sc, sh, a, b, d = _coefficients(coef_ptr, C, c, a_idx < count)
        sc = sc[:, None, None]
        sh = sh[:, None, None]
        a = a[:, None, None]
        b = b[:, None, None]
        d = d[:, None, None]
    x = tl.load(x_ptr + x_off, mask=x_mask, other=0.0).to(tl.float32)
    gr = activation_grad(dy.to(tl.float32), x * sc + sh, ACTIVATION, negative_slope)
    tl.store(gx_ptr + g_off, (a * gr + b * x + d).to(gx_ptr.dtype.element_ty), mask=x_mask)


# Elements per tile; 4 warps: 8 per thread, so that a thread holds a 16-byte vector of a 16-bit
# dtype (scripts/gpu_resources.py checks every configuration for spills).
_TILE = 1024
_NUM_WARPS = 4
# Reductions: at least ~8 programs per SM of a 132-SM H200 where the size allows.
_PROGRAMS = 2048
_INT32_LIMIT = INT32_LIMIT  # a module global: tests lower it to force the 64-bit path


def _wide(*tensors) -> bool:
    return reaches(tensors, _TILE, _INT32_LIMIT)


def _tiling(x, r):
    """Constexprs and the (a, b) grid extents of the tiling for x: pixels (x's channels
    contiguous, r a power of two) or rows (any other case)."""
    n, cr, h, w = x.shape
    c = cr // (r * r)
    rp = triton.next_power_of_2(r)
    if x.stride(1) == 1 and cr > 1 and r == rp and r * r <= _TILE:
        block_b = min(triton.next_power_of_2(c), _TILE // (r * r))
        block_a = _TILE // (block_b * r * r)
        pixels, count, groups = True, n * h * w, triton.cdiv(c, block_b)
    else:
        block_b = max(1, min(triton.next_power_of_2(w), _TILE // rp))
        block_a = max(1, _TILE // (block_b * rp))
        pixels, count, groups = False, n * c * h * r, triton.cdiv(w, block_b)
    return dict(R=r, RP=rp, PIXELS=pixels, BLOCK_A=block_a, BLOCK_B=block_b), count, groups


def _split(units, block, groups, device):
    """(programs per group, units per program) for the reductions: one program per group under
    the CPU interpreter (each program costs ~1 ms there); enough to fill the GPU otherwise."""
    if device.type == "cpu":
        splits = 1
    else:
        splits = max(1, min(triton.cdiv(units, 2 * block), triton.cdiv(_PROGRAMS, groups)))
    per = triton.cdiv(triton.cdiv(units, splits), block) * block
    return triton.cdiv(units, per), per


def _reduction_grid(x, r, c):
    """(constexprs, count, per, splits, groups) of a per-channel reduction over x: units are
    input pixels (groups: blocks of channels) or the rows (n, oh) of one channel (groups: channels)."""
    meta, _, _ = _tiling(x, r)
    n, _, h, w = x.shape
    if meta["PIXELS"]:
        count, groups = n * h * w, triton.cdiv(c, meta["BLOCK_B"])
    else:
        count, groups = n * h * r, c
    splits, per = _split(count, meta["BLOCK_A"], groups, x.device)
    return meta, count, per, splits, groups


def _batch_stats(x, r, c):
    n, _, h, w = x.shape
    m = n * r * r * h * w
    if m == 0:
        zeros = torch.zeros(c, dtype=torch.float32, device=x.device)
        return zeros, zeros.clone()
    meta, count, per, splits, groups = _reduction_grid(x, r, c)
    part = torch.empty((c, splits, 4), dtype=torch.float32, device=x.device)
    _stats_kernel[(groups, splits)](x, part, count, per, splits, c, h, w, *x.stride(), **meta,
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
    if out.numel():
        meta, count, groups = _tiling(x, r)
        _eval_forward_kernel[(triton.cdiv(count, meta["BLOCK_A"]), groups)](
            x, out, scale, shift, count, c, h, w, *x.stride(), *out.stride(), slope,
            ACTIVATION=activation, **meta, WIDE=_wide(x, out), num_warps=_NUM_WARPS)
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
        meta, count, per, splits, groups = _reduction_grid(x, r, c)
        part = torch.empty((c, splits, 2), dtype=torch.float32, device=x.device)
        _backward_sums_kernel[(groups, splits)](grad_out, x, scale, shift, mean, part, count, per, splits, c, h, w,
                                                *x.stride(), *grad_out.stride(), slope, ACTIVATION=activation,
                                                **meta, WIDE=_wide(x, grad_out), num_warps=_NUM_WARPS)
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
        meta, count, groups = _tiling(x, r)
        _backward_input_kernel[(triton.cdiv(count, meta["BLOCK_A"]), groups)](
            grad_out, x, grad_x, coef, count, c, h, w, *x.stride(), *grad_out.stride(), *grad_x.stride(),
            slope, ACTIVATION=activation, **meta, WIDE=_wide(x, grad_out, grad_x), num_warps=_NUM_WARPS)
    param_dtype = x.dtype if weight is None else weight.dtype
    return grad_x, grad_w.to(param_dtype), s1.to(param_dtype)


register_triton_backend("pixel_shuffle_bn", _forward, _backward)
