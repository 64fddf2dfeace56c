"""Inference latency on CPU: each model (default encoder, eval mode) exported to ONNX and run
by onnxruntime, next to eager PyTorch (the fused ops) and ``torch.compile`` of the model, at
batch 1 and batch 8 of 256x256 (``--bench-size full``) or 128x128 (``small``, the CPU default
of these benchmarks). One ONNX file per model, exported with dynamic batch/H/W, serves both
shapes. One ``benchmark.group`` per (model, shape); implementations "eager", "compiled",
"onnxruntime". Run::

    pytest benchmarks/bench_onnx.py --bench-size full --benchmark-json=bench-results/onnx.json
    python benchmarks/bench_onnx.py [--size small|full] [--models uresnet,unet] [--rounds 5]  # table + ratios
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

try:
    import uresnet_models  # noqa: F401
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import uresnet_models as um
from uresnet_models import export

MODELS = ("uresnet", "uresnet_cls", "deresunet", "resunet_atrous", "resunet", "unet")
IMPLS = ("eager", "compiled", "onnxruntime")
BATCHES = (1, 8)
_ONNX_DIR = tempfile.TemporaryDirectory(prefix="uresnet-bench-onnx-")


def side(size: str) -> int:
    return 256 if size == "full" else 128


@functools.lru_cache(maxsize=None)
def _model(name: str):
    torch.manual_seed(0)
    model = um.create_model(name).eval()
    channels = 3 + (model.depth_channels if name == "deresunet" else 0)
    return model, channels


@functools.lru_cache(maxsize=None)
def _onnx_file(name: str) -> Path:
    """One export per model: dynamic batch, H and W."""
    model, channels = _model(name)
    path = Path(_ONNX_DIR.name) / f"{name}.onnx"
    return export.export_model(model, path, "onnx", example=torch.randn(2, channels, 64, 64))


def make_runner(name: str, impl: str):
    """A callable ``f(x)``: the model's inference by ``impl``."""
    model, _ = _model(name)
    if impl == "onnxruntime":
        return export.load_exported(_onnx_file(name), "onnx")
    run = torch.compile(model) if impl == "compiled" else model

    def infer(x):
        with torch.no_grad():
            return run(x)
    return infer


def _input(name: str, batch: int, size: str):
    _, channels = _model(name)
    torch.manual_seed(1)
    return torch.randn(batch, channels, side(size), side(size))


# ----------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
def test_inference_latency(benchmark, bench_options, name, batch, impl):
    if bench_options.device != "cpu":
        pytest.skip("onnxruntime runs on CPU here (CPUExecutionProvider)")
    x = _input(name, batch, bench_options.size)
    run = make_runner(name, impl)
    run(x)  # compile / session warm-up
    benchmark.group = f"inference {name} {batch}x{side(bench_options.size)}x{side(bench_options.size)}"
    benchmark.pedantic(run, args=(x,), rounds=5 if batch == 1 else 3, warmup_rounds=1)
    benchmark.extra_info.update(model=name, implementation=impl, batch=batch, side=side(bench_options.size),
                                bench_size=bench_options.size, device="cpu", mode="eval_fwd",
                                torch_version=torch.__version__, threads=torch.get_num_threads())


# ----------------------------------------------------------------------------- standalone
def _median_time(run, x, rounds: int) -> float:
    run(x)  # warm-up (compiles)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full"), default="full")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    print(f"CPU inference, {torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.rounds} "
          f"(ms); ratio = eager time / time")
    print(f"{'model':<16} {'input':<14}" + "".join(f"{i:>13}" for i in impls) + "".join(
        f"{'x ' + i:>15}" for i in impls if i != "eager"))
    for name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            x = _input(name, batch, args.size)
            t = {impl: _median_time(make_runner(name, impl), x, args.rounds) for impl in impls}
            ratios = "".join(f"{t['eager'] / t[i]:>15.2f}" for i in impls if i != "eager" and "eager" in t)
            print(f"{name:<16} {f'{batch}x{x.shape[1]}x{x.shape[2]}x{x.shape[3]}':<14}"
                  + "".join(f"{t[i] * 1e3:>13.1f}" for i in impls) + ratios, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
