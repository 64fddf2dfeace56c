"""Deployment: every model and fused module exports to ONNX (standard operators only) and to
torch.export/AOTInductor with the fused ops lowered to ATen; one file with dynamic batch, H and
W serves every size; the decomposed artifacts load in a fresh process without uresnet; the
``uresnet export`` command on a checkpoint written by ``uresnet train``.

The default-encoder row of the model matrix always runs; the four timm encoders and the
AOTInductor compiles (minutes on two cores) are ``slow``."""
import inspect
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image
from torch import nn

import uresnet_models as um
from uresnet_models import export as model_export
from uresnet_models.train import load_checkpoint
from uresnet_ops import reference
from uresnet_ops.export import DECOMPOSITIONS, export_onnx, to_aten
from uresnet_ops.nn import ASPP, EUCB, AtrousBlock, EUCBStar, MultiDilationConv2d, PixelShuffleBN
from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
ENCODERS = ["resnet18", "efficientnet_b0", "convnext_atto", "mobilenetv3_small_100"]
_DEC = dict(decoder_channels=(16, 8, 8, 4, 4))  # one width per level of a stride-32 encoder
SMALL = {
    "uresnet": dict(base_channels=4, residual_widths=(8, 8, 8, 8), residual_out_channels=4),
    "uresnet_cls": dict(base_channels=4, unet_depth=3),
    "deresunet": dict(_DEC, bottleneck_channels=16), "resunet_atrous": _DEC, "resunet": _DEC, "unet": _DEC,
}
MODELS = list(SMALL)
AUTO = torch.export.Dim.AUTO
DYNAMIC = ({0: AUTO, 2: AUTO, 3: AUTO},)
TOLERANCE = 1e-4  # float32, onnxruntime vs eager


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name, encoder=None, **kwargs):
    kwargs = {**SMALL[name], **kwargs}
    if encoder is not None:
        kwargs["encoder"] = encoder
    elif name == "resunet":  # its own encoder (the default) has three levels
        kwargs.pop("decoder_channels")
    model = um.create_model(name, num_classes=2, **kwargs)
    _randomize_batch_norm(model)
    return model.eval()


def _randomize_batch_norm(module):
    """Running statistics and affine parameters away from 0/1, so eval-mode BatchNorm matters."""
    with torch.no_grad():
        for m in module.modules():
            if getattr(m, "running_var", None) is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)


def _channels(name):
    return 4 if name == "deresunet" else 3  # RGB + depth


