"""The ``uresnet`` command line: --help everywhere, one-line errors for bad arguments and
paths, and train -> eval -> predict on a tiny binary images/masks folder."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_cli, write_idx

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--encoder", "none", "--model-arg", "base_channels=4", "--model-arg", "residual_widths=(8,8,8,8)",
        "--model-arg", "residual_out_channels=4", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


run = run_cli


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


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    """``uresnet train`` for two epochs on a tiny binary images/masks folder of 6 images:
    (the data folder, the run folder, what train printed)."""
    from uresnet_models.cli import main
    root = tmp_path_factory.mktemp("binary")
    data, run_dir = _binary_folder(root / "data"), root / "run"
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread, which is per test
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(["train", "--data", str(data), "--format", "binary", "--epochs", "2", "--batch-size", "2",
                           "--lr", "3e-3", "--image-size", "24", "--val-fraction", "0.34", "--early-stop", "5",
                           "--optimizer", "adamw", *TINY, "--out", str(run_dir)])
    finally:
        torch.set_num_threads(threads)
    assert status == 0, err.getvalue()
    return data, run_dir, out.getvalue()


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
    (["train", "--format", "torchvision", "--dataset", "ImageNet", "--data", "."], "one of MNIST, FashionMNIST"),
    (["train", "--format", "torchvision", "--data", "."], "needs --dataset NAME"),
    (["train", "--format", "binary", "--dataset", "MNIST", "--data", "."], "--dataset MNIST is for --format torch"),
    (["train", "--format", "binary", "--data", ".", "--download"], "--download is for --format torchvision"),
    (["train", "--format", "torchvision", "--dataset", "MNIST", "--data", "/no/such/root"], "/no/such/root"),
    (["train", "--schedule", "cosine"], "invalid choice"),
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


def test_train_eval_predict_binary_folder(binary_run, tmp_path, capsys):
    data, run_dir, out = binary_run
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
    monkeypatch.setattr(model_bench, "model_shapes", lambda size, device: [(1, 64)])  # a tiny step: fast here
    path = tmp_path / "models.json"
    argv = ["bench", "--models", "uresnet", "--device", "cpu", "--rounds", "1", "--json", str(path)]
    status, out, _ = run(argv, capsys)
    assert status == 0 and "uresnet(resnet34)" in out and "1x64x64" in out
    assert "where the fused train step's time goes" in out and "limit with free fused ops" in out
    rows = json.loads(path.read_text())["models"]
    assert {(r["mode"], r["implementation"]) for r in rows} == {
        ("train", "plain"), ("train", "fused"), ("infer", "plain"), ("infer", "fused"), ("infer", "fused+fold")}
    for row in rows:
        assert row["median_s"] > 0 and row["model"] == "uresnet(resnet34)"
        for key in ("peak_bytes", "saved_bytes"):
            assert (row[key] or 0) > 0 if row["mode"] == "train" else row[key] is None
    assert "saved plain" in out
    status, _, err = run(["bench", "--models", "uresnet,nope", "--device", "cpu"], capsys)
    assert status == 2 and "--models: unknown nope" in err


# --------------------------------------------------------------------------- issues 18, 19
def test_bench_op_path_runs_to_the_table(capsys):
    # the README's command (it crashed with UnboundLocalError), at the smallest size and time it takes
    status, out, err = run(["bench", "--op", "pixel_shuffle_bn", "--no-compile", "--device", "cpu", "--size", "small",
                            "--min-time", "0.01"], capsys)
    assert status == 0, err
    assert "xeager" in out and "pixel_shuffle_bn" in out and "eager" in out and "spread" in out
    assert "(x = baseline time / implementation time; >1 is faster; spread = (max - min) / median of the repeats)" \
        in out


def test_bench_repeats_and_says_when_the_times_are_noise(tmp_path, capsys, monkeypatch):
    import uresnet_models.benchmark as bench
    monkeypatch.setattr(bench, "machine_load", lambda: 3.5)
    path = tmp_path / "b.json"
    status, out, err = run(["bench", "--op", "pixel_shuffle_bn", "--no-compile", "--device", "cpu", "--size", "small",
                            "--min-time", "0.005", "--repeats", "2", "--json", str(path)], capsys)
    assert status == 0, err
    assert "note: the machine was busy: load average 3.5" in out
    results = json.loads(path.read_text())
    assert results["load_average"] == 3.5 and results["notes"]
    for row in results["results"]:
        assert row["repeats"] == 2 and len(row["medians_s"]) == 2
        assert row["spread"] == pytest.approx((max(row["medians_s"]) - min(row["medians_s"])) / row["median_s"])
    assert bench.noise_notes(0.1, [0.02, 0.05], 3) == []
    (note,) = bench.noise_notes(0.1, [0.02, 0.4], 3)
    assert "1 of 2 measurement(s) spread by more than 10% over 3 repeat(s) (up to 40%)" in note


def test_version_and_fast_help():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys; from uresnet_models.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr  # the parser imports no torch
    proc = subprocess.run([sys.executable, "-m", "uresnet", "--version"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    import uresnet_models
    assert proc.returncode == 0 and proc.stdout.strip() == f"uresnet {uresnet_models.__version__}"


def test_help_shows_defaults_and_descriptions(capsys):
    _, out, _ = run(["train", "--help"], capsys)
    flat = " ".join(out.split())
    for needle in ("--epochs EPOCHS default 10", "(default 0)", "--weight-decay WEIGHT_DECAY default 0",
                   "autocast dtype (default none)", "--pretrained", "--freeze-encoder", "focal"):
        assert needle in flat, needle
    _, out, _ = run(["bench", "--help"], capsys)
    assert "Median time of each op" in out
    _, out, _ = run(["predict", "--help"], capsys)
    assert "--batch-size" in out and "--no-progress" in out


def test_list_models_shows_own_encoder_not_none(capsys):
    _, out, _ = run(["list-models", "uresnet", "--params"], capsys)
    assert "(own)" in out and "None" not in out


def test_corrupted_checkpoint_files_are_named(binary_run, capsys):
    _, run_dir, _ = binary_run
    for name in ("training.json", "config.json"):
        path = run_dir / "best" / name
        good = path.read_text()
        path.write_text(good[:40])
        try:
            status, _, err = run(["eval", "--checkpoint", str(run_dir), "--no-progress"], capsys)
        finally:
            path.write_text(good)  # the run is shared by the module's tests
        assert status == 2 and f"{path} is not valid JSON" in err and len(err.strip().splitlines()) == 1, err


def test_bad_data_is_found_before_the_model_is_built(tmp_path, capsys):
    data = _binary_folder(tmp_path / "data", n=4)
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(data / "masks" / "001.png")  # wrong size
    (data / "images" / "003.png").write_bytes((data / "images" / "003.png").read_bytes()[:60])  # truncated
    status, out, err = run(["train", "--data", str(data), "--format", "binary", "--epochs", "1", "--val-fraction",
                            "0.5", *TINY, "--out", str(tmp_path / "run")], capsys)
    assert status == 2 and "training uresnet" not in out  # the model was never built
    assert "001.png" in err and "003.png" in err and "1 bad sample(s)" in err and "val: " in err, err
    assert not (tmp_path / "run").exists()


def test_grayscale_images_are_converted_and_said(tmp_path, capsys):
    data = _binary_folder(tmp_path / "data", n=4)
    gray = np.asarray(Image.open(data / "images" / "002.png").convert("L"))
    Image.fromarray(gray).save(data / "images" / "002.png")
    status, out, err = run(["train", "--data", str(data), "--format", "binary", "--epochs", "1", "--batch-size", "2",
                            "--image-size", "24", "--val-fraction", "0.5", *TINY, "--out", str(tmp_path / "run")],
                           capsys)
    assert status == 0, err
    assert "1 image(s) in mode L (e.g. 002.png) are converted to RGB" in out
    assert "1 class)" in out  # not "1 classes"


def test_encoder_normalisation_freeze_and_pretrained_flags(tmp_path, capsys):
    data = _binary_folder(tmp_path / "data", n=4)
    args = ["train", "--data", str(data), "--format", "binary", "--epochs", "1", "--batch-size", "2", "--image-size",
            "32", "--val-fraction", "0.5", "--model", "unet", "--encoder", "test_resnet", "--model-arg",
            "decoder_channels=(8,8,8,8,8)", "--no-progress", "--freeze-encoder", "--out", str(tmp_path / "run")]
    status, out, err = run(args, capsys)
    assert status == 0, err
    assert "trained: encoder frozen" in out
    meta = json.loads((tmp_path / "run" / "best" / "training.json").read_text())
    # test_resnet's pretrained_cfg says 0.5 / 0.5, not the ImageNet statistics
    assert meta["data"]["mean"] == [0.5, 0.5, 0.5] and meta["data"]["std"] == [0.5, 0.5, 0.5]
    assert meta["config"]["freeze_encoder"] is True
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert config["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    card = (tmp_path / "run" / "best" / "README.md").read_text()
    assert "| trained on | binary" in card and "encoder frozen" in card and "| val_miou |" in card
    status, _, err = run(["train", "--data", "synthetic", "--encoder", "none", "--pretrained", "--epochs", "1",
                          "--out", str(tmp_path / "x")], capsys)
    assert status == 2 and "pretrained=True needs a timm encoder" in err


def test_ctrl_c_saves_a_resumable_state(tmp_path, capsys, monkeypatch):
    from uresnet_models import train as training
    calls = {"n": 0}
    original = training.Task.loss

    def interrupting_loss(self, out, batch):
        calls["n"] += 1
        if calls["n"] == 2:  # in the first epoch
            raise KeyboardInterrupt
        return original(self, out, batch)

    monkeypatch.setattr(training.Task, "loss", interrupting_loss)
    run_dir = tmp_path / "run"
    args = ["train", "--data", "synthetic", "--epochs", "2", "--batch-size", "8", "--train-samples", "32",
            "--val-samples", "8", *TINY, "--out", str(run_dir)]
    status, out, err = run(args, capsys)
    assert status == 130
    assert "interrupted in epoch 1" in out and "--resume" in out and str(run_dir / "last") in out
    assert err.startswith("\n") and "interrupted" in err
    assert (run_dir / "last" / "state.pt").is_file()
    monkeypatch.setattr(training.Task, "loss", original)
    status, out, err = run(args + ["--resume"], capsys)
    assert status == 0, err
    assert "resumed from" in out and "epoch 1/2" in out and "epoch 2/2" in out


def test_samples_come_from_the_best_checkpoint(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from uresnet_models import plots
    from uresnet_models import train as training
    seen = {}
    original = plots.save_samples

    def spy(model, *a, **k):
        seen["state"] = {n: t.clone() for n, t in model.state_dict().items()}
        return original(model, *a, **k)

    monkeypatch.setattr(plots, "save_samples", spy)
    # early epochs improve, later ones are worse: a lr that diverges after epoch 1 is not reliable, so
    # force the metric: only epoch 1 is "best"
    scores = iter([0.9, 0.1, 0.1])
    real_eval = training.evaluate

    def fake_eval(*a, **k):
        metrics = real_eval(*a, **k)
        metrics["miou"] = next(scores)
        return metrics

    monkeypatch.setattr(training, "evaluate", fake_eval)
    run_dir = tmp_path / "run"
    status, out, err = run(["train", "--data", "synthetic", "--epochs", "3", "--batch-size", "8", "--train-samples",
                            "16", "--val-samples", "8", "--lr", "1e-2", *TINY, "--out", str(run_dir)], capsys)
    assert status == 0, err
    best = load_file(str(run_dir / "best" / "model.safetensors"))
    last = load_file(str(run_dir / "last" / "model.safetensors"))
    key = next(k for k in best if not torch.equal(best[k], last[k]))
    assert torch.equal(seen["state"][key], best[key])
    size = Image.open(run_dir / "samples.png").size
    assert size[0] >= 3 * 128 and size[1] > 6 * 128  # titled columns, legend, legible tiles


def test_classifier_eval_per_class_accuracy_and_confusion_matrix(tmp_path, capsys):
    run_dir = tmp_path / "cls"
    status, out, err = run(["train", "--data", "synthetic", "--task", "cls", "--model", "uresnet_cls", "--encoder",
                            "none", "--model-arg", "unet=False", "--image-size", "16", "--epochs", "1",
                            "--train-samples", "16", "--val-samples", "12", "--batch-size", "8", "--no-progress",
                            "--out", str(run_dir)], capsys)
    assert status == 0, err
    assert (run_dir / "samples.png").is_file()
    path = tmp_path / "m.json"
    status, out, err = run(["eval", "--checkpoint", str(run_dir), "--no-progress", "--json", str(path)], capsys)
    assert status == 0, err
    metrics = json.loads(path.read_text())
    cm = metrics["confusion_matrix"]
    assert len(cm) == 3 and sum(map(sum, cm)) == 12
    assert metrics["top1"] == pytest.approx(sum(cm[i][i] for i in range(3)) / 12)
    assert "confusion matrix" in out and "circle" in out


def test_predict_batches_and_shows_progress(binary_run, tmp_path, capsys, monkeypatch):
    import uresnet_models.predict as predicting
    data, run_dir, _ = binary_run
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((data / "images").glob("*.png"))[:5]:
        (images / path.name).write_bytes(path.read_bytes())
    model, _, _ = predicting.load_checkpoint(run_dir)
    batches = []
    model.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    orig = predicting.load_checkpoint
    monkeypatch.setattr(predicting, "load_checkpoint", lambda *a, **k: (model, *orig(*a, **k)[1:]))
    status, out, err = run(["predict", "--checkpoint", str(run_dir), "--input", str(images), "--out",
                            str(tmp_path / "masks"), "--batch-size", "2"], capsys)
    assert status == 0, err
    assert batches == [2, 2, 1] and len(list((tmp_path / "masks").glob("*.png"))) == 5
    assert "predict" in err and "5/5" in err  # the progress bar (stderr)


def test_compile_hides_the_cuda_home_warning_without_a_gpu():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda")}
    code = ("import torch; from uresnet_models.cli import _quiet_cpp_extension_log; _quiet_cpp_extension_log(); "
            "import torch.utils.cpp_extension")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "No CUDA runtime is found" not in proc.stderr, proc.stderr


def test_demo_output_folder_is_ignored_by_git():
    assert "uresnet-demo/" in (ROOT / ".gitignore").read_text().split()


# --------------------------------------------------------------------------- issue 28
SYNTHETIC_RUN = ["train", "--data", "synthetic", "--epochs", "1", "--batch-size", "4", "--train-samples", "8",
                 "--val-samples", "4", "--image-size", "16", *TINY]


def test_train_refuses_an_out_that_holds_a_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(SYNTHETIC_RUN + ["--out", str(run_dir)], capsys)[0] == 0
    weights = (run_dir / "best" / "model.safetensors").read_bytes()
    status, out, err = run(SYNTHETIC_RUN + ["--out", str(run_dir), "--seed", "3"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--out {run_dir} holds a run (best, last, log.csv" in err and "--resume" in err and "--overwrite" in err
    assert "training" not in out and (run_dir / "best" / "model.safetensors").read_bytes() == weights
    status, _, err = run(SYNTHETIC_RUN + ["--out", str(run_dir), "--resume", "--overwrite"], capsys)
    assert status == 2 and "not both" in err
    # --overwrite replaces the run's files (a stale one of the old run goes), nothing else in the folder
    (run_dir / "last" / "stale.txt").write_text("from the old run")
    (run_dir / "notes.txt").write_text("mine")
    status, _, err = run(SYNTHETIC_RUN + ["--out", str(run_dir), "--seed", "3", "--overwrite"], capsys)
    assert status == 0, err
    assert (run_dir / "best" / "model.safetensors").read_bytes() != weights
    assert not (run_dir / "last" / "stale.txt").exists() and (run_dir / "notes.txt").read_text() == "mine"
    # --resume says what to do too (the run is finished: nothing is trained again)
    status, out, err = run(SYNTHETIC_RUN + ["--out", str(run_dir), "--resume"], capsys)
    assert status == 0 and "resumed from" in out, err


def _class_id_folder(root: Path, n=4, size=24):
    """images/ + masks/ of class ids 0..2 and 255 (unlabelled) in a border."""
    rng = np.random.default_rng(1)
    for i in range(n):
        ids = np.zeros((size, size), np.uint8)
        ids[4:12, 4:20], ids[14:22, 6:14] = 1, 2
        ids[0] = 255
        image = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
        image[ids == 1], image[ids == 2] = (200, 40, 40), (40, 40, 200)
        for sub, array in (("images", image), ("masks", ids)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / sub / f"{i:03d}.png")
    return root


def test_masks_format_trains_and_names_bad_ids(tmp_path, capsys):
    data = _class_id_folder(tmp_path / "data")
    args = ["train", "--data", str(data), "--format", "masks", "--epochs", "1", "--batch-size", "2",
            "--image-size", "24", "--val-fraction", "0.5", *TINY]
    status, out, err = run(args + ["--num-classes", "3", "--out", str(tmp_path / "run")], capsys)
    assert status == 0, err
    assert "on masks (seg, 3 classes)" in out and "loss ce" in out
    meta = json.loads((tmp_path / "run" / "best" / "training.json").read_text())
    assert meta["data"]["ignore_index"] == 255 and meta["config"]["loss"] == "ce"
    status, out, err = run(["eval", "--checkpoint", str(tmp_path / "run"), "--no-progress"], capsys)
    assert status == 0 and "class2" in out, err
    status, _, err = run(args + ["--out", str(tmp_path / "x")], capsys)
    assert status == 2 and "--format masks needs --num-classes" in err
    bad = np.asarray(Image.open(data / "masks" / "002.png")).copy()
    bad[5, 5] = 7
    Image.fromarray(bad).save(data / "masks" / "002.png")
    status, out, err = run(args + ["--num-classes", "3", "--out", str(tmp_path / "y")], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "training" not in out
    assert "002.png: class id 7 outside 0..2 (and not the ignore index 255)" in err, err


def test_binary_masks_of_0_1_train_a_foreground(tmp_path, capsys):
    data = _binary_folder(tmp_path / "data", n=4)
    for path in (data / "masks").glob("*.png"):  # the smp/torchvision convention: 0/1
        Image.fromarray((np.asarray(Image.open(path)) > 0).astype(np.uint8)).save(path)
    args = ["train", "--data", str(data), "--format", "binary", "--epochs", "1", "--batch-size", "2",
            "--image-size", "24", "--val-fraction", "0.5", *TINY]
    status, out, err = run(args + ["--out", str(tmp_path / "run")], capsys)
    assert status == 0, err
    assert "val_iou_foreground nan" not in out and "no foreground" not in out
    for path in (data / "masks").glob("*.png"):  # no foreground anywhere: refused before the model is built
        Image.fromarray(np.zeros((24, 24), np.uint8)).save(path)
    status, out, err = run(args + ["--out", str(tmp_path / "empty")], capsys)
    assert status == 2 and "training" not in out
    assert "train: no foreground in any of the 2 training masks" in err, err


def test_an_undefined_foreground_iou_is_explained(tmp_path, capsys, monkeypatch):
    from uresnet_models import train as training
    from uresnet_models.train import undefined_foreground
    real_eval = training.evaluate

    def no_foreground(*a, **k):  # as when no validation mask holds foreground and the model predicts none
        return {**real_eval(*a, **k), "iou_foreground": float("nan")}

    monkeypatch.setattr(training, "evaluate", no_foreground)
    data = _binary_folder(tmp_path / "data", n=4)
    status, out, err = run(["train", "--data", str(data), "--format", "binary", "--epochs", "2", "--batch-size", "2",
                            "--image-size", "24", "--val-fraction", "0.5", *TINY, "--out", str(tmp_path / "r")], capsys)
    assert status == 0, err
    assert out.count("note: validation: the foreground IoU is undefined (nan): no mask holds foreground and the "
                     "model predicted none") == 1, out
    assert undefined_foreground({"iou_foreground": 0.0}) is None and undefined_foreground({"miou": 0.5}) is None


def test_predict_goes_on_past_unreadable_images(binary_run, tmp_path, capsys):
    data, run_dir, _ = binary_run
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((data / "images").glob("*.png"))[:3]:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "001.png").write_bytes(b"not a png")
    status, out, err = run(["predict", "--checkpoint", str(run_dir), "--input", str(images), "--out",
                            str(tmp_path / "masks"), "--no-progress"], capsys)
    assert status == 1
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.png")) == ["000.png", "002.png"]
    assert "1 of 3 image(s) could not be read" in out and f"cannot read image {images / '001.png'}" in out
    assert err.strip().splitlines()[-1] == "uresnet predict: 1 of 3 image(s) failed (listed above)"
    status, _, err = run(["predict", "--checkpoint", str(run_dir), "--input", str(images), "--out",
                          str(tmp_path / "strict"), "--no-progress", "--strict"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "001.png" in err, err


def test_a_damaged_checkpoint_is_named_by_every_command(binary_run, tmp_path, capsys):
    import shutil
    data, run_dir, _ = binary_run
    damaged = tmp_path / "run"
    shutil.copytree(run_dir, damaged)
    for folder in ("best", "last"):
        weights = damaged / folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    commands = [["eval", "--checkpoint", str(damaged), "--no-progress"],
                ["predict", "--checkpoint", str(damaged), "--input", str(data / "images"), "--out",
                 str(tmp_path / "m"), "--no-progress"],
                ["export", "--checkpoint", str(damaged), "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
                ["train", "--data", str(data), "--format", "binary", "--epochs", "3", "--batch-size", "2",
                 "--image-size", "24", "--val-fraction", "0.34", *TINY, "--out", str(damaged), "--resume"]]
    for argv in commands:
        status, _, err = run(argv, capsys)
        folder = "last" if argv[0] == "train" else "best"
        assert status == 2 and len(err.strip().splitlines()) == 1, (argv[0], err)
        assert f"{damaged / folder / 'model.safetensors'} is damaged" in err, (argv[0], err)
    shutil.copy(run_dir / "last" / "model.safetensors", damaged / "last" / "model.safetensors")
    state = damaged / "last" / "state.pt"
    state.write_bytes(state.read_bytes()[:500])
    status, _, err = run(commands[-1], capsys)
    assert status == 2 and f"{state} is damaged" in err and len(err.strip().splitlines()) == 1, err
    (damaged / "best" / "model.safetensors").unlink()  # missing: the same exit status, the file named
    status, _, err = run(commands[0], capsys)
    assert status == 2 and str(damaged / "best" / "model.safetensors") in err, err


def test_preprocessing_travels_with_the_checkpoint(binary_run, tmp_path):
    import uresnet_models
    _, run_dir, out = binary_run
    meta = json.loads((run_dir / "best" / "training.json").read_text())
    model = uresnet_models.from_pretrained(run_dir / "best")
    assert model.preprocessing["mean"] == pytest.approx(meta["data"]["mean"])
    assert model.preprocessing["std"] == pytest.approx(meta["data"]["std"])
    card = (run_dir / "best" / "README.md").read_text()
    assert "loss bce_dice" in card and "loss default" not in card
    assert "pre = model.preprocessing" in card and "v2.Normalize(pre[\"mean\"], pre[\"std\"])" in card
    model.preprocessing = {"mean": [0.1, 0.2, 0.3], "std": (0.5, 0.5, 0.5)}  # set by hand: saved and restored
    model.save_pretrained(tmp_path / "m")
    assert uresnet_models.from_pretrained(tmp_path / "m").preprocessing == {
        "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "input_range": [0.0, 1.0]}
    with pytest.raises(ValueError, match="one value per channel"):
        model.preprocessing = {"mean": [0.1], "std": [1.0, 2.0]}
    with pytest.raises(ValueError, match="preprocessing must be"):
        model.preprocessing = [0.5]
    model.preprocessing = None  # back to the encoder's: none for the seed's own
    assert model.preprocessing is None


def test_eval_and_predict_normalise_with_the_models_preprocessing(binary_run, tmp_path, capsys, monkeypatch):
    import shutil

    import uresnet_models.predict as predicting
    import uresnet_models.train as training
    data, run_dir, _ = binary_run
    edited = tmp_path / "run"
    shutil.copytree(run_dir, edited)
    config = json.loads((edited / "best" / "config.json").read_text())
    config["preprocessing"] = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "input_range": [0, 1]}
    (edited / "best" / "config.json").write_text(json.dumps(config))
    seen = []
    for module in (predicting, training):  # predict's transform, and eval's (through train.build_data)
        real = module.build_transform
        monkeypatch.setattr(module, "build_transform", lambda info, *a, real=real, **k: (
            seen.append((info.mean, info.std)), real(info, *a, **k))[1])
    assert run(["predict", "--checkpoint", str(edited), "--input", str(data / "images" / "000.png"), "--out",
                str(tmp_path / "m"), "--no-progress"], capsys)[0] == 0
    assert run(["eval", "--checkpoint", str(edited), "--no-progress"], capsys)[0] == 0
    assert seen == [((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))] * 2


def test_torchvision_format_trains_evaluates_and_predicts_grayscale(tmp_path, capsys, monkeypatch):
    """A folder of gzipped IDX files (Debian's dataset-fashion-mnist layout) through train, eval
    and predict: one input channel, the test set as the validation split, 28 x 28 images."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "fashion"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("t10k", 10)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(data / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels)
    Image.fromarray(images[0]).save(tmp_path / "shirt.png")
    run_dir = tmp_path / "run"
    status, out, err = run(["train", "--format", "torchvision", "--dataset", "FashionMNIST", "--data", str(data),
                            "--model", "uresnet_cls", "--encoder", "none", "--model-arg", "unet=False",
                            "--model-arg", "residual_widths=(8,8,8,8)", "--model-arg", "residual_blocks=1",
                            "--model-arg", "selected_upsampling=False", "--image-size", "28", "--epochs", "2",
                            "--batch-size", "8", "--lr", "1e-2", "--schedule", "onecycle", "--no-augment",
                            "--no-progress", "--workers", "0", "--out", str(run_dir)], capsys)
    assert status == 0, err
    assert "on torchvision FashionMNIST (cls, 10 classes): 24 train / 10 val samples" in out
    assert "checked the" not in out  # in memory: nothing to check file by file
    meta = json.loads((run_dir / "best" / "training.json").read_text())
    assert meta["data"]["in_channels"] == 1 and meta["config"]["dataset"] == "FashionMNIST"
    status, out, err = run(["eval", "--checkpoint", str(run_dir), "--no-progress"], capsys)
    assert status == 0, err
    assert "10 samples" in out and "Ankle boot" in out
    status, out, err = run(["eval", "--checkpoint", str(run_dir), "--dataset", "MNIST"], capsys)
    assert status == 2 and "--dataset needs --data" in err
    status, out, err = run(["predict", "--checkpoint", str(run_dir), "--input", str(tmp_path / "shirt.png"),
                            "--out", str(tmp_path / "pred"), "--no-progress"], capsys)
    assert status == 0, err
    assert (tmp_path / "pred" / "predictions.csv").is_file()
