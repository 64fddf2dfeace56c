"""Encoders: a timm ``features_only`` wrapper, the dual-modality (RGB + depth) encoder of
DeResUNet, and the seeds' own small encoders.

Every encoder is an ``nn.Module`` whose ``forward(x)`` returns a list of feature maps, shallow
to deep, and which has ``channels`` (their widths), ``reductions`` (their strides relative to
the input, from timm's ``feature_info.reduction()``) and ``output_stride`` (the deepest
reduction: the models pad their input to a multiple of it). Features are always NCHW and
exactly ``input size / reduction`` (see :class:`TimmEncoder`).
"""
from __future__ import annotations

import difflib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BasicBlock, DoubleConv, ResBlock

__all__ = ["Encoder", "TimmEncoder", "DualEncoder", "UNetEncoder", "ResidualUNetEncoder", "ResNetStagesEncoder",
           "resolve_encoder", "scaled_widths", "create_encoder", "get_preprocessing", "timm_name"]

TIMM_PREFIX = "tu-"  # segmentation_models_pytorch's prefix for timm encoders, accepted as an alias


def timm_name(name: str) -> str:
    """A timm model name without smp's ``tu-`` prefix."""
    return name[len(TIMM_PREFIX):] if isinstance(name, str) and name.startswith(TIMM_PREFIX) else name


def get_preprocessing(encoder) -> dict | None:
    """The input normalisation an encoder was trained with, from timm's ``pretrained_cfg``:
    ``{"mean": (...), "std": (...), "input_range": (0, 1)}`` (images scaled to [0, 1], then
    ``(x - mean) / std`` per channel). ``encoder``: a timm name (``tu-`` accepted) or an
    :class:`Encoder`; ``None`` for an encoder without one (the seeds' own)."""
    if isinstance(encoder, Encoder):
        return encoder.preprocessing
    if not isinstance(encoder, str):
        return None
    import timm
    cfg = timm.get_pretrained_cfg(timm_name(encoder))
    return _preprocessing(cfg.to_dict() if cfg is not None else {})


