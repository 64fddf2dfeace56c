"""Datasets and joint augmentation for ``uresnet train | eval | predict``.

Every dataset returns a *raw* sample dict: ``image`` (``tv_tensors.Image``, uint8 or float,
C x H x W), and, as the task needs, ``mask`` (``tv_tensors.Mask``, int64 H x W class ids,
``IGNORE_INDEX`` where unlabelled), ``depth`` (``tv_tensors.Mask``, float32 1 x H x W in
[0, 1]) and ``label`` (int). :class:`Transformed` applies one ``torchvision.transforms.v2``
pipeline to the whole dict, so image, mask and depth get the same flip and crop, and returns
plain tensors: ``image`` (float32, normalised, depth appended as the last channel), ``mask``,
``label``.

Formats (``--format``) and the layouts read from ``--data``:

* ``synthetic``: coloured shapes generated on the fly (no files); segmentation, classification
  or both.
* ``binary``: ``images/`` and ``masks/`` (same file stems), or ``train/`` and ``val/`` folders
  each holding those two. A mask of 0/1 has 1 as foreground, one of 0/255 (anti-aliased or JPEG
  included) everything above 127; palette and 1-bit PNGs are read by their index. Any other
  mask (values 0..127 only, or exactly 0, 1 and 255) is ambiguous: a DataError names it.
* ``masks``: the same layout, the masks single-channel PNGs of class ids ``0..num_classes-1``
  (palette PNGs by their index, as Pascal VOC's), ``ignore_index`` (default 255) unlabelled.
* ``cityscapes``: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/*_gtFine_labelIds.png``; label ids become the 19 train ids, the rest 255.
* ``sunrgbd``: ``rgb/``, ``depth/``, ``label/`` (same stems; label 0 = background, 1..37 the
  classes; depth an 8/16-bit PNG scaled by its type's maximum), optionally under
  ``train/`` and ``val/``.
* ``imagefolder``: ``<class>/<image>`` folders (``torchvision.datasets.ImageFolder``),
  optionally under ``train/`` and ``val/``.
* ``torchvision`` with ``dataset=NAME``: the ``torchvision.datasets`` class of that name reads
  ``--data`` as its ``root`` (train/val: the dataset's own train and test or val split), never
  downloading unless ``download``: ``MNIST`` and ``FashionMNIST`` (1 channel; ``root/<NAME>/raw/``
  as torchvision wants it, or a folder holding the four IDX files, gzipped or not, as Debian's
  ``dataset-fashion-mnist`` installs them: see :func:`torchvision_root`), ``CIFAR10``
  (``root/cifar-10-batches-py/`` or that folder itself), ``VOCSegmentation``
  (``root/VOCdevkit/VOC2012/``: 21 classes, 255 unlabelled), ``OxfordIIITPet``
  (``root/oxford-iiit-pet/``: the trimaps as background 0, pet 1, border 255) and ``Cityscapes``
  (as ``cityscapes``).
* ``cifar10``: an alias of ``torchvision`` with ``dataset=CIFAR10``.

Where a format has no ``train/``/``val/`` split on disk, a seeded ``val_fraction`` of the files
is held out. A missing or unreadable file raises :class:`DataError` naming it.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from .constants import FORMATS, IMAGE_EXTENSIONS, TORCHVISION_DATASETS

IGNORE_INDEX = 255
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPE_NAMES = ("background", "circle", "square", "triangle")
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


class DataError(ValueError):
    """A dataset path, layout or file that cannot be used (the message names it)."""


@dataclass
class DataInfo:
    """What the model and the loss need to know about a dataset."""
    format: str
    task: str                       # "seg", "cls" or "joint" (segmentation + image class)
    num_classes: int                # segmentation classes (1 = binary, sigmoid), or image classes for "cls"
    in_channels: int = 3            # model input channels (RGB + depth for sunrgbd)
    depth_channels: int = 0
    aux_classes: int | None = None  # image classes of a "joint" task
    class_names: list = field(default_factory=list)
    ignore_index: int = IGNORE_INDEX
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


# --------------------------------------------------------------------------- file reading
def read_image(path, mode: str = "RGB") -> torch.Tensor:
    """An image file as a C x H x W tensor: uint8 for "RGB" and "L" (grayscale, 1 channel); int64
    for "labels" (class ids: a palette image's indices; colour channels only where they are all
    equal) and "binary" (a palette or 1-bit image's indices, anything else as grayscale: see
    :func:`binary_mask`); float32 in [0, 1] for "depth" (8- or 16-bit, scaled by its type's
    maximum)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            if mode in ("RGB", "L") or (mode == "binary" and img.mode not in ("P", "1")):
                array = np.asarray(img.convert("RGB" if mode == "RGB" else "L"))
            else:
                array = np.asarray(img)
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None
    if array.ndim == 3 and mode not in ("RGB", "L"):  # a label/depth map saved with colour (and alpha) channels
        colour = array[..., :3]
        if (colour != colour[..., :1]).any():
            raise DataError(f"{path}: a colour image where single-channel values were expected (class ids, "
                            "a binary mask or depth); save it as grayscale or as a palette PNG")
        array = array[..., 0]
    tensor = torch.from_numpy(array.copy())
    tensor = tensor.permute(2, 0, 1) if tensor.dim() == 3 else tensor.unsqueeze(0)
    if mode in ("labels", "binary"):
        return tensor.long()
    if mode == "depth":
        peak = 65535.0 if array.dtype in (np.uint16, np.int32, np.int64) or array.max() > 255 else 255.0
        return tensor.float() / peak
    return tensor


