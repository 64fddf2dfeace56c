"""Triton kernel of multi_dilation_conv2d (forward): one implicit GEMM over (N*H*W) x (sum Cout_b)
with K = Cin x taps. Every program owns a tile of output pixels and a tile of one branch's
output channels; taps whose whole pixel tile reads padding are skipped; bias and activation
in the epilogue; each branch stores straight into its channel slice of the output. All
branches go in one launch (a small table of column tiles says which branch each one is).
The backward is not implemented here: it runs on the next backend of the default order."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import backends
from .._common import memory_format
from . import AVAILABLE, DEVICE_TYPES, INTERPRET
from .pixel_shuffle_bn import _apply_activation

OP = "multi_dilation_conv2d"

# BLOCK_N is fixed per launch (the column-tile table is built for it); the rest is autotuned.
if INTERPRET:  # multi-config autotune fails under the interpreter
    _BLOCK_N = 16
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4)]
else:
    _BLOCK_N = 64
    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for m, k, w, s in [(128, 32, 4, 3), (128, 64, 4, 3), (64, 32, 4, 4), (64, 64, 4, 3),
                                   (256, 32, 8, 3), (256, 64, 8, 3)]]


@triton.autotune(configs=_CONFIGS, key=["C_IN", "C_TOT", "H", "W", "DTYPE_KEY"])
@triton.jit
def _forward_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, tiles_ptr, NHW, C_IN, C_TOT, H, W,
                    sxn, sxc, sxh, sxw, son, soc, soh, sow, negative_slope,
                    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DTYPE_KEY: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    tile = tl.program_id(1)
    # Column tile: (first output channel of the branch, branch width, first channel of the
    # tile inside the branch, kernel size, dilation, offset of the branch's packed weights).
    c_off = tl.load(tiles_ptr + tile * 6 + 0)
    c_out = tl.load(tiles_ptr + tile * 6 + 1)
    n0 = tl.load(tiles_ptr + tile * 6 + 2)
    ks = tl.load(tiles_ptr + tile * 6 + 3)
    dil = tl.load(tiles_ptr + tile * 6 + 4)
    w_off = tl.load(tiles_ptr + tile * 6 + 5).to(tl.int64)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < NHW
    hw = H * W
    n = offs_m // hw
    oh = (offs_m % hw) // W
    ow = offs_m % W
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < c_out
    offs_k = tl.arange(0, BLOCK_K)
    half = (ks - 1) // 2
    if DTYPE_KEY == "float64":
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, ks * ks):
        ih = oh + (t // ks - half) * dil
        iw = ow + (t % ks - half) * dil
        valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if tl.max(valid.to(tl.int32), axis=0) > 0:  # else every pixel of the tile reads padding
            x_row = x_ptr + n * sxn + ih * sxh + iw * sxw
            w_tap = w_ptr + w_off + t * C_IN * c_out
            for c0 in range(0, C_IN, BLOCK_K):
                ck = c0 + offs_k
                a = tl.load(x_row[:, None] + ck[None, :] * sxc, mask=valid[:, None] & (ck[None, :] < C_IN), other=0.0)
                b = tl.load(w_tap + ck[:, None] * c_out + offs_n[None, :],
                            mask=(ck[:, None] < C_IN) & mask_n[None, :], other=0.0)
                if UPCAST:  # the interpreter's bfloat16 tl.dot returns garbage (triton 3.8)
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc += tl.dot(a, b, input_precision="ieee", out_dtype=acc.dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c_off + offs_n, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
    acc = _apply_activation(acc, ACTIVATION, negative_slope)
    o_ptr = out_ptr + (n * son + oh * soh + ow * sow)[:, None] + (c_off + offs_n)[None, :] * soc
    tl.store(o_ptr, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _forward(x, weights, dilations, biases, activation, slope):
    if x.dtype == torch.float64 and x.device.type == "cuda":  # no fp64 tl.dot path on GPUs
        return NotImplemented
    n, c_in, h, w = x.shape
    widths = [wt.shape[0] for wt in weights]
    out = torch.empty((n, sum(widths), h, w), dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    if out.numel() == 0:
        return out
    # Weights per branch as (k, k, Cin, Cout_b): a tap's (Cin x Cout_b) block is the GEMM's B.
    packed = torch.cat([wt.permute(2, 3, 1, 0).reshape(-1) for wt in weights])
    bias = torch.cat(list(biases)).contiguous() if biases else packed
    # One row per column tile of _BLOCK_N channels; tiles never straddle branches.
    rows, c_off, w_off = [], 0, 0
    for wt, d in zip(weights, dilations):
        cout, k = wt.shape[0], wt.shape[-1]
        rows += [(c_off, cout, n0, k, d, w_off) for n0 in range(0, cout, _BLOCK_N)]
        c_off += cout
        w_off += wt.numel()
    tiles = torch.tensor(rows, dtype=torch.int64, device=x.device)
    # float32 stays IEEE (no tf32): the tests compare at float32 tolerance.
    key = {torch.float64: "float64", torch.float32: "float32"}.get(x.dtype, "half")
    nhw = n * h * w

    def grid(meta):
        return (triton.cdiv(nhw, meta["BLOCK_M"]), len(rows))
    _forward_kernel[grid](x, packed, bias, out, tiles, nhw, c_in, out.shape[1], h, w, *x.stride(), *out.stride(),
                          slope, HAS_BIAS=bool(biases), ACTIVATION=activation, DTYPE_KEY=key,
                          UPCAST=INTERPRET and key == "half", BLOCK_N=_BLOCK_N)
    return out


backends.register_backend(OP, "triton", DEVICE_TYPES, _forward, available=AVAILABLE)
