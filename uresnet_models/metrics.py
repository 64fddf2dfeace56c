"""Metrics accumulated over a dataset: a confusion matrix for segmentation (IoU per class and
mean, Dice, pixel accuracy) and for classification (per-class accuracy), and top-k counts.
Both sum integer counts, so ``all_reduce`` over processes gives exactly the single-process
result.

The functional API computes per-image counts and reduces them as smp/torchmetrics do::

    tp, fp, fn, tn = stat_scores(pred, target, num_classes)      # each (N images, C classes)
    iou_score(tp, fp, fn, tn, reduction="micro")                 # or macro, weighted, *-imagewise, none
    f1_score(...), dice_score(...), precision(...), recall(...), accuracy(...)
"""
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
    """``matrix[t, p]`` counts pixels (or images) of true class t predicted as p
    (``ignore_index`` left out). ``num_classes`` counts the binary case as 2 classes
    (background, foreground); :meth:`compute` then also reports the foreground's IoU and Dice
    (``iou_foreground``, ``dice_foreground``: what torchmetrics' and smp's binary IoU/F1 are),
    next to ``miou``, the mean over both classes."""

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
        out = {"miou": _nanmean(iou), "mdice": _nanmean(dice), "pixel_acc": self.pixel_accuracy(),
               "iou": iou.tolist(), "dice": dice.tolist()}
        if self.num_classes == 2:
            out["iou_foreground"], out["dice_foreground"] = iou[1].item(), dice[1].item()
        return out

    def class_accuracy(self) -> torch.Tensor:
        """Per-class accuracy (recall): TP / (samples of the class); NaN for an absent class."""
        support = self.matrix.sum(1).double()
        return torch.where(support > 0, self.matrix.diag().double() / support.clamp_min(1),
                           torch.full_like(support, float("nan")))


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


# --------------------------------------------------------------------------- functional API
REDUCTIONS = ("micro", "macro", "weighted", "micro-imagewise", "macro-imagewise", "none")


def stat_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = IGNORE_INDEX):
    """Per-image, per-class true/false positives/negatives ``(tp, fp, fn, tn)``, each an int64
    (N, C) tensor. ``pred``: class ids (N, ...) or logits (N, C, ...) (argmax, or ``> 0`` for
    one channel); ``target``: class ids (N, ...); pixels equal to ``ignore_index`` count in
    none. ``num_classes``: 1 or 2 both give the binary case as 2 classes (background, foreground)."""
    if pred.dim() == target.dim() + 1:
        pred = predictions(pred)
    if pred.shape != target.shape:
        raise ValueError(f"stat_scores: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    c = max(num_classes, 2)
    n = target.shape[0]
    pred, target = pred.reshape(n, -1).long(), target.reshape(n, -1).long()
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    if ((target < 0) | (target >= c))[valid].any():
        raise ValueError(f"stat_scores: target values outside 0..{c - 1} (and not the ignore index {ignore_index})")
    classes = torch.arange(c, device=target.device).view(1, c, 1)
    p = (pred.unsqueeze(1) == classes) & valid.unsqueeze(1)
    t = (target.unsqueeze(1) == classes) & valid.unsqueeze(1)
    tp = (p & t).sum(2)
    fp = (p & ~t).sum(2)
    fn = (~p & t).sum(2)
    tn = valid.sum(1, keepdim=True) - tp - fp - fn
    return tp, fp, fn, tn


def _reduce(fn, tp, fp, fn_, tn, reduction: str, zero_division: float):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    tp, fp, fn_, tn = (x.double() for x in (tp, fp, fn_, tn))

    def score(*counts):
        num, den = fn(*counts)
        return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, zero_division))

    if reduction == "micro":
        return score(tp.sum(), fp.sum(), fn_.sum(), tn.sum())
    if reduction in ("macro", "weighted"):
        per_class = score(tp.sum(0), fp.sum(0), fn_.sum(0), tn.sum(0))
        if reduction == "macro":
            return per_class.mean()
        support = (tp + fn_).sum(0)
        return (per_class * support).sum() / support.sum().clamp_min(1)
    if reduction == "micro-imagewise":
        return score(tp.sum(1), fp.sum(1), fn_.sum(1), tn.sum(1)).mean()
    per_image_class = score(tp, fp, fn_, tn)
    return per_image_class.mean() if reduction == "macro-imagewise" else per_image_class


def iou_score(tp, fp, fn, tn, reduction: str = "micro", zero_division: float = 0.0) -> torch.Tensor:
    """IoU (Jaccard) = TP / (TP + FP + FN), reduced by ``reduction``: ``micro`` (counts summed
    over images and classes), ``macro`` (per class over the dataset, then the mean over
    classes), ``weighted`` (as macro, weighted by each class's TP + FN), ``micro-imagewise`` /
    ``macro-imagewise`` (per image, then the mean over images), ``none`` (N, C). A 0/0 score
    is ``zero_division``."""
    return _reduce(lambda tp, fp, fn, tn: (tp, tp + fp + fn), tp, fp, fn, tn, reduction, zero_division)


def f1_score(tp, fp, fn, tn, reduction: str = "micro", zero_division: float = 0.0) -> torch.Tensor:
    """F1 = Dice = 2 TP / (2 TP + FP + FN), reduced as in :func:`iou_score`."""
    return _reduce(lambda tp, fp, fn, tn: (2 * tp, 2 * tp + fp + fn), tp, fp, fn, tn, reduction, zero_division)


dice_score = f1_score


def precision(tp, fp, fn, tn, reduction: str = "micro", zero_division: float = 0.0) -> torch.Tensor:
    """Precision = TP / (TP + FP), reduced as in :func:`iou_score`."""
    return _reduce(lambda tp, fp, fn, tn: (tp, tp + fp), tp, fp, fn, tn, reduction, zero_division)


def recall(tp, fp, fn, tn, reduction: str = "micro", zero_division: float = 0.0) -> torch.Tensor:
    """Recall (sensitivity) = TP / (TP + FN), reduced as in :func:`iou_score`."""
    return _reduce(lambda tp, fp, fn, tn: (tp, tp + fn), tp, fp, fn, tn, reduction, zero_division)


def accuracy(tp, fp, fn, tn, reduction: str = "micro", zero_division: float = 0.0) -> torch.Tensor:
    """Accuracy = (TP + TN) / (TP + FP + FN + TN), reduced as in :func:`iou_score`."""
    return _reduce(lambda tp, fp, fn, tn: (tp + tn, tp + fp + fn + tn), tp, fp, fn, tn, reduction, zero_division)