def binary_mask(values: torch.Tensor, path) -> torch.Tensor:
    """A binary mask read as it was saved: 0/1 as it is, 0/255 (anti-aliased or JPEG included)
    foreground above 127. A mask of values 0..127 only (with any above 1: class ids?) or of
    exactly 0, 1 and 255 (0/1 with 255 unlabelled?) is ambiguous: a DataError names it."""
    top = int(values.max()) if values.numel() else 0
    if top <= 1:
        return values
    present = values.unique().tolist()
    if top < 128:
        raise DataError(f"{path}: mask values {_listed(present)} are neither 0/1 nor 0/255; for class ids use "
                        "--format masks --num-classes K")
    if present == [0, 1, 255]:
        raise DataError(f"{path}: mask values 0, 1 and 255 (0/1 with 255 unlabelled?); for that use --format masks "
                        "--num-classes 2 (255 is the default --ignore-index)")
    return (values > 127).long()


def _listed(values: list, most: int = 6) -> str:
    return ", ".join(map(str, values[:most])) + (f", ... ({len(values)} values)" if len(values) > most else "")


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _source_images(folder: Path) -> list[Path]:
    """The images a dataset is indexed by: at least one, or a DataError naming the folder."""
    images = _images_in(folder)
    if not images:
        raise DataError(f"no images in {folder}")
    return images


def _match(stems_from: list[Path], folder: Path, what: str) -> list[Path]:
    """For each file, the file with the same stem in ``folder`` (any image extension)."""
    by_stem = {p.stem: p for p in _images_in(folder)}
    matched = []
    for p in stems_from:
        if p.stem not in by_stem:
            raise DataError(f"no {what} for {p}: expected {folder / p.stem}.png (or another image extension)")
        matched.append(by_stem[p.stem])
    return matched


def _split_dir(root: Path, split: str) -> Path | None:
    """``root/<split>`` when the dataset is split on disk (``val`` also accepts ``test``)."""
    for name in (split, "test") if split == "val" else (split,):
        if (root / name).is_dir():
            return root / name
    return None


def _holdout(dataset: Dataset, split: str, val_fraction: float, seed: int) -> Dataset:
    """A seeded train/val split of a dataset that has none on disk."""
    n = len(dataset)
    n_val = min(n - 1, max(1, math.ceil(n * val_fraction))) if n > 1 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[:n_val] if split == "val" else order[n_val:]))


