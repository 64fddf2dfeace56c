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
        build_loss("focus")


# --------------------------------------------------------------------------- issue 19: more losses
def test_focal_loss_by_hand():
    from uresnet_models.losses import focal_loss
    # one image, 3 classes, 3 pixels; the last pixel is ignored
    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]], [[-1.0, 0.5, 1.0]]]])  # (1, 3, 1, 3)
    target = torch.tensor([[[0, 2, 255]]])
    p = logits.softmax(1)
    pt = torch.stack([p[0, 0, 0, 0], p[0, 2, 0, 1]])
    want = (-(1 - pt) ** 2 * pt.log()).mean()
    assert focal_loss(logits, target).item() == pytest.approx(want.item(), rel=1e-6)
    # gamma 0 is cross-entropy
    expected = F.cross_entropy(logits, target, ignore_index=255).item()
    assert focal_loss(logits, target, gamma=0).item() == pytest.approx(expected, rel=1e-6)
    # binary with alpha: alpha for foreground pixels, 1 - alpha for background
    x = torch.tensor([[[[1.5, -0.5, 0.2, 3.0]]]])
    y = torch.tensor([[[1, 0, 1, 255]]])
    s = torch.sigmoid(x[0, 0, 0, :3])
    pt = torch.stack([s[0], 1 - s[1], s[2]])
    w = torch.tensor([0.25, 0.75, 0.25])
    want = (-w * (1 - pt) ** 2 * pt.log()).mean()
    assert focal_loss(x, y, alpha=0.25).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(logits, target, alpha=0.25)


def test_tversky_loss_by_hand_and_special_cases():
    from uresnet_models.losses import tversky_loss
    x = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]]]])
    y = torch.tensor([[[1, 0], [0, 255]]])
    p = torch.sigmoid(x[0, 0]).flatten()[:3]
    t = torch.tensor([1.0, 0.0, 0.0])
    inter, fp, fn = (p * t).sum(), (p * (1 - t)).sum(), ((1 - p) * t).sum()
    want = 1 - (inter + 1) / (inter + 0.7 * fp + 0.3 * fn + 1)
    assert tversky_loss(x, y, alpha=0.7, beta=0.3).item() == pytest.approx(want.item(), rel=1e-6)
    g = torch.Generator().manual_seed(5)
    logits, target = torch.randn(2, 3, 5, 7, generator=g), torch.randint(0, 3, (2, 5, 7), generator=g)
    # 0.5/0.5 is Dice (without smoothing: Dice puts it on 2|P∩T|), 1/1 Jaccard
    assert tversky_loss(logits, target, smooth=0).item() == pytest.approx(dice_loss(logits, target, smooth=0).item(),
                                                                          rel=1e-6)
    assert tversky_loss(logits, target, alpha=1, beta=1).item() == pytest.approx(jaccard_loss(logits, target).item(),
                                                                                rel=1e-6)


def _lovasz_by_enumeration(errors: torch.Tensor, truth: torch.Tensor) -> float:
    """The Lovász extension written out: sort the errors decreasingly, and weight the i-th by
    J(first i) - J(first i-1), J(S) = the Jaccard loss of predicting the pixels in S wrong."""
    order = errors.argsort(descending=True)
    gts = truth.sum().item()

    def jaccard_loss_of(k):  # the first k pixels (in order) mispredicted
        wrong = torch.zeros_like(truth, dtype=torch.bool)
        wrong[order[:k]] = True
        fn = (wrong & (truth == 1)).sum().item()
        fp = (wrong & (truth == 0)).sum().item()
        union = gts + fp
        return 1 - (gts - fn) / union if union else 0.0

    return sum(errors[order[i]].item() * (jaccard_loss_of(i + 1) - jaccard_loss_of(i)) for i in range(len(truth)))


def test_lovasz_hinge_by_enumeration():
    from uresnet_models.losses import lovasz_hinge_loss
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 1, 3, 4, generator=g)
    target = torch.randint(0, 2, (2, 3, 4), generator=g)
    target[1, 0, 0] = 255
    per_image = []
    for lg, tg in zip(logits[:, 0], target):
        valid = tg != 255
        lg, y = lg[valid], tg[valid]
        errors = (1 - lg * (2 * y.float() - 1)).clamp_min(0)
        per_image.append(_lovasz_by_enumeration(errors, y))
    assert lovasz_hinge_loss(logits, target).item() == pytest.approx(sum(per_image) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="one binary channel"):
        lovasz_hinge_loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_lovasz_softmax_by_enumeration():
    from uresnet_models.losses import lovasz_softmax_loss
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(1, 4, 3, 3, generator=g)
    target = torch.tensor([[[0, 0, 1], [1, 2, 255], [2, 2, 0]]])  # class 3 absent
    probs = logits.softmax(1)[0].permute(1, 2, 0).reshape(-1, 4)
    flat = target.flatten()
    probs, flat = probs[flat != 255], flat[flat != 255]
    per_class = [_lovasz_by_enumeration(((flat == c).float() - probs[:, c]).abs(), (flat == c).long())
                 for c in range(3)]
    assert lovasz_softmax_loss(logits, target).item() == pytest.approx(sum(per_class) / 3, rel=1e-5)
    x = logits.clone().requires_grad_(True)
    lovasz_softmax_loss(x, target).backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["focal", "tversky", "lovasz"])
