"""Building blocks of the architectures: convolution blocks, the upsampling choices, a generic
U-Net decoder that works with any encoder's reductions, and U-ResNet's residual branch and
feature merge. (The atrous block of resunet_atrous is a fused op's module:
``uresnet_ops.nn.AtrousBlock``.)

Upsampling kinds (``upsample=`` of the architectures):

==================== ==========================================================================
``"pixel_shuffle_bn"`` PixelShuffle(2) -> BatchNorm -> ReLU as one fused op (DeResUNet)
``"eucb"``             EMCAD's EUCB: nearest x2 -> depthwise 3x3 -> BN -> ReLU -> 1x1, one op
``"eucb_bilinear"``    the same EUCB with bilinear x2 (U-ResNet's ResBlock branch)
``"eucb_star"``        U-ResNet's EUCB*: bilinear x2 -> grouped 3x3 stages with shuffles -> 1x1
``"bilinear"``         bilinear x2 (plus a 1x1 conv only when the width must change)
``"transpose"``        ConvTranspose2d(kernel 2, stride 2) (classic U-Net, Cross-Building)
==================== ==========================================================================
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from uresnet_ops.nn import EUCB, EUCBStar, PixelShuffleBN

UPSAMPLE_KINDS = ("pixel_shuffle_bn", "eucb", "eucb_bilinear", "eucb_star", "bilinear", "transpose")


# --------------------------------------------------------------------------- convolutions
class ConvBNReLU(nn.Sequential):
    """conv kxk (no bias) -> BatchNorm -> ReLU: DeResUNet's ConvBNReLU, Cross-Building's ConvBlock."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DoubleConv(nn.Sequential):
    """The U-Net's (conv 3x3 -> BN -> ReLU) x 2 (U-ResNet's DoubleConv)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        mid = out_channels if mid_channels is None else mid_channels
        super().__init__(ConvBNReLU(in_channels, mid), ConvBNReLU(mid, out_channels))


class BasicBlock(nn.Module):
    """ResNet's BasicBlock (conv3x3-BN-ReLU, conv3x3-BN, + shortcut, ReLU), with the 1x1
    conv + BN projection shortcut when the width or the stride changes (U-ResNet's ResBlock
    branch and its classifier's residual stages)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (nn.Identity() if in_channels == out_channels and stride == 1 else
                         nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                       nn.BatchNorm2d(out_channels)))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResBlock(nn.Module):
    """The Residual U-Net article's ``res_block``: conv3x3 + ReLU, conv3x3, add the shortcut,
    ReLU. The article adds ``x`` itself, which only type-checks when the width does not change;
    here the shortcut is a 1x1 projection when it does."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        y = self.conv2(self.relu(self.conv1(x)))
        return self.relu(y + self.shortcut(x))


def conv_pair(in_channels: int, out_channels: int) -> nn.Module:
    """Two ConvBNReLU (DeResUNet's decoder and bottleneck, Cross-Building's 2x ConvBlock)."""
    return DoubleConv(in_channels, out_channels)


# --------------------------------------------------------------------------- upsampling
def check_upsample(kind: str) -> str:
    if kind not in UPSAMPLE_KINDS:
        raise ValueError(f"upsample={kind!r} is not supported here; expected one of "
                         f"{', '.join(map(repr, UPSAMPLE_KINDS))}")
    return kind


class Upsample(nn.Module):
    """Upsampling by ``scale`` of one of :data:`UPSAMPLE_KINDS`, from ``in_channels`` to
    ``out_channels`` (``None``: the kind's natural width: ``in`` for bilinear, ``in / s^2``
    for pixel shuffle, ``in / 2`` otherwise). ``self.out_channels`` is the result's width."""

    def __init__(self, kind: str, in_channels: int, out_channels: int | None = None, scale: int = 2,
                 eucb_star_stages: int = 2):
        super().__init__()
        check_upsample(kind)
        self.kind, self.scale = kind, scale
        s2 = scale * scale
        if out_channels is None:
            natural = {"bilinear": in_channels, "pixel_shuffle_bn": in_channels // s2}.get(kind, in_channels // 2)
            out_channels = max(natural, 1)
        self.out_channels = out_channels
        if kind == "pixel_shuffle_bn":
            # PixelShuffle needs out * s^2 input channels: a 1x1 conv provides them if needed.
            self.pre = (nn.Identity() if in_channels == out_channels * s2
                        else nn.Conv2d(in_channels, out_channels * s2, 1, bias=False))
            self.up = PixelShuffleBN(out_channels * s2, scale, activation="relu")
        elif kind in ("eucb", "eucb_bilinear"):
            mode = "nearest" if kind == "eucb" else "bilinear"
            self.pre, self.up = nn.Identity(), EUCB(in_channels, out_channels, scale, mode=mode)
        elif kind == "eucb_star":
            groups = in_channels // 4 if in_channels % 4 == 0 else in_channels  # C/4, else depthwise
            self.pre = nn.Identity()
            self.up = EUCBStar(in_channels, out_channels, scale, mode="bilinear", stages=eucb_star_stages,
                               groups=groups)
        elif kind == "bilinear":
            self.pre = nn.Identity()
            self.up = nn.Sequential(nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False),
                                    *([] if in_channels == out_channels else [nn.Conv2d(in_channels, out_channels, 1)]))
        else:  # transpose
            self.pre, self.up = nn.Identity(), nn.ConvTranspose2d(in_channels, out_channels, scale, stride=scale)

    def forward(self, x):
        return self.up(self.pre(x))

    def extra_repr(self):
        return f"kind={self.kind!r}, scale={self.scale}, out_channels={self.out_channels}"


