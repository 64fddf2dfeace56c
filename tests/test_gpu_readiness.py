"""What a GPU run would find, checked without one: the test setup (TF32 off, Triton interpreted
only without a GPU), Triton paths that only realistic GPU shapes take (run here under the
interpreter), grid limits, and the GPU check's kernel runner in its CPU dry run."""
import math
import os
import subprocess
import sys

import pytest
import torch
import triton

import uresnet_ops
from uresnet_ops import reference
from uresnet_ops.backends import last_used
from uresnet_ops.triton import INTERPRET

from helpers import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels under the CPU interpreter")


@pytest.mark.parametrize("triton_version,numpy_version,works", [
    ("3.6.0", "2.3.5", True), ("3.6.0", "2.4.0", False), ("3.6.1", "2.5.2", False), ("3.8.0", "2.4.6", True)])
def test_triton_interpreter_numpy_range(triton_version, numpy_version, works):
    problem = uresnet_ops.triton.interpreter_problem(triton_version, numpy_version)
    assert (problem is None) == works
    if problem:
        assert f"numpy {numpy_version}" in problem and "numpy<2.4" in problem


def test_tf32_is_off_in_tests():
    # With TF32 a float32 reference on the GPU is off by ~1e-3: more than the float32 tolerances.
    assert not torch.backends.cudnn.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("has_gpu", [True, False])
def test_conftest_interprets_triton_only_without_gpu(has_gpu):
    code = (f"import torch; torch.cuda.is_available = lambda: {has_gpu}\n"
            "import runpy, os; runpy.run_path('tests/conftest.py')\n"
            "print('TRITON_INTERPRET=' + os.environ.get('TRITON_INTERPRET', ''))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"TRITON_INTERPRET={'' if has_gpu else '1'}"


@needs_interpreter
def test_triton_relu_keeps_nan_as_aten():
    x = torch.randn(1, 8, 3, 4)
    x[0, 1, 2, 3] = float("nan")
    p = dict(weight=torch.ones(2), bias=torch.zeros(2), running_mean=torch.zeros(2), running_var=torch.ones(2))
    with uresnet_ops.use_backend("triton", "pixel_shuffle_bn"):
        out = uresnet_ops.pixel_shuffle_bn(x, 2, **p, training=False, activation="relu")
    assert last_used("pixel_shuffle_bn") == "triton"
    expected = reference.pixel_shuffle_bn(x, 2, **p, training=False, activation="relu")
    assert expected.isnan().sum() == 1
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out, expected, equal_nan=True)


class LaunchSpy:
    """Stands in for a Triton kernel: records each launch's grid and constexprs, then launches
    the real kernel (or not, with run=False)."""

    def __init__(self, kernel, run=True):
        self.kernel, self.run, self.launches = kernel, run, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((tuple(grid), kwargs))
            if self.run:
                return self.kernel[grid](*args, **kwargs)
        return launch


def spy_kernels(monkeypatch, module, run=True):
    spies = {}
    for name, obj in list(vars(module).items()):
        if name.endswith("_kernel") and hasattr(obj, "__getitem__"):
            spies[name] = LaunchSpy(obj, run)
            monkeypatch.setattr(module, name, spies[name])
    return spies


@needs_interpreter
@pytest.mark.parametrize("mode,scale", [("nearest", 3), ("bilinear", 2)])
def test_shuffle_upsample_grad_weight_over_several_tiles_per_program(monkeypatch, mode, scale):
    # On a GPU every realistic shape gives each weight-gradient program several pixel tiles
    # (ONE_TILE=False); under the interpreter one tile per program is the default.
    import uresnet_ops.triton.shuffle_upsample as su
    monkeypatch.setattr(su, "_chunks", lambda t, planes, device: (2, triton.cdiv(t, 2)))
    spies = spy_kernels(monkeypatch, su)
    x = torch.randn(2, 4, 7, 11, requires_grad=True)  # 77 low-res pixels: 3 tiles of 32, 2 programs per plane
    params = dict(dw_weight=torch.randn(4, 2, 3, 3, requires_grad=True), pw_weight=None, pw_bias=None,
                  bn_weight=torch.rand(4) + 0.5, bn_bias=torch.randn(4), running_mean=None, running_var=None)
    with uresnet_ops.use_backend("triton", "shuffle_upsample"):
        out = uresnet_ops.shuffle_upsample(x, **params, training=True, scale_factor=scale, mode=mode,
                                           activation="silu")
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    assert last_used("shuffle_upsample", "backward") == "triton"
    assert [kw["ONE_TILE"] for _, kw in spies["_grad_weight_kernel"].launches] == [False]
    x64 = x.detach().double().requires_grad_()
    p64 = {k: None if v is None else v.detach().double().requires_grad_(k == "dw_weight") for k, v in params.items()}
    expected = reference.shuffle_upsample(x64, **p64, training=True, scale_factor=scale, mode=mode, activation="silu")
    expected.backward(grad_out.double())
    assert_close(x.grad, x64.grad, torch.float32, scale=10)
    assert_close(params["dw_weight"].grad, p64["dw_weight"].grad, torch.float32, scale=50)


@needs_interpreter
@pytest.mark.parametrize("mode,scale", [("nearest", 2), ("bilinear", 2)])
def test_shuffle_upsample_grids_fit_cuda_limits(monkeypatch, mode, scale):
    # More than 65535 pixel tiles of one plane: grid axes 1 and 2 stop at 65535, axis 0 at 2^31 - 1.
    import uresnet_ops.triton.shuffle_upsample as su
    spies = spy_kernels(monkeypatch, su, run=False)  # the launches only: the shapes are large for the interpreter
    h = w = math.isqrt(65536 * su._block(1, 8192, torch.float32)) + 1
    x = torch.randn(1, 1, h, w)
    weight = torch.randn(1, 1, 3, 3)
    su._forward(x, weight, torch.zeros(1), scale, mode, "none", 0.0, False)
    su._forward(x, weight, None, scale, mode, "none", 0.0, True)
    su._backward(torch.randn(1, 1, h * scale, w * scale), x, weight, scale, mode)
    grids = [grid for spy in spies.values() for grid, _ in spy.launches]
    assert len(grids) >= (6 if mode == "bilinear" else 3)
    for grid in grids:
        assert grid[0] < 2 ** 31 and all(g <= 65535 for g in grid[1:]), grids


def test_run_each_kernel_dry_run_against_float64():
    result = subprocess.run([sys.executable, "scripts/run_each_kernel.py", "--device", "cpu"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "reference: float64" in result.stdout
    assert "0 failure(s)" in result.stdout