@pytest.mark.parametrize("channels", [1, 3])
def test_new_losses_by_name_ignore_index_and_backward(name, channels):
    loss = build_loss(name)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, channels, 6, 5, generator=g, requires_grad=True)
    target = torch.randint(0, max(channels, 2), (2, 6, 5), generator=g)
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value) and logits.grad.abs().sum() > 0
    # ignored pixels change nothing, whatever their logits
    target2 = target.clone()
    target2[:, :2] = 255
    moved = logits.detach().clone()
    moved[:, :, :2] += 5
    assert loss(moved, target2).item() == pytest.approx(loss(logits.detach(), target2).item(), rel=1e-6)


# --------------------------------------------------------------------------- issue 19: metrics
def test_binary_foreground_iou_is_named_apart_from_the_mean():
    target = torch.tensor([[0, 0, 1, 1, 1, 0]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 0]])
    cm = ConfusionMatrix(1)
    cm.update(pred, target)
    m = cm.compute()
    assert m["iou_foreground"] == pytest.approx(2 / 4)  # TP 2, FP 1, FN 1
    assert m["miou"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    assert m["dice_foreground"] == pytest.approx(4 / 6)
    assert "iou_foreground" not in ConfusionMatrix(3).compute()


def test_stat_scores_and_reductions_by_hand():
    from uresnet_models import metrics as M
    # two images of 4 pixels, 3 classes, one ignored pixel
    target = torch.tensor([[0, 1, 1, 2], [2, 2, 0, 255]])
    pred = torch.tensor([[0, 1, 2, 2], [2, 1, 0, 1]])
    tp, fp, fn, tn = M.stat_scores(pred, target, 3)
    assert tp.tolist() == [[1, 1, 1], [1, 0, 1]]
    assert fp.tolist() == [[0, 0, 1], [0, 1, 0]]
    assert fn.tolist() == [[0, 1, 0], [0, 0, 1]]
    assert tn.tolist() == [[3, 2, 2], [2, 2, 1]]
    # micro: all counts summed: TP 5, FP 2, FN 2
    assert M.iou_score(tp, fp, fn, tn, "micro").item() == pytest.approx(5 / 9)
    assert M.f1_score(tp, fp, fn, tn, "micro").item() == pytest.approx(10 / 14)
    # macro: per class over the dataset: c0 2/2, c1 1/3, c2 2/4
    assert M.iou_score(tp, fp, fn, tn, "macro").item() == pytest.approx((1 + 1 / 3 + 0.5) / 3)
    # weighted by support (TP + FN): c0 2, c1 2, c2 3
    assert M.iou_score(tp, fp, fn, tn, "weighted").item() == pytest.approx((2 * 1 + 2 / 3 + 3 * 0.5) / 7)
    # per image: image 0 TP 3 FP 1 FN 1 -> 3/5; image 1 TP 2 FP 1 FN 1 -> 2/4
    assert M.iou_score(tp, fp, fn, tn, "micro-imagewise").item() == pytest.approx((3 / 5 + 2 / 4) / 2)
    none = M.iou_score(tp, fp, fn, tn, "none")
    assert none.shape == (2, 3) and none[1, 1].item() == 0.0  # 0 TP, 1 FP: 0
    assert M.iou_score(tp, fp, fn, tn, "macro-imagewise").item() == pytest.approx(none.mean().item())
    assert M.precision(tp, fp, fn, tn, "micro").item() == pytest.approx(5 / 7)
    assert M.recall(tp, fp, fn, tn, "macro").item() == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert M.accuracy(tp, fp, fn, tn, "none")[0, 0].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reduction"):
        M.iou_score(tp, fp, fn, tn, "mean")
    with pytest.raises(ValueError, match="outside"):
        M.stat_scores(pred, torch.full_like(target, 7), 3)


def test_functional_metrics_equal_smp():
    smp = pytest.importorskip("segmentation_models_pytorch")
    from uresnet_models import metrics as M
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randint(0, 4, (3, 9, 11), generator=g), torch.randint(0, 4, (3, 9, 11), generator=g)
    ours = M.stat_scores(pred, target, 4, ignore_index=None)
    theirs = smp.metrics.get_stats(pred, target, mode="multiclass", num_classes=4)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    for reduction in ("micro", "macro", "micro-imagewise", "macro-imagewise", "none"):
        for name in ("iou_score", "f1_score", "precision", "recall", "accuracy"):
            a = getattr(M, name)(*ours, reduction=reduction)
            b = getattr(smp.metrics, name)(*theirs, reduction=reduction)
            assert torch.allclose(a.float(), b.float(), atol=1e-6), (name, reduction)


def test_class_accuracy():
    cm = ConfusionMatrix(3, -1)
    cm.update(torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 2, 2, 1]))
    assert cm.class_accuracy().tolist()[:3] == pytest.approx([1.0, 0.5, 0.5])
