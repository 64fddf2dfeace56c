"""Real data: uresnet_cls learns Fashion-MNIST (Debian's dataset-fashion-mnist, which CI
installs) through the library's training loop, on a subset, to an accuracy no broken model
reaches (chance is 10%)."""
from pathlib import Path

import pytest

from uresnet_models.data import IDX_FILES
from uresnet_models.train import TrainConfig, fit

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FILES = [f"{name}.gz" for name in IDX_FILES]  # as Debian installs them

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not all((FASHION_MNIST / f).is_file() for f in FILES),
                                 reason=f"Fashion-MNIST is not installed ({FASHION_MNIST}: apt-get install "
                                        "dataset-fashion-mnist)")]


def test_uresnet_cls_learns_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the decompressed IDX files
    cfg = TrainConfig(model="uresnet_cls", encoder=None, format="torchvision", dataset="FashionMNIST",
                      data=str(FASHION_MNIST), train_samples=3000, val_samples=1000, image_size=28, augment=False,
                      model_args=dict(residual_widths=(8, 16, 32, 64), residual_blocks=1, base_channels=4,
                                      unet_depth=1, upsample="bilinear", selected_upsampling=False),
                      epochs=3, batch_size=64, lr=5e-3, schedule="onecycle", optimizer="adamw", weight_decay=5e-4,
                      workers=0, device="cpu", out=str(tmp_path / "run"), progress=False)
    result = fit(cfg, log=lambda *a, **k: None)
    history = result["history"]
    assert [row["val_top1"] for row in history][-1] >= 0.70, history  # 1000 of the test images
    assert history[-1]["train_loss"] < history[0]["train_loss"]
