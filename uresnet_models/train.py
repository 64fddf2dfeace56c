"""The training loop behind ``uresnet train`` (and the evaluation behind ``uresnet eval``).

One process, or several under ``torchrun`` (:mod:`uresnet_models.distributed`; the batch size is
per process): a :class:`~torch.utils.data.distributed.DistributedSampler` shards and shuffles
the training set in every case (one replica when alone), and augmentation is seeded per sample
(:class:`uresnet_models.data.Transformed`), so N processes with batch B/N see the same batches as
one process with batch B; validation is sharded without padding and its counts all-reduced, so
the metrics are exactly those of one process. Only rank 0 prints, logs and writes the run folder:
checkpoints (:mod:`uresnet_models.checkpoint`), ``log.csv``, ``log.json``, ``curves.png`` and
``samples.png`` (:mod:`uresnet_models.plots`).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from .checkpoint import load_checkpoint  # noqa: F401  (re-exported: uresnet_models.train.load_checkpoint)
from .checkpoint import clear_run, load_resume, run_contents, save_checkpoint, save_interrupted
from .constants import DEFAULT_ENCODER
from .data import (IGNORE_INDEX, DataError, DataInfo, Transformed, build_dataset, build_transform, check_dataset,
                   source_problem)
from .distributed import distributed_model, setup_distributed, sync_batchnorm
from .errors import UsageError
from .losses import build_loss
from .metrics import ConfusionMatrix, TopK, predictions
from .plots import plot_curves, save_best_samples, write_logs

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = ("plateau", "onecycle")
SHOWN_METRICS = ("miou", "iou_foreground", "mdice", "pixel_acc", "top1")  # in the per-epoch line
LOSS_SHOWN_EVERY = 20  # steps between updates of the progress bar's loss (each one waits for the device)


@dataclass
class TrainConfig:
    """Everything ``uresnet train`` takes: each flag is the field of its name (``--no-X`` sets
    ``X=False``). Checked when made: a bad value or combination raises
    :class:`~uresnet_models.errors.UsageError` naming the flag."""
    model: str = "uresnet"
    encoder: str | None = DEFAULT_ENCODER  # a timm name, None (the seed's own) or the architecture's default
    model_args: dict = field(default_factory=dict)
    pretrained: bool = False          # the encoder's timm weights
    freeze_encoder: bool = False      # train the decoder and heads only
    format: str | None = "synthetic"  # None: synthetic (then data must be too)
    data: str | None = "synthetic"
    dataset: str | None = None        # --format torchvision: the torchvision.datasets class name
    download: bool = False            # --format torchvision: let torchvision download into data
    task: str | None = None           # synthetic only: seg, cls, joint
    num_classes: int | None = None    # synthetic classes / binary 1 or 2 / masks: the classes in the masks
    ignore_index: int = IGNORE_INDEX  # masks: the unlabelled value
    image_size: int | tuple | None = 64
    train_samples: int | None = None  # synthetic dataset lengths; of other data, a seeded random subset
    val_samples: int | None = None
    val_fraction: float = 0.1
    augment: bool = True
    epochs: int = 10
    steps_per_epoch: int | None = None  # cap (None: the whole training set)
    batch_size: int = 8
    lr: float = 1e-4
    schedule: str = "plateau"         # plateau: ReduceLROnPlateau per epoch; onecycle: OneCycleLR per step (max lr)
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
    resume: str | None = None         # a run (or its last/) to continue; "auto": out's own last/
    overwrite: bool = False           # replace the run out holds (without it or resume, fit refuses one)
    progress: bool = True
    check_data: bool = True           # read every file once before building the model

    def __post_init__(self):
        if isinstance(self.image_size, list):  # read back from training.json
            self.image_size = tuple(self.image_size)
        self.format = self.format or "synthetic"
        problem = source_problem(self.format, self.data, self.task, self.dataset)
        if problem:
            raise UsageError(problem)
        if self.download and self.format != "torchvision":
            raise UsageError(f"--download is for --format torchvision (got --format {self.format})")
        if self.format != "synthetic" and not self.download and not os.path.exists(self.data):
            raise UsageError(f"--data {self.data}: no such file or folder")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0:
            raise UsageError("--lr must be positive")
        if self.amp not in AMP_DTYPES:
            raise UsageError(f"--amp {self.amp!r}: expected one of {', '.join(AMP_DTYPES)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.ignore_index != IGNORE_INDEX and self.format != "masks":
            raise UsageError(f"--ignore-index is for --format masks ({self.format} has its own unlabelled value)")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite: continue the run or replace it, not both")
        if self.resume == "auto":
            self.resume = os.path.join(self.out, "last")
        if self.resume and not os.path.exists(self.resume):
            raise UsageError(f"--resume: {self.resume} does not exist")


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
    if encoder == DEFAULT_ENCODER:
        default = inspect.signature(uresnet_models.model_entrypoint(cfg.model)).parameters.get("encoder")
        encoder = None if default is None else default.default
    return uresnet_models.get_preprocessing(encoder) if isinstance(encoder, str) else None


def raw_dataset(cfg: TrainConfig, split: str):
    """The untransformed dataset of ``split`` and its DataInfo; of data read from files, a seeded
    random subset of ``cfg.train_samples`` / ``cfg.val_samples`` where given (quick runs)."""
    length = cfg.train_samples if split == "train" else cfg.val_samples
    dataset, info = build_dataset(cfg.format, cfg.data, split, task=cfg.task, image_size=cfg.image_size,
                                  num_classes=cfg.num_classes, length=length, val_fraction=cfg.val_fraction,
                                  seed=cfg.seed, ignore_index=cfg.ignore_index, dataset=cfg.dataset,
                                  download=cfg.download)
    if cfg.format != "synthetic" and length is not None and length < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))
        dataset = Subset(dataset, sorted(order[:length].tolist()))
    return dataset, info


def build_data(cfg: TrainConfig, split: str, train_transform: bool | None = None, normalization=None, raw=None):
    """The transformed dataset of ``split`` and its DataInfo (augmented when
    ``train_transform``, by default for the train split). The image is normalised with
    ``normalization`` (``(mean, std)``; default: the encoder's :func:`encoder_preprocessing`,
    else the dataset's own statistics). ``raw``: the ``(dataset, info)`` already read."""
    raw, info = raw or raw_dataset(cfg, split)
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


def _loader(dataset, batch_size, sampler, workers, drop_last=False):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      persistent_workers=False, pin_memory=False)


