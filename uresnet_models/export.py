"""Exporting a model for deployment: ONNX, a torch.export program (``.pt2``) or an AOTInductor
package, each lowered to standard ops and checked against eager PyTorch.

    x = torch.randn(2, 3, 256, 256)
    path = export_model(model, "model.onnx", "onnx", example=x)       # dynamic batch, H, W
    print(max_difference(model, path, "onnx", torch.randn(1, 3, 97, 131)))

The fused ops are replaced by their ATen chains (:func:`uresnet_ops.export.to_aten`), so none
of the three files needs this package to load: ONNX runs in onnxruntime, the ``pt2`` program
with ``torch.export.load`` and the AOTInductor package with ``torch._inductor.aoti_load_package``.
With ``dynamic`` (the default) one file takes any batch size and any H, W.

A model's input normalisation (``model.preprocessing``) is not part of its graph: the file takes
normalised float input, and :func:`export_checkpoint` writes the normalisation beside it
(``<name>.preprocessing.json``). :class:`Preprocessed` puts it in the graph instead, which then
takes images as they are decoded (uint8, 0..255) or as floats in [0, 1].
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

import uresnet_ops

from .constants import EXPORT_FORMATS as FORMATS
from .errors import UsageError


INPUT_DTYPES = {"uint8": torch.uint8, "float": torch.float32}  # what a Preprocessed graph takes


class Preprocessed(nn.Module):
    """``model`` behind its normalisation, for export: takes N x C x H x W images as ``uint8``
    (0..255) or ``float`` (in [0, 1]), scales them to [0, 1] and normalises the first
    ``len(mean)`` channels with ``preprocessing``'s mean and std (a depth channel after them
    stays as it is, as in training)."""

    def __init__(self, model: nn.Module, preprocessing: dict, in_channels: int, input_dtype: str = "uint8"):
        super().__init__()
        if input_dtype not in INPUT_DTYPES:
            raise ValueError(f"input_dtype must be one of {list(INPUT_DTYPES)}, got {input_dtype!r}")
        mean, std = list(preprocessing["mean"]), list(preprocessing["std"])
        extra = in_channels - len(mean)
        self.model, self.scale = model, 1 / 255 if input_dtype == "uint8" else 1.0
        self.register_buffer("mean", torch.tensor(mean + [0.0] * extra).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std + [1.0] * extra).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor):
        return self.model((x.float() * self.scale - self.mean) / self.std)


def export_program(model: nn.Module, example: torch.Tensor, *, dynamic: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` in eval mode, lowered to core ATen (fused ops included).
    ``dynamic``: batch, H and W are symbolic (the example needs a batch of 2 or more: torch.export
    specialises sizes of 0 and 1)."""
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ValueError(f"export: example must be an (N, C, H, W) tensor, got "
                         f"{tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__}")
    if dynamic and min(example.shape[0], example.shape[2], example.shape[3]) < 2:
        raise ValueError(f"export: a dynamic export needs an example with batch, H and W of at least 2, got "
                         f"{tuple(example.shape)}")
    auto = torch.export.Dim.AUTO
    shapes = ({0: auto, 2: auto, 3: auto},) if dynamic else None
    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=shapes)
    finally:
        model.train(was_training)
    return uresnet_ops.export.to_aten(program)


def export_model(model: nn.Module, path: str | os.PathLike, format: str, *, example: torch.Tensor,
                 dynamic: bool = True) -> Path:
    """Write ``model`` (eval mode) to ``path`` as ``format``: ``onnx`` (standard operators only),
    ``pt2`` (``torch.export.save`` of the ATen program) or ``aoti`` (an AOTInductor package,
    compiled for the example's device; minutes on a small CPU). Returns the path."""
    if format not in FORMATS:
        raise ValueError(f"export: format must be one of {list(FORMATS)}, got {format!r}")
    path = Path(path)
    program = export_program(model, example, dynamic=dynamic)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        torch.onnx.export(program, (example,), dynamo=True, input_names=["image"], verbose=False).save(str(path))
    elif format == "pt2":
        torch.export.save(program, str(path))
    else:
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


def load_exported(path: str | os.PathLike, format: str):
    """A callable ``f(x) -> tuple of tensors`` running the exported file ``path``."""
    if format not in FORMATS:
        raise ValueError(f"load_exported: format must be one of {list(FORMATS)}, got {format!r}")
    if format == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: tuple(torch.from_numpy(y) for y in session.run(None, {name: x.cpu().numpy()}))
    run = torch.export.load(str(path)).module() if format == "pt2" else torch._inductor.aoti_load_package(str(path))
    return lambda x: _as_tuple(run(x))


