"""``resunet``: the Residual U-Net of the article (seed 3): residual blocks (conv3x3 + ReLU,
conv3x3, + shortcut, ReLU) in the encoder and the decoder, bilinear x2 upsampling, a 1x1 head.
``encoder=None`` (the default) is the article's own encoder: res_block 64 -> max-pool ->
res_block 128 -> max-pool -> bottleneck res_block 256; a timm name replaces it."""
from __future__ import annotations

from ..base import SegmentationModel
from ..blocks import ResBlock
from ..encoders import ResidualUNetEncoder, resolve_encoder
from ..registry import register_model

TIMM_DECODER_CHANNELS = (256, 128, 64, 32, 16)


@register_model("resunet")
class ResUNet(SegmentationModel):
    """Decoder per level: bilinear x2 (``upsample``) -> concat skip -> ResBlock (with the 1x1
    projection shortcut the article's code lacks). Defaults: the article's widths,
    ``encoder_channels=(64, 128, 256)`` and ``decoder_channels=(128, 64)``; with a timm encoder
    the decoder widths default to 256/128/64/32/16."""

    def __init__(self, encoder: str | None = None, in_channels: int = 3, num_classes: int = 1,
                 aux_classes: int | None = None, pretrained: bool = False, decoder_channels=None,
                 encoder_channels=(64, 128, 256), upsample: str = "bilinear",
                 encoder_kwargs: dict | None = None):
        super().__init__(num_classes, aux_classes, encoder=resolve_encoder(
            encoder, in_channels, pretrained, own=lambda: ResidualUNetEncoder(in_channels, encoder_channels),
            what="resunet", encoder_kwargs=encoder_kwargs))
        # the article's decoder mirrors its encoder (128, 64); a timm encoder gets the U-Net's widths
        default = tuple(self.encoder.channels[-2::-1]) if encoder is None else TIMM_DECODER_CHANNELS
        self.build_unet(self.decoder_widths(decoder_channels, default), upsample, ResBlock)
