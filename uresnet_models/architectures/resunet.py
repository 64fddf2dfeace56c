"""``resunet``: the Residual U-Net of the article (seed 3): residual blocks (conv3x3 + ReLU,
conv3x3, + shortcut, ReLU) in the encoder and the decoder, bilinear x2 upsampling, a 1x1 head.
``encoder=None`` (the default) is the article's own encoder: res_block 64 -> max-pool ->
res_block 128 -> max-pool -> bottleneck res_block 256; a timm name replaces it."""
from __future__ import annotations

from ..base import SegmentationModel
from ..blocks import ResBlock, UNetDecoder, check_upsample, decoder_levels, fit_widths
from ..encoders import ResidualUNetEncoder, resolve_encoder
from ..heads import SegmentationHead
from ..registry import register_model


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
        enc = resolve_encoder(encoder, in_channels, pretrained,
                              own=lambda: ResidualUNetEncoder(in_channels, encoder_channels), what="resunet",
                              encoder_kwargs=encoder_kwargs)
        super().__init__(num_classes, aux_classes, enc.channels[-1])
        check_upsample(upsample)
        self.encoder = enc
        self.output_stride = enc.output_stride
        levels = decoder_levels(enc.reductions)
        default = tuple(enc.channels[-2::-1]) if encoder is None else (256, 128, 64, 32, 16)
        widths = fit_widths(decoder_channels, len(levels), default)
        self.decoder = UNetDecoder(enc.channels, enc.reductions, widths, upsample, ResBlock)
        self.head = SegmentationHead(self.decoder.out_channels, num_classes)

    def forward_padded(self, x):
        features = self.encoder(x)
        return self.head(self.decoder(features[-1], features)), features[-1]