def _outputs(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _onnx_check(module, example, sizes, tmp_path):
    """Export ``module`` once with the plain ``torch.onnx.export(..., dynamo=True)``, dynamic
    batch/H/W; check the graph has standard operators only and matches eager in onnxruntime at
    every size in ``sizes``."""
    path = tmp_path / "model.onnx"
    torch.onnx.export(module, (example,), str(path), dynamo=True, dynamic_shapes=DYNAMIC, verbose=False)
    _onnxruntime_check(module, path, sizes)


def _onnxruntime_check(module, path, sizes):
    graph = onnx.load(str(path)).graph
    domains = {node.domain for node in graph.node}
    assert domains <= {"", "ai.onnx"}, domains  # no custom (uresnet_ops) domain, no onnxscript functions
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for shape in sizes:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = _outputs(module(x))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == tuple(e.shape)
            torch.testing.assert_close(torch.from_numpy(g), e, rtol=TOLERANCE, atol=TOLERANCE)


# --------------------------------------------------------------------------- ONNX: models
def _model_onnx(name, encoder, tmp_path):
    model = _model(name, encoder)
    c = _channels(name)
    _onnx_check(model, torch.randn(2, c, 64, 64), [(1, c, 97, 131), (3, c, 32, 50)], tmp_path)


@pytest.mark.parametrize("name", MODELS)
def test_model_onnx_default_encoder(name, tmp_path):
    _model_onnx(name, None, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", MODELS)
def test_model_onnx_encoders(name, encoder, tmp_path):
    _model_onnx(name, encoder, tmp_path)


def test_aux_head_onnx(tmp_path):
    """(seg_logits, class_logits): both outputs, at two sizes."""
    model = _model("resunet", aux_classes=3)
    _onnx_check(model, torch.randn(2, 3, 40, 40), [(1, 3, 97, 131), (2, 3, 33, 20)], tmp_path)


# --------------------------------------------------------------------------- ONNX: modules
MODULES = {
    "PixelShuffleBN": (lambda: PixelShuffleBN(16, 2), 16),
    "PixelShuffleBN_leaky": (lambda: PixelShuffleBN(12, 2, activation=("leaky_relu", 0.2)), 12),
    "EUCB": (lambda: EUCB(8, 6), 8),
    "EUCB_shuffled_silu": (lambda: EUCB(8, 6, mode="bilinear", shuffle_groups=2, activation="silu"), 8),
    "EUCBStar": (lambda: EUCBStar(8, 6), 8),
    "MultiDilationConv2d_bn": (lambda: MultiDilationConv2d(6, 4, dilations=(1, 2, 3, 5)), 6),
    "MultiDilationConv2d_plain": (lambda: MultiDilationConv2d(6, (3, 5), (1, 3), (1, 2), norm=False), 6),
    "ASPP": (lambda: ASPP(6, (2, 3), out_channels=8), 6),
    "AtrousBlock": (lambda: AtrousBlock(6, 8, dilations=(1, 2, 3, 4)), 6),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_module_onnx(name, tmp_path):
    build, c = MODULES[name]
    module = build()
    _randomize_batch_norm(module)
    module.eval()
    _onnx_check(module, torch.randn(2, c, 9, 11), [(1, c, 7, 13), (3, c, 16, 5)], tmp_path)


# --------------------------------------------------------------------------- decompositions
def _bn_args(c, dtype=torch.float32):
    return (torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype),
            torch.rand(c, dtype=dtype) + 0.5)


@pytest.mark.parametrize("training", [False, True])
def test_decompositions_match_the_ops(training):
    """Each decomposition returns what its op returns, statistics included, in both modes."""
    ops = torch.ops.uresnet_ops
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    args = (x, 2, *_bn_args(2, torch.float64), training, 1e-5, "leaky_relu", 0.1)
    cases = [(ops.pixel_shuffle_bn.default, args)]
    dw, pw, pw_bias = torch.randn(8, 2, 3, 3, dtype=torch.float64), torch.randn(5, 8, 1, 1, dtype=torch.float64), None
    for mode, groups, pw_weight in (("nearest", 1, pw), ("bilinear", 4, None)):
        cases.append((ops.shuffle_upsample.default, (x, dw, pw_weight, pw_bias, *_bn_args(8, torch.float64),
                                                     training, 1e-5, 2, mode, groups, "silu", 0.01)))
    weights = [torch.randn(3, 8, k, k, dtype=torch.float64) for k in (1, 3, 5)]
    for biases in ([], [torch.randn(3, dtype=torch.float64) for _ in weights]):
        cases.append((ops.multi_dilation_conv2d.default, (x, weights, [1, 2, 3], biases, "relu", 0.01)))
    for op, op_args in cases:
        expected = _outputs(op(*op_args))
        got = _outputs(DECOMPOSITIONS[op](*op_args))
        assert len(got) == len(expected), op
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=lambda m, op=op: f"{op}: {m}")


def test_reference_is_the_decomposition_of_multi_dilation():
    """The decomposition is the public reference chain (the ground truth the backends test against)."""
    x, w = torch.randn(1, 4, 6, 6), [torch.randn(2, 4, 3, 3)]
    torch.testing.assert_close(DECOMPOSITIONS[torch.ops.uresnet_ops.multi_dilation_conv2d.default](
        x, w, [2], [], "none", 0.01), reference.multi_dilation_conv2d(x, w, [2]))


def test_to_aten_bad_argument():
    with pytest.raises(TypeError, match="ExportedProgram"):
        to_aten(nn.Conv2d(1, 1, 1))


# --------------------------------------------------------------------------- any size
@pytest.mark.parametrize("example_hw", [(64, 64), (67, 91)])
def test_export_dynamic_size_either_side_of_a_multiple(example_hw):
    """Exported at a multiple of the stride, the program runs at other sizes, and the reverse
    (the padding used to branch on the size; every capture locked the branch in)."""
    model = _model("deresunet", "resnet18")
    program = torch.export.export(model, (torch.randn(2, 4, *example_hw),), dynamic_shapes=DYNAMIC)
    for shape in [(1, 4, 96, 96), (2, 4, 97, 131), (3, 4, 100, 130)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
    assert any("uresnet_ops" in str(n.target) for n in program.graph.nodes)  # the fused ops, kept
    aten = to_aten(program)
    assert not any("uresnet_ops" in str(n.target) for n in aten.graph.nodes)
    x = torch.randn(1, 4, 97, 131)
    with torch.no_grad():
        torch.testing.assert_close(aten.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_jit_trace_at_one_size_runs_at_another():
    model = _model("uresnet")
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 128, 160))
        for shape in [(1, 3, 100, 130), (2, 3, 97, 131)]:
            x = torch.randn(shape)
            torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


_HAS_LEGACY_ONNX = "dynamo" in inspect.signature(torch.onnx.export).parameters


@pytest.mark.skipif(not _HAS_LEGACY_ONNX, reason="this torch has no TorchScript-based ONNX exporter")
@pytest.mark.parametrize("name", ["EUCB_shuffled_silu", "MultiDilationConv2d_bn", "PixelShuffleBN_leaky"])
def test_legacy_onnx_exporter(name, tmp_path):
    """torch.onnx.export(..., dynamo=False) traces the decompositions too: standard operators,
    dynamic axes."""
    build, c = MODULES[name]
    module = build()
    _randomize_batch_norm(module)
    module.eval()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():  # the exporter's deprecation warning
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, c, 9, 11),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    _onnxruntime_check(module, path, [(1, c, 7, 13), (3, c, 16, 5)])


