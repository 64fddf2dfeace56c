"""The training loop: learning on synthetic shapes, checkpoints and logs, resume, joint and
classification training, and 2-process DDP (gloo, CPU) against a single process."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import uresnet_models
from helpers import fake_cifar10
from uresnet_models.train import TrainConfig, fit, load_checkpoint, raw_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model="uresnet", encoder=None,
            model_args=dict(base_channels=8, residual_widths=(16, 16, 16, 16), residual_out_channels=8))


pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("shapes")
    cfg = TrainConfig(**TINY, image_size=32, train_samples=128, val_samples=32, epochs=2, batch_size=16, lr=5e-3,
                      out=str(out), progress=False)
    return fit(cfg, log=_quiet)


def test_two_epochs_lower_the_loss_and_beat_chance(shapes_run):
    h = shapes_run["history"]
    assert [r["epoch"] for r in h] == [1, 2]
    assert h[1]["train_loss"] < h[0]["train_loss"] and h[1]["val_loss"] < h[0]["val_loss"]
    # predicting background everywhere scores about 0.22 mIoU on 4 classes
    assert h[1]["val_miou"] > 0.4, h
    # every class found (pixel accuracy is no test here: background alone scores about 0.88)
    assert len(h[1]["val_iou"]) == 4 and min(h[1]["val_iou"]) > 0.1, h
    assert 0.0 <= h[1]["val_pixel_acc"] <= 1.0


def test_run_folder_contents(shapes_run):
    out = shapes_run["out"]
    for name in ("best/model.safetensors", "best/config.json", "best/training.json", "last/state.pt",
                 "log.csv", "log.json", "curves.png", "samples.png"):
        assert (out / name).is_file(), name
    header = (out / "log.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["epoch", "lr", "train_loss", "val_loss", "val_miou"]
    assert len(json.loads((out / "log.json").read_text())) == 2
    model, info, meta = load_checkpoint(out)  # the run folder resolves to best/
    assert meta["epoch"] == shapes_run["best_epoch"] and info.num_classes == 4
    # what training normalised with and the loss it used travel with the checkpoint
    assert uresnet_models.from_pretrained(out / "best").preprocessing["std"] == [0.25] * 3 == list(info.std)
    assert meta["config"]["loss"] == "ce"
    with torch.no_grad():
        reloaded = model(torch.zeros(1, 3, 32, 32))
        trained = shapes_run["model"].eval()(torch.zeros(1, 3, 32, 32))
    if shapes_run["best_epoch"] == 2:
        torch.testing.assert_close(reloaded, trained)


def test_curves_are_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    from uresnet_models import plots
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "lr": 1e-3, "val_miou": 0.5}]
    assert plots.plot_curves(history, tmp_path / "curves.png") is None
    assert "matplotlib" in capsys.readouterr().out and not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("schedule", ["plateau", "onecycle"])
def test_resume_continues_where_it_stopped(tmp_path, schedule):
    base = dict(**TINY, image_size=32, train_samples=48, val_samples=16, batch_size=12, lr=5e-3, progress=False,
                schedule=schedule)
    straight = fit(TrainConfig(**base, epochs=3, out=str(tmp_path / "straight")), log=_quiet)["history"]
    fit(TrainConfig(**base, epochs=2, out=str(tmp_path / "part")), log=_quiet)
    if schedule == "onecycle":  # its shape is the run's length: longer is another schedule, refused
        from uresnet_models.errors import UsageError
        with pytest.raises(UsageError, match="one-cycle schedule spans 8 steps, this run 12 .--epochs 3 x 4"):
            fit(TrainConfig(**base, epochs=3, out=str(tmp_path / "part"), resume=str(tmp_path / "part")), log=_quiet)
        lrs = [row["lr"] for row in straight]  # at each epoch's end: stepped per batch, down from the peak --lr
        assert 5e-3 >= lrs[0] > lrs[1] > lrs[2] and lrs[2] < 5e-3 / 10
        return
    logs = []
    resumed = fit(TrainConfig(**base, epochs=3, out=str(tmp_path / "part"), resume=str(tmp_path / "part")),
                  log=logs.append)["history"]
    assert any("resumed" in line and "epoch 2" in line for line in logs)
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(resumed, straight):  # same batches, augmentation, optimizer state: the same run
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    # resuming with another model is refused
    with pytest.raises(ValueError, match="cannot resume"):
        fit(TrainConfig(**{**base, "model_args": {"base_channels": 4}}, epochs=4, out=str(tmp_path / "x"),
                        resume=str(tmp_path / "part")), log=_quiet)


def test_joint_segmentation_and_classification(tmp_path):
    cfg = TrainConfig(**TINY, task="joint", image_size=32, train_samples=16, val_samples=8, epochs=1, batch_size=8,
                      lr=1e-3, out=str(tmp_path), progress=False)
    result = fit(cfg, log=_quiet)
    row = result["history"][0]
    assert {"val_miou", "val_top1"} <= set(row) and 0 <= row["val_top1"] <= 1
    model = uresnet_models.from_pretrained(tmp_path / "best")
    seg, cls = model.eval()(torch.zeros(2, 3, 32, 32))
    assert seg.shape == (2, 4, 32, 32) and cls.shape == (2, 3)


def _cifar(root: Path, monkeypatch, per_batch=8):
    def learnable(name, labels):  # learnable from the red channel
        data = np.random.default_rng(len(name)).integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        data[np.arange(per_batch), 0] = np.array(labels)[:, None, None] * 25
        return data
    return fake_cifar10(root, monkeypatch, per_batch, learnable)


def test_classification_on_cifar10_layout(tmp_path, monkeypatch):
    cfg = TrainConfig(model="uresnet_cls", encoder="test_resnet", format="cifar10",
                      data=str(_cifar(tmp_path / "c", monkeypatch)),
                      model_args=dict(base_channels=8, unet_depth=2, selected_upsampling=False), image_size=32,
                      epochs=1, batch_size=8, lr=1e-3, out=str(tmp_path / "run"), progress=False, workers=0)
    row = fit(cfg, log=_quiet)["history"][0]
    assert "val_top1" in row and "val_miou" not in row and "val_top5" in row
    subset, _ = raw_dataset(replace(cfg, train_samples=5), "train")  # a seeded random subset of 40
    again, _ = raw_dataset(replace(cfg, train_samples=5), "train")
    assert len(subset) == 5 and subset.indices == again.indices != list(range(5))
    with pytest.raises(ValueError, match="uresnet_cls"):
        fit(TrainConfig(**{**cfg.__dict__, "model": "uresnet", "encoder": None, "overwrite": True}), log=_quiet)


# --------------------------------------------------------------------------- DDP
DDP_ARGS = ["--encoder", "none", "--model-arg", "base_channels=4", "--model-arg", "residual_widths=(8,8,8,8)",
            "--model-arg", "residual_out_channels=4", "--model-arg", "upsample=pixel_shuffle_bn",
            "--image-size", "32", "--train-samples", "32", "--val-samples", "12", "--epochs", "2", "--lr", "3e-3",
            "--seed", "1", "--no-progress"]


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    """torchrun with 2 CPU processes (batch 4 each) against one process (batch 8): the same
    batches, synchronised BatchNorm (plain BN and the fused PixelShuffleBN) and all-reduced
    gradients give the same losses and IoU up to float rounding."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "uresnet",
           "train", *DDP_ARGS, "--batch-size", "4", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("epoch 1/2 ") == 1  # rank 0 prints alone
    ddp = json.loads((tmp_path / "ddp" / "log.json").read_text())

    from uresnet_models.cli import main
    assert main(["train", *DDP_ARGS, "--batch-size", "8", "--out", str(tmp_path / "single")]) == 0
    single = json.loads((tmp_path / "single" / "log.json").read_text())
    assert len(ddp) == len(single) == 2
    for d, s in zip(ddp, single):
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=2e-3)
        assert d["val_loss"] == pytest.approx(s["val_loss"], rel=2e-3)
        assert d["val_miou"] == pytest.approx(s["val_miou"], abs=5e-3)
        assert d["val_pixel_acc"] == pytest.approx(s["val_pixel_acc"], abs=5e-3)
    assert (tmp_path / "ddp" / "best" / "model.safetensors").is_file()


