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
import sys
from pathlib import Path

import pytest
import torch

try:
    import uresnet_models  # noqa: F401
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import uresnet_ops

from uresnet_models.benchmark import IMPLS, MODELS, model_shape, model_step, print_model_table
from uresnet_ops.timing import synchronize


# ----------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,encoder", MODELS, ids=[f"{n}-{e}" for n, e in MODELS])
def test_model_train_step(benchmark, bench_options, name, encoder, impl):
    device = torch.device(bench_options.device)
    batch, side = model_shape(bench_options.size, device.type)
    benchmark.group = f"train_step {name}({encoder}) {batch}x{side}x{side}"
    ctx = uresnet_ops.use_backend("reference") if impl == "reference" else contextlib.nullcontext()
    with ctx:
        _, step = model_step(name, encoder, device, batch, side)
        step()
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def target():
            step()
            synchronize(device)

        benchmark.pedantic(target, rounds=3 if bench_options.size == "small" else 10, warmup_rounds=1)
    benchmark.extra_info.update(model=f"{name}({encoder})", implementation=impl, device=device.type,
                                batch=batch, side=side, bench_size=bench_options.size, mode="train_step_adam",
                                torch_version=torch.__version__)
    if device.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)


@pytest.mark.parametrize("name", ["unet", "smp:Unet"])
def test_unet_vs_smp_train_step(benchmark, bench_options, name):
    if name == "smp:Unet":
        pytest.importorskip("segmentation_models_pytorch")
    device = torch.device(bench_options.device)
    batch, side = model_shape(bench_options.size, device.type)
    benchmark.group = f"train_step unet(resnet50) vs smp {batch}x{side}x{side}"
    _, step = model_step(name, "resnet50", device, batch, side)
    step()
    synchronize(device)

    def target():
        step()
        synchronize(device)

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
    print(f"device={args.device} size={size} torch={torch.__version__} backends={uresnet_ops.available_backends()}")
    print_model_table(args.device, size, args.rounds, args.models.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
