"""``uresnet demo`` (README command 1): every step runs and passes; its correctness check fails
for a backend that computes the wrong result."""
import argparse

import pytest
import torch

import uresnet_ops
from uresnet_models import demo
from uresnet_ops import backends
from helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_runs_every_step_and_passes(tmp_path, capsys):
    status, out, _ = run_cli(["demo", "--epochs", "1", "--speed-rounds", "1", "--threads", "1",
                              "--out", str(tmp_path / "demo")], capsys)
    assert status == 0, out[-2000:]
    for title, _ in demo.DEMO_STEPS:
        assert f"== {title} ==" in out
    assert "all checks passed" in out
    for op in uresnet_ops.backends.OPS:
        assert f"{op:<22} reference  max abs err" in out and f"{op:<22} reference  ERROR" not in out
    assert (tmp_path / "demo" / "samples.png").exists()


@pytest.fixture
def off_by_one_percent():
    """A pixel_shuffle_bn backend for CPU whose forward is the reference's times 1.01."""
    ref = backends._registry["pixel_shuffle_bn"]["reference"]

    def forward(*args):
        out, mean, var = ref.forward(*args)
        return out * 1.01, mean, var

    uresnet_ops.register_backend("pixel_shuffle_bn", "off", "cpu", forward, ref.backward)
    yield "off"
    del backends._registry["pixel_shuffle_bn"]["off"]


def test_demo_correctness_fails_a_wrong_backend(off_by_one_percent, capsys):
    ctx = demo.DemoContext(argparse.Namespace(seed=0), torch.device("cpu"))
    demo.demo_correctness(ctx)
    out = capsys.readouterr().out
    assert ctx.failures == ["pixel_shuffle_bn/off"]
    assert "pixel_shuffle_bn       off" in out and "FAIL" in out
    assert "pixel_shuffle_bn       reference  max abs err" in out