@pytest.mark.skipif(not _HAS_LEGACY_ONNX, reason="this torch has no TorchScript-based ONNX exporter")
@pytest.mark.parametrize("name", MODELS)
def test_legacy_onnx_exporter_model(name, tmp_path):
    model, c = _model(name), _channels(name)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, c, 64, 64),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    _onnxruntime_check(model, path, [(2, c, 97, 131), (1, c, 32, 50)])


def test_export_onnx_and_to_aten_program(tmp_path):
    """uresnet_ops.export.export_onnx writes the file; an ExportedProgram that keeps the fused ops
    goes to ONNX once lowered with to_aten."""
    module = EUCBStar(8, 6)
    _randomize_batch_norm(module)
    module.eval()
    x = torch.randn(2, 8, 9, 11)
    export_onnx(module, (x,), tmp_path / "a.onnx", dynamic_shapes=DYNAMIC)
    _onnxruntime_check(module, tmp_path / "a.onnx", [(1, 8, 7, 13)])
    program = to_aten(torch.export.export(module, (x,), dynamic_shapes=DYNAMIC))
    torch.onnx.export(program, (x,), str(tmp_path / "b.onnx"), dynamo=True, verbose=False)
    _onnxruntime_check(module, tmp_path / "b.onnx", [(3, 8, 16, 5)])


def test_decompositions_stay_out_of_torchs_global_table():
    # There, inductor refuses to compile the ops whenever the environment variable CI is set
    # ("make_fallback(...): a decomposition exists"): torch.compile would fail in users' CI.
    from torch._decomp import get_decompositions
    assert get_decompositions(list(DECOMPOSITIONS)) == {}


# --------------------------------------------------------------------------- fresh process
_LOAD = """
import sys
{block}
import torch
x = torch.load(sys.argv[2])
if sys.argv[3] == "pt2":
    out = torch.export.load(sys.argv[1]).module()(x)
elif sys.argv[3] == "aoti":
    out = torch._inductor.aoti_load_package(sys.argv[1])(x)
else:
    import onnxruntime
    s = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    out = torch.from_numpy(s.run(None, {{s.get_inputs()[0].name: x.numpy()}})[0])
out = out[0] if isinstance(out, (list, tuple)) else out
torch.save(out, sys.argv[4])
print(sys.modules.get("uresnet_ops") is not None)  # imported
"""
# sys.modules[name] = None makes `import name` fail: the file must load without this package.
_WITHOUT_URESNET = "for name in ('uresnet_ops', 'uresnet_models', 'uresnet'):\n    sys.modules[name] = None"