def max_difference(model: nn.Module, path: str | os.PathLike, format: str, x: torch.Tensor) -> float:
    """The largest absolute difference between the exported file's outputs and eager ``model``'s
    (eval mode) on ``x``, over every output."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = _as_tuple(model(x))
    finally:
        model.train(was_training)
    with torch.no_grad():
        got = load_exported(path, format)(x)
    if len(got) != len(expected):
        raise RuntimeError(f"the exported model returns {len(got)} outputs, eager {len(expected)}")
    for g, e in zip(got, expected):
        if g.shape != e.shape:
            raise RuntimeError(f"the exported model returns shape {tuple(g.shape)}, eager {tuple(e.shape)}")
    return max(float((g.to(e.device, e.dtype) - e).abs().max()) for g, e in zip(got, expected))


def preprocessing_file(path: str | os.PathLike) -> Path:
    """Where :func:`export_checkpoint` writes the input description of the file ``path``."""
    path = Path(path)
    return path.with_name(path.stem + ".preprocessing.json")


def export_checkpoint(checkpoint: str | os.PathLike, path: str | os.PathLike, format: str, *, image_size=None,
                      dynamic: bool = False, include_preprocessing: str | None = None, log=print) -> tuple[Path, float]:
    """``uresnet export``: :func:`export_model` of a checkpoint (a run folder's best/), with an
    example input of ``image_size`` (default: the training size), then :func:`max_difference` on
    a random input, of another batch and size where those are dynamic. ``include_preprocessing``
    ("uint8" or "float"): the graph takes images of that type and normalises them itself
    (:class:`Preprocessed`). The input the file expects, normalisation included, is written
    beside it (:func:`preprocessing_file`). Returns the file and that difference."""
    from .checkpoint import load_checkpoint
    if not os.path.exists(checkpoint):
        raise UsageError(f"--checkpoint {checkpoint}: no such folder")
    model, info, meta = load_checkpoint(checkpoint, "cpu")
    size = image_size or meta.get("config", {}).get("image_size") or 64
    h, w = (size, size) if isinstance(size, int) else size
    if dynamic and min(h, w) < 2:
        raise UsageError(f"--image-size {h}x{w}: --dynamic needs H and W of at least 2")
    pre = model.preprocessing
    if include_preprocessing:
        model = Preprocessed(model, pre, info.in_channels, include_preprocessing)

    def example_input(*shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8) if include_preprocessing == "uint8" else \
            torch.rand(shape) if include_preprocessing else torch.randn(shape)

    example = example_input(2 if dynamic else 1, info.in_channels, h, w)
    log(f"exporting {checkpoint} ({_architecture(model)}) as {format}, input {example.dtype} "
        f"{'(N, ' if dynamic else '(1, '}{info.in_channels}, {'H, W) dynamic' if dynamic else f'{h}, {w})'}"
        + (", normalisation included" if include_preprocessing else ""))
    path = export_model(model, path, format, example=example, dynamic=dynamic)
    check = example_input(1, info.in_channels, h + 3, w + 5) if dynamic else example
    difference = max_difference(model, path, format, check)
    log(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB); max difference vs eager on a random "
        f"{'x'.join(map(str, check.shape))} input: {difference:.2e}")
    described = preprocessing_file(path)
    described.write_text(json.dumps(_input_description(pre, info, include_preprocessing, (h, w), dynamic), indent=1)
                         + "\n")
    log(f"wrote {described}: " + ("the input it takes" if include_preprocessing else
                                  f"the normalisation its input needs (mean {pre['mean']}, std {pre['std']})"))
    return path, difference


def _architecture(model: nn.Module) -> str:
    return (model.model if isinstance(model, Preprocessed) else model).model_config["architecture"]


def _input_description(pre: dict, info, include_preprocessing: str | None, size: tuple, dynamic: bool) -> dict:
    """What the exported file takes, as written beside it."""
    channels = f"N x {info.in_channels} x H x W" + (f" (RGB, then {info.depth_channels} depth in [0, 1])"
                                                    if info.depth_channels else " (RGB)")
    if include_preprocessing:
        scale = "0..255" if include_preprocessing == "uint8" else "in [0, 1]"
        text = f"{include_preprocessing} {channels}, {scale}; the normalisation below is done in the graph"
    else:
        text = f"float32 {channels}: scaled to [0, 1], then (x - mean) / std on the first {len(pre['mean'])} channels"
    return {"input": text, "normalisation_in_graph": bool(include_preprocessing),
            "input_dtype": include_preprocessing or "float32", "mean": list(pre["mean"]), "std": list(pre["std"]),
            "input_range": list(pre.get("input_range", (0, 1))), "image_size": None if dynamic else list(size)}


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
