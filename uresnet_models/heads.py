"""Output heads: the 1x1 segmentation head of every seed, and the classification head
(global average pool -> linear) of U-ResNet's classifier and of the ``aux_classes`` option."""
from __future__ import annotations

import torch
from torch import nn


class SegmentationHead(nn.Conv2d):
    """A 1x1 convolution to ``num_classes`` logits (the seeds' final 1x1 conv; no softmax or
    sigmoid: the losses take logits)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes, 1)


class ClassificationHead(nn.Module):
    """Global average pool -> dropout -> linear, to ``num_classes`` logits."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))
