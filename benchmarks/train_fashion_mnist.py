"""Train ``uresnet_cls`` from scratch on Fashion-MNIST on the CPU, through the library's own
training loop (:func:`uresnet_models.train.fit`), and report the test accuracy (the 10,000
test images: the validation split of ``--format torchvision``) and the wall time.

    apt-get install dataset-fashion-mnist        # the data: /usr/share/datasets/fashion-mnist
    python benchmarks/train_fashion_mnist.py --threads 1

The defaults are the run in benchmarks/results/fashion_mnist.md: the seed's residual path
(stem + four stages of one BasicBlock, 16/32/64/128 wide) next to a U-Net of base width 4
and depth 2 (bilinear upsampling), no Selected Upsampling (28 x 28 is enough at stride 1),
AdamW with a one-cycle schedule over 4 epochs, batch 128, no augmentation. The wall time
counts everything ``fit`` does: reading the data, training, evaluating after every epoch,
writing the checkpoints and plots; the CPU time (this process's, all its threads) is beside it:
on cores shared with other jobs it is what the run costs, the wall time what it took. The
accuracy is the last epoch's, not the best one's (no choice is made on the test set).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout: this tree's uresnet_models

DEBIAN_DATA = "/usr/share/datasets/fashion-mnist"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=DEBIAN_DATA, help=f"the four IDX files, gzipped or not, or torchvision's "
                   f"FashionMNIST root (default {DEBIAN_DATA})")
    p.add_argument("--epochs", type=int, default=4, help="default 4")
    p.add_argument("--batch-size", type=int, default=128, help="default 128")
    p.add_argument("--lr", type=float, default=3e-3, help="peak of the one-cycle schedule (default 3e-3)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW's (default 5e-4)")
    p.add_argument("--widths", default="16,32,64,128", help="the residual path's stage widths (default 16,32,64,128)")
    p.add_argument("--blocks", type=int, default=1, help="BasicBlocks per stage (default 1)")
    p.add_argument("--base-channels", type=int, default=4, help="the U-Net's base width (default 4)")
    p.add_argument("--unet-depth", type=int, default=2, help="the U-Net's downsamplings (default 2)")
    p.add_argument("--upsample", default="bilinear", help="the U-Net decoder's upsampling (default bilinear)")
    p.add_argument("--augment", action="store_true", help="random resized crop, flip, brightness/contrast (default: "
                   "none; 4 epochs are too few for them to pay)")
    p.add_argument("--train-samples", type=int, help="a seeded random subset of the 60,000 training images")
    p.add_argument("--val-samples", type=int, help="a seeded random subset of the 10,000 test images")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (default 0: the images are in "
                   "memory; a worker only competes for the cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run folder (default: a temporary one, removed after)")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    return p.parse_args(argv)


def config(args, out: str):
    from uresnet_models.train import TrainConfig
    widths = tuple(int(w) for w in args.widths.split(","))
    return TrainConfig(
        model="uresnet_cls", encoder=None, format="torchvision", dataset="FashionMNIST", data=args.data,
        model_args=dict(residual_widths=widths, residual_blocks=args.blocks, base_channels=args.base_channels,
                        unet_depth=args.unet_depth, upsample=args.upsample, selected_upsampling=False),
        image_size=28, augment=args.augment, train_samples=args.train_samples, val_samples=args.val_samples,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule="onecycle", optimizer="adamw",
        weight_decay=args.weight_decay, workers=args.workers, seed=args.seed, device="cpu", out=out,
        overwrite=True, progress=args.progress)


def run(args, log=print) -> dict:
    """Train per ``args``; the result row (accuracy, times, settings)."""
    import torch

    from uresnet_models import count_parameters
    from uresnet_models.train import fit
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        cfg = config(args, args.out or scratch)
        began, cpu_began = time.perf_counter(), time.process_time()
        result = fit(cfg, log=log)
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    last = result["history"][-1]
    return {"test_top1": last["val_top1"], "best_test_top1": result["best"], "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "train_s": round(sum(row["seconds"] for row in result["history"]), 1),
            "params": count_parameters(result["model"]), "epochs": len(result["history"]),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "train_samples": args.train_samples or 60000, "test_samples": args.val_samples or 10000,
            "config": {k: v for k, v in cfg.__dict__.items() if k not in ("out", "progress")},
            "torch": torch.__version__}


def main(argv=None) -> int:
    args = parse_args(argv)
    row = run(args)
    print(f"uresnet_cls on Fashion-MNIST: test accuracy {row['test_top1']:.4f} (last epoch; best "
          f"{row['best_test_top1']:.4f}), wall time {row['wall_s']:.0f} s ({row['train_s']:.0f} s in the epochs; "
          f"CPU time {row['cpu_s']:.0f} s), "
          f"{row['params'] / 1e3:.0f}k parameters, {row['threads']} thread(s), load average "
          f"{row['load_average_before'][0]:.2f} before, {row['load_average_after'][0]:.2f} after "
          f"({row['cpu_count']} cores)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
