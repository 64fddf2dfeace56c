"""The cost of getting to the kernel: each fused op against the eager chain it replaces, from
1xCx4x4 (the deepest decoder stage of a small image at batch 1, where the call is all overhead)
up to the small benchmark shape.

    python benchmarks/bench_overhead.py [--rounds 15] [--out benchmarks/results/overhead.md]

One thread (this is a 2-core shared VM); every implementation of a row is timed in turn, round
after round (interleaved), and each figure is the median over rounds of one round's mean call.
Columns: the fused op as a user calls it (``uresnet_ops.<op>``, default backend), the eager chain
(``uresnet_ops.reference.<op>``, plain torch.nn.functional), one ATen op of the chain alone (the
floor of any call: ``F.batch_norm`` of the output's shape, or the chain's first ``F.conv2d``),
and the compiled kernel op called directly (``torch.ops.uresnet_ops._<op>_native``: what the call
costs without the layers in front of it, eval only).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from uresnet_ops import testing
from uresnet_ops.timing import device_name

# op -> (sample_inputs keywords, shapes from 1xCx4x4 up to the small benchmark shape)
ROWS = {
    "pixel_shuffle_bn": ({"upscale_factor": 2}, [(1, 64, 4, 4), (1, 64, 8, 8), (2, 64, 16, 16)]),
    "shuffle_upsample": ({"out_channels": 8, "shuffle_groups": 4}, [(1, 16, 4, 4), (1, 16, 8, 8), (2, 32, 16, 16)]),
    "multi_dilation_conv2d": ({"out_channels": 4, "dilations": (1, 2, 3, 4)},
                              [(1, 16, 4, 4), (1, 16, 8, 8), (2, 32, 16, 16)]),
}
MODES = ("eval_fwd", "train_fwdbwd")


def one_aten_op(sample) -> callable:
    """The cheapest single ATen call of the op's chain, on tensors of its shapes."""
    out = sample.call(testing.implementation(sample.op, testing.EAGER)[0]).detach()
    if sample.op == "multi_dilation_conv2d":
        x, w = sample.args[0].detach(), sample.args[1][0].detach()
        return lambda: F.conv2d(x, w)
    c = out.shape[1]
    mean, var = torch.zeros(c), torch.ones(c)
    return lambda: F.batch_norm(out, mean, var, None, None, False)


def native_kernel(sample) -> callable | None:
    """The compiled kernel op on the sample, called directly (it takes the public op's arguments;
    eval)."""
    op = getattr(torch.ops.uresnet_ops, f"_{sample.op}_native", None)
    if op is None:
        return None
    public = getattr(torch.ops.uresnet_ops, sample.op).default
    calls = []

    class Capture(TorchDispatchMode):  # records the arguments the front end passes to the op
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is public:
                calls.append(args)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Capture():
        sample.call()
    return (lambda: op.default(*calls[0])) if calls else None


def time_row(fns: dict, rounds: int) -> dict:
    """Median over ``rounds`` of one round's mean microseconds per call, for each function."""
    calls = {}
    for name, fn in fns.items():  # warm up and choose a round's call count (~20 ms)
        for _ in range(5):
            fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(3, int(0.02 / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    command = " ".join(["python benchmarks/bench_overhead.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"Made with `{command}` on {device_name('cpu')}, 1 thread, torch {torch.__version__}, load "
             f"average {os.getloadavg()[0]:.1f} at the start (the VM has 2 cores); µs per call, median of "
             f"{args.rounds} interleaved rounds; ×eager = eager chain / fused (>1: fused is faster).", "",
             "| op | shape | mode | fused µs | eager chain µs | ×eager | one ATen op µs | kernel op alone µs |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for op, (params, shapes) in ROWS.items():
        for shape in shapes:
            for mode in (m for m in MODES if m in testing.op_modes(op)):
                flags = testing.mode_flags(mode)
                sample = testing.sample_inputs(op, "cpu", torch.float32, shape=shape, **flags, **params)
                fns = {impl: testing.step_function(sample, testing.implementation(op, impl)[0], mode)
                       for impl in (testing.DEFAULT, testing.EAGER)}
                fns["aten"] = one_aten_op(sample)
                kernel = native_kernel(sample) if mode == "eval_fwd" else None
                if kernel is not None:
                    fns["kernel"] = kernel
                t = time_row(fns, args.rounds)
                line = (f"| {op} | {'x'.join(map(str, shape))} | {mode} | {t[testing.DEFAULT]:.1f} | "
                        f"{t[testing.EAGER]:.1f} | {t[testing.EAGER] / t[testing.DEFAULT]:.2f} | {t['aten']:.1f} | "
                        + (f"{t['kernel']:.1f} |" if "kernel" in t else "– |"))
                lines.append(line)
                print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
