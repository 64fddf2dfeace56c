"""Model train-step benchmarks: forward + backward + Adam step of resunet_atrous(resnet50),
deresunet(resnet50) and uresnet(resnet34) with the default (fused) backends vs the same model
under ``uresnet_ops.use_backend("reference")``; peak memory on CUDA. For reference, also our
``unet(resnet50)`` vs ``segmentation_models_pytorch.Unet("resnet50")`` when smp is installed
(``pip install segmentation-models-pytorch``, the ``bench`` extra; skipped otherwise).

Sizes (``--bench-size``, see conftest.py): ``full`` = 256x256, batch 16 on CUDA / 4 on CPU (the
issue's target shape); ``small`` (default on CPU) = 128x128, batch 2, so the CPU run takes a
couple of minutes. One ``benchmark.group`` per (model, size); implementations "fused" and
"reference". Run::

    pytest benchmarks -k train_step --benchmark-json=bench-results/models.json
    python benchmarks/bench_models.py [--size small|full] [--device cpu|cuda]   # table, no pytest
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

try:
    import uresnet_models  # noqa: F401
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import uresnet_models  # noqa: E402
import uresnet_ops  # noqa: E402

MODELS = [("resunet_atrous", "resnet50"), ("deresunet", "resnet50"), ("uresnet", "resnet34")]
IMPLS = ("fused", "reference")


def shape(size: str, device: str) -> tuple[int, int]:
    """(batch, side) of the train step."""
    if size == "full":
        return (16 if device == "cuda" else 4), 256
    return (4 if device == "cuda" else 2), 128


def build_model(name: str, encoder: str):
    """``smp:Unet`` is segmentation_models_pytorch's U-Net; any other name is ours."""
    if name == "smp:Unet":
        smp = pytest.importorskip("segmentation_models_pytorch")
        return smp.Unet(encoder, encoder_weights=None, classes=2)
    return uresnet_models.create_model(name, encoder=encoder, num_classes=2)


def make_step(name: str, encoder: str, device, batch: int, side: int, seed: int = 0):
    """A model, its Adam optimizer and a callable running one train step on fixed inputs."""
    torch.manual_seed(seed)
    model = build_model(name, encoder).to(device).train()
    channels = 3 + (model.depth_channels if name == "deresunet" else 0)
    x = torch.randn(batch, channels, side, side, device=device)
    target = torch.randint(0, 2, (batch, side, side), device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        return loss

    return model, step


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(name, encoder, impl, device, size, rounds=3) -> dict:
    """Median seconds per train step (and CUDA peak memory) of one model and implementation."""
    batch, side = shape(size, torch.device(device).type)
    ctx = uresnet_ops.use_backend("reference") if impl == "reference" else contextlib.nullcontext()
    cuda = torch.device(device).type == "cuda"
    with ctx:
        model, step = make_step(name, encoder, device, batch, side)
        step()  # warm-up (allocator, cuDNN/oneDNN primitives)
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
    del model, step
    return dict(model=f"{name}({encoder})", impl=impl, batch=batch, side=side, median_s=statistics.median(times),
                peak_bytes=peak)


# ----------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,encoder", MODELS, ids=[f"{n}-{e}" for n, e in MODELS])
def test_model_train_step(benchmark, bench_options, name, encoder, impl):
    device = torch.device(bench_options.device)
    batch, side = shape(bench_options.size, device.type)
    benchmark.group = f"train_step {name}({encoder}) {batch}x{side}x{side}"
    ctx = uresnet_ops.use_backend("reference") if impl == "reference" else contextlib.nullcontext()
    with ctx:
        _, step = make_step(name, encoder, device, batch, side)
        step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def target():
            step()
            _sync(device)

        benchmark.pedantic(target, rounds=3 if bench_options.size == "small" else 10, warmup_rounds=1)
    benchmark.extra_info.update(model=f"{name}({encoder})", implementation=impl, device=device.type,
                                batch=batch, side=side, bench_size=bench_options.size, mode="train_step_adam",
                                torch_version=torch.__version__)
    if device.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)


@pytest.mark.parametrize("name", ["unet", "smp:Unet"])
def test_unet_vs_smp_train_step(benchmark, bench_options, name):
    device = torch.device(bench_options.device)
    batch, side = shape(bench_options.size, device.type)
    benchmark.group = f"train_step unet(resnet50) vs smp {batch}x{side}x{side}"
    _, step = make_step(name, "resnet50", device, batch, side)
    step()
    _sync(device)

    def target():
        step()
        _sync(device)

    benchmark.pedantic(target, rounds=3 if bench_options.size == "small" else 10, warmup_rounds=1)
    benchmark.extra_info.update(model=f"{name}(resnet50)", implementation=name, device=device.type, batch=batch,
                                side=side, bench_size=bench_options.size, mode="train_step_adam",
                                torch_version=torch.__version__)


# ----------------------------------------------------------------------------- standalone
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("small", "full"), help="default: full on CUDA, small on CPU")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=",".join([n for n, _ in MODELS] + ["unet"]),
                        help="comma-separated subset (unet: ours vs smp's)")
    args = parser.parse_args(argv)
    size = args.size or ("full" if args.device == "cuda" else "small")
    wanted = set(args.models.split(","))
    print(f"device={args.device} size={size} torch={torch.__version__} backends={uresnet_ops.available_backends()}")
    print(f"{'model':<26} {'shape':<12} {'fused':>10} {'reference':>10} {'speedup':>8} {'mem fused':>10} "
          f"{'mem ref':>10} {'mem saved':>9}")
    for name, encoder in MODELS:
        if name not in wanted:
            continue
        fused, ref = (measure(name, encoder, impl, args.device, size, args.rounds) for impl in IMPLS)
        mem = ("", "", "")
        if fused["peak_bytes"]:
            mem = (f"{fused['peak_bytes'] / 2**30:.2f}G", f"{ref['peak_bytes'] / 2**30:.2f}G",
                   f"{1 - fused['peak_bytes'] / ref['peak_bytes']:.0%}")
        print(f"{fused['model']:<26} {fused['batch']}x{fused['side']}x{fused['side']:<6} {fused['median_s'] * 1e3:>8.0f}ms "
              f"{ref['median_s'] * 1e3:>8.0f}ms {ref['median_s'] / fused['median_s']:>7.2f}x {mem[0]:>10} {mem[1]:>10} "
              f"{mem[2]:>9}", flush=True)
    if "unet" in wanted:
        try:
            ours, theirs = (measure(name, "resnet50", "fused", args.device, size, args.rounds)
                            for name in ("unet", "smp:Unet"))
            print(f"unet(resnet50) {ours['median_s'] * 1e3:.0f}ms vs smp.Unet(resnet50) {theirs['median_s'] * 1e3:.0f}ms: "
                  f"{theirs['median_s'] / ours['median_s']:.2f}x")
        except pytest.skip.Exception:
            print("segmentation_models_pytorch is not installed: no unet vs smp comparison")
    return 0


if __name__ == "__main__":
    sys.exit(main())
