"""``resunet_atrous``: Cross-Building-Segmentation's ResNet50 U-Net with atrous blocks on the
skip connections (seed 2), on any timm encoder (default resnet50)."""
from __future__ import annotations

from uresnet_ops.nn import AtrousBlock

from ..base import SegmentationModel
from ..blocks import conv_pair
from ..encoders import resolve_encoder, scaled_widths
from ..registry import register_model

SEED_DECODER_CHANNELS = (1024, 512, 256, 128, 64)  # for resnet50's 2048-wide deepest feature


@register_model("resunet_atrous")
class ResUNetAtrous(SegmentationModel):
    """Encoder -> bridge (2x ConvBlock at the deepest width) -> up blocks: ``upsample``
    (ConvTranspose 2x2 by default) -> concat the skip, passed through an ``AtrousBlock``
    (four parallel convs k=(1,3,3,3), d=(1,6,12,18), one fused op, plus a max-pool branch;
    keeps the skip's width) -> 2x ConvBlock; the last skip is the raw input; 1x1 head.

    ``decoder_channels`` default: the seed's 1024/512/256/128/64 scaled by the encoder's
    deepest width / 2048 (exactly the seed for resnet50). ``atrous=False`` drops the atrous
    blocks (the plain ResNet U-Net ablation)."""

    def __init__(self, encoder: str = "resnet50", in_channels: int = 3, num_classes: int = 1,
                 aux_classes: int | None = None, pretrained: bool = False, decoder_channels=None,
                 upsample: str = "transpose", atrous: bool = True, dilations=(1, 6, 12, 18),
                 encoder_kwargs: dict | None = None):
        super().__init__(num_classes, aux_classes, encoder=resolve_encoder(
            encoder, in_channels, pretrained, what="resunet_atrous", encoder_kwargs=encoder_kwargs))
        deepest = self.encoder.channels[-1]
        self.bridge = conv_pair(deepest, deepest)
        widths = self.decoder_widths(decoder_channels, scaled_widths(SEED_DECODER_CHANNELS, deepest / 2048))
        dilations = tuple(dilations)
        skip_block = (lambda ch: AtrousBlock(ch, ch, kernel_sizes=(1,) + (3,) * (len(dilations) - 1),
                                             dilations=dilations)) if atrous else None
        # The seed's up blocks are ConvTranspose(in, out) then 2x ConvBlock(out + skip, out).
        # (bilinear and pixel shuffle keep their natural widths: in, in / 4).
        ups = [None] * len(widths) if upsample in ("bilinear", "pixel_shuffle_bn") else widths
        self.build_unet(widths, upsample, conv_pair, input_skip_channels=in_channels, skip_block=skip_block,
                        up_channels=ups)
