"""What a training run writes for a person to read: ``log.csv`` / ``log.json`` (one row per
epoch), ``curves.png`` (with matplotlib) and ``samples.png``; :func:`colorize` gives masks their
colours (also ``uresnet predict --color``)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .data import DataInfo
from .metrics import predictions

LOG_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_miou", "val_mdice", "val_iou_foreground",
               "val_pixel_acc", "val_top1", "seconds")
PALETTE = torch.tensor([[0, 0, 0], [230, 60, 50], [60, 190, 80], [60, 90, 230], [240, 200, 40], [200, 80, 220],
                        [60, 200, 220], [250, 140, 40], [140, 140, 140], [120, 60, 20]], dtype=torch.uint8)


def write_logs(out: Path, history: list[dict]) -> None:
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, LOG_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    (out / "log.json").write_text(json.dumps(history, indent=1) + "\n")


def plot_curves(history: list[dict], path: Path, log: Callable = print) -> Path | None:
    """A PNG of the loss, validation metric and learning rate per epoch (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: skipping {path} (pip install matplotlib)")
        return None
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    axes[0].plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    axes[0].set_title("loss")
    axes[0].legend()
    for key in ("val_miou", "val_mdice", "val_pixel_acc", "val_top1"):
        if any(h.get(key) is not None for h in history):
            axes[1].plot(epochs, [h.get(key) for h in history], "o-", label=key[4:])
    axes[1].set_title("validation")
    axes[1].set_ylim(0, 1)
    axes[1].legend()
    axes[2].plot(epochs, [h["lr"] for h in history], "o-")
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, also on short runs
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def colorize(mask: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Class ids (H, W) -> RGB uint8 (3, H, W); ignored pixels white."""
    colors = PALETTE[mask.clamp(0, 10 ** 6) % len(PALETTE)]
    colors[mask == ignore_index] = 255
    return colors.permute(2, 0, 1)


def class_names(info: DataInfo, n: int) -> list[str]:
    """``n`` names for the classes of ``info``: its own, then the ids of the unnamed ones."""
    names = list(info.class_names or [])[:n]
    return names + [str(i) for i in range(len(names), n)]


def _to_pil(t: torch.Tensor, scale: int):
    """A (3, H, W) float [0, 1] tensor as a PIL image enlarged ``scale`` times (nearest)."""
    from PIL import Image
    array = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(array)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


@torch.no_grad()
def save_samples(model: nn.Module, dataset, info: DataInfo, path: Path, device, count: int = 6) -> Path | None:
    """A PNG of ``count`` validation samples. Segmentation: one row per sample with the columns
    "input", "true mask" and "prediction" titled, and a legend of the class colours below;
    classification: the inputs captioned with the true and the predicted class."""
    from PIL import Image, ImageDraw
    model.eval()
    mean, std = torch.tensor(info.mean).view(-1, 1, 1), torch.tensor(info.std).view(-1, 1, 1)

    def shown(image):  # the colour (or grayscale) channels, unnormalised, as RGB
        return (image[:len(mean)] * std + mean).expand(3, -1, -1)
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    if not samples:
        return None
    h, w = samples[0]["image"].shape[-2:]
    scale = max(1, -(-128 // max(h, w)))  # tiles at least 128 px: small inputs stay legible
    tw, th, pad, line = w * scale, h * scale, 6, 14
    names = class_names(info, max(info.aux_classes or 0, info.num_classes, 2))
    if info.task == "cls":
        cols = min(len(samples), 3)
        rows_n = -(-len(samples) // cols)
        canvas = Image.new("RGB", (cols * (tw + pad) + pad, rows_n * (th + 2 * line + pad) + pad), "white")
        draw = ImageDraw.Draw(canvas)
        for k, sample in enumerate(samples):
            out = model(sample["image"].unsqueeze(0).to(device))
            pred = int(out.float().argmax(1)[0])
            x0, y0 = pad + (k % cols) * (tw + pad), pad + (k // cols) * (th + 2 * line + pad)
            canvas.paste(_to_pil(shown(sample["image"]), scale), (x0, y0))
            true = int(sample["label"])
            draw.text((x0, y0 + th + 1), f"true: {names[true]}", fill="black")
            draw.text((x0, y0 + th + line), f"pred: {names[pred]}", fill="darkgreen" if pred == true else "red")
        canvas.save(path)
        return path
    n_classes = max(info.num_classes, 2)
    legend_rows = -(-n_classes // 4)
    canvas = Image.new("RGB", (3 * (tw + pad) + pad, line + pad + len(samples) * (th + pad) + legend_rows * line + pad),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(("input", "true mask", "prediction")):
        draw.text((pad + c * (tw + pad), 2), title, fill="black")
    for r, sample in enumerate(samples):
        out = model(sample["image"].unsqueeze(0).to(device))
        seg = out[0] if isinstance(out, (tuple, list)) else out
        pred = predictions(seg.float())[0].cpu()
        tiles = [shown(sample["image"]), colorize(sample["mask"], info.ignore_index).float() / 255,
                 colorize(pred).float() / 255]
        for c, tile in enumerate(tiles):
            canvas.paste(_to_pil(tile, scale), (pad + c * (tw + pad), line + pad + r * (th + pad)))
    y0 = line + pad + len(samples) * (th + pad)
    col_w = (canvas.width - pad) // 4
    for c in range(n_classes):
        x, y = pad + (c % 4) * col_w, y0 + (c // 4) * line
        color = tuple(int(v) for v in PALETTE[c % len(PALETTE)])
        draw.rectangle([x, y + 2, x + 9, y + 11], fill=color, outline="black")
        draw.text((x + 13, y + 1), names[c][:max(4, col_w // 7)], fill="black")
    canvas.save(path)
    return path


def save_best_samples(model: nn.Module, out: Path, val_set, info: DataInfo, device) -> None:
    """samples.png from the best/ checkpoint (the one eval and predict use), not the last epoch;
    ``model`` keeps its own weights."""
    from safetensors.torch import load_model
    from .hub import WEIGHTS_NAME
    best_weights = out / "best" / WEIGHTS_NAME
    if not best_weights.is_file():
        save_samples(model, val_set, info, out / "samples.png", device)
        return
    last = {k: v.clone() for k, v in model.state_dict().items()}
    load_model(model, str(best_weights), device=str(device))
    save_samples(model, val_set, info, out / "samples.png", device)
    model.load_state_dict(last)
