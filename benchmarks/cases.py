"""Benchmark cases: shapes per op and size, argument builders, minimal bytes moved and flops.

No pytest here; conftest.py turns these into parametrized benchmarks. A case's ``sizes`` says
in which ``--bench-size`` it runs: "full" are the seeds' decoder/ASPP shapes (the default on
CUDA), "small" are scaled-down shapes so the whole run takes minutes on a 2-core CPU.
"""
from __future__ import annotations

import dataclasses

import torch

import uresnet_ops
from uresnet_ops import reference

OPS = ("pixel_shuffle_bn", "shuffle_upsample", "multi_dilation_conv2d")
MODES = ("eval_fwd", "train_fwd", "train_fwdbwd")
# Backend implementations are the names of uresnet_ops backends; these two are the baselines.
EAGER, COMPILED = "eager", "compiled"


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    label: str  # shape label used in the group name
    x_shape: tuple
    params: tuple = ()  # (key, value) pairs, see build()
    sizes: tuple = ("full",)
    cuda_only: bool = False

    @property
    def kw(self) -> dict:
        return dict(self.params)

    def modes(self) -> tuple:
        # multi_dilation_conv2d has no BatchNorm: its train and eval forward are the same op.
        return ("eval_fwd", "train_fwdbwd") if self.op == "multi_dilation_conv2d" else MODES


def _psbn(n, c, h, w, r=2, sizes=("full",), **extra):
    return Case("pixel_shuffle_bn", f"{n}x{c}x{h}x{w}-r{r}", (n, c, h, w), (("r", r),), sizes, **extra)


def _su(n, c, h, w, cout, groups=1, sizes=("full",), **extra):
    label = f"{n}x{c}x{h}x{w}-to{cout}" + (f"-g{groups}" if groups > 1 else "")
    return Case("shuffle_upsample", label, (n, c, h, w), (("cout", cout), ("groups", groups)), sizes, **extra)


def _mdc(n, c, h, w, per_branch, kernels=(1, 3, 3, 3), dilations=(1, 6, 12, 18), sizes=("full",), **extra):
    label = f"{n}x{c}x{h}x{w}-{len(kernels)}x{per_branch}" + \
        ("" if dilations == (1, 6, 12, 18) else "-d" + ",".join(map(str, dilations)))
    return Case("multi_dilation_conv2d", label, (n, c, h, w),
                (("per_branch", per_branch), ("kernels", kernels), ("dilations", dilations)), sizes, **extra)


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
    names = []
    for name in uresnet_ops.available_backends(op):
        if name == "triton" and device_type == "cpu":
            continue
        with uresnet_ops.use_backend(name, op):
            if uresnet_ops.get_backend(op, device_type).name == name:
                names.append(name)
    return names + [EAGER, COMPILED]


@dataclasses.dataclass
class Inputs:
    args: tuple
    kwargs: dict
    grad_inputs: list  # tensors that require grad in train_fwdbwd
    out_shape: tuple
    bytes: dict  # mode -> minimal bytes moved
    flops: dict  # mode -> nominal flops of the reference chain (None: memory-bound op)
    useful_flops: dict  # mode -> flops no kernel can avoid (see useful_flops())


