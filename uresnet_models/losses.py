"""Segmentation losses: cross-entropy (with ``ignore_index``), soft Dice, soft Jaccard and the
Cross-Building weighted BCE + Dice. Logits are (N, C, H, W); targets (N, H, W) class ids.
``C == 1`` is the binary case (sigmoid; target 0/1), ``C > 1`` the multi-class one (softmax).
Pixels equal to ``ignore_index`` count in no loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX

LOSSES = ("ce", "bce_dice", "dice", "jaccard")


def _probs_and_onehot(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """Per-class probabilities, one-hot targets and the valid-pixel mask, all (N, C, H, W)
    (float32 whatever the logits' dtype: the sums below need it)."""
    logits = logits.float()
    valid = (target != ignore_index).unsqueeze(1)
    safe = torch.where(valid.squeeze(1), target, torch.zeros_like(target))
    if logits.shape[1] == 1:
        return torch.sigmoid(logits), safe.unsqueeze(1).float(), valid
    onehot = F.one_hot(safe, logits.shape[1]).permute(0, 3, 1, 2).float()
    return logits.softmax(1), onehot, valid


def soft_overlap(logits, target, ignore_index: int = IGNORE_INDEX):
    """Per-class soft intersection and the sums of probabilities and targets over the batch."""
    probs, onehot, valid = _probs_and_onehot(logits, target, ignore_index)
    probs, onehot = probs * valid, onehot * valid
    return (probs * onehot).sum((0, 2, 3)), probs.sum((0, 2, 3)), onehot.sum((0, 2, 3))


def dice_loss(logits, target, ignore_index: int = IGNORE_INDEX, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, averaged over classes: 1 - (2|P∩T| + s) / (|P| + |T| + s)."""
    inter, p, t = soft_overlap(logits, target, ignore_index)
    return 1 - ((2 * inter + smooth) / (p + t + smooth)).mean()


def jaccard_loss(logits, target, ignore_index: int = IGNORE_INDEX, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Jaccard (IoU), averaged over classes: 1 - (|P∩T| + s) / (|P| + |T| - |P∩T| + s)."""
    inter, p, t = soft_overlap(logits, target, ignore_index)
    return 1 - ((inter + smooth) / (p + t - inter + smooth)).mean()


def bce_loss(logits, target, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Binary cross-entropy with logits over the valid pixels (one-hot targets when C > 1)."""
    _, onehot, valid = _probs_and_onehot(logits.detach(), target, ignore_index)
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), onehot, reduction="none")
    mask = valid.expand_as(per_pixel).float()
    return (per_pixel * mask).sum() / mask.sum().clamp_min(1)


def ce_loss(logits, target, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy (softmax) for C > 1, binary cross-entropy for C == 1."""
    if logits.shape[1] == 1:
        return bce_loss(logits, target, ignore_index)
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCE + (1 - bce_weight) * soft Dice`` (Cross-Building: 0.5 / 0.5)."""

    def __init__(self, bce_weight: float = 0.5, ignore_index: int = IGNORE_INDEX, smooth: float = 1.0):
        super().__init__()
        if not 0.0 <= bce_weight <= 1.0:
            raise ValueError(f"bce_weight must be in [0, 1], got {bce_weight}")
        self.bce_weight, self.ignore_index, self.smooth = bce_weight, ignore_index, smooth

    def forward(self, logits, target):
        return (self.bce_weight * bce_loss(logits, target, self.ignore_index)
                + (1 - self.bce_weight) * dice_loss(logits, target, self.ignore_index, self.smooth))


class _Fn(nn.Module):
    def __init__(self, fn, ignore_index):
        super().__init__()
        self.fn, self.ignore_index = fn, ignore_index

    def forward(self, logits, target):
        return self.fn(logits, target, self.ignore_index)


def build_loss(name: str, *, ignore_index: int = IGNORE_INDEX, bce_weight: float = 0.5) -> nn.Module:
    """A segmentation loss by name: ``ce``, ``bce_dice``, ``dice`` or ``jaccard``."""
    if name == "bce_dice":
        return BCEDiceLoss(bce_weight, ignore_index)
    fns = {"ce": ce_loss, "dice": dice_loss, "jaccard": jaccard_loss}
    if name not in fns:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    return _Fn(fns[name], ignore_index)
