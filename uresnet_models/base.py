"""Base classes: save/load (safetensors + JSON config) and the segmentation model contract
(logits at the input's resolution for any H, W; optional auxiliary classification head)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .blocks import crop_to, pad_to_multiple
from .heads import ClassificationHead

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ModelBase(nn.Module):
    """What every registered model has: ``model_config`` (the architecture name and the
    arguments :func:`uresnet_models.create_model` was called with, set by it) and
    :meth:`save_pretrained`."""

    model_config: dict | None = None

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``path/model.safetensors`` (the state dict, buffers included) and
        ``path/config.json`` (how to rebuild the model); :func:`uresnet_models.from_pretrained`
        reads them back. Returns the folder."""
        from safetensors.torch import save_model
        config = getattr(self, "model_config", None)
        if not config:
            raise RuntimeError(f"{type(self).__name__}.save_pretrained: the model has no model_config; build it with "
                               "uresnet_models.create_model(...) so that it can be rebuilt")
        try:
            text = json.dumps(config, indent=2, sort_keys=True)
        except TypeError as error:
            raise TypeError(f"save_pretrained: the model's arguments are not JSON-serializable ({error}); pass names "
                            "and numbers (e.g. an encoder name, not an encoder module)") from error
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_model(self, str(path / WEIGHTS_NAME), metadata={"format": "pt", "architecture": config["architecture"]})
        (path / CONFIG_NAME).write_text(text + "\n")
        return path


def from_pretrained(path: str | os.PathLike, *, device=None, strict: bool = True, **overrides) -> nn.Module:
    """The model saved by :meth:`ModelBase.save_pretrained` in ``path``: rebuilt from its
    config (``overrides`` replace saved arguments; ``pretrained`` is always False, the weights
    come from the file), with its weights and buffers loaded."""
    from safetensors.torch import load_model

    from .registry import create_model
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"from_pretrained: {f} not found (expected a folder written by save_pretrained)")
    config = json.loads(config_file.read_text())
    kwargs = {**config.get("kwargs", {}), **overrides, "pretrained": False}
    model = create_model(config["architecture"], **kwargs)
    if device is not None:
        model.to(device)
    load_model(model, str(weights_file), strict=strict, device=str(device) if device is not None else "cpu")
    return model


class SegmentationModel(ModelBase):
    """A segmentation model: ``forward(x)`` returns logits (N, num_classes, H, W) at the
    input's resolution for any H and W, or ``(seg_logits, class_logits)`` with ``aux_classes``.

    Any size works because the input is zero-padded at the bottom/right to a multiple of the
    encoder's total stride (``output_stride``, 32 for timm encoders) and the logits are cropped
    back. Every x2 step of the decoder is then exact, so the fused upsampling ops (PixelShuffle,
    EUCB, transposed convs) need no resizing, and the valid region is computed as for an
    input that size; interpolating decoder features to odd skip sizes would instead blur every
    level. Subclasses implement :meth:`forward_padded`."""

    output_stride: int = 1

    def __init__(self, num_classes: int, aux_classes: int | None = None, aux_channels: int | None = None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if aux_classes is not None and (not isinstance(aux_classes, int) or aux_classes < 1):
            raise ValueError(f"aux_classes must be None or a positive int, got {aux_classes!r}")
        self.num_classes, self.aux_classes = num_classes, aux_classes
        self.aux_head = ClassificationHead(aux_channels, aux_classes) if aux_classes else None

    def forward_padded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, deepest_feature)`` of an input whose H, W are multiples of ``output_stride``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected an (N, C, H, W) input, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, self.output_stride)
        logits, deepest = self.forward_padded(padded)
        logits = crop_to(logits, h, w)  # always (nothing to cut at a multiple): no branch on the size
        if self.aux_head is not None:
            return logits, self.aux_head(deepest)
        return logits
