"""``deresunet``: DeResUNet (seed 1), an RGB-D segmentation U-Net with two parallel encoders
whose features are concatenated at every scale, and a PixelShuffle + BatchNorm decoder."""
from __future__ import annotations

from torch import nn

from ..base import SegmentationModel
from ..blocks import ConvBNReLU, conv_pair
from ..encoders import DualEncoder, resolve_encoder, scaled_widths
from ..registry import register_model

SEED_DECODER_CHANNELS = (1024, 512, 256, 64, 16)  # for two resnet50s (4096 wide at 1/32)


@register_model("deresunet")
class DeResUNet(SegmentationModel):
    """Input: one (N, in_channels + depth_channels, H, W) tensor, RGB first. The RGB part goes
    through one encoder, the depth part through a second one with a ``depth_channels`` stem;
    their features are concatenated per scale (128@1/2 ... 4096@1/32 for two resnet50s).
    Bottleneck: 2x ConvBNReLU 4096 -> 2048. Decoder blocks: PixelShuffle(2) + BN + ReLU
    (one fused ``PixelShuffleBN`` op) -> concat skip -> 2x ConvBNReLU (1024/512/256/64);
    output: PixelShuffleBN(2) -> ConvBNReLU -> 1x1 conv.

    ``depth_encoder`` defaults to ``encoder``; ``depth_channels=0`` gives a single-encoder
    PixelShuffle U-Net. ``decoder_channels`` default: the seed's widths scaled by the concatenated
    deepest width / 4096 (exactly the seed for two resnet50s); ``bottleneck_channels`` default:
    half the concatenated deepest width (2048)."""

    def __init__(self, encoder: str = "resnet50", in_channels: int = 3, num_classes: int = 1,
                 aux_classes: int | None = None, pretrained: bool = False, depth_channels: int = 1,
                 depth_encoder: str | None = None, decoder_channels=None, upsample: str = "pixel_shuffle_bn",
                 bottleneck_channels: int | None = None, encoder_kwargs: dict | None = None):
        if not isinstance(depth_channels, int) or depth_channels < 0:
            raise ValueError(f"depth_channels must be a non-negative int, got {depth_channels!r}")
        enc = resolve_encoder(encoder, in_channels, pretrained, what="deresunet", encoder_kwargs=encoder_kwargs)
        if depth_channels:
            depth = resolve_encoder(encoder if depth_encoder is None else depth_encoder, depth_channels, pretrained,
                                    what="deresunet", encoder_kwargs=encoder_kwargs)
            enc = DualEncoder(enc, depth, in_channels)
        super().__init__(num_classes, aux_classes, encoder=enc)
        self.in_channels, self.depth_channels = in_channels, depth_channels
        deepest = enc.channels[-1]
        width = max(deepest // 2, 16) if bottleneck_channels is None else int(bottleneck_channels)
        self.bottleneck = conv_pair(deepest, width)
        widths = self.decoder_widths(decoder_channels, scaled_widths(SEED_DECODER_CHANNELS, deepest / 4096))
        self.build_unet(widths, upsample, conv_pair, in_channels=width, final_block=ConvBNReLU)

    @property
    def bridge(self) -> nn.Module:
        """The seed's Bottleneck, run by the default ``forward_padded`` (its weights keep the
        seed's name, ``bottleneck.*``)."""
        return self.bottleneck

    def forward_padded(self, x):
        expected = self.in_channels + self.depth_channels
        if x.shape[1] != expected:
            raise ValueError(f"deresunet expects {expected} input channels ({self.in_channels} RGB then "
                             f"{self.depth_channels} depth), got {x.shape[1]}")
        return super().forward_padded(x)
