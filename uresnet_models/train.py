"""The training loop behind ``uresnet train`` (and ``eval``/``predict``'s checkpoint loading).

One process, or several under ``torchrun`` (DDP; batch size is per process):

* data: a :class:`~torch.utils.data.distributed.DistributedSampler` shards and shuffles the
  training set in every case (one replica when alone), and augmentation is seeded per sample
  (:class:`uresnet_models.data.Transformed`), so N processes with batch B/N see the same
  batches as one process with batch B; validation is sharded without padding and its counts
  all-reduced, so the metrics are exactly those of one process;
* BatchNorm is synchronised: the fused modules (``PixelShuffleBN``, ``EUCB``, ``EUCBStar``,
  ``MultiDilationConv2d``, ``ASPP``) get ``sync=True`` (the fused ops' own sync path, for the
  BatchNorms they run), every other plain ``BatchNorm2d`` becomes ``SyncBatchNorm`` on GPUs
  (timm's converter, which also knows timm's norm+act layers) and, on CPU where
  ``torch.nn.SyncBatchNorm`` refuses to run, ``PixelShuffleBN`` with factor 1 (the same module,
  state dict unchanged);
* only rank 0 prints, logs and writes checkpoints.

An output folder holds ``best/`` and ``last/`` (``model.safetensors`` + ``config.json`` from
``save_pretrained``, ``training.json`` with the data description and metrics; ``last/state.pt``
with the optimizer, scheduler and scaler for ``--resume``), ``log.csv``, ``log.json`` and
``curves.png`` (with matplotlib).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from .data import DataError, DataInfo, Transformed, build_dataset, build_transform, check_dataset
from .losses import build_loss
from .metrics import ConfusionMatrix, TopK, predictions

DEFAULT = "default"  # encoder: the architecture's own default
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAINING_JSON = "training.json"
STATE_NAME = "state.pt"


@dataclass
class TrainConfig:
    """Everything ``uresnet train`` takes (the CLI flags map one to one)."""
    model: str = "uresnet"
    encoder: str | None = DEFAULT
    model_args: dict = field(default_factory=dict)
    pretrained: bool = False          # the encoder's timm weights
    freeze_encoder: bool = False      # train the decoder and heads only
    format: str = "synthetic"
    data: str | None = "synthetic"
    task: str | None = None           # synthetic only: seg, cls, joint
    num_classes: int | None = None    # synthetic classes / binary 1 or 2
    image_size: int | tuple | None = 64
    train_samples: int | None = None  # synthetic dataset lengths
    val_samples: int | None = None
    val_fraction: float = 0.1
    augment: bool = True
    epochs: int = 10
    steps_per_epoch: int | None = None  # cap (None: the whole training set)
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adam"
    loss: str | None = None           # None: ce (bce_dice for one binary channel)
    bce_weight: float = 0.5
    aux_weight: float = 0.4
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    early_stop: int = 0               # epochs without improvement before stopping; 0: never
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    workers: int | None = None
    device: str | None = None
    out: str = "runs/uresnet"
    resume: str | None = None
    progress: bool = True
    check_data: bool = True           # read every file once before building the model


# --------------------------------------------------------------------------- processes
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Dist:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on GPUs,
    gloo on CPU; each process takes the GPU of its ``LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if world <= 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(),
                torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu"))


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm use the statistics of the whole distributed batch (see the module doc)."""
    from uresnet_ops.nn import PixelShuffleBN
    fused_bns = set()  # the BatchNorms a fused op runs itself: its ``sync`` synchronises them
    for m in model.modules():
        if isinstance(m, PixelShuffleBN) or hasattr(m, "fused_batch_norms"):
            m.sync = True
            fused_bns.update(id(bn) for bn in getattr(m, "fused_batch_norms", list)())
    if device.type != "cpu":
        from timm.layers import convert_sync_batchnorm as convert
    else:
        convert = _cpu_sync_batchnorm
    return _convert_batchnorms(model, fused_bns, convert)


def _convert_batchnorms(module: nn.Module, keep: set, convert: Callable) -> nn.Module:
    """``convert(module)``, leaving the BatchNorms whose ids are in ``keep`` as they are."""
    if id(module) in keep:
        return module
    if not any(id(m) in keep for m in module.modules()):
        return convert(module)
    for name, child in module.named_children():
        module._modules[name] = _convert_batchnorms(child, keep, convert)
    return module


