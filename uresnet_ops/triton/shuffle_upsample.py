"""Triton kernels of shuffle_upsample's fused upsample + grouped 3x3 conv (the ConvKernels pair of
uresnet_ops/shuffle_upsample.py; BatchNorm folding, the shuffled 1x1 GEMM and the rest are
composed there, by fused_backend). The upsampled tensor is never written.

Upsample + 3x3 conv is, per output parity (a, b), a 3x3 conv on the LOW-resolution input
(docs/design.md §3.2): out[i*s+a, j*s+b] = sum_d W[d, a, b] * x[i+dr-1, j+dc-1], with the effective
weights W = einsum(w, S, S) built on the host from a 0/1 (nearest) or bilinear-weight selection
S[a, d, k]. So every program owns a tile of low-resolution pixels of one (n, c) plane, loads the
3x3 low-resolution neighbourhood of each once per input channel, and writes all s*s outputs.

* nearest (any integer s): exact everywhere (a low-res neighbour is out of range exactly when
  its high-res tap is padding).
* bilinear (s=2, align_corners=False): the interior formula reads the neighbourhood with
  clamped indices, which is exact except on the one-pixel high-resolution border (where the
  conv's zero padding and the upsample's clamping meet); a second small kernel recomputes the
  border pixels directly (taps interpolated on the fly) and overwrites them. Statistics and
  weight gradients split the same way (main kernel masks the border, border kernel adds it).

Backward: grad_x is a strided correlation of grad with an effective (s+2)^2 (nearest) or 6x6
(bilinear) kernel per (co, ci) (gather form, no atomics; bilinear low-res border pixels again
recomputed directly). grad_weight: per-program partial sums of grad * neighbourhood per
(ci, d, parity), summed on the host and mapped back to the 3x3 taps with the same S. Batch
statistics: per-program (count, shift, sum of deviations, sum of squared deviations) around the
program's own float32 mean, Chan-merged in float64 by a few tiny torch ops (no host sync).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._common import ACTIVATIONS, stat_dtype
from ..shuffle_upsample import ConvKernels, fused_backend
from . import INTERPRET
from ._common import INT32_LIMIT, apply_activation, program_index, reaches, register_triton_backend

OP = "uresnet_ops::_shuffle_upsample_conv (triton)"

# Pixels per program. Under the interpreter small fixed tiles (the test planes are tiny and
# every op costs interpreter time); on a GPU sized by the accumulator's width ((BLOCK, 16, SSP)
# or (BLOCK, KK)) so that every kernel compiles for sm_90 at 4 warps without register spills,
# for every scale factor (scripts/gpu_resources.py checks it; docs/gpu_resources.md lists the
# registers). The border kernels are a vanishing share of the work.
# Programs go on grid axis 0 only (planes x tiles, flattened): axes 1 and 2 stop at 65535.
_BORDER_BLOCK = 64  # border pixels per program


def _block(width, budget, dtype):
    """Low-res pixels per program (a power of 2) for an accumulator of (BLOCK, width) elements
    of ``dtype`` (width and budget powers of 2; float64 takes half as many)."""
    if dtype == torch.float64:
        budget //= 2
    return 32 if INTERPRET else max(1, min(128, budget // width))


def _gx_border_block(dtype):
    """Border pixels per program of _grad_x_border_kernel, whose accumulator and offsets are
    (BLOCK, 16, 16): float64 takes half (at 8, triton 3.6's ptxas 12.8 spills)."""
    return 64 if INTERPRET else 4 if dtype == torch.float64 else 8


@triton.jit
def _taps():
    """The 9 taps (or low-res neighbours) as a vector of 16: (row - 1, col - 1, valid)."""
    d = tl.arange(0, 16)
    return d // 3 - 1, d % 3 - 1, d < 9


@triton.jit
def _source(o, size):
    """ATen's bilinear (align_corners=False, scale 2) source of upsampled row/col o:
    (i0, i1, weight of i1), i0 and i1 inside [0, size) for any o in [-1, 2 * size]."""
    src = tl.maximum((o.to(tl.float32) + 0.5) * 0.5 - 0.5, 0.0)
    i0 = tl.minimum(src.to(o.dtype), size - 1)
    i1 = tl.minimum(i0 + 1, size - 1)
    return i0, i1, src - i0.to(tl.float32)


@triton.jit
def _bilinear(hh, ww, H, W, sxh, sxw, acc_ty: tl.constexpr):
    """Offsets and weights of the four low-res pixels that upsampled (hh, ww) interpolates."""
    r0, r1, lh = _source(hh, H)
    c0, c1, lw = _source(ww, W)
    lh = lh.to(acc_ty)
    lw = lw.to(acc_ty)
    return (r0 * sxh + c0 * sxw, r0 * sxh + c1 * sxw, r1 * sxh + c0 * sxw, r1 * sxh + c1 * sxw,
            (1.0 - lh) * (1.0 - lw), (1.0 - lh) * lw, lh * (1.0 - lw), lh * lw)


@triton.jit
def _border_pixel(e, OH, OW):
    """The e-th pixel of the one-pixel border of an (OH, OW) plane (OH, OW >= 2), each once:
    row 0, row OH-1, then columns 0 and OW-1 of the rows between."""
    k = e - 2 * OW
    oh = tl.where(e < OW, 0, tl.where(e < 2 * OW, OH - 1, 1 + k // 2))
    ow = tl.where(e < OW, e, tl.where(e < 2 * OW, e - OW, (k % 2) * (OW - 1)))
    return oh, ow


@triton.jit
def _store_moments(part_ptr, base, y, valid):
    """(count, shift, sum(y - shift), sum((y - shift)^2)) over the valid elements of 2-D y, with
    shift their own mean: the deviations stay small however far from zero the values are."""
    cnt = tl.sum(valid.to(y.dtype))
    shift = tl.sum(tl.where(valid, y, 0.0)) / tl.maximum(cnt, 1.0)
    d = tl.where(valid, y - shift, 0.0)
    tl.store(part_ptr + base, cnt)
    tl.store(part_ptr + base + 1, shift)
    tl.store(part_ptr + base + 2, tl.sum(d))
    tl.store(part_ptr + base + 3, tl.sum(d * d))


@triton.jit
def _forward_kernel(x_ptr, wf_ptr, bias_ptr, out_ptr, part_ptr, C, CG, H, W, OH, OW, T,
                    sxn, sxc, sxh, sxw, negative_slope,
                    S: tl.constexpr, SSP: tl.constexpr, BILINEAR: tl.constexpr, STATS: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
                    WIDE: tl.constexpr):
    # Program (n*C + co, tile): BLOCK low-res pixels x the s*s output parities of channel co;
    # per input channel of the group, one load of the pixels' 3x3 low-res neighbourhoods.
    acc_ty: tl.constexpr = wf_ptr.dtype.element_ty
    plane = program_index(0, WIDE) // T
    t = program_index(0, WIDE) % T
    n = plane // C
    co = plane % C
    g0 = (co // CG) * CG
    pix = t * BLOCK + tl.arange(0, BLOCK)
    i = pix // W
    j = pix % W
    pmask = i < H  # pix < H * W, without the product (it could pass 2**31 in 32 bits)
    dr, dc, dmask = _taps()
    r = i[:, None] + dr[None, :]
    c = j[:, None] + dc[None, :]
    m = pmask[:, None] & dmask[None, :]
    if BILINEAR:  # the interior formula: neighbours clamped into the plane
        r = tl.minimum(tl.maximum(r, 0), H - 1)
        c = tl.minimum(tl.maximum(c, 0), W - 1)
    else:  # a neighbour outside the plane is exactly a padding tap
        m = m & (r >= 0) & (r < H) & (c >= 0) & (c < W)
    off = r * sxh + c * sxw
    par = tl.arange(0, SSP)
    w_off = tl.arange(0, 16)[:, None] * SSP + par[None, :]
    acc3 = tl.zeros([BLOCK, 16, SSP], dtype=acc_ty)  # reduced over the neighbours once, at the end
    for ci in range(CG):
        v = tl.load(x_ptr + n * sxn + (g0 + ci) * sxc + off, mask=m, other=0.0).to(acc_ty)
        wt = tl.load(wf_ptr + (co * CG + ci) * 16 * SSP + w_off)
        acc3 += v[:, :, None] * wt[None, :, :]
    acc = tl.sum(acc3, axis=1)
    oh = i[:, None] * S + (par // S)[None, :]
    ow = j[:, None] * S + (par % S)[None, :]
    omask = pmask[:, None] & (par < S * S)[None, :]
    if STATS:
        if BILINEAR:  # the border pixels come from the border kernel
            omask = omask & (oh > 0) & (oh < OH - 1) & (ow > 0) & (ow < OW - 1)
        _store_moments(part_ptr, (plane * T + t) * 4, acc, omask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + co)
        y = apply_activation(acc, ACTIVATION, negative_slope)
        tl.store(out_ptr + plane * OH * OW + oh * OW + ow, y.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _forward_border_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, C, CG, H, W, OH, OW, NB, TB,
                           sxn, sxc, sxh, sxw, negative_slope,
                           STATS: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                           BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # Bilinear only: program (n*C + co, tile) recomputes BLOCK high-res border pixels directly,
    # the 9 taps interpolated on the fly.
    acc_ty: tl.constexpr = w_ptr.dtype.element_ty
    plane = program_index(0, WIDE) // TB
    t = program_index(0, WIDE) % TB
    n = plane // C
    co = plane % C
    g0 = (co // CG) * CG
    e = t * BLOCK + tl.arange(0, BLOCK)
    emask = e < NB
    oh, ow = _border_pixel(e, OH, OW)
    kh, kw, kmask = _taps()
    hh = oh[:, None] + kh[None, :]
    ww = ow[:, None] + kw[None, :]
    m = emask[:, None] & kmask[None, :] & (hh >= 0) & (hh < OH) & (ww >= 0) & (ww < OW)
    o00, o01, o10, o11, w00, w01, w10, w11 = _bilinear(hh, ww, H, W, sxh, sxw, acc_ty)
    k = tl.arange(0, 16)
    acc2 = tl.zeros([BLOCK, 16], dtype=acc_ty)
    for ci in range(CG):
        xb = x_ptr + n * sxn + (g0 + ci) * sxc
        u = (w00 * tl.load(xb + o00, mask=m, other=0.0).to(acc_ty)
             + w01 * tl.load(xb + o01, mask=m, other=0.0).to(acc_ty)
             + w10 * tl.load(xb + o10, mask=m, other=0.0).to(acc_ty)
             + w11 * tl.load(xb + o11, mask=m, other=0.0).to(acc_ty))
        wt = tl.load(w_ptr + (co * CG + ci) * 9 + k, mask=k < 9, other=0.0)
        acc2 += u * wt[None, :]
    acc = tl.sum(acc2, axis=1)
    if STATS:
        _store_moments(part_ptr, (plane * TB + t) * 4, acc[:, None], emask[:, None])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + co)
        y = apply_activation(acc, ACTIVATION, negative_slope)
        tl.store(out_ptr + plane * OH * OW + oh * OW + ow, y.to(out_ptr.dtype.element_ty), mask=emask)


@triton.jit
def _grad_x_kernel(g_ptr, wb_ptr, gx_ptr, C, CG, H, W, OH, OW, T, sgn, sgc, sgh, sgw,
                   S: tl.constexpr, P: tl.constexpr, K: tl.constexpr, KK: tl.constexpr, BLOCK: tl.constexpr,
                   WIDE: tl.constexpr):
    # Program (n*C + ci, tile): grad_x over BLOCK low-res pixels, a stride-S correlation of grad
    # (the K x K window from (i*S - P, j*S - P)) with the effective kernels of the group.
    acc_ty: tl.constexpr = wb_ptr.dtype.element_ty
    plane = program_index(0, WIDE) // T
    t = program_index(0, WIDE) % T
    n = plane // C
    ci = plane % C
    g0 = (ci // CG) * CG
    pix = t * BLOCK + tl.arange(0, BLOCK)
    i = pix // W
    j = pix % W
    pmask = i < H
    q = tl.arange(0, KK)
    r = i[:, None] * S + (q // K - P)[None, :]
    c = j[:, None] * S + (q % K - P)[None, :]
    m = pmask[:, None] & (q < K * K)[None, :] & (r >= 0) & (r < OH) & (c >= 0) & (c < OW)
    off = r * sgh + c * sgw
    acc2 = tl.zeros([BLOCK, KK], dtype=acc_ty)
    for co in range(CG):
        v = tl.load(g_ptr + n * sgn + (g0 + co) * sgc + off, mask=m, other=0.0).to(acc_ty)
        wt = tl.load(wb_ptr + ((g0 + co) * CG + (ci - g0)) * KK + q)
        acc2 += v * wt[None, :]
    acc = tl.sum(acc2, axis=1)
    # pmask again, without a division: kept live across the loop, ptxas 12.8 (triton 3.6) spills it.
    tl.store(gx_ptr + plane * H * W + pix, acc.to(gx_ptr.dtype.element_ty), mask=pix < tl.cast(H, pix.dtype) * W)


@triton.jit
def _low_res_weight(i, hh, H, OH):
    """Bilinear weight of low-res row i in upsampled row hh (0 when hh is outside the plane)."""
    r0, r1, l1 = _source(hh, H)
    wt = tl.where(r0 == i, 1.0 - l1, 0.0) + tl.where(r1 == i, l1, 0.0)
    return tl.where((hh >= 0) & (hh < OH), wt, 0.0)


@triton.jit
def _grad_x_border_kernel(g_ptr, w_ptr, gx_ptr, C, CG, H, W, OH, OW, NB, TB, sgn, sgc, sgh, sgw,
                          BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # Bilinear only: program (n*C + ci, tile) recomputes BLOCK low-res border pixels directly:
    # grad_x[i, j] = sum over the 4x4 upsampled pixels (2i-1+a, 2j-1+b) of their interpolation
    # weight on (i, j) times the transposed conv of grad there. A pixel may come twice (H or W
    # of 1): both write the same value.
    acc_ty: tl.constexpr = w_ptr.dtype.element_ty
    plane = program_index(0, WIDE) // TB
    t = program_index(0, WIDE) % TB
    n = plane // C
    ci = plane % C
    g0 = (ci // CG) * CG
    e = t * BLOCK + tl.arange(0, BLOCK)
    emask = e < NB
    k = e - 2 * W
    i = tl.where(e < W, 0, tl.where(e < 2 * W, H - 1, k // 2))
    j = tl.where(e < W, e, tl.where(e < 2 * W, e - W, (k % 2) * (W - 1)))
    ab = tl.arange(0, 16)
    hh = 2 * i[:, None] + (ab // 4 - 1)[None, :]
    ww = 2 * j[:, None] + (ab % 4 - 1)[None, :]
    coef = (_low_res_weight(i[:, None], hh, H, OH) * _low_res_weight(j[:, None], ww, W, OW)).to(acc_ty)
    kh, kw, kmask = _taps()
    r = hh[:, :, None] - kh[None, None, :]
    c = ww[:, :, None] - kw[None, None, :]
    m = ((emask[:, None] & (coef != 0))[:, :, None] & kmask[None, None, :]
         & (r >= 0) & (r < OH) & (c >= 0) & (c < OW))
    off = r * sgh + c * sgw
    kk = tl.arange(0, 16)
    acc3 = tl.zeros([BLOCK, 16, 16], dtype=acc_ty)
    for co in range(CG):
        v = tl.load(g_ptr + n * sgn + (g0 + co) * sgc + off, mask=m, other=0.0).to(acc_ty)
        wt = tl.load(w_ptr + ((g0 + co) * CG + (ci - g0)) * 9 + kk, mask=kk < 9, other=0.0)
        acc3 += v * wt[None, None, :]
    acc = tl.sum(coef * tl.sum(acc3, axis=2), axis=1)
    tl.store(gx_ptr + plane * H * W + i * W + j, acc.to(gx_ptr.dtype.element_ty), mask=emask)


@triton.jit
def _grad_weight_tile(g_ptr, n, co, i, j, H, W, OH, OW, sgn, sgc, sgh, sgw, sxh, sxw,
                      S: tl.constexpr, SSP: tl.constexpr, BILINEAR: tl.constexpr):
    """The tile of low-res pixels (i, j) (rows past H are masked): grad[n, co] at their s*s
    parities (BLOCK, SSP), and the offsets and mask of their 3x3 low-res neighbourhoods (BLOCK, 16)."""
    pmask = i < H
    par = tl.arange(0, SSP)
    oh = i[:, None] * S + (par // S)[None, :]
    ow = j[:, None] * S + (par % S)[None, :]
    gm = pmask[:, None] & (par < S * S)[None, :]
    if BILINEAR:  # the border pixels come from the border kernel
        gm = gm & (oh > 0) & (oh < OH - 1) & (ow > 0) & (ow < OW - 1)
    g = tl.load(g_ptr + n * sgn + co * sgc + oh * sgh + ow * sgw, mask=gm, other=0.0)
    d = tl.arange(0, 16)
    r = i[:, None] + (d // 3 - 1)[None, :]
    c = j[:, None] + (d % 3 - 1)[None, :]
    m = pmask[:, None] & (d < 9)[None, :]
    if BILINEAR:
        r = tl.minimum(tl.maximum(r, 0), H - 1)
        c = tl.minimum(tl.maximum(c, 0), W - 1)
    else:
        m = m & (r >= 0) & (r < H) & (c >= 0) & (c < W)
    return g, r * sxh + c * sxw, m


@triton.jit
def _grad_weight_kernel(g_ptr, x_ptr, part_ptr, C, CG, H, W, OH, OW, T, TPP, NCH,
                        sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                        S: tl.constexpr, SSP: tl.constexpr, BILINEAR: tl.constexpr, ONE_TILE: tl.constexpr,
                        BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # Program (n*C + co, chunk): over its TPP tiles of low-res pixels, for each input channel ci
    # of the group, the sums of grad[co] at parity p times x[ci] at neighbour d, per (d, p).
    acc_ty: tl.constexpr = part_ptr.dtype.element_ty
    plane = program_index(0, WIDE) // NCH
    chunk = program_index(0, WIDE) % NCH
    n = plane // C
    co = plane % C
    g0 = (co // CG) * CG
    dst = (tl.arange(0, 16)[:, None] * SSP + tl.arange(0, SSP)[None, :]
           + (plane * NCH + chunk) * CG * 16 * SSP)
    pix = chunk * TPP * BLOCK + tl.arange(0, BLOCK)  # the first tile's pixels
    i0 = pix // W
    j0 = pix % W
    if ONE_TILE:  # the tile's indices and grad once for all input channels
        g, off, m = _grad_weight_tile(g_ptr, n, co, i0, j0, H, W, OH, OW, sgn, sgc, sgh, sgw, sxh, sxw,
                                      S, SSP, BILINEAR)
        g = g.to(acc_ty)
        for ci in range(CG):
            v = tl.load(x_ptr + n * sxn + (g0 + ci) * sxc + off, mask=m, other=0.0).to(acc_ty)
            tl.store(part_ptr + dst + ci * 16 * SSP, tl.sum(v[:, :, None] * g[:, None, :], axis=0))
    else:
        t_lo = chunk * TPP
        t_hi = tl.minimum(t_lo + TPP, T)
        # The next tile's (i, j) by adding BLOCK pixels: no division per tile and input channel.
        di = BLOCK // W
        dj = BLOCK % W
        for ci in range(CG):
            acc = tl.zeros([BLOCK, 16, SSP], dtype=acc_ty)
            i = i0
            j = j0
            for _t in range(t_lo, t_hi):
                g, off, m = _grad_weight_tile(g_ptr, n, co, i, j, H, W, OH, OW, sgn, sgc, sgh, sgw, sxh, sxw,
                                              S, SSP, BILINEAR)
                v = tl.load(x_ptr + n * sxn + (g0 + ci) * sxc + off, mask=m, other=0.0).to(acc_ty)
                acc += v[:, :, None] * g.to(acc_ty)[:, None, :]
                j += dj
                i += di + (j >= W).to(tl.int32)
                j = tl.where(j >= W, j - W, j)
            tl.store(part_ptr + dst + ci * 16 * SSP, tl.sum(acc, axis=0))


@triton.jit
def _grad_weight_border_kernel(g_ptr, x_ptr, part_ptr, C, CG, H, W, OH, OW, NB, TB,
                               sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, BLOCK: tl.constexpr,
                               WIDE: tl.constexpr):
    # Bilinear only: program (n*C + co, tile) adds the high-res border pixels' share of the
    # weight gradient, the taps interpolated directly.
    acc_ty: tl.constexpr = part_ptr.dtype.element_ty
    plane = program_index(0, WIDE) // TB
    t = program_index(0, WIDE) % TB
    n = plane // C
    co = plane % C
    g0 = (co // CG) * CG
    e = t * BLOCK + tl.arange(0, BLOCK)
    emask = e < NB
    oh, ow = _border_pixel(e, OH, OW)
    g = tl.load(g_ptr + n * sgn + co * sgc + oh * sgh + ow * sgw, mask=emask, other=0.0).to(acc_ty)
    kh, kw, kmask = _taps()
    hh = oh[:, None] + kh[None, :]
    ww = ow[:, None] + kw[None, :]
    m = emask[:, None] & kmask[None, :] & (hh >= 0) & (hh < OH) & (ww >= 0) & (ww < OW)
    o00, o01, o10, o11, w00, w01, w10, w11 = _bilinear(hh, ww, H, W, sxh, sxw, acc_ty)
    k = tl.arange(0, 16)
    for ci in range(CG):
        xb = x_ptr + n * sxn + (g0 + ci) * sxc
        u = (w00 * tl.load(xb + o00, mask=m, other=0.0).to(acc_ty)
             + w01 * tl.load(xb + o01, mask=m, other=0.0).to(acc_ty)
             + w10 * tl.load(xb + o10, mask=m, other=0.0).to(acc_ty)
             + w11 * tl.load(xb + o11, mask=m, other=0.0).to(acc_ty))
        tl.store(part_ptr + ((plane * TB + t) * CG + ci) * 16 + k, tl.sum(g[:, None] * u, axis=0))


# ---- host side ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _selection(s, mode, device):
    """S[a, d, k] (float64): weight of low-res neighbour i+d-1 in upsampled row i*s + a + k - 1
    (the input of output row i*s + a at tap k), by the interior formula (bilinear: source row
    (2i + a + k - 1 + 0.5) / 2 - 0.5, between its floor and the next row, neighbours clamped)."""
    if mode == "nearest":
        sel = [[[1.0 if (a + k - 1) // s == d - 1 else 0.0 for k in range(3)] for d in range(3)] for a in range(s)]
    else:
        sel = [[[0.0] * 3 for _ in range(3)] for _ in range(2)]
        for a in range(2):
            for k in range(3):
                src = (a + k - 1) / 2 - 0.25  # relative to i
                lo = math.floor(src)
                sel[a][lo + 1][k] += 1 - (src - lo)
                sel[a][lo + 2][k] += src - lo
    return torch.tensor(sel, dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=None)
def _window(s, mode, device):
    """(M, P): M[dr, kh] (float64) is the weight that grad row i*s - P + dr gets through tap kh
    in grad_x row i (interior): v[dr + kh - 2], v the weights of the upsampled rows
    i*s - P + 1 + a in low-res row i (nearest: s ones, P = 1; bilinear: 1/4, 3/4, 3/4, 1/4, P = 2)."""
    v, p = ([1.0] * s, 1) if mode == "nearest" else ([0.25, 0.75, 0.75, 0.25], 2)
    k = len(v) + 2
    m = [[v[dr + kh - 2] if 0 <= dr + kh - 2 < len(v) else 0.0 for kh in range(3)] for dr in range(k)]
    return torch.tensor(m, dtype=torch.float64, device=device), p


_INT32_LIMIT = INT32_LIMIT  # a module global: tests lower it to force the 64-bit path
_SLACK = 1024  # the indices of a tile past a tensor's end (masked, but compared) must not wrap either


def _wide(*tensors) -> bool:
    return reaches(tensors, _SLACK, _INT32_LIMIT)


def _ssp(s):
    return triton.next_power_of_2(s * s)


def _parity_weights(weight, s, mode):
    """(C, Cg, 16, SSP): weight of low-res neighbour d for output parity a*s+b, zero-padded
    (summed in float64)."""
    sel = _selection(s, mode, weight.device)
    c, cg = weight.shape[:2]
    wf = torch.einsum("xykl,adk,bel->xydeab", weight.double(), sel, sel).reshape(c, cg, 9, s * s)
    return torch.nn.functional.pad(wf, (0, _ssp(s) - s * s, 0, 16 - 9)).to(weight.dtype).contiguous()


def _window_weights(weight, s, mode):
    """(WB, P, K, KK): grad_x[i, j] = sum grad[i*s - P + dr, j*s - P + dc] * WB[co, ci, dr*K + dc]
    (interior), WB[dr, dc] = sum_{kh, kw} w[kh, kw] M[dr, kh] M[dc, kw], zero-padded to KK,
    the next power of 2 of K*K."""
    m, p = _window(s, mode, weight.device)
    k = m.shape[0]
    kk = triton.next_power_of_2(k * k)
    wb = torch.einsum("xykl,dk,el->xyde", weight.double(), m, m).flatten(2)
    return torch.nn.functional.pad(wb, (0, kk - k * k)).to(weight.dtype).contiguous(), p, k, kk


def _check(x, weight, s, mode, bias=None):
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{OP}: argument 'x' must be a 4-D floating tensor, got {x.dtype} of shape {tuple(x.shape)}")
    c = x.shape[1]
    if (weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] < 1 or c % weight.shape[1]
            or tuple(weight.shape[2:]) != (3, 3)):
        raise ValueError(f"{OP}: argument 'weight' must have shape (C, C/groups, 3, 3) with C = {c}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != stat_dtype(x) or weight.device != x.device:
        raise ValueError(f"{OP}: argument 'weight' must be {stat_dtype(x)} on {x.device} (the accumulation "
                         f"type), got {weight.dtype} on {weight.device}")
    if bias is not None and (bias.shape != (c,) or bias.dtype != weight.dtype or bias.device != x.device):
        raise ValueError(f"{OP}: argument 'bias' must be ({c},) {weight.dtype} on {x.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"{OP}: argument 'mode' must be 'nearest' or 'bilinear', got {mode!r}")
    if s < 1 or (mode == "bilinear" and s != 2):
        raise ValueError(f"{OP}: argument 'scale_factor' must be >= 1 (2 for mode 'bilinear'), "
                         f"got {s} for mode {mode!r}")


def _merge_moments(parts, dtype):
    """Chan's merge of per-program (count, shift, sum(d), sum(d^2)), (C, P, 4), in float64."""
    p = parts.double()
    cnt = p[..., 0]
    safe = cnt.clamp_min(1)
    mean_i = p[..., 1] + p[..., 2] / safe
    m2_i = (p[..., 3] - p[..., 2] ** 2 / safe).clamp_min(0)
    total = cnt.sum(1)
    mean = (cnt * mean_i).sum(1) / total.clamp_min(1)
    m2 = m2_i.sum(1) + (cnt * (mean_i - mean[:, None]) ** 2).sum(1)
    return mean.to(dtype), (m2 / total.clamp_min(1)).to(dtype)


def _forward(x, weight, bias, s, mode, activation, slope, stats):
    _check(x, weight, s, mode, bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: argument 'activation' must be one of {list(ACTIVATIONS)}, got {activation!r}")
    n, c, h, w = x.shape
    oh, ow, cg = h * s, w * s, weight.shape[1]
    bilinear = mode == "bilinear"
    empty = x.new_empty((0,), dtype=weight.dtype)
    if stats:
        out = x.new_empty((0,))
        if n * oh * ow == 0:
            zeros = x.new_zeros((c,), dtype=weight.dtype)
            return out, zeros, zeros.clone()
    else:
        out = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device)
        if out.numel() == 0:
            return out, empty, empty.clone()
    wf = _parity_weights(weight, s, mode)
    block = _block(16 * _ssp(s), 8192, weight.dtype)
    t = triton.cdiv(h * w, block)
    part = torch.empty((n, c, t, 4), dtype=weight.dtype, device=x.device) if stats else empty
    b = weight if bias is None else bias.contiguous()
    dst = empty if stats else out
    _forward_kernel[(n * c * t,)](x, wf, b, dst, part, c, cg, h, w, oh, ow, t, *x.stride(), float(slope),
                                S=s, SSP=_ssp(s), BILINEAR=bilinear, STATS=stats, HAS_BIAS=bias is not None,
                                ACTIVATION=activation, BLOCK=block, WIDE=_wide(x, wf, dst, part))
    parts = [part]
    if bilinear:
        nb = 2 * ow + 2 * (oh - 2)
        tb = triton.cdiv(nb, _BORDER_BLOCK)
        part_b = torch.empty((n, c, tb, 4), dtype=weight.dtype, device=x.device) if stats else empty
        _forward_border_kernel[(n * c * tb,)](x, weight.contiguous(), b, dst, part_b, c, cg, h, w, oh, ow, nb, tb,
                                            *x.stride(), float(slope), STATS=stats, HAS_BIAS=bias is not None,
                                            ACTIVATION=activation, BLOCK=_BORDER_BLOCK,
                                            WIDE=_wide(x, dst, part_b))
        parts.append(part_b)
    if not stats:
        return out, empty, empty.clone()
    merged = torch.cat(parts, 2).permute(1, 0, 2, 3).reshape(c, -1, 4)
    mean, var = _merge_moments(merged, weight.dtype)
    return out, mean, var


def _chunks(t, planes, device):
    """(tiles per program, programs per plane) of the weight-gradient kernel: one tile per
    program under the interpreter (fewest interpreted ops); on a GPU about 4096 programs, so
    the partial sums stay small for grouped weights too."""
    if device.type == "cpu":
        return 1, t
    per = max(1, triton.cdiv(t * planes, 4096))
    return per, triton.cdiv(t, per)


def _backward(grad, x, weight, s, mode):
    _check(x, weight, s, mode)
    n, c, h, w = x.shape
    oh, ow, cg = h * s, w * s, weight.shape[1]
    if tuple(grad.shape) != (n, c, oh, ow) or grad.dtype != x.dtype or grad.device != x.device:
        raise ValueError(f"{OP}: argument 'grad' must be ({n}, {c}, {oh}, {ow}) {x.dtype} on {x.device}, got "
                         f"{tuple(grad.shape)} {grad.dtype} on {grad.device}")
    grad_x = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return grad_x, torch.zeros_like(weight)
    bilinear = mode == "bilinear"
    weight = weight.contiguous()
    wb, p, k, kk = _window_weights(weight, s, mode)
    block = _block(kk, 2048, weight.dtype)  # (BLOCK, KK) accumulator and offsets
    t = triton.cdiv(h * w, block)
    _grad_x_kernel[(n * c * t,)](grad, wb, grad_x, c, cg, h, w, oh, ow, t, *grad.stride(),
                                 S=s, P=p, K=k, KK=kk, BLOCK=block, WIDE=_wide(grad, wb, grad_x))
    if bilinear:
        nb = 2 * w + 2 * h
        block = _gx_border_block(weight.dtype)
        tb = triton.cdiv(nb, block)
        _grad_x_border_kernel[(n * c * tb,)](grad, weight, grad_x, c, cg, h, w, oh, ow, nb, tb, *grad.stride(),
                                             BLOCK=block, WIDE=_wide(grad, weight, grad_x))
    ssp = _ssp(s)
    block = _block(16 * ssp, 2048, weight.dtype)
    t = triton.cdiv(h * w, block)
    per, nch = _chunks(t, n * c, x.device)
    part = torch.empty((n, c, nch, cg, 16, ssp), dtype=weight.dtype, device=x.device)
    _grad_weight_kernel[(n * c * nch,)](grad, x, part, c, cg, h, w, oh, ow, t, per, nch, *x.stride(), *grad.stride(),
                                      S=s, SSP=ssp, BILINEAR=bilinear, ONE_TILE=per == 1,
                                      BLOCK=block, WIDE=_wide(grad, x, part))
    sums = part.sum((0, 2), dtype=torch.float64)[..., :9, : s * s].reshape(c, cg, 3, 3, s, s)
    sel = _selection(s, mode, x.device)
    grad_w = torch.einsum("xydeab,adk,bel->xykl", sums, sel, sel)
    if bilinear:
        nb = 2 * ow + 2 * (oh - 2)
        tb = triton.cdiv(nb, _BORDER_BLOCK)
        part_b = torch.empty((n, c, tb, cg, 16), dtype=weight.dtype, device=x.device)
        _grad_weight_border_kernel[(n * c * tb,)](grad, x, part_b, c, cg, h, w, oh, ow, nb, tb,
                                                *x.stride(), *grad.stride(), BLOCK=_BORDER_BLOCK,
                                                WIDE=_wide(grad, x, part_b))
        grad_w = grad_w + part_b.sum((0, 2), dtype=torch.float64)[..., :9].reshape(c, cg, 3, 3)
    return grad_x, grad_w.to(weight.dtype)


KERNELS = ConvKernels(_forward, _backward)
register_triton_backend("shuffle_upsample", *fused_backend(KERNELS))
