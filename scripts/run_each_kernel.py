"""Run every native (or Triton) kernel once, forward and backward, on small odd shapes in each
dtype, and check each result against the reference backend computed in float64 (no TF32: cuDNN
would run a float32 reference in TF32): the workload that scripts/gpu_check.sh runs for both GPU
backends and under compute-sanitizer. ``--device cpu`` runs the same calls on the C++ CPU
kernels, a dry run of this script on a machine without a GPU.

    python3 scripts/run_each_kernel.py [--device cuda|cpu] [--backend cuda|triton|cpu] [--dtype float32 ...]

Exits non-zero when a kernel did not run (another backend answered) or disagreed with the
reference; prints one line per call.
"""
from __future__ import annotations

import argparse
import sys

import torch

import uresnet_ops
from uresnet_ops import backends, multi_dilation_conv2d, pixel_shuffle_bn, shuffle_upsample


def pixel_shuffle_bn_cases(device, dtype):
    for layout in (torch.contiguous_format, torch.channels_last):
        for training in (True, False):
            stats = torch.randn(9, device=device) * 0.1, torch.rand(9, device=device) + 0.5  # float32, any x

            def call(x, weight, bias, training=training, stats=stats):
                running = [s.clone() for s in stats]
                return pixel_shuffle_bn(x, 2, weight, bias, *running, training=training, activation="relu")
            x = torch.randn(3, 36, 5, 7, device=device, dtype=dtype).contiguous(memory_format=layout)
            yield (f"pixel_shuffle_bn r=2 {str(layout)[6:]} training={training}", "pixel_shuffle_bn", call,
                   [x, torch.rand(9, device=device, dtype=dtype) + 0.5, torch.randn(9, device=device, dtype=dtype)])


def shuffle_upsample_cases(device, dtype):
    for mode in ("nearest", "bilinear"):
        for groups in (1, 4):
            def call(x, dw, pw, pw_bias, bn_weight, bn_bias, mode=mode, groups=groups):
                stats = torch.zeros(8, device=device), torch.ones(8, device=device)
                return shuffle_upsample(x, dw, pw, pw_bias, bn_weight, bn_bias, *stats, mode=mode,
                                        shuffle_groups=groups)
            rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
            yield (f"shuffle_upsample {mode} shuffle_groups={groups}", "shuffle_upsample", call,
                   [rand(2, 8, 5, 6), rand(8, 1, 3, 3), rand(12, 8, 1, 1), rand(12), rand(8).abs() + 0.5, rand(8)])


def multi_dilation_cases(device, dtype):
    kernels, dilations = (1, 3, 3, 3), [1, 6, 12, 18]

    def call(x, *params):
        return multi_dilation_conv2d(x, list(params[:4]), dilations, list(params[4:]), "relu")
    weights = [torch.randn(5, 6, k, k, device=device, dtype=dtype) * 0.3 for k in kernels]
    biases = [torch.randn(5, device=device, dtype=dtype) for _ in kernels]
    yield ("multi_dilation_conv2d k=(1,3,3,3) d=(1,6,12,18)", "multi_dilation_conv2d", call,
           [torch.randn(2, 6, 19, 23, device=device, dtype=dtype), *weights, *biases])


def check(op, call, inputs, backend):
    """Forward and backward of ``call(*inputs)`` with ``backend``, and with the reference backend
    on the same inputs and output gradient in float64; returns what went wrong, or None."""
    grad_out, results = None, {}
    for impl in (backend, "reference"):
        leaves = [t.detach().clone().requires_grad_() if impl == backend else t.detach().double().requires_grad_()
                  for t in inputs]
        with uresnet_ops.use_backend(impl):
            out = call(*leaves)
            if grad_out is None:
                grad_out = torch.randn_like(out)
            grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
            used = backends.last_used(op, "forward"), backends.last_used(op, "backward")
        if used != (impl, impl):
            return f"{impl} was asked for, but forward/backward ran on {used}"
        results[impl] = [out] + list(grads)
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-4}.get(inputs[0].dtype, 2e-2)
    for i, (ours, ref) in enumerate(zip(results[backend], results["reference"])):
        error = ((ours.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
        if not error <= tolerance:  # NaN fails too
            what = "output" if i == 0 else f"gradient of input {i - 1}"
            return f"{what}: relative error {error:.1e} > {tolerance:.0e}"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backend", choices=("cuda", "triton", "cpu"), help="default: the device's C++ kernels")
    parser.add_argument("--dtype", nargs="+", choices=("float32", "float64", "float16", "bfloat16"),
                        help="default: float32 float64, and float16 bfloat16 on cuda")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("run_each_kernel: no CUDA device here; use --device cpu for a dry run", file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    backend = args.backend or args.device
    if backend not in uresnet_ops.available_backends():
        print(f"run_each_kernel: backend {backend!r} is not available here "
              f"(available: {uresnet_ops.available_backends()})", file=sys.stderr)
        return 2
    dtypes = ([getattr(torch, name) for name in args.dtype] if args.dtype else
              [torch.float32, torch.float64] + ([torch.float16, torch.bfloat16] if args.device == "cuda" else []))
    failures = 0
    print(f"run_each_kernel: {backend} kernels on {args.device}; reference: float64")
    for dtype in dtypes:
        for cases in (pixel_shuffle_bn_cases, shuffle_upsample_cases, multi_dilation_cases):
            for name, op, call, inputs in cases(args.device, dtype):
                error = check(op, call, inputs, backend)
                failures += error is not None
                print(f"{'FAIL' if error else 'ok  '} {backend:6s} {str(dtype)[6:]:8s} {name}{': ' + error if error else ''}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