def _cpu_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Plain ``BatchNorm2d`` -> ``PixelShuffleBN`` with factor 1 and ``sync=True`` (same state dict)."""
    from uresnet_ops.nn import PixelShuffleBN
    if type(module) is nn.BatchNorm2d:  # subclasses (norm+act layers) keep local statistics
        fused = PixelShuffleBN.from_modules(nn.PixelShuffle(1), module)
        fused.sync = True
        return fused
    for name, child in module.named_children():
        module._modules[name] = _cpu_sync_batchnorm(child)
    return module


def seed_everything(seed: int, deterministic: bool = False) -> None:
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------- data and model
def encoder_preprocessing(cfg: TrainConfig) -> dict | None:
    """The normalisation of the encoder ``cfg`` asks for (timm's ``pretrained_cfg``), or None
    (the seeds' own encoders: the dataset's statistics are used)."""
    import inspect

    import uresnet_models
    encoder = cfg.encoder
    if encoder == DEFAULT:
        default = inspect.signature(uresnet_models.model_entrypoint(cfg.model)).parameters.get("encoder")
        encoder = None if default is None else default.default
    return uresnet_models.get_preprocessing(encoder) if isinstance(encoder, str) else None


def build_data(cfg: TrainConfig, split: str, train_transform: bool | None = None, normalization=None, raw=None):
    """The transformed dataset of ``split`` and its DataInfo (augmented when
    ``train_transform``, by default for the train split). The image is normalised with
    ``normalization`` (``(mean, std)``; default: the encoder's :func:`encoder_preprocessing`,
    else the dataset's own statistics). ``raw``: the ``(dataset, info)`` already read."""
    length = cfg.train_samples if split == "train" else cfg.val_samples
    raw, info = raw or build_dataset(cfg.format, cfg.data, split, task=cfg.task, image_size=cfg.image_size,
                                     num_classes=cfg.num_classes, length=length, val_fraction=cfg.val_fraction,
                                     seed=cfg.seed)
    if normalization is None:
        pre = encoder_preprocessing(cfg)
        normalization = (pre["mean"], pre["std"]) if pre and len(pre["mean"]) == len(info.mean) else None
    if normalization is not None:
        info.mean, info.std = tuple(normalization[0]), tuple(normalization[1])
    size = None if cfg.format == "synthetic" else cfg.image_size  # synthetic data is made at that size
    train = split == "train" if train_transform is None else train_transform
    transform = build_transform(info, train=train, image_size=size, augment=cfg.augment)
    return Transformed(raw, transform, cfg.seed), info


def build_model(cfg: TrainConfig, info: DataInfo) -> nn.Module:
    import uresnet_models
    kwargs = dict(cfg.model_args)
    if kwargs.get("activation") is not None:
        raise ValueError(f"model argument activation={kwargs['activation']!r}: training computes its losses on "
                         "logits; train without it and give it when loading the checkpoint "
                         "(uresnet_models.from_pretrained(path, activation=...))")
    if cfg.encoder != DEFAULT:
        kwargs["encoder"] = cfg.encoder
    if cfg.model == "deresunet" and info.depth_channels:
        kwargs.setdefault("depth_channels", info.depth_channels)
        in_channels = info.in_channels - info.depth_channels  # deresunet counts depth apart
    else:
        in_channels = info.in_channels
    if info.task == "cls" and cfg.model != "uresnet_cls":
        raise ValueError(f"{info.format} is a classification dataset: use --model uresnet_cls")
    if info.task != "cls" and cfg.model == "uresnet_cls":
        raise ValueError(f"uresnet_cls is a classifier; {info.format} (task {info.task}) needs a segmentation model")
    if info.aux_classes:
        kwargs["aux_classes"] = info.aux_classes
    model = uresnet_models.create_model(cfg.model, in_channels=in_channels, num_classes=info.num_classes,
                                        pretrained=cfg.pretrained, **kwargs)
    if cfg.freeze_encoder:
        model.freeze_encoder()
    return model


def unused_parameters(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the trainable parameters that a forward and backward on ``example`` leave
    without a gradient (an encoder of which only some features are used: hrnet under
    uresnet_cls). Run in eval mode, so no running statistic moves; gradients are cleared after."""
    was_training = model.training
    model.eval()
    try:
        out = model(example)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        sum(o.float().sum() for o in outs).backward()
        return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def distributed_model(model: nn.Module, device: torch.device, example: torch.Tensor, say=print):
    """``model`` in DistributedDataParallel, told to look for unused parameters only where it
    has some (that search costs a graph traversal every step)."""
    unused = unused_parameters(model, example)
    if unused:
        say(f"{len(unused)} parameter(s) get no gradient (e.g. {unused[0]}): DDP looks for unused parameters")
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=bool(unused))


def _loader(dataset, batch_size, sampler, workers, drop_last=False):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      persistent_workers=False, pin_memory=False)


def _default_workers(cfg: TrainConfig) -> int:
    if cfg.workers is not None:
        return cfg.workers
    return 0 if cfg.format == "synthetic" else min(4, max(0, (os.cpu_count() or 1) - 1))


# --------------------------------------------------------------------------- steps
class Task:
    """Forward + loss for the dataset's task (seg, cls or joint)."""

    def __init__(self, info: DataInfo, cfg: TrainConfig):
        self.info = info
        self.loss_name = cfg.loss or ("bce_dice" if info.num_classes == 1 else "ce")
        self.seg_loss = build_loss(self.loss_name, ignore_index=info.ignore_index, bce_weight=cfg.bce_weight)
        self.aux_weight = cfg.aux_weight

    def split(self, out):
        """(seg_logits or None, class_logits or None) of a model output."""
        if self.info.task == "cls":
            return None, out
        if self.info.task == "joint":
            return out
        return out, None

    def loss(self, out, batch) -> torch.Tensor:
        seg, cls = self.split(out)
        total = 0.0
        if seg is not None:
            total = self.seg_loss(seg, batch["mask"])
        if cls is not None:
            weight = self.aux_weight if seg is not None else 1.0
            total = total + weight * F.cross_entropy(cls.float(), batch["label"])
        return total


def _to(batch: dict, device, channels_last: bool) -> dict:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def _autocast(device, amp: str):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader, task: Task, device, *, amp: str = "none", channels_last: bool = False,
             progress: bool = False) -> dict:
    """Loss and metrics over ``loader`` (summed over processes when distributed)."""
    from tqdm.auto import tqdm
    was_training = model.training
    model.eval()
    info = task.info
    cm = ConfusionMatrix(info.num_classes, info.ignore_index) if info.task != "cls" else None
    topk = TopK((1, 5) if (info.aux_classes or info.num_classes) > 5 else (1,)) if info.task != "seg" else None
    class_cm = ConfusionMatrix(info.aux_classes or info.num_classes, -1) if info.task != "seg" else None
    sums = torch.zeros(2, dtype=torch.float64)  # loss * n, n
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress):
        batch = _to(batch, device, channels_last)
        with _autocast(device, amp):
            out = model(batch["image"])
        n = batch["image"].shape[0]
        sums += torch.tensor([float(task.loss(out, batch)) * n, n], dtype=torch.float64)
        seg, cls = task.split(out)
        if cm is not None:
            cm.update(predictions(seg.float()), batch["mask"])
        if topk is not None:
            topk.update(cls.float(), batch["label"])
            class_cm.update(cls.argmax(1), batch["label"])
    model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    metrics = {"loss": (sums[0] / sums[1]).item() if sums[1] else float("nan")}
    if cm is not None:
        metrics.update(cm.all_reduce().compute())
    if topk is not None:
        metrics.update(topk.all_reduce().compute())
        class_cm.all_reduce()
        n = info.aux_classes or info.num_classes
        metrics["class_accuracy"] = class_cm.class_accuracy()[:n].tolist()
        metrics["confusion_matrix"] = class_cm.matrix[:n, :n].tolist()  # [true][predicted]
    return metrics


def monitor_key(info: DataInfo) -> str:
    return "top1" if info.task == "cls" else "miou"


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(folder: Path, model: nn.Module, info: DataInfo, cfg: TrainConfig, epoch: int, metrics: dict,
                    state: dict | None = None) -> Path:
    """``save_pretrained`` (its README.md card with the data and the metrics) + ``training.json``
    (+ ``state.pt`` for resuming)."""
    from .base import CARD_NAME, model_card
    model.save_pretrained(folder)
    training = {"trained on": f"{info.format} `{cfg.data}` ({info.task}; classes: {', '.join(map(str, info.class_names))})",
                "epoch": epoch, "recipe": f"{cfg.optimizer} lr {cfg.lr}, batch {cfg.batch_size}, image size "
                f"{cfg.image_size}, loss {cfg.loss or 'default'}" + (", encoder frozen" if cfg.freeze_encoder else "")}
    card_config = json.loads((folder / "config.json").read_text())
    (folder / CARD_NAME).write_text(model_card(card_config, model, metrics, training))
    meta = {"epoch": epoch, "metrics": metrics, "data": info.to_dict(),
            "config": {k: v for k, v in asdict(cfg).items()}}
    (folder / TRAINING_JSON).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    if state is not None:
        torch.save(state, folder / STATE_NAME)
    return folder


def load_checkpoint(path, device=None) -> tuple[nn.Module, DataInfo, dict]:
    """The model, DataInfo and training.json of a checkpoint folder (or of a run folder's best/)."""
    from .base import from_pretrained, read_json
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not (path / "config.json").is_file() and (path / "best" / "config.json").is_file():
        path = path / "best"
    meta_file = path / TRAINING_JSON
    model = from_pretrained(path, device=device)
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found (expected a checkpoint written by uresnet train)")
    meta = read_json(meta_file)
    data = meta["data"]
    info = DataInfo(**{k: tuple(v) if k in ("mean", "std") else v for k, v in data.items()})
    return model.eval(), info, meta


# --------------------------------------------------------------------------- logging
LOG_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_miou", "val_mdice", "val_iou_foreground",
               "val_pixel_acc", "val_top1", "seconds")


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


