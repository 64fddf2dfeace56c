"""2-process DDP (torchrun, gloo, CPU) equals one process with the doubled batch for the default
``uresnet`` (EUCB: the BatchNorm inside shuffle_upsample) and ``resunet_atrous`` (AtrousBlock's
multi_dilation_conv2d): the same batches, synchronised BatchNorm (plain and inside the fused ops)
and all-reduced gradients give the same losses and metrics after several steps, up to rounding."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--image-size", "32", "--train-samples", "32", "--val-samples", "12", "--epochs", "2", "--lr", "1e-4",
          "--seed", "1", "--no-progress"]
MODELS = {
    "uresnet": ["--model", "uresnet", "--encoder", "none", "--model-arg", "base_channels=4",
                "--model-arg", "residual_widths=(8,8,8,8)", "--model-arg", "residual_out_channels=4"],
    "resunet_atrous": ["--model", "resunet_atrous", "--encoder", "resnet18",
                       "--model-arg", "decoder_channels=(16,8,8,8,8)"],
}


def run_pair(model, out: Path):
    """(log of 2 processes with batch 4 each, log of one process with batch 8)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    args = ["train", *MODELS[model], *COMMON]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "uresnet",
           *args, "--batch-size", "4", "--out", str(out / "ddp")]
    proc = subprocess.run(ddp, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    single = [sys.executable, "-m", "uresnet", *args, "--batch-size", "8", "--out", str(out / "single")]
    proc = subprocess.run(single, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads((out / kind / "log.json").read_text()) for kind in ("ddp", "single")]


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_two_processes_equal_one_with_the_doubled_batch(tmp_path, model):
    ddp, single = run_pair(model, tmp_path)
    assert len(ddp) == len(single) == 2
    for d, s in zip(ddp, single):  # 4 optimizer steps per epoch
        # Measured: synchronised, the training losses agree to 4e-8 (relative); with per-process
        # statistics in EUCB they were 2e-4 apart after 4 steps and 8e-4 after 8. The small lr
        # keeps Adam from amplifying rounding (it turns the noise of a gradient that is zero in
        # exact arithmetic, a bias before BatchNorm, into steps of lr), which reaches the
        # validation loss through the running statistics (7e-5 apart here).
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=2e-5), (d, s)
        assert d["val_loss"] == pytest.approx(s["val_loss"], rel=1e-3), (d, s)
        assert d["val_miou"] == pytest.approx(s["val_miou"], abs=1e-3), (d, s)
