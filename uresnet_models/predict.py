"""``uresnet predict``: a checkpoint run on image files. Segmentation models write one PNG per
image (class ids, 0/255 for one binary channel, or colours), classifiers ``predictions.csv``.
Images are normalised with the model's own ``preprocessing`` (what it was trained with); an
unreadable image is skipped and listed at the end unless ``strict``."""
from __future__ import annotations

import csv
import os
from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import load_checkpoint
from .data import IMAGE_EXTENSIONS, DataError, build_transform, read_image
from .errors import UsageError
from .metrics import predictions
from .plots import colorize


def image_files(path: str) -> list[str]:
    """``path`` if it is a file, else the images in the folder ``path``, sorted."""
    if not os.path.isdir(path):
        return [path]
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))


def predict(checkpoint: str, inputs: str, out: str, *, depth: str | None = None, image_size=None,
            color: bool = False, batch_size: int = 8, device: torch.device | str = "cpu", progress: bool = True,
            strict: bool = False, log: Callable = print) -> tuple[list[tuple], list[tuple]]:
    """Run ``checkpoint`` on the image (or folder of images) ``inputs`` and write the results to
    the folder ``out``; ``depth``: the folder of depth maps, by the images' names, of an RGB-D
    model. Images are resized to ``image_size`` (default: the training size), masks written at
    the image's own size. Consecutive images of the same model-input size share a forward pass
    of up to ``batch_size``. An image (or depth map) that cannot be read is skipped, or with
    ``strict`` raises its :class:`~uresnet_models.data.DataError`. Returns the rows, one per image
    done: ``(file, mask file)``, or ``(file, class_id, class, probability)`` for a classifier;
    and the ``(file, reason)`` of each image skipped."""
    from torchvision import tv_tensors
    from tqdm.auto import tqdm
    for flag, path in (("--checkpoint", checkpoint), ("--input", inputs)):
        if not os.path.exists(path):
            raise UsageError(f"{flag} {path}: no such file or folder")
    if depth and not os.path.isdir(depth):
        raise UsageError(f"--depth {depth}: no such folder")
    model, info, meta = load_checkpoint(checkpoint, device)
    files = image_files(inputs)
    if not files:
        raise UsageError(f"--input {inputs}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    if info.depth_channels and not depth:
        raise UsageError("this checkpoint takes RGB + depth: give --depth FOLDER (depth maps with the images' names)")
    size = image_size or meta.get("config", {}).get("image_size")
    pre = model.preprocessing  # what training normalised with (load_checkpoint restores it)
    transform = build_transform(replace(info, mean=tuple(pre["mean"]), std=tuple(pre["std"])), train=False,
                                image_size=tuple(size) if isinstance(size, list) else size)
    os.makedirs(out, exist_ok=True)
    rows, failed = [], []

    def load(path):
        image = read_image(path, "L" if info.in_channels - info.depth_channels == 1 else "RGB")
        x = transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        if info.depth_channels:
            stem = os.path.splitext(os.path.basename(path))[0]
            matches = [f for f in os.listdir(depth) if os.path.splitext(f)[0] == stem]
            if not matches:
                raise DataError(f"no depth map for {path} in {depth}")
            depth_map = read_image(os.path.join(depth, matches[0]), "depth").unsqueeze(0)
            x = torch.cat([x, F.interpolate(depth_map, size=x.shape[-2:], mode="nearest")[0]])
        return path, image.shape[-2:], x

    def run(batch):
        with torch.no_grad():
            output = model(torch.stack([x for _, _, x in batch]).to(device))
        seg_all = output[0] if isinstance(output, (tuple, list)) else output
        for j, (path, size_of_image, _) in enumerate(batch):
            if info.task == "cls":
                probs = output[j].float().softmax(0).cpu()
                k = int(probs.argmax())
                name = info.class_names[k] if k < len(info.class_names) else str(k)
                rows.append((path, k, name, float(probs[k])))
                bar.write(f"{path}: {name} ({probs[k]:.3f})")
                continue
            seg = F.interpolate(seg_all[j:j + 1].float(), size=size_of_image, mode="bilinear", align_corners=False)
            mask = predictions(seg)[0].cpu()
            if color:
                pixels = colorize(mask).permute(1, 2, 0).numpy()
            else:  # class ids; one binary channel as 0/255, the binary format's own mask convention
                pixels = (mask * (255 if info.num_classes == 1 else 1)).clamp(0, 255).to(torch.uint8).numpy()
            target = os.path.join(out, os.path.splitext(os.path.basename(path))[0] + ".png")
            Image.fromarray(pixels).save(target)
            rows.append((path, target))
        bar.update(len(batch))

    bar = tqdm(total=len(files), desc="predict", unit="image", disable=not progress)
    pending = []
    for path in files:
        try:
            item = load(path)
        except DataError as error:
            if strict:
                raise
            failed.append((path, str(error)))
            bar.update()
            continue
        if pending and (len(pending) >= batch_size or pending[0][2].shape != item[2].shape):
            run(pending)
            pending = []
        pending.append(item)
    if pending:
        run(pending)
    bar.close()
    if info.task == "cls":
        target = os.path.join(out, "predictions.csv")
        with open(target, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "class_id", "class", "probability"])
            writer.writerows(rows)
        log(f"wrote {target}")
    else:
        log(f"wrote {len(rows)} mask(s) to {out}")
    if failed:
        log(f"{len(failed)} of {len(files)} image(s) could not be read and were skipped (--strict stops at the first):")
        for _, reason in failed:
            log(f"  {reason}")  # a DataError names its file
    return rows, failed
