"""Output heads: the 1x1 segmentation head of every seed, the classification head (global
average pool -> linear) of U-ResNet's classifier and of the ``aux_classes`` option, and the
output activation that ``model.predict`` applies."""
from __future__ import annotations

import functools

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


ACTIVATIONS = ("identity", "sigmoid", "softmax", "softmax2d", "logsoftmax", "tanh")


class Activation(nn.Module):
    """The activation of ``create_model(..., activation=)``: ``None``/``"identity"``,
    ``"sigmoid"``, ``"softmax"`` / ``"logsoftmax"`` (over the class dimension, 1; smp's
    ``"softmax2d"`` is the same softmax), ``"tanh"`` or any callable (applied to the logits
    tensor)."""

    def __init__(self, activation=None):
        super().__init__()
        if activation is None or activation == "identity":
            self.fn, self.name = None, "identity"
        elif isinstance(activation, str):
            # functions and partials, not lambdas: the model must pickle (torch.save, deepcopy)
            softmax = functools.partial(torch.softmax, dim=1)
            fns = {"sigmoid": torch.sigmoid, "softmax": softmax, "softmax2d": softmax,
                   "logsoftmax": functools.partial(torch.log_softmax, dim=1), "tanh": torch.tanh}
            if activation not in fns:
                raise ValueError(f"activation={activation!r}: expected None, a callable or one of "
                                 f"{', '.join(map(repr, ACTIVATIONS))}")
            self.fn, self.name = fns[activation], activation
        elif callable(activation):
            self.fn, self.name = activation, getattr(activation, "__name__", type(activation).__name__)
        else:
            raise TypeError(f"activation must be None, a name or a callable, got {type(activation).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.fn is None else self.fn(x)

    def extra_repr(self):
        return self.name
