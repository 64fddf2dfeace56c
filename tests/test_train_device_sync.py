"""The training loop keeps its loss sum on the device: no host read per step (each would wait
for the GPU), and the epoch's train_loss is the same n-weighted mean as before."""
import sys

import pytest
import torch

from uresnet_models import train
from uresnet_models.train import TrainConfig, fit

TINY = dict(model="uresnet", encoder=None, image_size=32, val_samples=8, epochs=1, batch_size=8, lr=1e-3,
            progress=True, model_args=dict(base_channels=4, residual_widths=(8, 8, 8, 8), residual_out_channels=4))

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, monkeypatch, train_samples):
    """(train_loss, the training steps' (loss, n), Tensor.item calls made in train.py) of a
    one-epoch run (the optimizer reads its CPU step counts with .item(): no device sync)."""
    steps, items = [], [0]
    task_loss, item = train.Task.loss, torch.Tensor.item

    def recording_loss(self, out, batch):
        loss = task_loss(self, out, batch)
        if loss.requires_grad:  # a training step (evaluate runs without grad)
            steps.append((loss.detach().clone(), batch["image"].shape[0]))
        return loss

    def counting_item(self):
        items[0] += sys._getframe(1).f_code.co_filename == train.__file__
        return item(self)

    monkeypatch.setattr(train.Task, "loss", recording_loss)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    result = fit(TrainConfig(**TINY, train_samples=train_samples, out=str(tmp_path / str(train_samples))),
                 log=lambda *a, **k: None)
    monkeypatch.undo()
    return result["history"][0]["train_loss"], [(loss.item(), n) for loss, n in steps], items[0]


def test_train_loss_is_read_once_per_epoch_and_unchanged(tmp_path, monkeypatch):
    assert train.LOSS_SHOWN_EVERY > 6  # below it, the progress bar reads nothing
    loss2, steps2, items2 = _run(tmp_path, monkeypatch, 16)
    loss6, steps6, items6 = _run(tmp_path, monkeypatch, 48)
    assert (len(steps2), len(steps6)) == (2, 6)
    assert items6 == items2  # four more steps, no more host reads (was 2 per step)
    for loss, steps in ((loss2, steps2), (loss6, steps6)):
        # the float64 sum of loss * n over n, in step order, as when it was summed on the host
        expected = torch.tensor(0.0, dtype=torch.float64)
        for value, n in steps:
            expected += value * n
        assert loss == (expected / sum(n for _, n in steps)).item()
