"""Triton kernels of multi_dilation_conv2d. Forward: one implicit GEMM over (N*H*W) x (sum Cout_b)
with K = Cin x taps. Every program owns a tile of output pixels and a tile of one branch's
output channels; taps whose whole pixel tile reads padding are skipped; bias and activation
in the epilogue; each branch stores straight into its channel slice of the output. All
branches go in one launch (a small table of column tiles says which branch each one is).

Backward (three launches plus two small torch reductions):
1. grad_pre = grad_out * act'(pre): the backward schema carries no saved output, so the
   pre-activation is recomputed by the forward kernel itself (GRAD=True epilogue: bias added,
   then grad_out is read at the same position and multiplied by act'); no launch for "none".
   (Taking the forward output instead would need a schema change and cannot invert silu.)
2. grad_x: one transposed implicit GEMM over all branches, (N*H*W) x C_in with
   K = sum_b Cout_b * taps_b; tap t of branch b reads grad_pre at pixel - offset_t; taps whose
   whole pixel tile falls outside the map are skipped.
3. grad weights: per (branch column tile, tap) an implicit GEMM Cout_b x C_in over the pixels,
   split along the pixels into per-program partials summed by torch (deterministic, no atomics).
grad biases: grad_pre summed per output channel (torch, in the accumulation dtype).

Loads (sm_90): Triton's pipeliner turns a load into cp.async only when each thread copies at
least 4 bytes, i.e. a float16/bfloat16 load must be vectorised: contiguous and provably aligned
along one dimension. So the weights are packed with every row zero-padded to a multiple of
_ALIGN elements; activations are read along their channels, contiguous in channels_last (a half
NCHW input is copied to channels_last once when its channel count is a multiple of _ALIGN);
branch channel offsets are declared multiples of _ALIGN (CH_ALIGN) when every branch's width is.
Index math is 32-bit unless an offset can reach 2**31 (WIDE)."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._common import memory_format
from . import INTERPRET
from ._common import INT32_LIMIT, activation_grad, apply_activation, program_index, reaches, register_triton_backend

OP = "multi_dilation_conv2d"
# Rows of packed weights, and channel runs that load as vectors, are multiples of this many
# elements: Triton assumes divisibility of an integer argument by 16 (never by 8).
_ALIGN = tl.constexpr(16)

# BLOCK_N is fixed per launch (the column-tile table is built for it); the rest is autotuned.
# GPU configs: those that compile for sm_90 without register spills in every dtype, with every
# epilogue (scripts/gpu_resources.py checks it; the 128- and 256-row tiles at 4 warps all spilled,
# and 3 pipeline stages spilled in float32: the float32 IEEE dot on FMAs; so did the 64x32 tile
# in float32 with 32-bit indices, and with triton 3.6's ptxas 12.8 the 32x16 one: float32 keeps
# 64x16 alone). Registers per config: docs/gpu_resources.md.
if INTERPRET:  # multi-config autotune fails under the interpreter
    _BLOCK_N = 16
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4)]
else:
    _BLOCK_N = 64
    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for m, k, w, s in [(64, 32, 8, 2), (64, 16, 8, 2), (32, 16, 4, 2)]]


def _prune_forward(configs, named_args, **kwargs):
    """The forward's configs for a launch: float32 only the 64x16 tile (the others spill, above)."""
    if kwargs.get("DTYPE_KEY") == "float32":
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) == (64, 16)] or configs
    return configs


@triton.jit
def _arange(size: tl.constexpr, WIDE: tl.constexpr):
    # 0..size-1 in the kernel's index width: a channel index times a stride can pass 2**31 too.
    r = tl.arange(0, size)
    if WIDE:
        r = r.to(tl.int64)
    return r


@triton.autotune(configs=_CONFIGS, key=["C_IN", "C_TOT", "H", "W", "DTYPE_KEY", "WIDE"],
                 prune_configs_by={"early_config_prune": _prune_forward})
