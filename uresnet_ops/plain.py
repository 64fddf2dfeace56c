"""The plain-PyTorch forms of the fused modules: what :func:`uresnet_ops.unfuse` puts in their
place (each fused class's ``plain()`` builds its twin here).

A twin computes its fused module's chain with plain torch modules and functions only
(``nn.BatchNorm2d``, ``nn.Conv2d``, ``F.pixel_shuffle``, ``F.channel_shuffle``, ``torch.cat``,
...), never through the uresnet_ops ops or their dispatch: it is the baseline the fused
modules are compared with. It holds the fused module's own submodules, parameters and buffers
under the same names, so both state dicts have the same keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import parse_activation

__all__ = ["PlainPixelShuffleBN", "PlainEUCB", "PlainEUCBStar", "PlainMultiDilationConv2d", "PlainASPP",
           "PlainAtrousBlock", "activation_module"]


def activation_module(activation) -> nn.Module:
    """The nn.Module of an activation spec ("relu", ("leaky_relu", 0.2), ...)."""
    name, slope = parse_activation(activation, "activation_module")
    return {"none": nn.Identity, "relu": nn.ReLU, "silu": nn.SiLU}.get(name, lambda: nn.LeakyReLU(slope))()


def _shuffle(x, groups: int):
    return x if groups == 1 else F.channel_shuffle(x, groups)


class PlainPixelShuffleBN(nn.BatchNorm2d):
    """``PixelShuffle(r) -> BatchNorm2d -> activation``: a ``BatchNorm2d`` (its state dict, its
    running statistics) that pixel-shuffles its input first. (torch's and timm's
    ``convert_sync_batchnorm`` see a ``BatchNorm2d`` and would drop the pixel shuffle.)"""

    def __init__(self, num_features: int, upscale_factor: int, activation="relu", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.upscale_factor = upscale_factor
        self.act = activation_module(activation)

    def forward(self, x):
        if self.upscale_factor != 1:
            x = F.pixel_shuffle(x, self.upscale_factor)
        return self.act(super().forward(x))

    def extra_repr(self):
        return f"{super().extra_repr()}, upscale_factor={self.upscale_factor}"


class PlainEUCB(nn.Module):
    """``up_dwc`` (Upsample -> depthwise/grouped 3x3 conv -> BatchNorm2d -> act), then channel
    shuffle, then ``pwc`` (the 1x1 conv), as EMCAD writes it."""

    def __init__(self, up_dwc: nn.Sequential, pwc: nn.Sequential, shuffle_groups: int = 1):
        super().__init__()
        self.up_dwc, self.pwc, self.shuffle_groups = up_dwc, pwc, shuffle_groups

    def forward(self, x):
        return self.pwc(_shuffle(self.up_dwc(x), self.shuffle_groups))


class PlainEUCBStar(nn.Module):
    """``up``, then per stage (grouped 3x3 conv -> BatchNorm2d -> act) and channel shuffle,
    then the 1x1 conv ``pwc``."""

    def __init__(self, up: nn.Upsample, stages: nn.ModuleList, pwc: nn.Conv2d, groups: int):
        super().__init__()
        self.up, self.stages, self.pwc, self.groups = up, stages, pwc, groups

    def forward(self, x):
        x = self.up(x)
        for stage in self.stages:
            x = _shuffle(stage(x), self.groups)
        return self.pwc(x)


class PlainMultiDilationConv2d(nn.Module):
    """``torch.cat`` of the branches (each ``Sequential(conv (, bn), act)``) on one input."""

    def __init__(self, branches: nn.ModuleList):
        super().__init__()
        self.branches = branches

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.branches], 1)


class PlainASPP(nn.Module):
    """torchvision's ASPP forward: the conv branches and the image-pooling branch (``convs[-1]``,
    its 1x1 map broadcast back by bilinear interpolation, at ``pool_position`` among the
    branches), concatenated, then ``project``."""

    def __init__(self, convs: nn.ModuleList, project: nn.Sequential, pool_position: int):
        super().__init__()
        self.convs, self.project, self.pool_position = convs, project, pool_position

    def forward(self, x):
        outs = [branch(x) for branch in self.convs[:-1]]
        pooled = F.interpolate(self.convs[-1](x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        outs.insert(self.pool_position, pooled)
        return self.project(torch.cat(outs, 1))


class PlainAtrousBlock(nn.Module):
    """The atrous block's branches and max-pool, concatenated, then BatchNorm -> 1x1 conv ->
    BatchNorm -> ReLU."""

    def __init__(self, branches: nn.ModuleList, pool: nn.Module, bn_in: nn.Module, conv: nn.Module,
                 bn_out: nn.Module, act: nn.Module):
        super().__init__()
        self.branches, self.pool, self.bn_in, self.conv, self.bn_out, self.act = \
            branches, pool, bn_in, conv, bn_out, act

    def forward(self, x):
        y = torch.cat([branch(x) for branch in self.branches] + [self.pool(x)], 1)
        return self.act(self.bn_out(self.conv(self.bn_in(y))))
