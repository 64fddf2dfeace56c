"""Segmentation losses: cross-entropy (with ``ignore_index``), soft Dice, soft Jaccard, the
Cross-Building weighted BCE + Dice, focal loss, Tversky loss and the Lovász hinge / softmax
losses. Logits are (N, C, H, W); targets (N, H, W) class ids. ``C == 1`` is the binary case
(sigmoid; target 0/1), ``C > 1`` the multi-class one (softmax). Pixels equal to
``ignore_index`` count in no loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .constants import LOSSES
from .data import IGNORE_INDEX


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


def focal_loss(logits, target, ignore_index: int = IGNORE_INDEX, gamma: float = 2.0,
               alpha: float | None = None) -> torch.Tensor:
    """Focal loss (Lin et al. 2017), mean over the valid pixels: ``-(1 - p_t)^gamma log p_t``
    with ``p_t`` the probability of the true class (softmax for C > 1; for C == 1 the sigmoid's
    probability of the pixel's label, summed over the one channel), times ``alpha`` for the
    foreground and ``1 - alpha`` for the background (binary only; ``None``: no weighting)."""
    logits = logits.float()
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    if logits.shape[1] == 1:
        y = safe.float()
        log_pt = -F.binary_cross_entropy_with_logits(logits[:, 0], y, reduction="none")
        weight = 1.0 if alpha is None else alpha * y + (1 - alpha) * (1 - y)
    else:
        if alpha is not None:
            raise ValueError("focal_loss: alpha is for one binary channel; weight classes with ce instead")
        log_pt = logits.log_softmax(1).gather(1, safe.unsqueeze(1))[:, 0]
        weight = 1.0
    per_pixel = -weight * (1 - log_pt.exp()).pow(gamma) * log_pt
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1)


def tversky_loss(logits, target, ignore_index: int = IGNORE_INDEX, alpha: float = 0.5, beta: float = 0.5,
                 smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Tversky index, averaged over classes:
    ``1 - (|P∩T| + s) / (|P∩T| + alpha |P \\ T| + beta |T \\ P| + s)`` (alpha weighs false positives,
    beta false negatives; 0.5/0.5 is Dice, 1/1 Jaccard)."""
    inter, p, t = soft_overlap(logits, target, ignore_index)
    return 1 - ((inter + smooth) / (inter + alpha * (p - inter) + beta * (t - inter) + smooth)).mean()


def _lovasz_grad(errors_sorted_truth: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. the sorted errors, for the
    ground truth (0/1, float) in the order of decreasing errors (Berman et al. 2018, alg. 1)."""
    gts = errors_sorted_truth.sum()
    intersection = gts - errors_sorted_truth.cumsum(0)
    union = gts + (1 - errors_sorted_truth).cumsum(0)
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_hinge_loss(logits, target, ignore_index: int = IGNORE_INDEX, per_image: bool = True) -> torch.Tensor:
    """Lovász hinge loss of one binary channel (N, 1, H, W): the Lovász extension of the
    foreground Jaccard loss applied to the hinge errors ``1 - logit * sign`` (sign +1 for
    foreground, -1 for background), per image then averaged (``per_image=False``: over the
    whole batch at once)."""
    if logits.shape[1] != 1:
        raise ValueError(f"lovasz_hinge_loss takes one binary channel, got {logits.shape[1]}; use "
                         "lovasz_softmax_loss for C > 1")
    logits = logits.float()[:, 0]
    groups = list(zip(logits, target)) if per_image else [(logits, target)]
    losses = []
    for lg, tg in groups:
        valid = tg != ignore_index
        lg, y = lg[valid], tg[valid].float()
        if y.numel() == 0:
            losses.append(lg.sum() * 0)
            continue
        errors = 1 - lg * (2 * y - 1)
        errors_sorted, order = errors.sort(descending=True)
        losses.append(torch.dot(F.relu(errors_sorted), _lovasz_grad(y[order])))
    return torch.stack(losses).mean()


def lovasz_softmax_loss(logits, target, ignore_index: int = IGNORE_INDEX, classes: str = "present") -> torch.Tensor:
    """Lovász-softmax loss (C > 1): per class, the Lovász extension of the Jaccard loss on the
    errors ``|onehot - softmax|`` over the valid pixels of the batch, averaged over the classes
    present in the target (``classes="present"``) or all of them (``"all"``)."""
    if logits.shape[1] < 2:
        raise ValueError("lovasz_softmax_loss takes C > 1 logits; use lovasz_hinge_loss for one binary channel")
    if classes not in ("present", "all"):
        raise ValueError(f"classes must be 'present' or 'all', got {classes!r}")
    probs = logits.float().softmax(1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    flat = target.reshape(-1)
    valid = flat != ignore_index
    probs, flat = probs[valid], flat[valid]
    losses = []
    for c in range(probs.shape[1]):
        fg = (flat == c).float()
        if classes == "present" and fg.sum() == 0:
            continue
        errors_sorted, order = (fg - probs[:, c]).abs().sort(descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_grad(fg[order])))
    return torch.stack(losses).mean() if losses else probs.sum() * 0


def lovasz_loss(logits, target, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Lovász hinge for one binary channel, Lovász-softmax otherwise."""
    if logits.shape[1] == 1:
        return lovasz_hinge_loss(logits, target, ignore_index)
    return lovasz_softmax_loss(logits, target, ignore_index)


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
    """A segmentation loss by name: ``ce``, ``bce_dice``, ``dice``, ``jaccard``, ``focal``,
    ``tversky`` or ``lovasz`` (each with its default parameters; the functions take others)."""
    if name == "bce_dice":
        return BCEDiceLoss(bce_weight, ignore_index)
    fns = {"ce": ce_loss, "dice": dice_loss, "jaccard": jaccard_loss, "focal": focal_loss, "tversky": tversky_loss,
           "lovasz": lovasz_loss}
    if name not in fns:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    return _Fn(fns[name], ignore_index)
