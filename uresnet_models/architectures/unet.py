"""``unet``: the plain U-Net baseline (Ronneberger et al.) on a timm encoder: the comparison
point for the other architectures, with the same encoders and the same padding contract."""
from __future__ import annotations

from ..base import SegmentationModel
from ..blocks import DoubleConv
from ..encoders import resolve_encoder
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
        super().__init__(num_classes, aux_classes, encoder=resolve_encoder(
            encoder, in_channels, pretrained, what="unet", encoder_kwargs=encoder_kwargs))
        self.build_unet(self.decoder_widths(decoder_channels, DEFAULT_DECODER_CHANNELS), upsample, DoubleConv)