# --------------------------------------------------------------------------- synthetic
class SyntheticShapes(Dataset):
    """Coloured circles, squares and triangles on a noisy background, generated from
    ``seed`` and the index (the same sample every time, in every process). Each class has its
    own hue, jittered, so a small model learns it in a few hundred steps; the shape itself
    separates the classes where the colours overlap. ``label`` is the largest shape's class - 1."""

    def __init__(self, length: int = 256, size: int = 64, num_classes: int = 4, seed: int = 0, max_shapes: int = 3):
        if not 2 <= num_classes <= len(SHAPE_NAMES):
            raise DataError(f"synthetic shapes have 2 to {len(SHAPE_NAMES)} classes, got {num_classes}")
        self.length, self.size, self.num_classes = length, size, num_classes
        self.seed, self.max_shapes = seed, max_shapes
        self.hues = torch.tensor([[0.85, 0.25, 0.2], [0.2, 0.75, 0.3], [0.25, 0.35, 0.9]])

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)

        def rand(*shape):
            return torch.rand(shape, generator=g)
        s = self.size
        yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
        image = 0.35 + 0.15 * rand(3, 1, 1) + 0.08 * torch.randn(3, s, s, generator=g)
        mask = torch.zeros(s, s, dtype=torch.long)
        largest, label = -1.0, 0
        for _ in range(1 + int(rand(1) * self.max_shapes)):
            kind = 1 + int(rand(1) * (self.num_classes - 1))
            r = s * (0.1 + 0.12 * rand(1).item())
            cy, cx = (r + (s - 2 * r) * rand(2)).tolist()
            if kind == 1:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
            elif kind == 2:
                inside = ((yy - cy).abs() < r * 0.85) & ((xx - cx).abs() < r * 0.85)
            else:  # an upward triangle: apex at the top, base at the bottom
                inside = (yy > cy - r) & (yy < cy + r) & ((xx - cx).abs() < (yy - cy + r) / 2)
            colour = (self.hues[kind - 1] + 0.2 * (rand(3) - 0.5)).clamp(0, 1)
            image = torch.where(inside, colour.view(3, 1, 1), image)
            mask[inside] = kind
            area = inside.sum().item()
            if area > largest:
                largest, label = area, kind - 1
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        from torchvision import tv_tensors
        return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask), "label": label}


class SyntheticClassification(SyntheticShapes):
    """One shape per image; ``label`` is its kind (circle, square, triangle)."""

    def __init__(self, length: int = 256, size: int = 32, num_classes: int = 3, seed: int = 0):
        super().__init__(length, size, num_classes + 1, seed, max_shapes=1)


# --------------------------------------------------------------------------- folders
class BinaryFolder(Dataset):
    """``images/`` + ``masks/``: binary masks, 0/1 or 0/255 (:func:`binary_mask`)."""

    def __init__(self, root):
        root = Path(root)
        self.images = _source_images(root / "images")
        self.masks = _match(self.images, root / "masks", "mask")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from torchvision import tv_tensors
        image = read_image(self.images[index], "RGB")
        mask = binary_mask(read_image(self.masks[index], "binary")[0], self.masks[index])
        _check_size(image, mask, self.masks[index])
        return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)}


class MaskFolder(BinaryFolder):
    """``images/`` + ``masks/``: single-channel masks of class ids ``0..num_classes-1`` and
    ``ignore_index`` (unlabelled), lossless (a JPEG blurs ids into others)."""

    def __init__(self, root, num_classes: int, ignore_index: int = IGNORE_INDEX):
        super().__init__(root)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        lossy = [p for p in self.masks if p.suffix.lower() in (".jpg", ".jpeg")]
        if lossy:
            raise DataError(f"{lossy[0]}: a JPEG mask ({len(lossy)} in all); class-id masks must be lossless (PNG)")

    def __getitem__(self, index):
        from torchvision import tv_tensors
        path = self.masks[index]
        image, ids = read_image(self.images[index], "RGB"), read_image(path, "labels")[0]
        _check_size(image, ids, path)
        bad = ids[(ids != self.ignore_index) & ((ids < 0) | (ids >= self.num_classes))]
        if bad.numel():
            raise DataError(f"{path}: class id {int(bad.max())} outside 0..{self.num_classes - 1} (and not the "
                            f"ignore index {self.ignore_index})")
        return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(ids)}


def _cityscapes_lut() -> torch.Tensor:
    """label id -> train id (19 classes), everything else -> IGNORE_INDEX, from torchvision's table."""
    from torchvision.datasets import Cityscapes
    lut = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    for c in Cityscapes.classes:
        if 0 <= c.id < 256 and 0 <= c.train_id < 255:
            lut[c.id] = c.train_id
    return lut


def cityscapes_class_names() -> list[str]:
    from torchvision.datasets import Cityscapes
    return [c.name for c in sorted(Cityscapes.classes, key=lambda c: c.train_id) if 0 <= c.train_id < 255]


