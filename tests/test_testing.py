"""The op harness uresnet_ops.testing: sample inputs honour what was asked for, run on every
backend and give the reference's result; the step of each mode; clear errors."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import uresnet_ops
from uresnet_ops import reference, testing

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}


def _cases():
    for op in testing.OPS:
        for mode in testing.op_modes(op):
            for backend in testing.runnable_backends(op, "cpu", interpreter=True):
                yield pytest.param(op, mode, backend, id=f"{op}-{mode}-{backend}")


@pytest.mark.parametrize("op,mode,backend", list(_cases()))
def test_sample_runs_on_every_backend_and_gives_the_reference_result(op, mode, backend):
    sample = testing.sample_inputs(op, "cpu", torch.float32, **testing.mode_flags(mode))
    ours = testing.run_sample(sample.clone(), backend)
    ref = testing.run_sample(sample.clone(torch.float64), testing.EAGER, grad_out=ours.grad_out)
    backward = mode == "train_fwdbwd"
    assert ours.ran == (backend, backend if backward else None)
    assert ref.ran == (None, None)
    assert ours.output.shape == sample.out_shape
    assert len(ours.grads) == (len(sample.grad_inputs) if backward else 0)
    assert len(ours.running_stats) == (2 if op != "multi_dilation_conv2d" else 0)
    for (name, got), (_, want) in zip(ours.named(), ref.named(), strict=True):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), want, **TOL[torch.float32], msg=name)
    if mode == "train_fwd":  # the running statistics moved, as F.batch_norm moves them
        assert not torch.equal(ours.running_stats[0], sample.running_stats[0])


@pytest.mark.parametrize("op", testing.OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", testing.LAYOUTS)
def test_shape_dtype_and_layout_are_honoured(op, dtype, layout):
    shape = {"pixel_shuffle_bn": (3, 36, 5, 7), "shuffle_upsample": (2, 6, 5, 4),
             "multi_dilation_conv2d": (1, 3, 9, 11)}[op]
    sample = testing.sample_inputs(op, "cpu", dtype, shape=shape, layout=layout, requires_grad=True)
    x = sample.x
    assert x.shape == shape and x.dtype == dtype and x.is_leaf and x.requires_grad
    assert x.is_contiguous() == (layout == "contiguous")
    assert x.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    args = sample.arguments
    for name, value in args.items():
        if name in ("running_mean", "running_var", "weight", "bias", "bn_weight", "bn_bias"):
            assert value.dtype == stat, name  # BatchNorm in float32 (float64 for float64 inputs)
        elif name in ("dw_weight", "pw_weight", "pw_bias"):
            assert value.dtype == dtype, name
        elif name in ("weights", "biases"):
            assert all(t.dtype == dtype for t in value), name
    assert all(t.requires_grad and t.is_leaf for t in sample.grad_inputs)
    assert not any(t.requires_grad for t in sample.running_stats)
    assert len(sample.grad_names) == len(sample.grad_inputs)
    with torch.no_grad():
        out = sample.call(getattr(reference, op))
    assert out.shape == sample.out_shape and out.dtype == dtype


def test_same_seed_same_values_in_every_dtype_and_layout():
    for op in testing.OPS:
        a = testing.sample_inputs(op, "cpu", torch.float64, seed=3)
        b = testing.sample_inputs(op, "cpu", torch.float32, seed=3, layout="channels_last")
        c = testing.sample_inputs(op, "cpu", torch.float32, seed=4)
        for ta, tb in zip(a.grad_inputs + a.running_stats, b.grad_inputs + b.running_stats, strict=True):
            torch.testing.assert_close(ta.float(), tb.float(), rtol=0, atol=0)
        assert not torch.equal(b.x, c.x)


def test_per_op_parameters():
    s = testing.sample_inputs("pixel_shuffle_bn", shape=(2, 27, 4, 5), upscale_factor=3, affine=False,
                              track_running_stats=False, momentum=None, eps=1e-3, activation="silu",
                              training=True)
    a = s.arguments
    assert a["upscale_factor"] == 3 and a["weight"] is None and a["running_var"] is None
    assert a["momentum"] is None and a["eps"] == 1e-3 and a["activation"] == "silu"
    assert s.out_shape == (2, 3, 12, 15) and s.grad_names == ["x"] and s.running_stats == []

    s = testing.sample_inputs("shuffle_upsample", shape=(1, 8, 3, 4), out_channels=5, conv_groups=2,
                              scale_factor=3, mode="nearest", shuffle_groups=4, bias=False, training=False)
    a = s.arguments
    assert a["dw_weight"].shape == (8, 4, 3, 3) and a["pw_weight"].shape == (5, 8, 1, 1) and a["pw_bias"] is None
    assert (a["scale_factor"], a["shuffle_groups"], a["training"]) == (3, 4, False)
    assert s.out_shape == (1, 5, 9, 12) == reference.shuffle_upsample(*s.args, **s.kwargs).shape
    s = testing.sample_inputs("shuffle_upsample", shape=(1, 8, 3, 4), pointwise=False)
    assert s.arguments["pw_weight"] is None and s.out_shape == (1, 8, 6, 8)

    s = testing.sample_inputs("multi_dilation_conv2d", shape=(1, 3, 7, 8), out_channels=[2, 5],
                              kernel_sizes=(3, 5), dilations=(2, 1), bias=False, activation="none")
    a = s.arguments
    assert [w.shape for w in a["weights"]] == [(2, 3, 3, 3), (5, 3, 5, 5)] and a["biases"] is None
    assert a["dilations"] == [2, 1] and "training" not in a and s.out_shape == (1, 7, 7, 8)
    assert s.grad_names == ["x", "weights[0]", "weights[1]"]


def test_mixed_precision_parameter_dtypes():
    s = testing.sample_inputs("pixel_shuffle_bn", dtype=torch.bfloat16, param_dtype=torch.bfloat16,
                              stats_dtype=torch.float32)
    assert s.arguments["weight"].dtype == torch.bfloat16 and s.arguments["running_mean"].dtype == torch.float32
    s = testing.sample_inputs("shuffle_upsample", dtype=torch.float16, param_dtype=torch.float16)
    assert s.arguments["bn_weight"].dtype == s.arguments["running_var"].dtype == torch.float16


def test_meta_device_gives_shapes_without_values():
    s = testing.sample_inputs("multi_dilation_conv2d", "meta", torch.bfloat16, shape=(8, 256, 64, 64),
                              out_channels=64, requires_grad=True)
    assert s.x.device.type == "meta" and s.out_shape == (8, 256, 64, 64)
    assert s.grad_output().shape == s.out_shape


def test_clone_is_independent_and_casts():
    s = testing.sample_inputs("pixel_shuffle_bn", requires_grad=True, layout="channels_last")
    c = s.clone(torch.float64)
    assert c.x.dtype == torch.float64 and c.arguments["running_mean"].dtype == torch.float64
    assert c.x.is_contiguous(memory_format=torch.channels_last)
    assert all(t.requires_grad and t.is_leaf for t in c.grad_inputs)
    assert c.running_stats[0] is c.arguments["running_mean"]
    same = s.clone(requires_grad=False)
    assert not same.requires_grad and same.x.dtype == torch.float32
    testing.run_sample(same)  # a training call updates the clone's statistics only
    assert not torch.equal(same.running_stats[0], s.running_stats[0])
    assert same.x.data_ptr() != s.x.data_ptr()


@pytest.mark.parametrize("mode", testing.MODES)
def test_step_function_runs_each_mode(mode):
    sample = testing.sample_inputs("shuffle_upsample", **testing.mode_flags(mode))
    fn, context = testing.implementation("shuffle_upsample", "cpu" if uresnet_ops._library.HAS_EXTENSION
                                         else "reference")
    with context:
        step = testing.step_function(sample, fn, mode)
        result = step()
    if mode == "train_fwdbwd":
        assert len(result) == len(sample.grad_inputs)
        assert all(g.shape == t.shape for g, t in zip(result, sample.grad_inputs, strict=True))
        assert all(t.grad is None for t in sample.grad_inputs)  # autograd.grad: nothing accumulates
    else:
        assert result.shape == sample.out_shape and not result.requires_grad
    with pytest.raises(ValueError, match="requires_grad=True"):
        testing.step_function(testing.sample_inputs("pixel_shuffle_bn"), fn, "train_fwdbwd")
    with pytest.raises(ValueError, match="training=True"):
        testing.step_function(testing.sample_inputs("pixel_shuffle_bn", training=False), fn, "train_fwd")


def test_implementation_names():
    fn, context = testing.implementation("pixel_shuffle_bn", testing.EAGER)
    assert fn is reference.pixel_shuffle_bn
    fn, context = testing.implementation("pixel_shuffle_bn", "reference")
    assert fn is uresnet_ops.pixel_shuffle_bn
    with context:
        assert uresnet_ops.get_backend("pixel_shuffle_bn", "cpu").name == "reference"
    fn, _ = testing.implementation("pixel_shuffle_bn", testing.DEFAULT)
    assert fn is uresnet_ops.pixel_shuffle_bn
    assert testing.BASELINES == ("eager", "compiled")
    names = testing.runnable_backends("pixel_shuffle_bn", "cpu")
    assert "reference" in names and "triton" not in names


@pytest.mark.parametrize("call,match", [
    (lambda: testing.sample_inputs("conv"), r"sample_inputs: argument 'op' must be one of 'pixel_shuffle_bn', "
                                            r"'shuffle_upsample', 'multi_dilation_conv2d', got 'conv'"),
    (lambda: testing.op_modes("conv"), r"op_modes: argument 'op' must be one of .*pixel_shuffle_bn"),
    (lambda: testing.implementation("conv", "eager"), r"implementation: argument 'op'"),
    (lambda: testing.runnable_backends("conv", "cpu"), r"runnable_backends: argument 'op'"),
    (lambda: testing.mode_flags("train"), r"argument 'mode' must be one of 'eval_fwd', 'train_fwd', 'train_fwdbwd'"),
    (lambda: testing.sample_inputs("pixel_shuffle_bn", layout="nhwc"), r"argument 'layout' must be one of"),
    (lambda: testing.sample_inputs("pixel_shuffle_bn", dtype=torch.int32), r"argument 'dtype'"),
    (lambda: testing.sample_inputs("pixel_shuffle_bn", shape=(2, 8, 4)), r"argument 'shape' must be \(N, C, H, W\)"),
    (lambda: testing.sample_inputs("pixel_shuffle_bn", shape=(2, 6, 4, 4)), r"divisible by upscale_factor"),
    (lambda: testing.sample_inputs("multi_dilation_conv2d", kernel_sizes=(1, 3), dilations=(1,)), r"per branch"),
])
def test_bad_arguments_raise_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_unknown_parameter_names_the_op_and_its_parameters():
    with pytest.raises(TypeError, match=r"pixel_shuffle_bn takes no parameter 'r' \(its parameters: affine, eps"):
        testing.sample_inputs("pixel_shuffle_bn", r=2)


def test_importable_without_pytest():
    code = "import sys, uresnet_ops.testing as t; t.sample_inputs('pixel_shuffle_bn'); print('pytest' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]
