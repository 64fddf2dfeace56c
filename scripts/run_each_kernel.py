"""Run every native (or Triton) kernel once, forward and backward, on small odd shapes in each
dtype, and check each result against the reference backend computed in float64 (no TF32: cuDNN
would run a float32 reference in TF32): the workload that scripts/gpu_check.sh runs for both GPU
backends and under compute-sanitizer. ``--device cpu`` runs the same calls on the C++ CPU
kernels, a dry run of this script on a machine without a GPU.

    python3 scripts/run_each_kernel.py [--device cuda|cpu] [--backend cuda|triton|cpu] [--dtype float32 ...]
                                       [--op pixel_shuffle_bn ...] [--list]

``--op`` and ``--dtype`` split the work (scripts/gpu_check.sh runs the Triton part as one process
per op and dtype: each compiles its own kernels); ``--list`` prints the calls and runs nothing.

Exits non-zero when a kernel did not run (another backend answered) or disagreed with the
reference; prints one line per call.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    import uresnet_ops
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import uresnet_ops
from uresnet_ops.testing import run_sample, sample_inputs


def kernel_cases(device, dtype, ops):
    """(name, sample) per call of the ``ops``: small odd shapes (uresnet_ops.testing.sample_inputs),
    BatchNorm weight and bias in ``dtype``, running statistics in float32 (any x dtype)."""
    bn = dict(param_dtype=dtype, stats_dtype=torch.float32)
    for layout in ("contiguous", "channels_last") if "pixel_shuffle_bn" in ops else ():
        for training in (True, False):
            yield (f"pixel_shuffle_bn r=2 {layout} training={training}",
                   sample_inputs("pixel_shuffle_bn", device, dtype, shape=(3, 36, 5, 7), upscale_factor=2,
                                 layout=layout, training=training, requires_grad=True, **bn))
    for mode in ("nearest", "bilinear") if "shuffle_upsample" in ops else ():
        for groups in (1, 4):
            yield (f"shuffle_upsample {mode} shuffle_groups={groups}",
                   sample_inputs("shuffle_upsample", device, dtype, shape=(2, 8, 5, 6), out_channels=12, mode=mode,
                                 shuffle_groups=groups, training=True, requires_grad=True, seed=1, **bn))
    if "multi_dilation_conv2d" not in ops:
        return
    yield ("multi_dilation_conv2d k=(1,3,3,3) d=(1,6,12,18)",
           sample_inputs("multi_dilation_conv2d", device, dtype, shape=(2, 6, 19, 23), out_channels=5,
                         kernel_sizes=(1, 3, 3, 3), dilations=(1, 6, 12, 18), requires_grad=True, seed=2))


def check(sample, backend):
    """Forward and backward of ``sample`` with ``backend``, and with the reference backend on the
    same inputs (in float64) and output gradient; returns what went wrong, or None."""
    ours = run_sample(sample.clone(), backend)
    ref = run_sample(sample.clone(torch.float64), "reference", grad_out=ours.grad_out)
    for impl, outcome in ((backend, ours), ("reference", ref)):
        if outcome.ran != (impl, impl):
            return f"{impl} was asked for, but forward/backward ran on {outcome.ran}"
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-4}.get(sample.x.dtype, 2e-2)
    compared = 1 + len(ours.grads)  # the output and every gradient (running statistics: not compared)
    for (what, mine), (_, want) in list(zip(ours.named(), ref.named(), strict=True))[:compared]:
        error = ((mine.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
        if not error <= tolerance:  # NaN fails too
            return f"{what}: relative error {error:.1e} > {tolerance:.0e}"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backend", choices=("cuda", "triton", "cpu"), help="default: the device's C++ kernels")
    parser.add_argument("--dtype", nargs="+", choices=("float32", "float64", "float16", "bfloat16"),
                        help="default: float32 float64, and float16 bfloat16 on cuda")
    parser.add_argument("--op", nargs="+", choices=uresnet_ops.testing.OPS, help="default: every op")
    parser.add_argument("--list", action="store_true", help="print the calls, run nothing")
    args = parser.parse_args(argv)
    dtypes = ([getattr(torch, name) for name in args.dtype] if args.dtype else
              [torch.float32, torch.float64] + ([torch.float16, torch.bfloat16] if args.device == "cuda" else []))
    ops = args.op or uresnet_ops.testing.OPS
    if args.list:  # on the meta device: no kernel runs, no GPU needed
        for dtype in dtypes:
            for name, _ in kernel_cases("meta", dtype, ops):
                print(f"{str(dtype)[6:]:8s} {name}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("run_each_kernel: no CUDA device here; use --device cpu for a dry run", file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    backend = args.backend or args.device
    if backend not in uresnet_ops.available_backends():
        print(f"run_each_kernel: backend {backend!r} is not available here "
              f"(available: {uresnet_ops.available_backends()})", file=sys.stderr)
        return 2
    failures = 0
    print(f"run_each_kernel: {backend} kernels on {args.device}; reference: float64")
    for dtype in dtypes:
        for name, sample in kernel_cases(args.device, dtype, ops):
            error = check(sample, backend)
            failures += error is not None
            status = "FAIL" if error else "ok  "
            print(f"{status} {backend:6s} {str(dtype)[6:]:8s} {name}{': ' + error if error else ''}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
