"""What the Triton kernels of every op share: the activation and its gradient as @triton.jit
helpers (the Triton twins of uresnet_ops._common's), and the registration of a "triton" backend."""
from __future__ import annotations

import triton
import triton.language as tl

from .. import backends
from . import AVAILABLE, DEVICE_TYPES


# Index math is 32-bit unless an offset can reach this (the host chooses WIDE per launch).
INT32_LIMIT = 2 ** 31


@triton.jit
def program_index(axis: tl.constexpr, WIDE: tl.constexpr):
    # 64-bit index math only where an offset can reach 2**31 (WIDE): on the GPU each 64-bit
    # division or remainder is a call of a ~40-instruction routine, a 32-bit one a few
    # instructions. Everything indexed from the program id follows its width.
    pid = tl.program_id(axis)
    if WIDE:
        pid = pid.to(tl.int64)
    return pid


def reaches(tensors, margin: int, limit: int) -> bool:
    """Whether an index or offset into any of ``tensors``, or up to ``margin`` elements past its
    end (the masked lanes of a last tile are still computed), can reach ``limit``: then the
    kernels need 64-bit index math (WIDE)."""
    return any(t.numel() + margin >= limit
               or sum((d - 1) * abs(st) for d, st in zip(t.shape, t.stride(), strict=True)) + margin >= limit
               for t in tensors)


@triton.jit
def apply_activation(y, ACTIVATION: tl.constexpr, negative_slope):
    if ACTIVATION == "relu":  # NaN stays NaN, as in ATen (tl.maximum alone would give 0)
        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACTIVATION == "leaky_relu":
        y = tl.where(y >= 0, y, y * negative_slope)
    elif ACTIVATION == "silu":
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def activation_grad(dy, y, ACTIVATION: tl.constexpr, negative_slope):
    """dy times the activation's derivative at its input y."""
    if ACTIVATION == "relu":
        dy = tl.where(y > 0, dy, 0.0)
    elif ACTIVATION == "leaky_relu":
        dy = tl.where(y > 0, dy, dy * negative_slope)
    elif ACTIVATION == "silu":
        s = 1.0 / (1.0 + tl.exp(-y))
        dy = dy * s * (1.0 + y * (1.0 - s))
    return dy


def register_triton_backend(op: str, forward, backward, *, declines=None) -> None:
    """Register ``op``'s "triton" backend: for CUDA tensors where a GPU is present, and for CPU
    tensors too under ``TRITON_INTERPRET=1`` (uresnet_ops/triton/__init__.py). ``declines``: as
    for :func:`uresnet_ops.backends.register_backend`."""
    backends.register_backend(op, "triton", DEVICE_TYPES, forward, backward, available=AVAILABLE,
                              declines=declines)