class CityscapesSegmentation(Dataset):
    """Cityscapes fine annotations: ``*_gtFine_labelIds.png`` mapped to the 19 train ids."""

    def __init__(self, root, split: str = "train"):
        from torchvision.datasets import Cityscapes
        root = Path(root)
        try:  # torchvision lists the image/label pairs of the standard layout
            listing = Cityscapes(str(root), split=split, mode="fine", target_type="semantic")
        except (RuntimeError, ValueError) as error:
            raise DataError(f"{root} is not a Cityscapes folder with leftImg8bit/{split} and gtFine/{split} "
                            f"({str(error).splitlines()[0]})") from None
        self.pairs = sorted((Path(i), Path(t[0])) for i, t in zip(listing.images, listing.targets))
        if not self.pairs:
            raise DataError(f"no images in {root / 'leftImg8bit' / split}")
        self.lut = _cityscapes_lut()

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        from torchvision import tv_tensors
        image_path, label_path = self.pairs[index]
        image = read_image(image_path, "RGB")
        ids = read_image(label_path, "labels")[0]
        _check_size(image, ids, label_path)
        return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(self.lut[ids.clamp(0, 255)])}


class SUNRGBD(Dataset):
    """SUN RGB-D: ``rgb/``, ``depth/`` and ``label/`` with the same stems; labels 0..37
    (0 = background/unlabelled, kept as a class as in DeResUNet's 38-way output)."""

    NUM_CLASSES = 38

    def __init__(self, root):
        root = Path(root)
        self.rgb = _source_images(root / "rgb")
        self.depth = _match(self.rgb, root / "depth", "depth map")
        self.labels = _match(self.rgb, root / "label", "label map")

    def __len__(self):
        return len(self.rgb)

    def __getitem__(self, index):
        from torchvision import tv_tensors
        image = read_image(self.rgb[index], "RGB")
        depth = read_image(self.depth[index], "depth")
        label = read_image(self.labels[index], "labels")[0]
        _check_size(image, depth, self.depth[index])
        _check_size(image, label, self.labels[index])
        if label.max() >= self.NUM_CLASSES:
            raise DataError(f"{self.labels[index]}: label {int(label.max())} outside 0..{self.NUM_CLASSES - 1}")
        # depth travels as a Mask: flipped and cropped with the image, never colour-jittered, and
        # resized with nearest neighbours (no blending of valid depth with missing zeros)
        return {"image": tv_tensors.Image(image), "depth": tv_tensors.Mask(depth), "mask": tv_tensors.Mask(label)}


class ImageFolderClassification(Dataset):
    """``torchvision.datasets.ImageFolder`` read through :func:`read_image` (errors name the file)."""

    def __init__(self, root):
        from torchvision.datasets import ImageFolder
        try:
            folder = ImageFolder(str(root), loader=str)  # list the files only; read_image decodes them
        except (FileNotFoundError, OSError) as error:
            raise DataError(f"{root}: {error}") from None
        self.samples, self.classes = folder.samples, folder.classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        from torchvision import tv_tensors
        path, label = self.samples[index]
        return {"image": tv_tensors.Image(read_image(path, "RGB")), "label": label}