PALETTE = torch.tensor([[0, 0, 0], [230, 60, 50], [60, 190, 80], [60, 90, 230], [240, 200, 40], [200, 80, 220],
                        [60, 200, 220], [250, 140, 40], [140, 140, 140], [120, 60, 20]], dtype=torch.uint8)


def colorize(mask: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Class ids (H, W) -> RGB uint8 (3, H, W); ignored pixels white."""
    colors = PALETTE[mask.clamp(0, 10 ** 6) % len(PALETTE)]
    colors[mask == ignore_index] = 255
    return colors.permute(2, 0, 1)


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
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    if not samples:
        return None
    h, w = samples[0]["image"].shape[-2:]
    scale = max(1, -(-128 // max(h, w)))  # tiles at least 128 px: small inputs stay legible
    tw, th, pad, line = w * scale, h * scale, 6, 14
    names = _names(info)
    if info.task == "cls":
        cols = min(len(samples), 3)
        rows_n = -(-len(samples) // cols)
        canvas = Image.new("RGB", (cols * (tw + pad) + pad, rows_n * (th + 2 * line + pad) + pad), "white")
        draw = ImageDraw.Draw(canvas)
        for k, sample in enumerate(samples):
            out = model(sample["image"].unsqueeze(0).to(device))
            pred = int(out.float().argmax(1)[0])
            x0, y0 = pad + (k % cols) * (tw + pad), pad + (k // cols) * (th + 2 * line + pad)
            canvas.paste(_to_pil(sample["image"][:3] * std + mean, scale), (x0, y0))
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
        tiles = [sample["image"][:3] * std + mean, colorize(sample["mask"], info.ignore_index).float() / 255,
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


def _names(info: DataInfo) -> list[str]:
    n = max(info.aux_classes or 0, info.num_classes, 2)
    names = list(info.class_names or [])[:n]
    return names + [str(i) for i in range(len(names), n)]


# --------------------------------------------------------------------------- the loop
def fit(cfg: TrainConfig, log: Callable = print) -> dict:
    """Train per ``cfg``; returns ``{"history", "best", "best_epoch", "out", "model"}`` (the
    model is the trained, unwrapped module on its device)."""
    from tqdm.auto import tqdm
    env = setup_distributed(cfg.device)
    say = log if env.main else (lambda *a, **k: None)
    if cfg.amp not in AMP_DTYPES:
        raise ValueError(f"--amp {cfg.amp!r}: expected one of {', '.join(AMP_DTYPES)}")
    if cfg.optimizer not in ("adam", "adamw"):
        raise ValueError(f"--optimizer {cfg.optimizer!r}: expected adam or adamw")
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise ValueError("--epochs, --batch-size and --lr must be positive")
    seed_everything(cfg.seed, cfg.deterministic)
    splits, bad = {}, []
    for split in ("train", "val"):
        length = cfg.train_samples if split == "train" else cfg.val_samples
        splits[split] = build_dataset(cfg.format, cfg.data, split, task=cfg.task, image_size=cfg.image_size,
                                      num_classes=cfg.num_classes, length=length, val_fraction=cfg.val_fraction,
                                      seed=cfg.seed)
        if len(splits[split][0]) == 0:
            raise ValueError(f"empty dataset: no {split} samples in {cfg.data}")
        if cfg.check_data and cfg.format not in ("synthetic", "cifar10"):
            # every file read once now: a bad one is reported before the model is built, not mid-training
            began = time.perf_counter()
            try:
                for note in check_dataset(*splits[split]):
                    say(f"note: {split}: {note}")
            except DataError as error:
                bad.append(f"{split}: {error}")
                continue
            say(f"checked the {len(splits[split][0])} {split} samples ({time.perf_counter() - began:.1f} s)")
    if bad:
        raise DataError("; ".join(bad))
    train_set, info = build_data(cfg, "train", raw=splits["train"])
    val_set, _ = build_data(cfg, "val", normalization=(info.mean, info.std), raw=splits["val"])
    task = Task(info, cfg)
    model = build_model(cfg, info).to(env.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if env.enabled:
        model = sync_batchnorm(model, env.device)
    optim_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # The fused (single-kernel) Adam: on CPU it is about 3x faster than the per-tensor loop.
    optimizer = optim_cls([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay,
                          fused=env.device.type in ("cpu", "cuda") or None)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.amp == "fp16")
    out = Path(cfg.out)
    history, best, best_epoch, bad_epochs, start = [], -math.inf, 0, 0, 1
    if cfg.resume:
        resume_dir = Path(cfg.resume)
        resume_dir = resume_dir / "last" if (resume_dir / "last").is_dir() else resume_dir
        state = _load_resume(resume_dir, model, env.device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, best, best_epoch, bad_epochs = state["history"], state["best"], state["best_epoch"], state["bad_epochs"]
        start = state["epoch"] + 1
        say(f"resumed from {resume_dir} at epoch {state['epoch']} (best {monitor_key(info)} {best:.4f})")
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
    net = distributed_model(model, env.device, val_set[0]["image"][None].to(env.device), say) \
        if env.enabled else model
    step_net = torch.compile(net) if cfg.compile else net
    workers = _default_workers(cfg)
    sampler = DistributedSampler(train_set, num_replicas=env.world, rank=env.rank, shuffle=True, seed=cfg.seed)
    per_rank = math.ceil(len(train_set) / env.world)
    train_loader = _loader(train_set, cfg.batch_size, sampler, workers, drop_last=per_rank > cfg.batch_size)
    val_shard = Subset(val_set, range(env.rank, len(val_set), env.world))  # no padding: exact metrics
    val_loader = _loader(val_shard, cfg.batch_size, None, workers)
    key = monitor_key(info)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"training {cfg.model} on {info.format} ({info.task}, {_plural(info.num_classes, 'class', 'classes')}): "
        f"{len(train_set)} train / {len(val_set)} val samples, {env.world} process(es) on {env.device}, loss "
        f"{task.loss_name}, {total / 1e6:.2f}M parameters"
        + (f" ({trainable / 1e6:.2f}M trained: encoder frozen)" if trainable != total else ""))
    epoch = start
    try:
        for epoch in range(start, cfg.epochs + 1):
            began = time.perf_counter()
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            net.train()
            sums = torch.zeros(2, dtype=torch.float64)
            steps = len(train_loader) if cfg.steps_per_epoch is None else min(cfg.steps_per_epoch, len(train_loader))
            bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                       disable=not (cfg.progress and env.main))
            for i, batch in enumerate(train_loader):
                if i >= steps:
                    break
                batch = _to(batch, env.device, cfg.channels_last)
                optimizer.zero_grad(set_to_none=True)
                with _autocast(env.device, cfg.amp):
                    loss = task.loss(step_net(batch["image"]), batch)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                n = batch["image"].shape[0]
                sums += torch.tensor([loss.item() * n, n], dtype=torch.float64)
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.close()
            if env.enabled:
                dist.all_reduce(sums)
            metrics = evaluate(model, val_loader, task, env.device, amp=cfg.amp, channels_last=cfg.channels_last,
                               progress=cfg.progress and env.main)
            score = metrics.get(key, float("nan"))
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step(score if not math.isnan(score) else -math.inf)
            improved = score > best
            if improved:
                best, best_epoch, bad_epochs = score, epoch, 0
            else:
                bad_epochs += 1
            row = {"epoch": epoch, "lr": lr, "train_loss": (sums[0] / sums[1]).item(), "val_loss": metrics["loss"],
                   "seconds": round(time.perf_counter() - began, 3)}
            row.update({f"val_{k}": v for k, v in metrics.items() if k != "loss"})
            history.append(row)
            say(f"epoch {epoch}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  val_loss {metrics['loss']:.4f}  "
                + "  ".join(f"val_{k} {metrics[k]:.4f}" for k in ("miou", "iou_foreground", "mdice", "pixel_acc", "top1")
                            if k in metrics)
                + f"  lr {lr:.2e}  ({row['seconds']:.1f} s){'  *best' if improved else ''}")
            if env.main:
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch, "history": history, "best": best,
                         "best_epoch": best_epoch, "bad_epochs": bad_epochs}
                save_checkpoint(out / "last", model, info, cfg, epoch, row, state)
                if improved:
                    save_checkpoint(out / "best", model, info, cfg, epoch, row)
                write_logs(out, history)
            if cfg.early_stop and bad_epochs >= cfg.early_stop:
                say(f"early stopping: no {key} improvement for {bad_epochs} epochs")
                break
    except KeyboardInterrupt:
        if env.main:
            _save_interrupted(out, model, info, cfg, optimizer, scheduler, scaler, history, best, best_epoch,
                              bad_epochs, epoch, say)
        raise
    if env.main and history:
        plot_curves(history, out / "curves.png", say)
        _samples_of_best(model, out, val_set, info, env.device)
        say(f"best {key} {best:.4f} at epoch {best_epoch}; checkpoints, logs and plots in {out}")
    if env.enabled:
        dist.barrier()
    return {"history": history, "best": best, "best_epoch": best_epoch, "out": out, "model": model, "info": info}


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _save_interrupted(out, model, info, cfg, optimizer, scheduler, scaler, history, best, best_epoch, bad_epochs,
                      epoch, say) -> None:
    """Ctrl-C: write last/ with the weights so far, marked as the end of the epoch before, so
    that ``--resume`` repeats the interrupted epoch from its start with those weights."""
    done = epoch - 1
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
             "epoch": done, "history": history, "best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
             "interrupted_in_epoch": epoch}
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "last", model, info, cfg, done, history[-1] if history else {}, state)
    say(f"\ninterrupted in epoch {epoch}: saved the weights so far and the optimizer state to {out / 'last'}; "
        f"continue with the same command and --resume (epoch {epoch} is repeated from its start)")


def _samples_of_best(model, out: Path, val_set, info, device) -> None:
    """samples.png from the best/ checkpoint (the one eval and predict use), not the last epoch."""
    from safetensors.torch import load_model
    from .base import WEIGHTS_NAME
    best_weights = out / "best" / WEIGHTS_NAME
    if not best_weights.is_file():
        save_samples(model, val_set, info, out / "samples.png", device)
        return
    last = {k: v.clone() for k, v in model.state_dict().items()}
    load_model(model, str(best_weights), device=str(device))
    save_samples(model, val_set, info, out / "samples.png", device)
    model.load_state_dict(last)  # the returned model stays the last epoch's


def _load_resume(folder: Path, model: nn.Module, device) -> dict:
    from safetensors.torch import load_model
    from .base import CONFIG_NAME, WEIGHTS_NAME, read_json
    for name in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"cannot resume: {folder / name} not found (expected the last/ folder of a run)")
    saved = read_json(folder / CONFIG_NAME)
    if {k: saved.get(k) for k in ("architecture", "kwargs")} != getattr(model, "model_config", None):
        raise ValueError(f"cannot resume from {folder}: it holds {saved.get('architecture')} with "
                         f"{saved.get('kwargs')}, not the model asked for")
    load_model(model, str(folder / WEIGHTS_NAME), device=str(device))
    return torch.load(folder / STATE_NAME, map_location=device, weights_only=False)