def test_cpu_sync_batchnorm_keeps_the_state_dict():
    from uresnet_ops.nn import PixelShuffleBN
    from uresnet_models.distributed import sync_batchnorm
    make = lambda: uresnet_models.create_model("uresnet", encoder=None, num_classes=2, upsample="pixel_shuffle_bn",  # noqa: E731
                                               **TINY["model_args"])
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synced = sync_batchnorm(model, torch.device("cpu"))
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    fused = [m for m in synced.modules() if isinstance(m, PixelShuffleBN)]
    assert fused and all(m.sync for m in fused)
    after = synced.state_dict()
    assert after.keys() == before.keys()
    x = torch.randn(2, 3, 32, 32)
    reference = make()
    reference.load_state_dict(before)
    torch.testing.assert_close(synced.train()(x), reference.train()(x), rtol=1e-4, atol=1e-4)  # alone: plain BN


def test_curves_have_whole_epoch_ticks(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure
    from uresnet_models.plots import plot_curves
    figures = []
    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (figures.append(self),
                                                                                      original(self, *a, **k)))
    history = [dict(epoch=e, train_loss=1.0 / e, val_loss=1.0 / e, val_miou=0.1 * e, lr=1e-3) for e in (1, 2)]
    plot_curves(history, tmp_path / "c.png")
    ticks = [t for ax in figures[0].axes for t in ax.get_xticks() if 1 <= t <= 2]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_ddp_is_told_of_unused_parameters_only_where_there_are_some(tmp_path):
    # uresnet_cls uses only hrnet's deepest feature: 66 parameters get no gradient, which plain
    # DDP rejects at the second step. A model without any keeps the cheaper default.
    import torch.distributed as dist
    from uresnet_models.distributed import distributed_model, unused_parameters
    hrnet = uresnet_models.create_model("uresnet_cls", encoder="hrnet_w18_small", num_classes=3)
    plain = uresnet_models.create_model("uresnet_cls", encoder="resnet18", num_classes=3)
    example = torch.randn(1, 3, 64, 64)
    before = {k: v.clone() for k, v in hrnet.state_dict().items()}
    unused = unused_parameters(hrnet.train(), example)
    assert len(unused) > 0 and unused_parameters(plain, example) == []
    assert hrnet.training and all(p.grad is None for p in hrnet.parameters())
    assert all(torch.equal(before[k], v) for k, v in hrnet.state_dict().items())  # no statistic moved
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        net = distributed_model(hrnet, torch.device("cpu"), example, say=lambda *_: None)
        for _ in range(2):  # the second step is where plain DDP fails
            net(torch.randn(2, 3, 64, 64)).sum().backward()
    finally:
        dist.destroy_process_group()