@triton.jit
def _forward_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, tiles_ptr, go_ptr, NHW, C_IN, C_TOT, H, W,
                    sxn, sxc, sxh, sxw, son, soc, soh, sow, sgn, sgc, sgh, sgw, negative_slope,
                    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DTYPE_KEY: tl.constexpr, UPCAST: tl.constexpr,
                    GRAD: tl.constexpr, WIDE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # GRAD=False: out = act(conv + bias). GRAD=True (backward): out = grad_out * act'(conv + bias),
    # grad_out read at go_ptr with strides (sgn, sgc, sgh, sgw).
    pid_m = program_index(0, WIDE)
    tile = tl.program_id(1)
    # Column tile (the table is in the kernel's index width): (first output channel of the
    # branch, branch width, first channel of the tile inside the branch, kernel size, dilation,
    # offset of the branch's packed weights, a multiple of _ALIGN).
    c_off = tl.load(tiles_ptr + tile * 6 + 0)
    c_out = tl.load(tiles_ptr + tile * 6 + 1)
    n0 = tl.multiple_of(tl.load(tiles_ptr + tile * 6 + 2), BLOCK_N)
    ks = tl.load(tiles_ptr + tile * 6 + 3)
    dil = tl.load(tiles_ptr + tile * 6 + 4)
    w_off = tl.multiple_of(tl.load(tiles_ptr + tile * 6 + 5), _ALIGN)
    ldw = tl.cdiv(c_out, _ALIGN) * _ALIGN  # row length of the packed weights (zero-padded)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < NHW
    hw = H * W
    n = offs_m // hw
    oh = (offs_m % hw) // W
    ow = offs_m % W
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < c_out
    offs_k = _arange(BLOCK_K, WIDE)
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
            w_tap = w_ptr + w_off + t * C_IN * ldw
            for c0 in range(0, C_IN, BLOCK_K):
                ck = c0 + offs_k
                a = tl.load(x_row[:, None] + ck[None, :] * sxc, mask=valid[:, None] & (ck[None, :] < C_IN), other=0.0)
                # Masked to the padded row (zeros past c_out): a mask aligned like the row.
                b = tl.load(w_tap + ck[:, None] * ldw + offs_n[None, :],
                            mask=(ck[:, None] < C_IN) & (offs_n[None, :] < ldw), other=0.0)
                if UPCAST:  # the interpreter's bfloat16 tl.dot returns garbage (triton 3.8)
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc += tl.dot(a, b, input_precision="ieee", out_dtype=acc.dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c_off + offs_n, mask=mask_n, other=0.0).to(acc.dtype)[None, :]
    mask_out = mask_m[:, None] & mask_n[None, :]
    if GRAD:
        g_ptr = go_ptr + (n * sgn + oh * sgh + ow * sgw)[:, None] + (c_off + offs_n)[None, :] * sgc
        dy = tl.load(g_ptr, mask=mask_out, other=0.0).to(acc.dtype)
        acc = activation_grad(dy, acc, ACTIVATION, negative_slope)
    else:
        acc = apply_activation(acc, ACTIVATION, negative_slope)
    o_ptr = out_ptr + (n * son + oh * soh + ow * sow)[:, None] + (c_off + offs_n)[None, :] * soc
    tl.store(o_ptr, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


if INTERPRET:
    _GX_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4)]
    _GW_CONFIGS = [triton.Config({"BLOCK_CI": 16, "BLOCK_P": 16}, num_warps=4)]
    _GW_SPLIT_TARGET = 2  # programs per (tile, tap): > 1 so the tests exercise the partial sums
else:
    # 64 input channels per tile; float32 one 32x32 tile at 8 warps (with triton 3.6's ptxas 12.8
    # the others spill: the float32 IEEE dot on FMAs holds more per thread).
    _GX_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
                   for m, n, k, w, st in [(64, 64, 16, 8, 2), (32, 64, 16, 4, 2), (32, 32, 16, 8, 2)]]
    _GW_CONFIGS = [triton.Config({"BLOCK_CI": c, "BLOCK_P": p}, num_warps=w, num_stages=st)
                   for c, p, w, st in [(64, 32, 8, 3), (64, 64, 8, 3), (64, 16, 8, 2), (64, 32, 8, 2)]]
    _GW_SPLIT_TARGET = None  # from the SM count
# Pixels per weight-gradient split are a multiple of this (>= every BLOCK_P above).
_GW_P_ALIGN = 64


def _prune_grad_x(configs, named_args, **kwargs):
    """The input gradient's configs for a launch: 32-channel tiles in float32, 64 otherwise."""
    width = 32 if kwargs.get("DTYPE_KEY") == "float32" else 64
    return [c for c in configs if c.kwargs["BLOCK_N"] == width] or configs