# --------------------------------------------------------------------------- torchvision.datasets
# The IDX files torchvision's MNIST classes read from root/<class name>/raw/, uncompressed
IDX_FILES = tuple(f"{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


@dataclass(frozen=True)
class _TorchvisionSpec:
    task: str                     # "cls" (arrays in memory) or "seg" (image and mask files)
    splits: tuple                 # torchvision's (train, val) split argument: train=True/False, or split names
    layout: str = ""              # the folder under root torchvision reads ("" where only torchvision knows)
    files: tuple = ()             # what it must hold (for torchvision_root)
    in_channels: int = 3
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    kwargs: dict = field(default_factory=dict)  # further constructor arguments


TORCHVISION_SPECS = {
    "MNIST": _TorchvisionSpec("cls", (True, False), "MNIST/raw", IDX_FILES, 1, (0.1307,), (0.3081,)),
    "FashionMNIST": _TorchvisionSpec("cls", (True, False), "FashionMNIST/raw", IDX_FILES, 1, (0.2860,), (0.3530,)),
    "CIFAR10": _TorchvisionSpec("cls", (True, False), "cifar-10-batches-py", CIFAR10_FILES, 3,
                                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "VOCSegmentation": _TorchvisionSpec("seg", ("train", "val"), "VOCdevkit/VOC2012", kwargs={"year": "2012"}),
    "OxfordIIITPet": _TorchvisionSpec("seg", ("trainval", "test"), "oxford-iiit-pet",
                                      kwargs={"target_types": "segmentation"}),
    "Cityscapes": _TorchvisionSpec("seg", ("train", "val"), "leftImg8bit/<split> and gtFine/<split>"),
}
assert tuple(TORCHVISION_SPECS) == TORCHVISION_DATASETS


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uresnet" / "datasets"


def torchvision_root(root, layout: str, files) -> Path:
    """The ``root`` a torchvision dataset class reads: ``root`` itself where ``root/layout``
    holds ``files``; else, where ``root`` holds them directly (the IDX files gzipped or not, as
    Debian's dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist, or the
    CIFAR-10 batches folder itself), a cache folder (``$XDG_CACHE_HOME/uresnet/datasets``, by
    default ``~/.cache/...``) whose ``layout/`` links to them, gzipped files decompressed there
    once. A DataError names what is missing."""
    root = Path(root)
    if (root / layout).is_dir():  # torchvision's own layout
        missing = [f for f in files if not (root / layout / f).is_file()]
        if missing:
            raise DataError(f"{root / layout}: missing {', '.join(missing)} (expected {', '.join(files)})")
        return root
    found = {f: next((p for p in (root / f, root / f"{f}.gz") if p.is_file()), None) for f in files}
    missing = [f for f, p in found.items() if p is None]
    if missing:
        raise DataError(f"{root}: expected {root / layout}/ holding {', '.join(files)}, or those files (gzipped or "
                        f"not) in {root} itself; missing {', '.join(missing)}")
    # keyed by the sources (path, size, time): a changed file is decompressed again
    key = hashlib.sha1(repr([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
                             for p in found.values()]).encode()).hexdigest()[:16]
    cache = _cache_dir() / key
    target = cache / layout
    target.mkdir(parents=True, exist_ok=True)
    for name, source in found.items():
        if (target / name).is_file():
            continue
        partial = target / f".{name}.{os.getpid()}"  # then renamed: concurrent processes never read half a file
        if source.suffix == ".gz":
            try:
                with gzip.open(source, "rb") as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as error:
                partial.unlink(missing_ok=True)
                raise DataError(f"cannot decompress {source}: {error}") from None
        else:
            partial.symlink_to(source.resolve())
        os.replace(partial, target / name)
    return cache


class TorchvisionClassification(Dataset):
    """MNIST, FashionMNIST or CIFAR10 read by torchvision, as raw samples from its arrays in
    memory (no PIL round trip): ``image`` uint8 C x H x W, ``label``."""

    in_memory = True  # nothing to check file by file

    def __init__(self, dataset):
        data = torch.as_tensor(dataset.data)  # N x H x W (MNIST) or N x H x W x C (CIFAR)
        self.data = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
        self.labels = torch.as_tensor(dataset.targets, dtype=torch.long)
        self.classes = list(dataset.classes)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        from torchvision import tv_tensors
        return {"image": tv_tensors.Image(self.data[index]), "label": int(self.labels[index])}


class TorchvisionSegmentation(Dataset):
    """A torchvision segmentation dataset (PIL image, PIL mask) as raw samples; ``lut`` maps
    the mask's values to class ids (``IGNORE_INDEX`` unlabelled)."""

    def __init__(self, dataset, lut: torch.Tensor):
        self.dataset, self.lut = dataset, lut

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        import numpy as np
        from torchvision import tv_tensors
        where = f"{type(self.dataset).__name__} sample {index}"
        try:
            image, mask = self.dataset[index]
            image, mask = np.asarray(image.convert("RGB")), np.asarray(mask)
        except (OSError, ValueError) as error:  # PIL's messages name the file
            raise DataError(f"{where}: {error}") from None
        if mask.ndim != 2:
            raise DataError(f"{where}: a mask of shape {mask.shape}; expected one channel of class ids")
        image = torch.from_numpy(image.copy()).permute(2, 0, 1)
        ids = torch.from_numpy(mask.astype(np.int64))
        _check_size(image, ids, where)
        return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(self.lut[ids.clamp(0, 255)])}


def _pet_lut() -> torch.Tensor:
    """Oxford-IIIT Pet trimaps: 1 pet, 2 background, 3 border (unlabelled)."""
    lut = torch.arange(256)
    lut[1], lut[2], lut[3] = 1, 0, IGNORE_INDEX
    return lut


def _torchvision(name: str, root: Path, split: str, download: bool) -> tuple[Dataset, DataInfo]:
    import torchvision.datasets
    spec, fmt = TORCHVISION_SPECS[name], f"torchvision {name}"  # DataInfo.format: what the logs and cards say
    if name == "Cityscapes":  # the cityscapes format: torchvision lists the files, the label ids become train ids
        names = cityscapes_class_names()
        return CityscapesSegmentation(root, split), DataInfo(fmt, "seg", len(names), class_names=names)
    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise DataError(f"--dataset {name}: torchvision {torchvision.__version__} has no datasets.{name}")
    source = root if download or not spec.files else torchvision_root(root, spec.layout, spec.files)
    split_arg = spec.splits[split == "val"]
    split_kw = {"train": split_arg} if isinstance(split_arg, bool) else {
        "image_set" if name == "VOCSegmentation" else "split": split_arg}
    try:
        dataset = cls(str(source), download=download, **split_kw, **spec.kwargs)
    except (RuntimeError, OSError) as error:  # "Dataset not found ...", a split list missing
        raise DataError(f"--data {root}: not a torchvision {name} folder (expected {root / spec.layout}/ as "
                        f"torchvision.datasets.{name} reads it; {str(error).splitlines()[0]})") from None
    if spec.task == "cls":
        data = TorchvisionClassification(dataset)
        return data, DataInfo(fmt, "cls", len(data.classes), in_channels=spec.in_channels,
                              class_names=data.classes, mean=spec.mean, std=spec.std)
    if name == "VOCSegmentation":
        return (TorchvisionSegmentation(dataset, torch.arange(256)),
                DataInfo(fmt, "seg", len(VOC_CLASSES), class_names=list(VOC_CLASSES)))
    return TorchvisionSegmentation(dataset, _pet_lut()), DataInfo(fmt, "seg", 2,
                                                                 class_names=["background", "pet"])


def _check_size(image, other, path):
    if tuple(image.shape[-2:]) != tuple(other.shape[-2:]):
        raise DataError(f"{path}: size {tuple(other.shape[-2:])} differs from its image's {tuple(image.shape[-2:])}")


# --------------------------------------------------------------------------- checking
def _image_files(dataset) -> list:
    """The image (not mask) files of a file-based dataset, for the colour-mode check."""
    base, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, None)
    files = (getattr(base, "images", None) or getattr(base, "rgb", None)
             or [p for p, *_ in getattr(base, "pairs", None) or getattr(base, "samples", None) or []])
    return [files[i] for i in indices] if indices is not None else list(files)


