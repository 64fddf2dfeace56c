"""The ``uresnet`` command line: --help everywhere, one-line errors for bad arguments and
paths, and train -> eval -> predict on a tiny binary images/masks folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uresnet_models.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--encoder", "none", "--model-arg", "base_channels=4", "--model-arg", "residual_widths=(8,8,8,8)",
        "--model-arg", "residual_out_channels=4", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared cores: see test_train.py
    yield
    torch.set_num_threads(threads)


def run(argv, capsys):
    """(exit status, stdout, stderr) of ``uresnet argv``, argparse's exits included."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("command", ["demo", "train", "eval", "predict", "bench", "list-models"])
def test_help(command, capsys):
    status, out, _ = run([command, "--help"], capsys)
    assert status == 0 and out.startswith(f"usage: uresnet {command}")


def _binary_folder(root: Path, n=6, size=24):
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        y, x = rng.integers(2, size // 2, 2)
        mask[y:y + size // 3, x:x + size // 3] = 255
        image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        image[mask > 0] = (220, 200, 40)
        for sub, array in (("images", image), ("masks", mask)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / sub / f"{i:03d}.png")
    return root


BAD = [
    (["train", "--data", "/no/such/folder", "--format", "binary"], "/no/such/folder"),
    (["train", "--data", "/no/such/folder"], "--format"),
    (["train", "--format", "cityscapes"], "needs --data"),
    (["train", "--format", "coco"], "invalid choice"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--image-size", "big"], "--image-size"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--model", "unett", "--epochs", "1"], "unknown model 'unett'"),
    (["train", "--encoder", "resnet_nope", "--epochs", "1"], "resnet_nope"),
    (["train", "--model-arg", "oops"], "KEY=VALUE"),
    (["train", "--model-arg", "widthz=3", "--epochs", "1"], "widthz"),
    (["train", "--task", "joint", "--data", ".", "--format", "binary"], "--task"),
    (["train", "--resume", "/no/such/run"], "/no/such/run"),
    (["train", "--unknown-flag"], "unrecognized arguments"),
    (["eval", "--checkpoint", "/no/such/ckpt"], "/no/such/ckpt"),
    (["eval"], "--checkpoint"),
    (["predict", "--checkpoint", ".", "--input", "/no/such/images", "--out", "x"], "/no/such/images"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_arguments_give_one_line(argv, needle, capsys):
    status, _, err = run(argv, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("uresnet") and "error" in lines[0] and needle in lines[0], lines[0]


def test_missing_and_broken_files_are_named(tmp_path, capsys):
    data = _binary_folder(tmp_path / "data", n=3)
    (data / "masks" / "001.png").unlink()
    status, _, err = run(["train", "--data", str(data), "--format", "binary", "--epochs", "1", *TINY,
                          "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and "001" in err and len(err.strip().splitlines()) == 1
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(data / "masks" / "001.png")
    (data / "images" / "002.png").write_bytes(b"garbage")
    status, _, err = run(["train", "--data", str(data), "--format", "binary", "--epochs", "1", "--batch-size", "2",
                          "--val-fraction", "0.34", *TINY, "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and "002.png" in err and len(err.strip().splitlines()) == 1, err


def test_module_entry_point_exit_status():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "uresnet", "train", "--data", "/no/such/folder", "--format",
                           "binary"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "uresnet train: error: --data /no/such/folder: no such file or folder"]


def test_train_eval_predict_binary_folder(tmp_path, capsys):
    data = _binary_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    status, out, err = run(["train", "--data", str(data), "--format", "binary", "--epochs", "2", "--batch-size", "2",
                            "--lr", "3e-3", "--image-size", "24", "--val-fraction", "0.34", "--early-stop", "5",
                            "--optimizer", "adamw", *TINY, "--out", str(run_dir)], capsys)
    assert status == 0, err
    assert "loss bce_dice" in out and "epoch 2/2" in out
    assert (run_dir / "best" / "model.safetensors").is_file() and (run_dir / "log.csv").is_file()

    metrics_file = tmp_path / "metrics.json"
    status, out, err = run(["eval", "--checkpoint", str(run_dir), "--data", str(data), "--format", "binary",
                            "--no-progress", "--json", str(metrics_file)], capsys)
    assert status == 0, err
    metrics = json.loads(metrics_file.read_text())
    assert metrics["split"] == "val" and 0 <= metrics["miou"] <= 1 and len(metrics["iou"]) == 2
    best = json.loads((run_dir / "best" / "training.json").read_text())["metrics"]
    assert metrics["miou"] == pytest.approx(best["val_miou"])  # the same split, transform and weights
    assert "foreground" in out

    status, out, err = run(["predict", "--checkpoint", str(run_dir), "--input", str(data / "images"),
                            "--out", str(tmp_path / "masks")], capsys)
    assert status == 0, err
    written = sorted((tmp_path / "masks").glob("*.png"))
    assert len(written) == 6
    mask = np.asarray(Image.open(written[0]))
    assert mask.shape == (24, 24) and set(np.unique(mask)) <= {0, 255}


def test_bench_models_prints_and_writes_json(tmp_path, capsys, monkeypatch):
    import uresnet_models.benchmark as model_bench
    monkeypatch.setattr(model_bench, "shape", lambda size, device: (1, 64))  # a tiny step: fast here
    path = tmp_path / "models.json"
    status, out, _ = run(["bench", "--models", "uresnet", "--device", "cpu", "--rounds", "1", "--json", str(path)], capsys)
    assert status == 0 and "uresnet(resnet34)" in out and "1x64x64" in out
    (row,) = json.loads(path.read_text())["models"]
    assert row["fused"]["impl"] == "fused" and row["reference"]["impl"] == "reference"
    assert row["fused"]["median_s"] > 0 and row["reference"]["median_s"] > 0