@triton.autotune(configs=_GX_CONFIGS, key=["C_IN", "C_TOT", "H", "W", "DTYPE_KEY", "CH_ALIGN", "WIDE"],
                 prune_configs_by={"early_config_prune": _prune_grad_x})
@triton.jit
def _grad_x_kernel(gp_ptr, w_ptr, branches_ptr, gx_ptr, NUM_BRANCHES, NHW, C_IN, C_TOT, H, W,
                   sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                   DTYPE_KEY: tl.constexpr, UPCAST: tl.constexpr, CH_ALIGN: tl.constexpr, WIDE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # grad_x(pixel p, ci) = sum_b sum_t sum_co grad_pre(p - offset_b,t, c_off_b + co) * w_b[co, ci, t]:
    # rows = pixels, columns = input channels, K = every (branch, tap, output channel).
    # CH_ALIGN: every branch's first channel and width are multiples of it.
    pid_m = program_index(0, WIDE)
    pid_n = program_index(1, WIDE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < NHW
    hw = H * W
    n = offs_m // hw
    h = (offs_m % hw) // W
    w = offs_m % W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_IN
    ldc = tl.cdiv(C_IN, _ALIGN) * _ALIGN  # row length of the packed weights (zero-padded)
    offs_k = _arange(BLOCK_K, WIDE)
    if DTYPE_KEY == "float64":
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b in range(0, NUM_BRANCHES):
        # Branch row: (first output channel, width, kernel size, dilation, offset of its packed
        # (k, k, Cout_b, Cin padded to ldc) weights, a multiple of _ALIGN).
        c_off = tl.multiple_of(tl.load(branches_ptr + b * 5 + 0), CH_ALIGN)
        c_out = tl.multiple_of(tl.load(branches_ptr + b * 5 + 1), CH_ALIGN)
        ks = tl.load(branches_ptr + b * 5 + 2)
        dil = tl.load(branches_ptr + b * 5 + 3)
        w_off = tl.multiple_of(tl.load(branches_ptr + b * 5 + 4), _ALIGN)
        half = (ks - 1) // 2
        for t in range(0, ks * ks):
            # Output pixel that reads input pixel (h, w) through tap t: the flipped offset.
            oh = h - (t // ks - half) * dil
            ow = w - (t % ks - half) * dil
            valid = mask_m & (oh >= 0) & (oh < H) & (ow >= 0) & (ow < W)
            if tl.max(valid.to(tl.int32), axis=0) > 0:  # else the whole tile reads padding
                g_row = gp_ptr + n * sgn + oh * sgh + ow * sgw
                w_tap = w_ptr + w_off + t * c_out * ldc
                for c0 in range(0, c_out, BLOCK_K):
                    ck = c0 + offs_k
                    a = tl.load(g_row[:, None] + (c_off + ck)[None, :] * sgc,
                                mask=valid[:, None] & (ck[None, :] < c_out), other=0.0)
                    bm = tl.load(w_tap + ck[:, None] * ldc + offs_n[None, :],
                                 mask=(ck[:, None] < c_out) & (offs_n[None, :] < ldc), other=0.0)
                    if UPCAST:
                        a = a.to(tl.float32)
                        bm = bm.to(tl.float32)
                    acc += tl.dot(a, bm, input_precision="ieee", out_dtype=acc.dtype)
    x_ptr = gx_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + offs_n[None, :] * sxc
    tl.store(x_ptr, acc.to(gx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_GW_CONFIGS, key=["C_IN", "C_TOT", "H", "W", "DTYPE_KEY", "CH_ALIGN", "WIDE"])
@triton.jit
def _grad_w_kernel(x_ptr, gp_ptr, part_ptr, items_ptr, NHW, C_IN, C_TOT, H, W, PIX_PER_SPLIT, W_TOTAL,
                   sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                   DTYPE_KEY: tl.constexpr, UPCAST: tl.constexpr, CH_ALIGN: tl.constexpr, WIDE: tl.constexpr,
                   BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr):
    # Partial grad_w_b[co, ci, t] = sum over this split's pixels p of
    # grad_pre(p, c_off + co) * x(p + offset_t, ci): (Cout tile x K=pixels) @ (pixels x Cin tile).
    pid_ci = program_index(0, WIDE)
    item = tl.program_id(1)
    split = program_index(2, WIDE)
    # Item: (first output channel of the branch, branch width, first channel of the tile in the
    # branch, kernel size, dilation, offset of the branch's (Cout, Cin, k, k) gradient, tap).
    c_off = tl.multiple_of(tl.load(items_ptr + item * 7 + 0), CH_ALIGN)
    c_out = tl.multiple_of(tl.load(items_ptr + item * 7 + 1), CH_ALIGN)
    n0 = tl.multiple_of(tl.load(items_ptr + item * 7 + 2), BLOCK_CO)
    ks = tl.load(items_ptr + item * 7 + 3)
    dil = tl.load(items_ptr + item * 7 + 4)
    w_off = tl.load(items_ptr + item * 7 + 5)
    t = tl.load(items_ptr + item * 7 + 6)
    half = (ks - 1) // 2
    dh = (t // ks - half) * dil
    dw = (t % ks - half) * dil
    offs_co = n0 + tl.arange(0, BLOCK_CO)
    mask_co = offs_co < c_out
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    mask_ci = offs_ci < C_IN
    if DTYPE_KEY == "float64":
        acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    hw = H * W
    p_start = split * PIX_PER_SPLIT
    p_end = tl.minimum(p_start + PIX_PER_SPLIT, NHW)
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        n = p // hw
        h = (p % hw) // W
        w = p % W
        ih = h + dh
        iw = w + dw
        valid = (p < p_end) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        # Skip pixels that read only padding through tap t, but not in the half dtypes: the
        # pipeliner makes no cp.async of a load under a condition, and there a masked chunk
        # reads no memory and its wgmma is cheap.
        if DTYPE_KEY == "half":
            todo = True
        else:
            todo = tl.max(valid.to(tl.int32), axis=0) > 0
        if todo:
            a = tl.load(gp_ptr + (n * sgn + h * sgh + w * sgw)[None, :] + (c_off + offs_co)[:, None] * sgc,
                        mask=mask_co[:, None] & valid[None, :], other=0.0)
            bx = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + offs_ci[None, :] * sxc,
                         mask=valid[:, None] & mask_ci[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                bx = bx.to(tl.float32)
            acc += tl.dot(a, bx, input_precision="ieee", out_dtype=acc.dtype)
    kk = ks * ks
    dst = (part_ptr + split * W_TOTAL + w_off + offs_co[:, None] * (C_IN * kk)
           + offs_ci[None, :] * kk + t)
    tl.store(dst, acc, mask=mask_co[:, None] & mask_ci[None, :])


_TABLES: dict = {}
_INT32_LIMIT = INT32_LIMIT  # a module global: tests lower it to force the 64-bit path
_MARGIN = 1024  # past a tensor's last element: a tile's (>= the largest block) or split's end


def _wide(*tensors) -> bool:
    return reaches(tensors, _MARGIN, _INT32_LIMIT)


def _table(rows, device, wide):
    """The tensor of ``rows`` on ``device`` in the kernels' index width (int64 when ``wide``),
    cached: a host-to-device copy is not allowed while a CUDA graph is being captured, so the
    tables made during warm-up are reused."""
    key = (device, tuple(rows), wide)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) > 256:
            _TABLES.clear()
        table = _TABLES[key] = torch.tensor(rows, dtype=torch.int64 if wide else torch.int32, device=device)
    return table


def _padded(c):
    return triton.cdiv(c, _ALIGN.value) * _ALIGN.value


def _pack(weights, dims):
    """The branches' weights permuted by ``dims``, each zero-padded along its last (contiguous)
    dimension to a multiple of _ALIGN, in one buffer: every row of every tap's GEMM operand
    starts at a multiple of _ALIGN elements. Returns (buffer, offset of each branch)."""
    blocks = [wt.permute(*dims) for wt in weights]
    shapes = [(*b.shape[:-1], _padded(b.shape[-1])) for b in blocks]
    sizes = [math.prod(shape) for shape in shapes]
    packed = weights[0].new_zeros(sum(sizes))
    for b, shape, dst in zip(blocks, shapes, packed.split(sizes)):
        dst.view(shape)[..., :b.shape[-1]].copy_(b)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return packed, offsets


def _column_tiles(weights, dilations, offsets):
    """One row per column tile of _BLOCK_N channels (tiles never straddle branches):
    (first channel of the branch, its width, first channel of the tile, k, dilation, the
    branch's offset in ``offsets``)."""
    rows, c_off = [], 0
    for wt, d, w_off in zip(weights, dilations, offsets):
        cout, k = wt.shape[0], wt.shape[-1]
        rows += [(c_off, cout, n0, k, d, w_off) for n0 in range(0, cout, _BLOCK_N)]
        c_off += cout
    return rows


def _channel_align(widths):
    """CH_ALIGN: _ALIGN when every branch's width (so every first channel) is a multiple of it."""
    return _ALIGN.value if all(c % _ALIGN.value == 0 for c in widths) else 1


def _vector_layout(t, aligned):
    """``t``, copied once to channels_last when it is float16/bfloat16 in another layout and
    ``aligned`` (its channel runs are whole multiples of _ALIGN): then each thread's load of
    channels is a vector, which the pipeliner can make cp.async (NCHW's channel stride is H*W,
    and its pixel runs start anywhere after a dilated tap's shift). float32 needs no vectors."""
    cl = torch.channels_last
    if aligned and t.dtype in (torch.float16, torch.bfloat16) and not t.is_contiguous(memory_format=cl):
        return t.contiguous(memory_format=cl)
    return t


def _dtype_key(x):
    # float32 stays IEEE (no tf32): the tests compare at float32 tolerance.
    return {torch.float64: "float64", torch.float32: "float32"}.get(x.dtype, "half")


def _launch_forward(x, weights, dilations, biases, activation, slope, out, grad_out=None):
    """act(conv + bias) into out, or with grad_out: grad_out * act'(conv + bias) into out."""
    n, c_in, h, w = x.shape
    # Weights per branch as (k, k, Cin, Cout_b): a tap's (Cin x Cout_b) block is the GEMM's B.
    packed, offsets = _pack(weights, (2, 3, 1, 0))
    bias = torch.cat(list(biases)).contiguous() if biases else packed
    rows = _column_tiles(weights, dilations, offsets)
    go = out if grad_out is None else grad_out
    wide = _wide(x, out, go, packed)
    tiles = _table(rows, x.device, wide)
    key = _dtype_key(x)
    nhw = n * h * w

    def grid(meta):
        return (triton.cdiv(nhw, meta["BLOCK_M"]), len(rows))
    _forward_kernel[grid](x, packed, bias, out, tiles, go, nhw, c_in, out.shape[1], h, w, *x.stride(), *out.stride(),
                          *go.stride(), slope, HAS_BIAS=bool(biases), ACTIVATION=activation, DTYPE_KEY=key,
                          UPCAST=INTERPRET and key == "half", GRAD=grad_out is not None, WIDE=wide,
                          BLOCK_N=_BLOCK_N)


def _forward(x, weights, dilations, biases, activation, slope):
    if x.dtype == torch.float64 and x.device.type == "cuda":  # no fp64 tl.dot path on GPUs
        return NotImplemented
    n, c_in, h, w = x.shape
    widths = [wt.shape[0] for wt in weights]
    out = torch.empty((n, sum(widths), h, w), dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    if out.numel() == 0:
        return out
    _launch_forward(_vector_layout(x, c_in % _ALIGN.value == 0), weights, dilations, biases, activation, slope, out)
    return out


def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _backward(grad_out, x, weights, dilations, biases, activation, slope):
    if x.dtype == torch.float64 and x.device.type == "cuda":
        return NotImplemented
    n, c_in, h, w = x.shape
    widths = [wt.shape[0] for wt in weights]
    c_tot = sum(widths)
    nhw = n * h * w
    key = _dtype_key(x)
    upcast = INTERPRET and key == "half"
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_x = torch.empty_like(x)  # as the fake kernel (x's strides when dense)
    if nhw == 0 or c_tot == 0:
        grad_x.zero_()
        grad_w = [torch.zeros_like(wt) for wt in weights]
        grad_b = [torch.zeros_like(b) for b in biases] if biases else []
        return grad_x, grad_w, grad_b
    ch_align = _channel_align(widths)
    x = _vector_layout(x, c_in % _ALIGN.value == 0)  # read by the forward recompute and grad_w

    # 1. grad of the pre-activation (channels_last: channel-contiguous rows for both GEMMs).
    if activation == "none":
        gp = _vector_layout(grad_out, ch_align > 1)
    else:
        gp = torch.empty((n, c_tot, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        _launch_forward(x, weights, dilations, biases, activation, slope, gp, grad_out=grad_out)

    # 2. grad_x: one transposed implicit GEMM over every branch and tap.
    if c_in > 0:
        packed_t, offsets = _pack(weights, (2, 3, 0, 1))  # (k, k, Cout_b, Cin)
        brows, c_off = [], 0
        for wt, d, w_off in zip(weights, dilations, offsets):
            brows.append((c_off, wt.shape[0], wt.shape[-1], d, w_off))
            c_off += wt.shape[0]
        wide = _wide(gp, packed_t, grad_x)
        branches = _table(brows, x.device, wide)

        def grid_x(meta):
            return (triton.cdiv(nhw, meta["BLOCK_M"]), triton.cdiv(c_in, meta["BLOCK_N"]))
        _grad_x_kernel[grid_x](gp, packed_t, branches, grad_x, len(brows), nhw, c_in, c_tot, h, w,
                               *gp.stride(), *grad_x.stride(), DTYPE_KEY=key, UPCAST=upcast, CH_ALIGN=ch_align,
                               WIDE=wide)
    else:
        grad_x.zero_()

    # 3. grad weights: per (column tile, tap) partial GEMMs over pixel splits, summed here.
    sizes = [wt.numel() for wt in weights]
    w_total = sum(sizes)
    if c_in > 0:
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        items = [row + (t,) for row in _column_tiles(weights, dilations, offsets) for t in range(row[3] * row[3])]
        if _GW_SPLIT_TARGET is not None:
            target = _GW_SPLIT_TARGET
        else:  # about 4 waves of programs; the Cin tiles are 64
            target = triton.cdiv(4 * _sm_count(x.device), len(items) * triton.cdiv(c_in, 64))
        splits = max(1, min(triton.cdiv(nhw, _GW_P_ALIGN), target))
        per_split = triton.cdiv(triton.cdiv(nhw, splits), _GW_P_ALIGN) * _GW_P_ALIGN
        splits = triton.cdiv(nhw, per_split)
        part = torch.empty((splits, w_total), dtype=acc_dtype, device=x.device)
        wide = _wide(x, gp, part)
        item_table = _table(items, x.device, wide)

        def grid_w(meta):
            return (triton.cdiv(c_in, meta["BLOCK_CI"]), len(items), splits)
        _grad_w_kernel[grid_w](x, gp, part, item_table, nhw, c_in, c_tot, h, w, per_split, w_total,
                               *x.stride(), *gp.stride(), DTYPE_KEY=key, UPCAST=upcast, CH_ALIGN=ch_align,
                               WIDE=wide, BLOCK_CO=_BLOCK_N)
        flat = part.sum(0)
    else:
        flat = torch.zeros(w_total, dtype=acc_dtype, device=x.device)
    grad_w = []
    for wt, g in zip(weights, flat.split(sizes)):
        # A fresh tensor per branch (no views of one buffer: outputs must not alias), with
        # the weight's strides as the fake kernel's empty_like(weight).
        grad_w.append(torch.empty_like(wt).copy_(g.view(wt.shape)))

    # grad biases: grad_pre summed per output channel, in the accumulation dtype.
    grad_b = []
    if biases:
        gb = gp.sum(dim=(0, 2, 3), dtype=acc_dtype)
        grad_b = [g.to(b.dtype, copy=True) for g, b in zip(gb.split(widths), biases)]
    return grad_x, grad_w, grad_b


def _tf32_convolutions_are_faster(x, *rest):
    """float32 on a GPU where torch lets cuDNN use TF32 (its default): the reference's cuDNN
    convolutions run on tensor cores there, far above this kernel's IEEE float32 rate on CUDA
    cores (docs/roofline.md). Declined by default only; asked for by name, this backend runs."""
    return x.device.type == "cuda" and x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32


register_triton_backend(OP, _forward, _backward, declines=_tf32_convolutions_are_faster)