def check_dataset(dataset: Dataset, info: DataInfo, max_errors: int = 10, split: str = "train") -> list[str]:
    """Read every sample once (decoding each file): unreadable or truncated files, masks whose
    size differs from their image and labels outside ``0..num_classes-1`` (other than
    ``ignore_index``) raise one :class:`DataError` listing up to ``max_errors`` of them, as do
    segmentation masks of the ``split`` "train" with no foreground (no class but 0) anywhere.
    Returns notes about what is accepted but converted (grayscale or RGBA images -> RGB) and
    the classes no mask of ``split`` holds."""
    from PIL import Image
    errors = []
    seg_classes = max(info.num_classes, 2) if info.task != "cls" else None
    pixels = torch.zeros(seg_classes or 0, dtype=torch.long)  # labelled pixels per class
    for i in range(len(dataset)):
        try:
            sample = dataset[i]
        except DataError as error:
            errors.append(str(error))
        else:
            mask = sample.get("mask")
            if seg_classes is not None and mask is not None:
                labelled = mask[mask != info.ignore_index]
                bad = labelled[(labelled < 0) | (labelled >= seg_classes)]
                if bad.numel():
                    errors.append(f"sample {i}: label {int(bad[0])} outside 0..{seg_classes - 1} "
                                  f"(and not the ignore index {info.ignore_index})")
                else:
                    pixels += torch.bincount(labelled.flatten(), minlength=seg_classes)
        if len(errors) >= max_errors:
            break
    if errors:
        more = " (stopped at the first {})".format(max_errors) if len(errors) >= max_errors else ""
        raise DataError(f"{len(errors)} bad sample(s){more}: " + "; ".join(errors))
    notes = _class_notes(pixels, info, split, len(dataset)) if seg_classes is not None else []
    modes: dict[str, list] = {}
    for path in _image_files(dataset):
        with Image.open(path) as img:
            if img.mode != "RGB":
                modes.setdefault(img.mode, []).append(Path(path).name)
    return notes + [f"{len(names)} image(s) in mode {mode} (e.g. {names[0]}) are converted to RGB"
                    + (" (grayscale: the channel is repeated)" if mode in ("L", "I;16", "I", "1") else "")
                    for mode, names in sorted(modes.items())]


