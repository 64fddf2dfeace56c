"""Losses and metrics against values computed by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from uresnet_models.losses import BCEDiceLoss, build_loss, ce_loss, dice_loss, jaccard_loss
from uresnet_models.metrics import ConfusionMatrix, TopK, predictions


def test_confusion_matrix_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 1, 0]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    # rows = truth, cols = prediction; the ignored pixel (255) is left out; class 3 never appears
    assert cm.matrix.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = cm.compute()
    # IoU: c0 2/(3+3-2)=0.5, c1 2/(2+3-2)=2/3, c2 1/(2+1-1)=0.5, c3 undefined
    assert m["iou"][:3] == pytest.approx([0.5, 2 / 3, 0.5])
    assert math.isnan(m["iou"][3])
    assert m["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    # Dice: 2TP/(row + col): c0 4/6, c1 4/5, c2 2/3
    assert m["dice"][:3] == pytest.approx([4 / 6, 4 / 5, 2 / 3])
    assert m["mdice"] == pytest.approx((4 / 6 + 4 / 5 + 2 / 3) / 3)
    assert m["pixel_acc"] == pytest.approx(5 / 7)


def test_confusion_matrix_accumulates_and_takes_logits():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 1, 2]])
    logits = F.one_hot(torch.tensor([[0, 2, 2]]), 3).permute(0, 2, 1).float().unsqueeze(-1)  # (1, 3, 3, 1)
    cm.update(logits, target.unsqueeze(-1))
    cm.update(torch.tensor([[0, 1, 2]]), target)
    assert cm.matrix.diag().tolist() == [2, 1, 2]
    assert cm.matrix[1, 2] == 1
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0]), torch.tensor([5]))


def test_binary_predictions_threshold_at_zero_logit():
    logits = torch.tensor([[[[-1.0, 0.5], [2.0, -0.1]]]])
    assert predictions(logits).tolist() == [[[0, 1], [1, 0]]]
    cm = ConfusionMatrix(1)  # one sigmoid channel counts as background/foreground
    cm.update(logits, torch.tensor([[[0, 1], [0, 0]]]))
    assert cm.matrix.tolist() == [[2, 1], [0, 1]]
    assert cm.compute()["iou"] == pytest.approx([2 / 3, 1 / 2])


def test_topk_by_hand():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([2, 0, 1, 1])
    topk = TopK((1, 2))
    topk.update(logits, labels)
    # top-1 hits: sample 1 only; top-2 hits: samples 0, 1, 2, 3
    assert topk.compute() == {"top1": pytest.approx(0.25), "top2": pytest.approx(1.0)}


def test_dice_and_jaccard_by_hand():
    logits = torch.zeros(1, 1, 2, 2)  # sigmoid 0.5 everywhere
    target = torch.tensor([[[1, 0], [1, 1]]])
    # intersection 1.5, sum(p) 2, sum(t) 3, smooth 1
    assert dice_loss(logits, target).item() == pytest.approx(1 - (2 * 1.5 + 1) / (2 + 3 + 1))
    assert jaccard_loss(logits, target).item() == pytest.approx(1 - (1.5 + 1) / (2 + 3 - 1.5 + 1))
    # an ignored pixel counts nowhere: the same as the 3 remaining pixels
    ignored = torch.tensor([[[1, 255], [1, 1]]])
    assert dice_loss(logits, ignored).item() == pytest.approx(1 - (2 * 1.5 + 1) / (1.5 + 3 + 1))


def test_multiclass_dice_is_zero_when_perfect():
    target = torch.tensor([[[0, 1], [2, 2]]])
    logits = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(logits, target).item() == pytest.approx(0, abs=1e-6)
    assert jaccard_loss(logits, target).item() == pytest.approx(0, abs=1e-6)
    assert dice_loss(-logits, target).item() > 0.5


def test_bce_dice_weights():
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[1, 0], [1, 1]]])
    dice = 1 - 4 / 6
    assert BCEDiceLoss(0.5)(logits, target).item() == pytest.approx(0.5 * math.log(2) + 0.5 * dice)
    assert BCEDiceLoss(1.0)(logits, target).item() == pytest.approx(math.log(2))
    assert build_loss("bce_dice", bce_weight=0.0)(logits, target).item() == pytest.approx(dice)
    with pytest.raises(ValueError):
        BCEDiceLoss(1.5)


def test_ce_ignore_index_and_names():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 3)
    target = torch.randint(0, 4, (2, 3, 3))
    target[0, 0, 0] = 255
    valid = target != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], target[valid])
    assert ce_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert build_loss("ce")(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("focal")
