"""``uresnet_ops.fuse`` on torchvision's deeplabv3_resnet50: inference (eval forward) and a train
step (forward + backward + SGD step), the original vs the fused one (its ASPP becomes
``uresnet_ops.nn.ASPP``), for the fused block alone (the ASPP on the backbone's output, 2048
channels at 1/8 of the side) and for the whole network, side by side: the block's speed-up is
diluted by the backbone, which fuse leaves as it is.

Shapes: CPU batch 1, 128x128, float32; CUDA batch 8, 512x512 under bfloat16 autocast. One
``benchmark.group`` per part and mode; implementations "original" and "fused". Run::

    pytest benchmarks -k deeplabv3 --bench-device cpu --benchmark-json=bench-results/fuse.json
    python benchmarks/bench_fuse.py [--device cpu|cuda] [--rounds 5]   # table, no pytest
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import pytest
import torch

try:
    import uresnet_ops
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import uresnet_ops
from uresnet_models.benchmark import median_step_seconds
from uresnet_ops.timing import synchronize

IMPLS = ("original", "fused")
MODES = ("inference", "train_step")
PARTS = ("block", "network")


def shape(device: str) -> tuple[int, int]:
    """(batch, side)."""
    return (8, 512) if device == "cuda" else (1, 128)


def make_step(impl: str, mode: str, device, seed: int = 0, part: str = "network"):
    """A callable running one inference or train step of deeplabv3_resnet50, or of its ASPP
    alone (``part="block"``), fused or not."""
    from torchvision.models.segmentation import deeplabv3_resnet50
    torch.manual_seed(seed)
    device = torch.device(device)
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21).to(device)
    batch, side = shape(device.type)
    x = torch.randn(batch, 3, side, side, device=device)
    target = torch.randint(0, 21, (batch, side, side), device=device)
    if part == "block":  # the ASPP on the backbone's output; a per-pixel class target on its 256 channels
        model = _Out(model.classifier[0])
        x = torch.randn(batch, 2048, side // 8, side // 8, device=device)
        target = torch.randint(0, 256, (batch, side // 8, side // 8), device=device)
    if impl == "fused":
        model = uresnet_ops.fuse(model, inplace=True)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext)
    if mode == "inference":
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                return model(x)["out"]
        return step
    model.train()
    # BatchNorm on the 1x1 pooled ASPP branch needs more than one value per channel in training
    if batch == 1:
        x, target = x.repeat(2, 1, 1, 1), target.repeat(2, 1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model(x)["out"], target)
        loss.backward()
        optimizer.step()
        return loss
    return step


class _Out(torch.nn.Module):
    """A module returning ``{"out": module(x)}``, as the network does."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return {"out": self.module(x)}


# ----------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("part", PARTS)
def test_fuse_deeplabv3_resnet50(benchmark, bench_options, part, mode, impl):
    device = torch.device(bench_options.device)
    batch, side = shape(device.type)
    if mode == "train_step" and batch == 1:
        batch = 2
    benchmark.group = f"fuse deeplabv3_resnet50 {part} {mode} {batch}x{side}x{side}"
    step = make_step(impl, mode, device, part=part)
    step()  # warm-up (allocator, cuDNN/oneDNN primitives)
    synchronize(device)

    def target():
        step()
        synchronize(device)

    benchmark.pedantic(target, rounds=3 if device.type == "cpu" else 20, warmup_rounds=1)
    benchmark.extra_info.update(model="deeplabv3_resnet50", part=part, implementation=impl, mode=mode,
                                device=device.type,
                                batch=batch, side=side,
                                dtype="bfloat16-autocast" if device.type == "cuda" else "float32",
                                torch_version=torch.__version__)


# ----------------------------------------------------------------------------- standalone
def measure(impl, mode, device, rounds, part="network") -> float:
    step = make_step(impl, mode, device, part=part)
    step()
    synchronize(device)
    return median_step_seconds(step, device, rounds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    batch, side = shape(args.device)
    print(f"deeplabv3_resnet50 device={args.device} batch={batch} side={side} torch={torch.__version__}")
    print(f"{'mode':<12}" + "".join(f" {part + ' original':>17} {part + ' fused':>14} {'speedup':>8}"
                                     for part in PARTS))
    for mode in MODES:
        row = f"{mode:<12}"
        for part in PARTS:
            original, fused = (measure(impl, mode, args.device, args.rounds, part) for impl in IMPLS)
            row += f" {original * 1e3:>15.1f}ms {fused * 1e3:>12.1f}ms {original / fused:>7.2f}x"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