def loader_workers(cfg: TrainConfig) -> int:
    """Data loader processes: ``cfg.workers``, else none for synthetic data and up to 4 for files."""
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


def undefined_foreground(metrics: dict) -> str | None:
    """Why the foreground IoU of binary ``metrics`` is NaN, or None where it is defined."""
    if not math.isnan(metrics.get("iou_foreground", 0.0)):
        return None
    return ("the foreground IoU is undefined (nan): no mask holds foreground and the model predicted none (0/0), "
            "so miou is the background's IoU alone")


def _check_out(cfg: TrainConfig) -> None:
    """An --out that holds a run is continued (--resume) or replaced (--overwrite), never silently."""
    found = run_contents(cfg.out)
    if found and not (cfg.resume or cfg.overwrite):
        raise UsageError(f"--out {cfg.out} holds a run ({', '.join(found)}): continue it with --resume, replace it "
                         "with --overwrite, or choose another --out")


# --------------------------------------------------------------------------- the loop
def fit(cfg: TrainConfig, log: Callable = print) -> dict:
    """Train per ``cfg``; returns ``{"history", "best", "best_epoch", "out", "model"}`` (the
    model is the trained, unwrapped module on its device)."""
    from tqdm.auto import tqdm
    env = setup_distributed(cfg.device)
    say = log if env.main else (lambda *a, **k: None)
    _check_out(cfg)
    seed_everything(cfg.seed, cfg.deterministic)
    splits, bad = {}, []
    for split in ("train", "val"):
        splits[split] = raw_dataset(cfg, split)
        if len(splits[split][0]) == 0:
            raise ValueError(f"empty dataset: no {split} samples in {cfg.data}")
        whole = getattr(splits[split][0], "dataset", splits[split][0])  # a subset's
        if cfg.check_data and cfg.format != "synthetic" and not getattr(whole, "in_memory", False):
            # every file read once now: a bad one is reported before the model is built, not mid-training
            began = time.perf_counter()
            try:
                for note in check_dataset(*splits[split], split=split):
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
    cfg = replace(cfg, loss=task.loss_name)  # the loss used, in training.json and the model card
    model = build_model(cfg, info).to(env.device)
    model.preprocessing = {"mean": info.mean, "std": info.std, "input_range": (0, 1)}  # saved with the weights
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if env.enabled:
        model = sync_batchnorm(model, env.device)
    trained = [p for p in model.parameters() if p.requires_grad]
    # The fused (single-kernel) Adam: on CPU it is about 3x faster than the per-tensor loop.
    optimizer = OPTIMIZERS[cfg.optimizer](trained, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          fused=env.device.type in ("cpu", "cuda") or None)
    workers = loader_workers(cfg)
    sampler = DistributedSampler(train_set, num_replicas=env.world, rank=env.rank, shuffle=True, seed=cfg.seed)
    per_rank = math.ceil(len(train_set) / env.world)
    train_loader = _loader(train_set, cfg.batch_size, sampler, workers, drop_last=per_rank > cfg.batch_size)
    steps = len(train_loader) if cfg.steps_per_epoch is None else min(cfg.steps_per_epoch, len(train_loader))
    if cfg.schedule == "onecycle":  # stepped after every batch
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.epochs * steps)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.plateau_factor,
                                                               patience=cfg.plateau_patience)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.amp == "fp16")
    out = Path(cfg.out)
    history, best, best_epoch, bad_epochs, start = [], -math.inf, 0, 0, 1

    def state(epoch: int, **extra) -> dict:
        """What --resume needs to continue after ``epoch``."""
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "history": history, "best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                **extra}

    if cfg.resume:
        resume_dir, saved = load_resume(cfg.resume, model, env.device)
        optimizer.load_state_dict(saved["optimizer"])
        planned = saved["scheduler"].get("total_steps")
        if cfg.schedule == "onecycle" and planned != scheduler.total_steps:
            raise UsageError(f"--resume {cfg.resume}: its one-cycle schedule spans {planned} steps, this run "
                             f"{scheduler.total_steps} (--epochs {cfg.epochs} x {steps}); resume with the run's "
                             "--epochs, --batch-size and --steps-per-epoch")
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        history, best = saved["history"], saved["best"]
        best_epoch, bad_epochs = saved["best_epoch"], saved["bad_epochs"]
        start = saved["epoch"] + 1
        say(f"resumed from {resume_dir} at epoch {saved['epoch']} (best {monitor_key(info)} {best:.4f})")
    if env.main:
        if cfg.overwrite:
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
    net = distributed_model(model, env.device, val_set[0]["image"][None].to(env.device), say) \
        if env.enabled else model
    step_net = torch.compile(net) if cfg.compile else net
    val_shard = Subset(val_set, range(env.rank, len(val_set), env.world))  # no padding: exact metrics
    val_loader = _loader(val_shard, cfg.batch_size, None, workers)
    key = monitor_key(info)
    trainable = sum(p.numel() for p in trained)
    total = sum(p.numel() for p in model.parameters())
    say(f"training {cfg.model} on {info.format} ({info.task}, {_plural(info.num_classes, 'class', 'classes')}): "
        f"{len(train_set)} train / {len(val_set)} val samples, {env.world} process(es) on {env.device}, loss "
        f"{task.loss_name}, {total / 1e6:.2f}M parameters"
        + (f" ({trainable / 1e6:.2f}M trained: encoder frozen)" if trainable != total else ""))
    epoch, said_undefined = start, False
    try:
        for epoch in range(start, cfg.epochs + 1):
            began = time.perf_counter()
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            net.train()
            # loss * n and n, summed on the device: read once per LOSS_SHOWN_EVERY steps and at the
            # epoch's end, not synchronised with the host every step.
            sums = torch.zeros(2, dtype=torch.float64, device=env.device)
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
                if cfg.schedule == "onecycle":
                    scheduler.step()
                n = batch["image"].shape[0]
                sums[0] += loss.detach().double() * n
                sums[1] += n
                bar.update()
                if not bar.disable and (i + 1) % LOSS_SHOWN_EVERY == 0:
                    bar.set_postfix(loss=f"{(sums[0] / sums[1]).item():.4f}")  # the epoch's mean so far
            bar.close()
            if env.enabled:
                dist.all_reduce(sums)
            metrics = evaluate(model, val_loader, task, env.device, amp=cfg.amp, channels_last=cfg.channels_last,
                               progress=cfg.progress and env.main)
            score = metrics.get(key, float("nan"))
            lr = optimizer.param_groups[0]["lr"]
            if cfg.schedule == "plateau":
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
                + "  ".join(f"val_{k} {metrics[k]:.4f}" for k in SHOWN_METRICS if k in metrics)
                + f"  lr {lr:.2e}  ({row['seconds']:.1f} s){'  *best' if improved else ''}")
            if undefined_foreground(metrics) and not said_undefined:
                said_undefined = True
                say(f"note: validation: {undefined_foreground(metrics)}")
            if env.main:
                save_checkpoint(out / "last", model, info, cfg, epoch, row, state(epoch))
                if improved:
                    save_checkpoint(out / "best", model, info, cfg, epoch, row)
                write_logs(out, history)
            if cfg.early_stop and bad_epochs >= cfg.early_stop:
                say(f"early stopping: no {key} improvement for {bad_epochs} epochs")
                break
    except KeyboardInterrupt:
        if env.main:
            save_interrupted(out, model, info, cfg, state(epoch - 1, interrupted_in_epoch=epoch), epoch, say)
        raise
    if env.main and history:
        plot_curves(history, out / "curves.png", say)
        save_best_samples(model, out, val_set, info, env.device)
        say(f"best {key} {best:.4f} at epoch {best_epoch}; checkpoints, logs and plots in {out}")
    if env.enabled:
        dist.barrier()
    return {"history": history, "best": best, "best_epoch": best_epoch, "out": out, "model": model, "info": info}


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