def _class_notes(pixels: torch.Tensor, info: DataInfo, split: str, samples: int) -> list[str]:
    """What the labelled pixels per class of a split say: no foreground at all (an error for
    training: the model would learn to predict background only), or classes never present."""
    if pixels.sum() == 0:
        raise DataError(f"no labelled pixel in any of the {samples} masks (all {info.ignore_index}, the ignore index)")
    if pixels[1:].sum() == 0:
        hint = "; binary masks are read as 0/1 or 0/255" if info.format == "binary" else ""
        if split == "train":
            raise DataError(f"no foreground in any of the {samples} training masks (every labelled pixel is class 0): "
                            f"the model would learn to predict class 0 everywhere{hint}")
        return [f"no foreground in any of the {samples} masks: the foreground IoU is undefined (nan) and miou is class "
                f"0's alone{hint}"]
    names = [info.class_names[c] if c < len(info.class_names) else str(c) for c in range(len(pixels))]
    absent = [f"{c} ({names[c]})" for c in range(len(pixels)) if pixels[c] == 0]
    if not absent:
        return []
    effect = "the model cannot learn it" if split == "train" else "its IoU is undefined (nan), left out of miou"
    return [f"class {', '.join(absent)} in none of the {samples} masks: {effect}"]


# --------------------------------------------------------------------------- building
def source_problem(fmt: str, data, task: str | None = None, dataset: str | None = None) -> str | None:
    """What is wrong with a dataset's description before any file is read, or None: the rule
    :func:`build_dataset` and :class:`~uresnet_models.train.TrainConfig` both apply. ``data``
    is a folder, or None / "synthetic" for synthetic shapes; ``task`` is for synthetic data only,
    ``dataset`` for the torchvision format only."""
    if fmt not in FORMATS:
        return f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}"
    if fmt == "torchvision" and dataset not in TORCHVISION_DATASETS:
        return (f"--format torchvision needs --dataset NAME, one of {', '.join(TORCHVISION_DATASETS)}; got "
                f"{'none' if dataset is None else repr(dataset)}")
    if fmt != "torchvision" and dataset is not None:
        return f"--dataset {dataset} is for --format torchvision (got --format {fmt})"
    synthetic_data = data is None or data == "synthetic"
    if fmt == "synthetic":
        return None if synthetic_data else (f"--data {data}: give the dataset's --format "
                                            f"({', '.join(FORMATS[1:-1])} or {FORMATS[-1]})")
    if synthetic_data:
        return f"--format {fmt} needs --data PATH (the dataset folder)"
    if task is not None:
        return f"--task is for --format synthetic ({fmt} has its own task)"
    return None