def test_config_checks_itself_when_made(tmp_path):
    from uresnet_models.errors import UsageError
    with pytest.raises(UsageError, match="^--epochs must be at least 1$"):
        TrainConfig(epochs=0)
    with pytest.raises(UsageError, match=r"^--task is for --format synthetic \(binary has its own task\)$"):
        TrainConfig(format="binary", data=str(tmp_path), task="joint")
    with pytest.raises(UsageError, match="^--data .*: give the dataset's --format"):
        TrainConfig(format=None, data=str(tmp_path))
    with pytest.raises(UsageError, match="^--resume: .*last does not exist$"):
        TrainConfig(out=str(tmp_path), resume="auto")
    with pytest.raises(UsageError, match=r"^--ignore-index is for --format masks"):
        TrainConfig(format="binary", data=str(tmp_path), ignore_index=0)
    with pytest.raises(UsageError, match="^--resume and --overwrite: continue the run or replace it, not both$"):
        TrainConfig(out=str(tmp_path), resume=str(tmp_path), overwrite=True)
    with pytest.raises(UsageError, match=r"^--download is for --format torchvision \(got --format binary\)$"):
        TrainConfig(format="binary", data=str(tmp_path), download=True)
    with pytest.raises(UsageError, match=r"^--schedule 'cosine': expected one of plateau, onecycle$"):
        TrainConfig(schedule="cosine")
    # --download may name a folder that is not there yet: torchvision makes it
    TrainConfig(format="torchvision", dataset="MNIST", data=str(tmp_path / "new"), download=True)
    cfg = TrainConfig(format=None, image_size=[32, 48])  # as read back from training.json
    assert cfg.format == "synthetic" and cfg.image_size == (32, 48)