def _run_fresh(path, fmt, x, tmp_path, *, with_uresnet: bool):
    torch.save(x, tmp_path / "x.pt")
    code = _LOAD.format(block="import uresnet_ops" if with_uresnet else _WITHOUT_URESNET)
    env = {**os.environ, "PYTHONPATH": str(ROOT) if with_uresnet else "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), fmt,
                           str(tmp_path / "y.pt")], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    return proc, (torch.load(tmp_path / "y.pt") if proc.returncode == 0 else None)


def test_fresh_process_loading(tmp_path):
    """The decomposed pt2 and the ONNX file load without uresnet; the program that keeps the
    fused ops (torch.export.save of torch.export.export) needs `import uresnet_ops`."""
    model = _model("resunet", upsample="pixel_shuffle_bn")
    example, x = torch.randn(2, 3, 32, 32), torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        expected = model(x)
    fused = torch.export.export(model, (example,), dynamic_shapes=DYNAMIC)
    torch.export.save(fused, tmp_path / "fused.pt2")
    for path, fmt in ((model_export.export_model(model, tmp_path / "m.pt2", "pt2", example=example), "pt2"),
                      (model_export.export_model(model, tmp_path / "m.onnx", "onnx", example=example), "onnx")):
        proc, out = _run_fresh(path, fmt, x, tmp_path, with_uresnet=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip() == "False"
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    proc, _ = _run_fresh(tmp_path / "fused.pt2", "pt2", x, tmp_path, with_uresnet=False)
    assert proc.returncode != 0 and "uresnet_ops" in proc.stderr
    proc, out = _run_fresh(tmp_path / "fused.pt2", "pt2", x, tmp_path, with_uresnet=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- AOTInductor
@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", [
    ("resunet", dict(upsample="pixel_shuffle_bn", encoder_channels=(8, 16, 16), decoder_channels=(16, 8))),
    ("uresnet", dict(base_channels=4, residual_widths=(8, 8, 8, 8), residual_out_channels=4, upsample="eucb_star")),
])
def test_aoti_package(name, kwargs, tmp_path):
    """torch.export -> decompositions -> AOTInductor package (CPU), loaded in a fresh process
    without uresnet, equal to eager at two sizes."""
    model = um.create_model(name, num_classes=2, **kwargs)
    _randomize_batch_norm(model)
    model.eval()
    path = model_export.export_model(model, tmp_path / "m.pt2", "aoti", example=torch.randn(2, 3, 32, 32))
    for shape in [(1, 3, 37, 45), (2, 3, 64, 32)]:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x)
        proc, out = _run_fresh(path, "aoti", x, tmp_path, with_uresnet=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A checkpoint written by `uresnet train` (tiny uresnet, one epoch of synthetic data)."""
    from uresnet_models.cli import main
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = main(["train", "--data", "synthetic", "--epochs", "1", "--image-size", "32", "--encoder", "none",
                       "--model-arg", "base_channels=4", "--model-arg", "residual_widths=(8,8,8,8)",
                       "--model-arg", "residual_out_channels=4", "--no-progress", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    return out


@pytest.mark.parametrize("fmt,extra", [("onnx", ["--dynamic"]), ("pt2", ["--image-size", "40x24"])])
def test_cli_export(trained_run, fmt, extra, tmp_path, capsys):
    out = tmp_path / f"model.{fmt}"
    status, stdout, err = run_cli(["export", "--checkpoint", str(trained_run), "--format", fmt, "--out", str(out),
                                *extra], capsys)
    assert status == 0, err
    assert out.is_file()
    difference = float(stdout.rsplit("max difference vs eager on a random ", 1)[1].split(": ")[1].split()[0])
    assert difference < TOLERANCE
    # and the file really is that model: run it here at a size of its own
    model, _, _ = load_checkpoint(trained_run)
    x = torch.randn(1, 3, 40, 24) if fmt == "pt2" else torch.randn(3, 3, 29, 51)
    assert model_export.max_difference(model, out, fmt, x) < TOLERANCE
    # the file takes normalised input: what normalisation is written beside it
    described = json.loads((tmp_path / "model.preprocessing.json").read_text())
    assert not described["normalisation_in_graph"] and described["input_dtype"] == "float32"
    assert described["mean"] == model.preprocessing["mean"] == [0.5] * 3 and described["std"] == [0.25] * 3


def test_export_with_preprocessing_matches_predict(trained_run, tmp_path, capsys):
    """train -> export with the normalisation in the graph -> ONNX Runtime on a raw image gives
    the masks `uresnet predict` writes (a folder that does not exist yet is created)."""
    from uresnet_models.data import SyntheticShapes
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        array = SyntheticShapes(2, 32, 4, seed=5)[i]["image"].permute(1, 2, 0).numpy()
        Image.fromarray(array).save(images / f"{i}.png")
    status, _, err = run_cli(["predict", "--checkpoint", str(trained_run), "--input", str(images), "--out",
                              str(tmp_path / "masks"), "--no-progress"], capsys)
    assert status == 0, err
    path = tmp_path / "new" / "model.onnx"  # a folder that does not exist yet
    status, _, err = run_cli(["export", "--checkpoint", str(trained_run), "--format", "onnx", "--out", str(path),
                              "--include-preprocessing"], capsys)
    assert status == 0, err
    described = json.loads((path.parent / "model.preprocessing.json").read_text())
    assert described["normalisation_in_graph"] and described["input_dtype"] == "uint8"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    for image in sorted(images.glob("*.png")):
        raw = np.asarray(Image.open(image).convert("RGB")).transpose(2, 0, 1)[None]  # as decoded
        logits = session.run(None, {session.get_inputs()[0].name: raw})[0][0]
        top = np.sort(logits, axis=0)
        clear = top[-1] - top[-2] > 1e-4  # pixels whose argmax no rounding can flip
        expected = np.asarray(Image.open(tmp_path / "masks" / image.name))
        assert clear.mean() > 0.99 and (logits.argmax(0) == expected)[clear].all(), image.name
    # float input in [0, 1] is the same graph without the division by 255
    model, info, _ = load_checkpoint(trained_run)
    raw = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    pre = model.preprocessing
    normalised = (raw / 255 - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(normalised)
        for dtype, x in (("uint8", raw), ("float", raw / 255)):
            wrapped = model_export.Preprocessed(model, pre, info.in_channels, dtype)
            torch.testing.assert_close(wrapped(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("argv,needle", [
    (["export", "--checkpoint", "/no/such/run", "--format", "onnx", "--out", "m.onnx"], "/no/such/run"),
    (["export", "--checkpoint", ".", "--format", "tflite", "--out", "m"], "invalid choice"),
    (["export", "--checkpoint", ".", "--format", "onnx"], "--out"),
    (["export", "--checkpoint", ".", "--format", "onnx", "--out", "m.onnx", "--image-size", "0x4"], "--image-size"),
    (["export", "--checkpoint", ".", "--format", "onnx", "--out", "m.onnx", "--include-preprocessing", "int8"],
     "invalid choice"),
])
def test_cli_export_bad_arguments_give_one_line(argv, needle, capsys):
    status, out, err = run_cli(argv, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


def test_cli_export_help(capsys):
    status, out, _ = run_cli(["export", "--help"], capsys)
    assert status == 0 and out.startswith("usage: uresnet export")


def test_export_model_bad_arguments(tmp_path):
    model = _model("resunet")
    with pytest.raises(ValueError, match="format"):
        model_export.export_model(model, tmp_path / "m", "tflite", example=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="at least 2"):
        model_export.export_program(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        model_export.export_program(model, torch.randn(3, 8, 8))
