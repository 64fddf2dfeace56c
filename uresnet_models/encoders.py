"""Encoders: a timm ``features_only`` wrapper, the dual-modality (RGB + depth) encoder of
DeResUNet, and the seeds' own small encoders.

Every encoder is an ``nn.Module`` whose ``forward(x)`` returns a list of feature maps, shallow
to deep, and which has ``channels`` (their widths), ``reductions`` (their strides relative to
the input, from timm's ``feature_info.reduction()``) and ``output_stride`` (the deepest
reduction: the models pad their input to a multiple of it).
"""
from __future__ import annotations

import difflib
from typing import Sequence

import torch
from torch import nn

from .blocks import BasicBlock, DoubleConv, ResBlock

__all__ = ["Encoder", "TimmEncoder", "DualEncoder", "UNetEncoder", "ResidualUNetEncoder", "ResNetStagesEncoder",
           "resolve_encoder", "scaled_widths",
           "create_encoder"]


class Encoder(nn.Module):
    """Base class: subclasses set ``channels`` and ``reductions`` and return a feature list."""
    channels: list[int]
    reductions: list[int]

    @property
    def output_stride(self) -> int:
        return self.reductions[-1]


class TimmEncoder(Encoder):
    """Any timm model created with ``features_only=True`` (``in_chans=in_channels``). Its
    ``feature_info`` gives the widths and reductions: resnet, efficientnet and mobilenetv3 start
    at 1/2, convnext at 1/4; the decoders follow whatever it reports."""

    def __init__(self, name: str, in_channels: int = 3, pretrained: bool = False, out_indices=None, **timm_kwargs):
        super().__init__()
        import timm
        if not isinstance(name, str) or not timm.is_model(name):
            close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else " (see timm.list_models())"
            raise ValueError(f"unknown timm encoder {name!r}{hint}")
        kwargs = dict(features_only=True, in_chans=in_channels, pretrained=pretrained, **timm_kwargs)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        try:
            self.model = timm.create_model(name, **kwargs)
        except Exception as error:  # noqa: BLE001
            if pretrained and not isinstance(error, (TypeError, AssertionError, NotImplementedError)):
                raise _weights_error(name, error) from error  # hub / network / cache errors
            if isinstance(error, (TypeError, ValueError, RuntimeError, AssertionError, NotImplementedError, KeyError)):
                raise ValueError(f"timm encoder {name!r} cannot be created with features_only=True "
                                 f"(in_chans={in_channels}): {type(error).__name__}: {error}") from error
            raise
        self.name = name
        self.channels = list(self.model.feature_info.channels())
        self.reductions = list(self.model.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))


def _weights_error(name: str, error: Exception) -> RuntimeError:
    return RuntimeError(
        f"pretrained weights for the timm encoder {name!r} could not be downloaded or found in the local cache "
        f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). Download them once "
        f"while online (they are cached by huggingface_hub / torch.hub), or use pretrained=False.")


class DualEncoder(Encoder):
    """DeResUNet's two parallel encoders, one per modality (RGB and depth, each its own timm
    model; the depth one has a ``depth_channels`` stem), whose features are concatenated at
    every scale: with two resnet50s 128@1/2, 512@1/4, 1024@1/8, 2048@1/16, 4096@1/32.
    ``forward`` takes one tensor, the RGB channels first."""

    def __init__(self, rgb: Encoder, depth: Encoder, rgb_channels: int):
        super().__init__()
        if list(rgb.reductions) != list(depth.reductions):
            raise ValueError(f"DualEncoder: the RGB and depth encoders must have the same reductions, got "
                             f"{rgb.reductions} and {depth.reductions}")
        self.rgb, self.depth, self.rgb_channels = rgb, depth, rgb_channels
        self.channels = [a + b for a, b in zip(rgb.channels, depth.channels)]
        self.reductions = list(rgb.reductions)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        rgb, depth = x[:, :self.rgb_channels], x[:, self.rgb_channels:]
        return [torch.cat([a, b], dim=1) for a, b in zip(self.rgb(rgb), self.depth(depth))]


class UNetEncoder(Encoder):
    """The classic U-Net contracting path of U-ResNet's UBlock: DoubleConv(in, base_c), then
    ``depth`` x (max-pool 2 -> DoubleConv) doubling the width: base_c..16*base_c at 1..1/16."""

    def __init__(self, in_channels: int = 3, base_channels: int = 32, depth: int = 4):
        super().__init__()
        widths = [base_channels * 2 ** i for i in range(depth + 1)]
        self.stages = nn.ModuleList([DoubleConv(in_channels, widths[0])] + [
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(a, b)) for a, b in zip(widths, widths[1:])])
        self.channels = widths
        self.reductions = [2 ** i for i in range(depth + 1)]

    def forward(self, x):
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class ResidualUNetEncoder(Encoder):
    """The Residual U-Net article's encoder: res_block(64) -> max-pool -> res_block(128) ->
    max-pool -> bottleneck res_block(256); features at 1, 1/2, 1/4."""

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (64, 128, 256)):
        super().__init__()
        widths = list(widths)
        self.stages = nn.ModuleList([ResBlock(in_channels, widths[0])] + [
            nn.Sequential(nn.MaxPool2d(2), ResBlock(a, b)) for a, b in zip(widths, widths[1:])])
        self.channels = widths
        self.reductions = [2 ** i for i in range(len(widths))]

    forward = UNetEncoder.forward


class ResNetStagesEncoder(Encoder):
    """U-ResNet classifier's residual path: 3x3 stem (CIFAR style) -> four stages of
    ``blocks`` BasicBlocks, widths 64/128/256/512, strides 1/2/2/2."""

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (64, 128, 256, 512), blocks: int = 2):
        super().__init__()
        widths = list(widths)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages, ch = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[BasicBlock(ch if j == 0 else w, w, stride if j == 0 else 1)
                                          for j in range(blocks)]))
            ch = w
        self.stages = nn.ModuleList(stages)
        self.channels = widths
        self.reductions = [2 ** i for i in range(len(widths))]

    def forward(self, x):
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def create_encoder(name, in_channels: int = 3, pretrained: bool = False, **timm_kwargs) -> Encoder:
    """A :class:`TimmEncoder` for a timm model name; an :class:`Encoder` instance passes through."""
    if isinstance(name, Encoder):
        return name
    return TimmEncoder(name, in_channels, pretrained, **timm_kwargs)


def resolve_encoder(encoder, in_channels: int, pretrained: bool, own=None, what: str = "this architecture") -> Encoder:
    """The encoder an architecture asked for: a timm name (or an :class:`Encoder`), or, for
    ``None``, the seed's own encoder built by ``own()`` (no pretrained weights exist for it)."""
    if encoder is None:
        if own is None:
            raise ValueError(f"{what} needs an encoder: pass a timm model name (e.g. encoder='resnet34')")
        if pretrained:
            raise ValueError(f"pretrained=True needs a timm encoder: {what}'s built-in encoder (encoder=None) has "
                             "no pretrained weights")
        return own()
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    return create_encoder(encoder, in_channels, pretrained)


def scaled_widths(widths, scale: float, minimum: int = 16, multiple: int = 8) -> tuple:
    """``widths`` times ``scale``, rounded to a multiple of ``multiple``, at least ``minimum``:
    the seeds' ResNet50 decoder widths adapted to a narrower encoder."""
    return tuple(max(minimum, int(round(w * scale / multiple)) * multiple) for w in widths)