def match_size(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` resized (bilinear) to ``ref``'s spatial size if they differ. The models pad their
    input to the encoder's total stride, so this only acts for encoders whose feature sizes are
    not exact halves of each other."""
    if x.shape[-2:] != ref.shape[-2:]:
        x = F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)
    return x


# --------------------------------------------------------------------------- decoder
class DecoderBlock(nn.Module):
    """One U-Net decoder level: upsample the deeper feature, concatenate the skip (if any),
    then ``block(in, out)`` (DoubleConv, ResBlock, ...)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, upsample: str,
                 block: Callable[[int, int], nn.Module], up_channels: int | None = None, eucb_star_stages: int = 2):
        super().__init__()
        self.up = Upsample(upsample, in_channels, up_channels, 2, eucb_star_stages)
        self.block = block(self.up.out_channels + skip_channels, out_channels)

    def forward(self, x, skip=None):
        x = self.up(x)
        if skip is not None:
            x = torch.cat([match_size(x, skip), skip], dim=1)
        return self.block(x)


def decoder_levels(reductions: Sequence[int]) -> list[int]:
    """The decoder's output reductions: from half the deepest feature's down to 1 (full
    resolution), one x2 step each; e.g. [16, 8, 4, 2, 1] for reductions [2, 4, 8, 16, 32]
    (resnet) and [4, 8, 16, 32] (convnext) alike."""
    deepest = reductions[-1]
    if deepest < 1 or deepest & (deepest - 1):
        raise ValueError(f"the encoder's deepest reduction must be a power of 2, got {deepest} "
                         f"(reductions {list(reductions)})")
    levels, r = [], deepest
    while r > 1:
        r //= 2
        levels.append(r)
    return levels


def fit_widths(widths: Sequence[int] | None, n: int, default: Sequence[int], what: str = "decoder_channels") -> tuple:
    """``widths`` checked to have ``n`` entries (one per decoder level); ``None`` gives the last
    ``n`` of ``default`` (extended by doubling at the deep end if it is too short)."""
    if widths is None:
        widths = list(default)
        while len(widths) < n:
            widths.insert(0, widths[0] * 2)
        return tuple(widths[len(widths) - n:])
    widths = tuple(int(w) for w in widths)
    if len(widths) != n or min(widths) < 1:
        raise ValueError(f"{what} must have {n} positive entries (one per decoder level, deepest first) "
                         f"for this encoder, got {widths}")
    return widths


class UNetDecoder(nn.Module):
    """A U-Net decoder over any encoder: one :class:`DecoderBlock` per x2 step from the deepest
    feature to full resolution (:func:`decoder_levels`), each concatenating the encoder feature
    of its reduction, if the encoder has one (the last one per reduction), or at full resolution
    the raw input when ``input_skip_channels`` > 0 (Cross-Building's last skip). Because it
    follows ``feature_info.reduction()``, stride-2 encoders (resnet, efficientnet) and stride-4
    ones (convnext: no skip at 1/2) both end at the input's resolution. ``skip_block(ch)``
    optionally transforms each encoder skip (the atrous blocks of resunet_atrous);
    ``up_channels``: the upsampling's output width per level (``None``: its natural width);
    ``final_block`` replaces ``block`` at full resolution (DeResUNet's output stage)."""

    def __init__(self, encoder_channels: Sequence[int], encoder_reductions: Sequence[int],
                 decoder_channels: Sequence[int], upsample: str, block: Callable[[int, int], nn.Module],
                 in_channels: int | None = None, input_skip_channels: int = 0,
                 skip_block: Callable[[int], nn.Module] | None = None, up_channels: Sequence[int | None] | None = None,
                 eucb_star_stages: int = 2, final_block: Callable[[int, int], nn.Module] | None = None):
        super().__init__()
        levels = decoder_levels(encoder_reductions)
        if len(decoder_channels) != len(levels):
            raise ValueError(f"decoder_channels needs {len(levels)} entries for reductions {list(encoder_reductions)}, "
                             f"got {tuple(decoder_channels)}")
        # index of the encoder feature used as the skip at each reduction (the last one per reduction)
        by_reduction = {r: i for i, r in enumerate(encoder_reductions[:-1])}
        self.levels = levels
        self.skip_index = [by_reduction.get(r, -1) for r in levels]
        self.use_input = [r == 1 and r not in by_reduction and input_skip_channels > 0 for r in levels]
        self.skip_blocks = nn.ModuleList()
        self.blocks = nn.ModuleList()
        ch = encoder_channels[-1] if in_channels is None else in_channels
        up_channels = [None] * len(levels) if up_channels is None else list(up_channels)
        for r, idx, use_input, out, up in zip(levels, self.skip_index, self.use_input, decoder_channels, up_channels):
            skip_ch = encoder_channels[idx] if idx >= 0 else (input_skip_channels if use_input else 0)
            has_skip_block = skip_block is not None and idx >= 0
            self.skip_blocks.append(skip_block(skip_ch) if has_skip_block else nn.Identity())
            level_block = final_block if r == 1 and final_block is not None else block
            self.blocks.append(DecoderBlock(ch, skip_ch, out, upsample, level_block, up, eucb_star_stages))
            ch = out
        self.out_channels = ch

    def forward(self, x: torch.Tensor, features: Sequence[torch.Tensor], image: torch.Tensor | None = None):
        """``x``: the deepest (or bridged) feature; ``features``: the encoder's; ``image``:
        the (padded) input, for the full-resolution skip."""
        for block, skip_block, idx, use_input in zip(self.blocks, self.skip_blocks, self.skip_index, self.use_input):
            skip = features[idx] if idx >= 0 else (image if use_input else None)
            x = block(x, None if skip is None else skip_block(skip))
        return x


# --------------------------------------------------------------------------- U-ResNet
class ResidualBranch(nn.Module):
    """U-ResNet's ResBlock branch: a stride-2 7x7 stem, stages of two BasicBlocks at stride 1
    (``widths``, seed 64/128/64/32), then an upsampling block back to full resolution (seed:
    EUCB with bilinear x2, 32 -> 16; or any other of :data:`UPSAMPLE_KINDS`)."""

    def __init__(self, in_channels: int, widths=(64, 128, 64, 32), out_channels: int = 16,
                 upsample: str = "eucb_bilinear"):
        super().__init__()
        widths = tuple(widths)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        blocks, ch = [], widths[0]
        for w in widths:
            blocks += [BasicBlock(ch, w), BasicBlock(w, w)]
            ch = w
        self.stages = nn.Sequential(*blocks)
        # the seed's EUCB bare, not in an Upsample: its weights are residual.up.*, not residual.up.up.*
        self.up = (EUCB(ch, out_channels, 2, mode="bilinear") if upsample == "eucb_bilinear"
                   else Upsample(upsample, ch, out_channels, 2))
        self.out_channels = out_channels

    def forward(self, x):
        return self.up(self.stages(self.stem(x)))


class FeatureMerge(nn.Sequential):
    """U-ResNet's Feature Merge before the 1x1 head: concat -> BatchNorm -> ReLU."""

    def __init__(self, channels: int):
        super().__init__(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def forward(self, *paths: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.cat(paths, dim=1))


# --------------------------------------------------------------------------- padding
def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x`` zero-padded at the bottom and right so that H and W are multiples of ``multiple``.
    Always padded (by 0 where it is one already): no branch on the size, so torch.export,
    torch.jit.trace and ONNX capture one graph for every H, W. The padding is rounded up with
    floor division, not ``(-w) % multiple``: torch.compile's backward partitioner cannot turn a
    symbolic modulo into graph code (``TensorReferenceAnalysis`` has no ``python_mod``), so a
    model compiled with ``dynamic=True``, or recompiled for a second size, failed to train."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, _round_up(w, multiple) - w, 0, _round_up(h, multiple) - h))


def _round_up(size, multiple: int):
    """The multiple of ``multiple`` at or above ``size`` (an int or a symbolic size)."""
    return (size + multiple - 1) // multiple * multiple


def crop_to(x: torch.Tensor, h, w) -> torch.Tensor:
    """The top-left ``h`` x ``w`` of ``x``, by F.pad with negative padding (a copy). Not a
    slice: whether the slice's view is contiguous depends on whether anything was cut, and
    torch.export guards on that, so its program would fail at sizes of the other kind."""
    if torch.jit.is_tracing():  # torch.jit.trace / the legacy ONNX exporter record the pad as a constant
        return x[..., :h, :w]
    return F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))
