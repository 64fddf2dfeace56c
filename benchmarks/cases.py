"""Benchmark cases: shapes per op and size, minimal bytes moved and flops.

No pytest here; conftest.py turns these into parametrized benchmarks. A case's ``sizes`` says
in which ``--bench-size`` it runs: "full" are the seeds' decoder/ASPP shapes (the default on
CUDA), "small" are scaled-down shapes so the whole run takes minutes on a 2-core CPU. The inputs,
the implementations and the timed step come from the op harness, :mod:`uresnet_ops.testing`
(a case's ``params`` are :func:`uresnet_ops.testing.sample_inputs` keywords).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from uresnet_ops import testing
from uresnet_ops.testing import COMPILED, EAGER, MODES, OPS  # noqa: F401  (OPS: re-exported, scripts/roofline.py)


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    label: str  # shape label used in the group name
    x_shape: tuple
    params: tuple = ()  # (keyword, value) pairs for uresnet_ops.testing.sample_inputs
    sizes: tuple = ("full",)
    cuda_only: bool = False

    @property
    def kw(self) -> dict:
        return dict(self.params)

    def modes(self) -> tuple:
        # multi_dilation_conv2d has no BatchNorm: its train and eval forward are the same op.
        return testing.op_modes(self.op)


def _psbn(n, c, h, w, r=2, sizes=("full",), **extra):
    return Case("pixel_shuffle_bn", f"{n}x{c}x{h}x{w}-r{r}", (n, c, h, w), (("upscale_factor", r),), sizes, **extra)


def _su(n, c, h, w, cout, groups=1, sizes=("full",), **extra):
    label = f"{n}x{c}x{h}x{w}-to{cout}" + (f"-g{groups}" if groups > 1 else "")
    return Case("shuffle_upsample", label, (n, c, h, w), (("out_channels", cout), ("shuffle_groups", groups)),
                sizes, **extra)


def _mdc(n, c, h, w, per_branch, kernel_sizes=(1, 3, 3, 3), dilations=(1, 6, 12, 18), sizes=("full",), **extra):
    label = f"{n}x{c}x{h}x{w}-{len(kernel_sizes)}x{per_branch}" + \
        ("" if dilations == (1, 6, 12, 18) else "-d" + ",".join(map(str, dilations)))
    return Case("multi_dilation_conv2d", label, (n, c, h, w),
                (("out_channels", per_branch), ("kernel_sizes", kernel_sizes), ("dilations", dilations)),
                sizes, **extra)


CASES = [
    # PixelShuffle+BN+ReLU: DeResUNet decoder steps (issue 3's shapes), a latency-bound one, and
    # the CPU target shape (8, 256, 32, 32) r=2.
    _psbn(16, 256, 64, 64), _psbn(8, 1024, 32, 32, r=4), _psbn(8, 2048, 16, 16), _psbn(8, 512, 64, 64),
    _psbn(2, 64, 16, 16, sizes=("full", "small")), _psbn(1, 64, 8, 8, sizes=("full", "small")),
    _psbn(8, 256, 32, 32, sizes=("small",)),
    # EUCB: the EMCAD decoder stages (320->128 is EMCAD's), a small one, and the CPU target
    # shape (8, 128, 32, 32)->64 with 4 shuffle groups (issue 4).
    _su(16, 128, 64, 64, 64), _su(8, 320, 32, 32, 128), _su(8, 512, 16, 16, 320),
    _su(1, 32, 8, 8, 16, sizes=("full", "small")), _su(8, 128, 32, 32, 64, groups=4, sizes=("small",)),
    # Atrous block / ASPP: k=(1,3,3,3), d=(1,6,12,18); DeepLab's d=(1,12,24,36) at 1/16; a small
    # one; and the CPU target shape (4, 128, 32, 32)->4x32 (issue 5).
    _mdc(8, 256, 64, 64, 64), _mdc(4, 1024, 32, 32, 256),
    _mdc(2, 2048, 16, 16, 256, dilations=(1, 12, 24, 36)),
    _mdc(1, 64, 16, 16, 16, sizes=("full", "small")), _mdc(4, 128, 32, 32, 32, sizes=("small",)),
]


def cases(op: str, size: str, device_type: str) -> list[Case]:
    return [c for c in CASES if c.op == op and size in c.sizes and (device_type == "cuda" or not c.cuda_only)]


def implementations(op: str, device_type: str) -> list[str]:
    """Every backend of ``op`` that runs on ``device_type`` here, then "eager" and "compiled".
    Triton under TRITON_INTERPRET=1 (a test mode) is left out on CPU."""
    return testing.runnable_backends(op, device_type) + [EAGER, COMPILED]


@dataclasses.dataclass
class Inputs:
    sample: testing.Sample  # the op's arguments (uresnet_ops.testing.sample_inputs)
    bytes: dict  # mode -> minimal bytes moved
    flops: dict  # mode -> nominal flops of the reference chain (None: memory-bound op)
    useful_flops: dict  # mode -> flops no kernel can avoid (see useful_flops())


def build(case: Case, mode: str, device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Random inputs for ``case`` in ``mode`` (x and conv weights in ``dtype``; BatchNorm parameters
    and running statistics float32, as in mixed precision), with the minimal bytes and the flops."""
    sample = testing.sample_inputs(case.op, device, dtype, shape=case.x_shape, seed=seed, **testing.mode_flags(mode),
                                   **case.kw)
    n, c, h, w = case.x_shape
    es = torch.finfo(dtype).bits // 8
    xb, ob = sample.x.numel() * es, math.prod(sample.out_shape) * es
    kw = case.kw
    if case.op == "pixel_shuffle_bn":
        fwd, bwd, flops = xb + ob, ob + xb + xb, None  # bwd reads grad_out and x, writes grad_x
    elif case.op == "shuffle_upsample":
        dw, pw = sample.arguments["dw_weight"], sample.arguments["pw_weight"]
        wb = (dw.numel() + pw.numel()) * es
        fwd, bwd = xb + wb + ob, ob + xb + wb + xb + wb  # bwd reads grad_out, x, weights; writes grads
        flops = 2 * n * 4 * h * w * (9 * c + c * kw["out_channels"])  # the reference chain's depthwise + 1x1 conv
    else:  # multi_dilation_conv2d
        wb = sum(t.numel() for t in sample.arguments["weights"]) * es
        fwd, bwd = xb + wb + ob, ob + xb + wb + xb + wb
        # every tap, padding included
        flops = 2 * n * h * w * c * kw["out_channels"] * sum(k * k for k in kw["kernel_sizes"])
    per_mode = {m: 3 if m == "train_fwdbwd" else 1 for m in MODES}  # backward: twice the forward's flops
    useful = useful_flops(case)
    return Inputs(sample,
                  bytes={"eval_fwd": fwd, "train_fwd": fwd, "train_fwdbwd": fwd + bwd},
                  flops={m: None if flops is None else flops * k for m, k in per_mode.items()},
                  useful_flops={m: None if useful is None else useful * k for m, k in per_mode.items()})


def useful_flops(case: Case) -> int | None:
    """The forward's multiply-adds x 2 that no kernel can avoid (None: no arithmetic to speak of):
    taps that read only zero padding left out; nearest-x2 upsampling's 3x3 taps merged into the
    2x2 distinct source pixels each output reads (weights pre-summed per parity)."""
    n, c, h, w = case.x_shape
    kw = case.kw
    if case.op == "pixel_shuffle_bn":
        return None
    if case.op == "shuffle_upsample":  # the depthwise 3x3 as 2x2, then the dense 1x1 conv
        return 2 * n * (4 * h * w) * (4 * c + c * kw["out_channels"])
    inside = 0  # over every tap of every branch: the outputs whose tap lands inside the image
    for k, d in zip(kw["kernel_sizes"], kw["dilations"], strict=True):
        for i in range(k):
            for j in range(k):
                inside += max(h - abs(i - k // 2) * d, 0) * max(w - abs(j - k // 2) * d, 0)
    return 2 * n * c * kw["out_channels"] * inside