def _preprocessing(pretrained_cfg: dict) -> dict | None:
    mean, std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
    if mean is None or std is None:
        return None
    return {"mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std), "input_range": (0, 1)}


class Encoder(nn.Module):
    """Base class: subclasses set ``channels`` and ``reductions`` and return a feature list."""
    channels: list[int]
    reductions: list[int]
    preprocessing: dict | None = None  # mean/std the weights expect (timm encoders); None: none known

    @property
    def output_stride(self) -> int:
        return self.reductions[-1]


class TimmEncoder(Encoder):
    """Any timm model created with ``features_only=True`` (``in_chans=in_channels``). Its
    ``feature_info`` gives the widths and reductions: resnet, efficientnet and mobilenetv3 start
    at 1/2, convnext at 1/4; the decoders follow whatever it reports. ``timm_kwargs`` go to
    ``timm.create_model`` (e.g. ``dynamic_img_size=True`` or ``img_size=`` for ViT-style models).

    The features come out NCHW (timm's NHWC ones, swin, mambaout, sequencer..., are permuted)
    and each exactly ``input size / reduction``: encoders with unpadded ("valid") convolutions
    (inception_v3, legacy_xception) give smaller maps, which are resized bilinearly onto that
    grid, so every decoder level and the logits line up with the input."""

    def __init__(self, name: str, in_channels: int = 3, pretrained: bool = False, out_indices=None, **timm_kwargs):
        super().__init__()
        import timm
        name = timm_name(name)
        if not isinstance(name, str) or not timm.is_model(name):
            close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else " (see timm.list_models())"
            raise ValueError(f"unknown timm encoder {name!r}{hint}")
        kwargs = dict(features_only=True, in_chans=in_channels, pretrained=pretrained, **timm_kwargs)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        try:
            self.model = timm.create_model(name, **kwargs)
        except Exception as error:
            if pretrained and not isinstance(error, (TypeError, AssertionError, NotImplementedError)):
                raise _weights_error(name, error) from error  # hub / network / cache errors
            if isinstance(error, (TypeError, ValueError, RuntimeError, AssertionError, NotImplementedError, KeyError)):
                raise ValueError(f"timm encoder {name!r} cannot be created with features_only=True "
                                 f"(in_chans={in_channels}): {type(error).__name__}: {error}") from error
            raise
        self.name, self.timm_kwargs = name, dict(timm_kwargs)
        self.channels = list(self.model.feature_info.channels())
        self.reductions = list(self.model.feature_info.reduction())
        self.channels_last_output = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")
        self.preprocessing = _preprocessing(dict(getattr(self.model, "pretrained_cfg", None) or {}))
        # ViT-style models take the one size their input patch embedding (the shallowest module
        # named patch_embed; a later stage's, visformer's patch_embed2 say, sees a smaller map) was
        # built for, unless asked otherwise
        embeds = [(name.count("."), m) for name, m in self.model.named_modules()
                  if name.rsplit(".", 1)[-1] == "patch_embed" and getattr(m, "strict_img_size", False)
                  and getattr(m, "img_size", None)]
        self.fixed_size = tuple(min(embeds, key=lambda e: e[0])[1].img_size) if embeds else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        if self.fixed_size is not None and (h, w) != self.fixed_size:
            raise ValueError(f"timm encoder {self.name!r} takes {self.fixed_size[0]}x{self.fixed_size[1]} inputs only, "
                             f"got {h}x{w} (the model pads its input to a multiple of {self.output_stride}); create "
                             "the model with encoder_kwargs={'dynamic_img_size': True} for any size (uresnet train: "
                             "--model-arg \"encoder_kwargs={'dynamic_img_size':True}\"), or img_size=(H, W) for "
                             "another")
        features = []
        for f, r in zip(self.model(x), self.reductions):
            if self.channels_last_output:
                f = f.permute(0, 3, 1, 2)
            size = (-(-h // r), -(-w // r))
            if tuple(f.shape[-2:]) != size:  # valid padding: stretch the map over the input's extent
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            features.append(f)
        return features


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
        self.preprocessing = rgb.preprocessing  # the depth channels are not normalised

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


def resolve_encoder(encoder, in_channels: int, pretrained: bool, own=None, what: str = "this architecture",
                    encoder_kwargs: dict | None = None) -> Encoder:
    """The encoder an architecture asked for: a timm name (or an :class:`Encoder`), or, for
    ``None``, the seed's own encoder built by ``own()`` (no pretrained weights exist for it).
    ``encoder_kwargs``: extra ``timm.create_model`` arguments of a timm encoder."""
    if encoder_kwargs is not None and not isinstance(encoder_kwargs, dict):
        raise TypeError(f"encoder_kwargs must be a dict of timm.create_model arguments, got "
                        f"{type(encoder_kwargs).__name__}")
    if encoder is None:
        if own is None:
            raise ValueError(f"{what} needs an encoder: pass a timm model name (e.g. encoder='resnet34')")
        if pretrained:
            raise ValueError(f"pretrained=True needs a timm encoder: {what}'s built-in encoder (encoder=None) has "
                             "no pretrained weights")
        if encoder_kwargs:
            raise ValueError(f"encoder_kwargs {encoder_kwargs} are timm arguments: {what}'s built-in encoder "
                             "(encoder=None) takes none")
        return own()
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if isinstance(encoder, Encoder) and encoder_kwargs:
        raise ValueError("encoder_kwargs apply to an encoder given by name, not to an Encoder instance")
    return create_encoder(encoder, in_channels, pretrained, **(encoder_kwargs or {}))


def scaled_widths(widths, scale: float, minimum: int = 16, multiple: int = 8) -> tuple:
    """``widths`` times ``scale``, rounded to a multiple of ``multiple``, at least ``minimum``:
    the seeds' ResNet50 decoder widths adapted to a narrower encoder."""
    return tuple(max(minimum, int(round(w * scale / multiple)) * multiple) for w in widths)
