"""``unet``: the plain U-Net baseline (Ronneberger et al.) on a timm encoder: the comparison
point for the other architectures, with the same encoders and the same padding contract."""
from __future__ import annotations

from ..base import SegmentationModel
from ..blocks import DoubleConv, UNetDecoder, check_upsample, decoder_levels, fit_widths
from ..encoders import resolve_encoder
from ..heads import SegmentationHead
from ..registry import register_model

DEFAULT_DECODER_CHANNELS = (256, 128, 64, 32, 16)


@register_model("unet")
class UNet(SegmentationModel):
    """Encoder features -> per level: upsample (``"transpose"``: the U-Net's 2x2 up-convolution,
    by default) -> concat skip -> DoubleConv -> 1x1 head. ``decoder_channels``: one width per
    decoder level, deepest first (default 256/128/64/32/16 for a stride-32 encoder)."""

    def __init__(self, encoder: str = "resnet34", in_channels: int = 3, num_classes: int = 1,
                 aux_classes: int | None = None, pretrained: bool = False, decoder_channels=None,
                 upsample: str = "transpose", encoder_kwargs: dict | None = None):
        enc = resolve_encoder(encoder, in_channels, pretrained, what="unet", encoder_kwargs=encoder_kwargs)
        super().__init__(num_classes, aux_classes, enc.channels[-1])
        check_upsample(upsample)
        self.encoder = enc
        self.output_stride = self.encoder.output_stride
        levels = decoder_levels(self.encoder.reductions)
        widths = fit_widths(decoder_channels, len(levels), DEFAULT_DECODER_CHANNELS)
        self.decoder = UNetDecoder(self.encoder.channels, self.encoder.reductions, widths, upsample, DoubleConv)
        self.head = SegmentationHead(self.decoder.out_channels, num_classes)

    def forward_padded(self, x):
        features = self.encoder(x)
        return self.head(self.decoder(features[-1], features)), features[-1]
