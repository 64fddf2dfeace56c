"""Metrics accumulated over a dataset: a confusion matrix for segmentation (IoU per class and
mean, Dice, pixel accuracy) and top-k counts for classification. Both sum integer counts, so
``all_reduce`` over processes gives exactly the single-process result."""
from __future__ import annotations

import torch

from .data import IGNORE_INDEX


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """Class ids from segmentation logits: argmax, or ``logit > 0`` for one binary channel."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(1)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class ConfusionMatrix:
    """``matrix[t, p]`` counts pixels of true class t predicted as p (``ignore_index`` left out).
    ``num_classes`` counts the binary case as 2 classes (background, foreground)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = max(num_classes, 2), ignore_index
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` class ids (or logits (N, C, H, W)), ``target`` class ids."""
        if pred.dim() == target.dim() + 1:
            pred = predictions(pred)
        valid = target != self.ignore_index
        t, p = target[valid].long().cpu(), pred[valid].long().cpu()
        if t.numel() and (t.max() >= self.num_classes or t.min() < 0):
            raise ValueError(f"target class {int(t.max())} outside 0..{self.num_classes - 1} "
                             f"(and not the ignore index {self.ignore_index})")
        self.matrix += torch.bincount(t * self.num_classes + p, minlength=self.num_classes ** 2).view_as(self.matrix)

    def all_reduce(self) -> "ConfusionMatrix":
        self.matrix = _all_reduce(self.matrix.clone())
        return self

    def iou(self) -> torch.Tensor:
        """Per-class IoU = TP / (TP + FP + FN); NaN for a class neither present nor predicted."""
        tp = self.matrix.diag().double()
        union = self.matrix.sum(0).double() + self.matrix.sum(1).double() - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def dice(self) -> torch.Tensor:
        """Per-class Dice (F1) = 2 TP / (2 TP + FP + FN); NaN where that is 0/0."""
        tp = self.matrix.diag().double()
        denom = self.matrix.sum(0).double() + self.matrix.sum(1).double()
        return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(tp, float("nan")))

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum().item()
        return self.matrix.diag().sum().item() / total if total else float("nan")

    def compute(self) -> dict:
        """``miou``/``mdice`` (means over classes with a defined value), ``pixel_acc``, and the
        per-class lists ``iou``/``dice`` (NaN: class absent from targets and predictions)."""
        iou, dice = self.iou(), self.dice()
        return {"miou": _nanmean(iou), "mdice": _nanmean(dice), "pixel_acc": self.pixel_accuracy(),
                "iou": iou.tolist(), "dice": dice.tolist()}


class TopK:
    """Top-k accuracy counts for classification logits (N, C) and labels (N,)."""

    def __init__(self, ks=(1,)):
        self.ks = tuple(ks)
        self.counts = torch.zeros(len(self.ks) + 1, dtype=torch.int64)  # hits per k, then total

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        k_max = min(max(self.ks), logits.shape[1])
        top = logits.topk(k_max, dim=1).indices.cpu()
        hit = top == labels.cpu().view(-1, 1)
        for i, k in enumerate(self.ks):
            self.counts[i] += hit[:, :k].any(1).sum()
        self.counts[-1] += labels.numel()

    def all_reduce(self) -> "TopK":
        self.counts = _all_reduce(self.counts.clone())
        return self

    def compute(self) -> dict:
        total = self.counts[-1].item()
        return {f"top{k}": (self.counts[i].item() / total if total else float("nan")) for i, k in enumerate(self.ks)}


def _nanmean(t: torch.Tensor) -> float:
    valid = t[~t.isnan()]
    return valid.mean().item() if valid.numel() else float("nan")
