"""Base classes: the segmentation model contract (logits at the input's resolution for any
H, W; optional auxiliary classification head), with the U-Net builder and forward the
U-Net-style architectures share. Saving and loading come from :class:`~.hub.HubMixin`."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import UNetDecoder, check_upsample, crop_to, decoder_levels, fit_widths, pad_to_multiple
from .heads import ClassificationHead, SegmentationHead
from .hub import HubMixin, checked_preprocessing


class ModelBase(nn.Module, HubMixin):
    """What every registered model has: :meth:`predict`, :meth:`freeze_encoder` /
    :meth:`unfreeze_encoder`, :attr:`preprocessing` and the output ``activation``; and from
    :class:`~.hub.HubMixin`, ``model_config`` (the architecture name and every argument it was
    built with, defaults included), ``save_pretrained``, ``from_pretrained`` and
    ``push_to_hub``."""

    _encoder_frozen: bool = False
    _preprocessing: dict | None = None

    @property
    def preprocessing(self) -> dict | None:
        """The input normalisation the model expects, ``{"mean", "std", "input_range"}``: images
        scaled to ``input_range`` (0..1), then ``(x - mean) / std`` on the first ``len(mean)``
        channels (a depth channel after them as it is). What was set (``uresnet train`` sets the
        normalisation it trained with; ``save_pretrained`` keeps it), else the encoder's weights'
        (timm's ``pretrained_cfg``), else None. Set None to fall back to the encoder's."""
        if self._preprocessing is not None:
            return self._preprocessing
        encoder = getattr(self, "encoder", None)
        return getattr(encoder, "preprocessing", None)

    @preprocessing.setter
    def preprocessing(self, value: dict | None) -> None:
        self._preprocessing = None if value is None else checked_preprocessing(value)

    def activate(self, out):
        """``out`` with the model's ``activation`` (``create_model(..., activation=)``, as smp's
        head) applied to the main output; auxiliary class logits stay logits. Every ``forward``
        ends with it."""
        act = getattr(self, "activation", None)
        if act is None:
            return out
        return (act(out[0]), *out[1:]) if isinstance(out, tuple) else act(out)

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        """``forward`` in eval mode without gradients (the activation, if any, included); the
        training mode is restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            return self(x)
        finally:
            self.train(was_training)

    def freeze_encoder(self) -> "ModelBase":
        """Stop training the encoder: its parameters get ``requires_grad=False`` and its
        normalisation layers stay in eval mode (running statistics frozen) even after
        ``.train()``. Returns the model."""
        encoder = self._encoder_module()
        for p in encoder.parameters():
            p.requires_grad_(False)
        self._encoder_frozen = True
        encoder.eval()
        return self

    def unfreeze_encoder(self) -> "ModelBase":
        """Undo :meth:`freeze_encoder`. Returns the model."""
        encoder = self._encoder_module()
        for p in encoder.parameters():
            p.requires_grad_(True)
        self._encoder_frozen = False
        encoder.train(self.training)
        return self

    def _encoder_module(self) -> nn.Module:
        encoder = getattr(self, "encoder", None)
        if not isinstance(encoder, nn.Module):
            raise RuntimeError(f"{type(self).__name__} has no encoder to freeze")
        return encoder

    def train(self, mode: bool = True):
        super().train(mode)
        if self._encoder_frozen:
            self.encoder.eval()
        return self


class SegmentationModel(ModelBase):
    """A segmentation model: ``forward(x)`` returns logits (N, num_classes, H, W) at the
    input's resolution for any H and W, or ``(seg_logits, class_logits)`` with ``aux_classes``.

    Any size works because the input is zero-padded at the bottom/right to a multiple of the
    encoder's total stride (``output_stride``, 32 for timm encoders) and the logits are cropped
    back. Every x2 step of the decoder is then exact, so the fused upsampling ops (PixelShuffle,
    EUCB, transposed convs) need no resizing, and the valid region is computed as for an
    input that size; interpolating decoder features to odd skip sizes would instead blur every
    level.

    A U-Net-style architecture passes its ``encoder`` here, sets ``self.bridge`` if it has a
    block on the deepest feature, and calls :meth:`build_unet`; the default
    :meth:`forward_padded` then runs encoder -> bridge -> decoder -> head. Others (U-ResNet's
    two paths) override :meth:`forward_padded`."""

    output_stride: int = 1

    def __init__(self, num_classes: int, aux_classes: int | None = None, aux_channels: int | None = None,
                 encoder: nn.Module | None = None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if aux_classes is not None and (not isinstance(aux_classes, int) or aux_classes < 1):
            raise ValueError(f"aux_classes must be None or a positive int, got {aux_classes!r}")
        self.num_classes, self.aux_classes = num_classes, aux_classes
        if aux_channels is None and encoder is not None:
            aux_channels = encoder.channels[-1]  # the aux head classifies the deepest feature
        self.aux_head = ClassificationHead(aux_channels, aux_classes) if aux_classes else None
        if encoder is not None:
            self.encoder = encoder
            self.output_stride = encoder.output_stride

    def decoder_widths(self, decoder_channels, default) -> tuple:
        """``decoder_channels`` checked against ``self.encoder``'s decoder levels, or for
        ``None`` the architecture's ``default`` fitted to them (:func:`~.blocks.fit_widths`)."""
        return fit_widths(decoder_channels, len(decoder_levels(self.encoder.reductions)), default)

    def build_unet(self, widths, upsample: str, block, **decoder_kwargs) -> None:
        """The half every U-Net-style architecture shares, after ``self.encoder`` (and the
        architecture's ``self.bridge``, if any) are set: ``self.decoder``, a
        :class:`~.blocks.UNetDecoder` of ``block``s with ``widths`` (deepest first) and
        ``upsample``; ``self.head``, the 1x1 head. ``decoder_kwargs`` go to the decoder."""
        check_upsample(upsample)
        if not hasattr(self, "bridge"):
            self.bridge = nn.Identity()  # a plain U-Net: the deepest feature goes straight to the decoder
        self.decoder = UNetDecoder(self.encoder.channels, self.encoder.reductions, widths, upsample, block,
                                   **decoder_kwargs)
        self.head = SegmentationHead(self.decoder.out_channels, self.num_classes)

    def forward_padded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, deepest_feature)`` of an input whose H, W are multiples of ``output_stride``;
        by default the parts :meth:`build_unet` made (``x`` is the decoder's full-resolution
        skip where it takes one)."""
        features = self.encoder(x)
        deepest = features[-1]
        return self.head(self.decoder(self.bridge(deepest), features, x)), deepest

    def forward(self, x: torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected an (N, C, H, W) input, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, self.output_stride)
        logits, deepest = self.forward_padded(padded)
        logits = crop_to(logits, h, w)  # always (nothing to cut at a multiple): no branch on the size
        if self.aux_head is not None:
            return self.activate((logits, self.aux_head(deepest)))
        return self.activate(logits)
