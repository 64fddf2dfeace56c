"""``uresnet`` and ``uresnet_cls``: U-ResNet (seed 0; Sensors 2025, 25(17):5600), a ResNet-style
residual path and a U-Net path run in parallel and fused.

Segmentation (``UResNet(seg_classes, in_channels=3, base_c=32)`` in the seed):

* ResBlock branch: 7x7 stride-2 conv -> 64, BN, ReLU; four stages of two BasicBlocks at
  stride 1 (widths 64/128/64/32); EUCB 32 -> 16 with bilinear x2 back to full resolution;
* UBlock: the classic U-Net (DoubleConv, 4 Down by max-pool, 4 Up + concat + DoubleConv);
  here its contracting path can be any timm encoder (``encoder=None``: the seed's own);
* Feature Merge: concat (base_c + 16) -> BN -> ReLU -> 1x1 conv.

Classification: residual stages 64/128/256/512 next to a U-Net, each average-pooled,
concatenated, linear; Selected Upsampling (SU) upsamples the input bilinearly x2 before the
first convolution, for low-resolution inputs (CIFAR).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ModelBase, SegmentationModel
from ..blocks import (DoubleConv, FeatureMerge, ResidualBranch, UNetDecoder, check_upsample, crop_to,
                      decoder_levels, pad_to_multiple)
from ..encoders import ResNetStagesEncoder, UNetEncoder, resolve_encoder
from ..heads import SegmentationHead
from ..registry import register_model


@register_model("uresnet")
class UResNet(SegmentationModel):
    """U-ResNet segmentation: ``ResidualBranch`` and a U-Net (``encoder`` + decoder with
    ``upsample``: ``"eucb"`` (default), ``"eucb_star"``, ``"bilinear"``, ``"transpose"`` (the
    seed's Up), ``"pixel_shuffle_bn"``, ``"eucb_bilinear"``) in parallel, joined by
    ``FeatureMerge`` and a 1x1 head. The ResBlock branch upsamples with the same kind, except
    that for the seed's ``"eucb"`` it uses the seed's own ``"eucb_bilinear"``.

    ``encoder=None`` (default) is the seed's U-Net contracting path with ``base_channels``
    (32); a timm name (e.g. ``"resnet34"``) replaces it. ``decoder_channels`` default: the
    seed's ``base_channels * reduction`` per level (.., 128, 64, 32). ``residual=False`` /
    ``unet=False`` are the paper's ablations without the ResBlock / UBlock path.
    ``aux_classes`` adds the joint classification head on the deepest U-path feature."""

    def __init__(self, encoder: str | None = None, in_channels: int = 3, num_classes: int = 1,
                 aux_classes: int | None = None, pretrained: bool = False, base_channels: int = 32,
                 upsample: str = "eucb", decoder_channels=None, residual_widths=(64, 128, 64, 32),
                 residual_out_channels: int = 16, residual: bool = True, unet: bool = True,
                 encoder_kwargs: dict | None = None):
        check_upsample(upsample)
        if not (residual or unet):
            raise ValueError("uresnet: at least one of residual and unet must be True")
        if aux_classes and not unet:
            raise ValueError("uresnet: aux_classes needs the U path (unet=True)")
        # built (and its arguments checked) for unet=False too, so a seeded model initialises as it always has
        enc = resolve_encoder(encoder, in_channels, pretrained,
                              own=lambda: UNetEncoder(in_channels, base_channels), what="uresnet",
                              encoder_kwargs=encoder_kwargs)
        super().__init__(num_classes, aux_classes, encoder=enc if unet else None)
        merged = 0
        if unet:  # UBlock
            widths = self.decoder_widths(decoder_channels, [base_channels * r for r in decoder_levels(enc.reductions)])
            self.decoder = UNetDecoder(enc.channels, enc.reductions, widths, upsample, DoubleConv)
            merged += self.decoder.out_channels
        else:
            self.encoder = self.decoder = None
            self.output_stride = 2  # the ResBlock branch's stride-2 stem
        if residual:  # ResBlock branch; the seed's EUCB is nearest in the U path, bilinear here
            self.residual = ResidualBranch(in_channels, residual_widths, residual_out_channels,
                                           "eucb_bilinear" if upsample == "eucb" else upsample)
            merged += residual_out_channels
        else:
            self.residual = None
        self.merge = FeatureMerge(merged)
        self.head = SegmentationHead(merged, num_classes)

    def forward_padded(self, x):
        parts, deepest = [], None
        if self.decoder is not None:
            features = self.encoder(x)
            deepest = features[-1]
            parts.append(self.decoder(deepest, features))
        if self.residual is not None:
            parts.append(self.residual(x))
        merged = self.merge(*parts)
        return self.head(merged), deepest


@register_model("uresnet_cls")
class UResNetClassifier(ModelBase):
    """U-ResNet classification: Selected Upsampling (bilinear x2 of the input, on by default;
    for 32x32 CIFAR images), then a residual path (``encoder``: a timm model, default resnet18
    with stages 64/128/256/512; ``None``: the seed's CIFAR-style stages, ``residual_widths``
    wide with ``residual_blocks`` BasicBlocks each) next to a U-Net (``base_channels``,
    ``unet_depth`` downs, EUCB* upsampling with 3 stages by default), each
    global-average-pooled, concatenated, dropout, linear -> ``num_classes`` logits."""

    def __init__(self, encoder: str | None = "resnet18", in_channels: int = 3, num_classes: int = 1,
                 aux_classes: int | None = None, pretrained: bool = False, base_channels: int = 32,
                 unet_depth: int = 4, upsample: str = "eucb_star", selected_upsampling: bool = True,
                 dropout: float = 0.0, unet: bool = True, encoder_kwargs: dict | None = None,
                 residual_widths=(64, 128, 256, 512), residual_blocks: int = 2):
        super().__init__()
        if aux_classes is not None:
            raise ValueError("uresnet_cls is a classifier: use num_classes (aux_classes is for segmentation models)")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        check_upsample(upsample)
        if encoder is not None and (tuple(residual_widths), residual_blocks) != ((64, 128, 256, 512), 2):
            raise ValueError(f"residual_widths and residual_blocks shape uresnet_cls's own encoder (encoder=None), "
                             f"not the timm encoder {encoder!r}")
        self.num_classes, self.selected_upsampling = num_classes, selected_upsampling
        self.encoder = resolve_encoder(encoder, in_channels, pretrained, what="uresnet_cls",
                                       own=lambda: ResNetStagesEncoder(in_channels, residual_widths, residual_blocks),
                                       encoder_kwargs=encoder_kwargs)
        features = self.encoder.channels[-1]
        if unet:
            self.unet_encoder = UNetEncoder(in_channels, base_channels, unet_depth)
            levels = decoder_levels(self.unet_encoder.reductions)
            self.unet_decoder = UNetDecoder(self.unet_encoder.channels, self.unet_encoder.reductions,
                                            tuple(base_channels * r for r in levels), upsample, DoubleConv,
                                            eucb_star_stages=3)
            features += self.unet_decoder.out_channels
        else:
            self.unet_encoder = self.unet_decoder = None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x):
        if self.selected_upsampling:  # SU: bilinear x2 before the first convolution
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        # zero-padded to the encoder's stride as the segmentation models do (tresnet, dla, hrnet need it)
        pooled = [self.pool(self.encoder(pad_to_multiple(x, self.encoder.output_stride))[-1])]
        if self.unet_encoder is not None:
            u = pad_to_multiple(x, self.unet_encoder.output_stride)  # zero padding: pooled, not cropped
            features = self.unet_encoder(u)
            pooled.append(self.pool(crop_to(self.unet_decoder(features[-1], features), *x.shape[-2:])))
        return self.activate(self.fc(self.dropout(torch.flatten(torch.cat(pooled, dim=1), 1))))