def build(case: Case, mode: str, device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Random inputs for ``case`` (x and conv weights in ``dtype``; BatchNorm parameters and
    running statistics float32, as in mixed precision)."""
    gen = torch.Generator().manual_seed(seed)
    grad = mode == "train_fwdbwd"
    training = mode != "eval_fwd"

    def rand(*shape, dt=dtype, scale=1.0, positive=False):
        t = torch.rand(shape, generator=gen) + 0.5 if positive else torch.randn(shape, generator=gen) * scale
        return t.to(device=device, dtype=dt).requires_grad_(grad)

    def bn(channels):
        return (rand(channels, dt=torch.float32, positive=True), rand(channels, dt=torch.float32),
                torch.zeros(channels, device=device), torch.ones(channels, device=device))

    n, c, h, w = case.x_shape
    es = torch.finfo(dtype).bits // 8
    x = rand(n, c, h, w)
    kw = case.kw
    if case.op == "pixel_shuffle_bn":
        r = kw["r"]
        weight, bias, rm, rv = bn(c // (r * r))
        args, kwargs = (x, r, weight, bias, rm, rv), dict(training=training, activation="relu")
        grads, out_shape = [x, weight, bias], (n, c // (r * r), h * r, w * r)
        X = O = x.numel() * es
        fwd, bwd, flops = X + O, O + X + X, None  # bwd reads grad_out and x, writes grad_x
    elif case.op == "shuffle_upsample":
        cout = kw["cout"]
        dw, pw, pw_bias = rand(c, 1, 3, 3, scale=1 / 3), rand(cout, c, 1, 1, scale=c ** -0.5), rand(cout)
        bn_w, bn_b, rm, rv = bn(c)
        args = (x, dw, pw, pw_bias, bn_w, bn_b, rm, rv)
        kwargs = dict(training=training, scale_factor=2, mode="nearest", shuffle_groups=kw.get("groups", 1),
                      activation="relu")
        grads, out_shape = [x, dw, pw, pw_bias, bn_w, bn_b], (n, cout, 2 * h, 2 * w)
        X, O, W = x.numel() * es, n * cout * 4 * h * w * es, (dw.numel() + pw.numel()) * es
        fwd, bwd = X + W + O, O + X + W + X + W  # bwd reads grad_out, x, weights; writes grads
        flops = 2 * n * 4 * h * w * (9 * c + c * cout)  # the reference chain's depthwise + 1x1 conv
    elif case.op == "multi_dilation_conv2d":
        per, kernels = kw["per_branch"], kw["kernels"]
        weights = [rand(per, c, k, k, scale=(c * k * k) ** -0.5) for k in kernels]
        biases = [rand(per) for _ in kernels]
        args, kwargs = (x, weights, list(kw["dilations"]), biases), dict(activation="relu")
        grads, out_shape = [x, *weights, *biases], (n, per * len(kernels), h, w)
        X, O, W = x.numel() * es, n * per * len(kernels) * h * w * es, sum(t.numel() for t in weights) * es
        fwd, bwd = X + W + O, O + X + W + X + W
        flops = 2 * n * h * w * c * per * sum(k * k for k in kernels)  # every tap, padding included
    else:
        raise ValueError(f"unknown op {case.op!r}")
    per_mode = {m: 3 if m == "train_fwdbwd" else 1 for m in MODES}  # backward: twice the forward's flops
    useful = useful_flops(case)
    return Inputs(args, kwargs, grads if grad else [], out_shape,
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
        return 2 * n * (4 * h * w) * (4 * c + c * kw["cout"])
    inside = 0  # over every tap of every branch: the outputs whose tap lands inside the image
    for k, d in zip(kw["kernels"], kw["dilations"]):
        for i in range(k):
            for j in range(k):
                inside += max(h - abs(i - k // 2) * d, 0) * max(w - abs(j - k // 2) * d, 0)
    return 2 * n * c * kw["per_branch"] * inside


def function(op: str, impl: str):
    """The callable of an implementation: the public op (run it inside ``use_backend(impl)``),
    the eager reference chain, or ``torch.compile`` of it."""
    if impl == EAGER:
        return getattr(reference, op)
    if impl == COMPILED:
        _raise_recompile_limits()
        return torch.compile(getattr(reference, op), dynamic=False)
    return getattr(uresnet_ops, op)


def runner(fn, inputs: Inputs, mode: str):
    """One timed iteration: the forward, or forward + backward to every input that takes a
    gradient (``torch.autograd.grad``, so nothing accumulates between rounds)."""
    args, kwargs = inputs.args, inputs.kwargs
    if mode != "train_fwdbwd":
        def run():
            with torch.no_grad():
                return fn(*args, **kwargs)
        return run
    grad_out = torch.randn(inputs.out_shape, generator=torch.Generator().manual_seed(1)).to(
        device=inputs.grad_inputs[0].device, dtype=inputs.grad_inputs[0].dtype)

    def run_backward():
        out = fn(*args, **kwargs)
        return torch.autograd.grad(out, inputs.grad_inputs, grad_out)
    return run_backward


def _raise_recompile_limits():
    # Every (shape, mode, dtype) recompiles the same reference function; do not let dynamo fall
    # back to eager silently after the default 8 recompiles.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))