def build_dataset(fmt: str, data, split: str = "train", *, task: str | None = None, image_size=64,
                  num_classes: int | None = None, length: int | None = None, val_fraction: float = 0.1,
                  seed: int = 0, ignore_index: int = IGNORE_INDEX, dataset: str | None = None,
                  download: bool = False) -> tuple[Dataset, DataInfo]:
    """The raw dataset of ``split`` ("train" or "val") and its :class:`DataInfo`.

    ``task`` (synthetic only): "seg" (default), "cls" or "joint". ``num_classes``: synthetic
    classes, for ``binary`` 1 (sigmoid, default) or 2 (softmax), for ``masks`` (required) the
    classes in the masks. ``length``: synthetic size. ``ignore_index``: the unlabelled value of
    ``masks``. ``dataset`` (``torchvision`` only): the ``torchvision.datasets`` class name;
    ``download``: let it download into ``data`` (never otherwise)."""
    if fmt == "cifar10":  # the alias
        fmt, dataset = "torchvision", "CIFAR10"
    problem = source_problem(fmt, data, task, dataset)
    if problem:
        raise DataError(problem)
    if split not in ("train", "val"):
        raise DataError(f"unknown split {split!r}; expected train or val")
    if fmt == "synthetic":
        return _synthetic(split, task or "seg", image_size, num_classes, length, seed)
    root = Path(data)
    if not root.exists() and not download:
        raise DataError(f"dataset folder not found: {root}")
    if fmt == "torchvision":
        return _torchvision(dataset, root, split, download)
    if fmt == "cityscapes":
        names = cityscapes_class_names()
        return CityscapesSegmentation(root, split), DataInfo(fmt, "seg", len(names), class_names=names)
    if fmt == "masks":
        if num_classes is None or num_classes < 2:
            raise DataError(f"--format masks needs --num-classes K (2 or more: the class ids 0..K-1 in the masks), "
                            f"got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise DataError(f"--ignore-index {ignore_index} is one of the class ids 0..{num_classes - 1}")
    folder = _split_dir(root, split)
    make = {"binary": BinaryFolder, "sunrgbd": SUNRGBD, "imagefolder": ImageFolderClassification,
            "masks": lambda path: MaskFolder(path, num_classes, ignore_index)}[fmt]
    dataset = make(folder) if folder is not None else _holdout(make(root), split, val_fraction, seed)
    if fmt == "masks":
        return dataset, DataInfo(fmt, "seg", num_classes, class_names=[f"class{i}" for i in range(num_classes)],
                                 ignore_index=ignore_index)
    if fmt == "binary":
        classes = num_classes or 1
        if classes not in (1, 2):
            raise DataError(f"binary masks have 1 (sigmoid) or 2 (softmax) classes, got {classes}")
        return dataset, DataInfo(fmt, "seg", classes, class_names=["background", "foreground"])
    if fmt == "sunrgbd":
        return dataset, DataInfo(fmt, "seg", SUNRGBD.NUM_CLASSES, in_channels=4, depth_channels=1,
                                 class_names=["background"] + [f"class{i}" for i in range(1, 38)])
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return dataset, DataInfo(fmt, "cls", len(base.classes), class_names=list(base.classes))


def _synthetic(split, task, image_size, num_classes, length, seed):
    if task not in ("seg", "cls", "joint"):
        raise DataError(f"unknown task {task!r}; expected seg, cls or joint")
    size = _size_pair(image_size)[0]
    length = length or (256 if split == "train" else 64)
    split_seed = seed * 2 + (split == "val")  # train and val never share a sample
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    if task == "cls":
        classes = num_classes or 3
        ds = SyntheticClassification(length, size, classes, split_seed)
        names = list(SHAPE_NAMES[1:classes + 1])
        return ds, DataInfo("synthetic", "cls", classes, class_names=names, mean=mean, std=std)
    classes = num_classes or 4
    ds = SyntheticShapes(length, size, classes, split_seed)
    aux = classes - 1 if task == "joint" else None
    return ds, DataInfo("synthetic", task, classes, aux_classes=aux, class_names=list(SHAPE_NAMES[:classes]),
                        mean=mean, std=std)


def _size_pair(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return tuple(size)


# --------------------------------------------------------------------------- augmentation
def build_transform(info: DataInfo, *, train: bool, image_size=None, augment: bool = True, crop_scale=(0.5, 1.0)):
    """The ``transforms.v2`` pipeline for raw samples: (train) random resized crop to
    ``image_size``, horizontal flip, brightness/contrast; (eval) resize to ``image_size``;
    then float conversion and normalisation of the image. Masks are resized with nearest
    neighbours and never colour-jittered (``tv_tensors.Mask``)."""
    from torchvision.transforms import v2
    size = _size_pair(image_size)
    steps = []
    if train and augment:
        if size is not None:
            steps.append(v2.RandomResizedCrop(size, scale=crop_scale, antialias=True))
        steps += [v2.RandomHorizontalFlip(), v2.ColorJitter(brightness=0.2, contrast=0.2)]
    elif size is not None:
        steps.append(v2.Resize(size, antialias=True))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(info.mean), list(info.std))]
    return v2.Compose(steps)


class Transformed(Dataset):
    """A raw dataset with a joint transform, returning plain tensors. The transform's random
    draws are seeded from (seed, epoch, index), so a sample is augmented the same way whatever
    the number of processes or loader workers (a DDP run sees what a single process sees)."""

    def __init__(self, dataset: Dataset, transform, seed: int = 0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[index]
        with torch.random.fork_rng(devices=[]):  # the transforms draw from the CPU generator
            # seeded alone: torch.manual_seed also queues a seeding of each accelerator, recording a stack trace
            # for each (~0.1-0.3 ms, per sample)
            torch.default_generator.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            sample = self.transform(sample)
        out = {"image": sample["image"].as_subclass(torch.Tensor)}
        if "depth" in sample:
            out["image"] = torch.cat([out["image"], sample["depth"].as_subclass(torch.Tensor).float()])
        if "mask" in sample:
            out["mask"] = sample["mask"].as_subclass(torch.Tensor).long()
        if "label" in sample:
            out["label"] = torch.tensor(sample["label"], dtype=torch.long)
        return out
