"""Drop-in modules running the fused ops.

Each keeps the parameter and buffer names of the plain-torch modules it replaces, so their
state dicts load, and equals that plain chain in training and eval. ``plain()`` gives that
chain as plain torch modules (:mod:`uresnet_ops.plain`), sharing the module's parameters,
buffers and submodules, with the same state-dict keys (what ``uresnet_ops.unfuse`` uses).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from ._common import parse_activation
from .multi_dilation_conv2d import multi_dilation_conv2d
from .distributed import sync_active, sync_pixel_shuffle_bn, sync_shuffle_upsample
from .pixel_shuffle_bn import pixel_shuffle_bn
from . import plain as _plain
from .plain import activation_module
from .shuffle_upsample import shuffle_upsample

__all__ = ["PixelShuffleBN", "EUCB", "EUCBStar", "MultiDilationConv2d", "ASPP", "AtrousBlock",
           "activation_module"]


def _activation_of(module: nn.Module):
    """The activation spec of an activation module (inverse of activation_module)."""
    if isinstance(module, nn.LeakyReLU):
        return ("leaky_relu", module.negative_slope)
    for cls, name in ((nn.ReLU, "relu"), (nn.SiLU, "silu"), (nn.Identity, "none")):
        if isinstance(module, cls):
            return name
    raise TypeError(f"unsupported activation module {type(module).__name__}; "
                    "expected ReLU, LeakyReLU, SiLU or Identity")


def batch_norm_args(bn) -> dict:
    """The functional BatchNorm arguments of ``bn`` for this call, exactly as
    ``nn.BatchNorm2d.forward`` derives them (counts the batch in num_batches_tracked)."""
    momentum = bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    return dict(running_mean=bn.running_mean if keep_running else None,
                running_var=bn.running_var if keep_running else None,
                training=use_batch_stats, momentum=0.0 if momentum is None else momentum, eps=bn.eps)


def _fold_batch_norm(weight, bias, bn):
    """Conv weight and bias with an eval-mode BatchNorm folded in (differentiable)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale if bias is None else (bias - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return weight * scale.to(weight.dtype).view(-1, 1, 1, 1), shift.to(weight.dtype)


def _scale_of(upsample: nn.Upsample) -> int:
    """The integer scale factor of an ``nn.Upsample`` (2, 2.0 or (2, 2))."""
    s = upsample.scale_factor
    return int(s[0] if isinstance(s, (tuple, list)) else s)


def _set_mode(module: nn.Module, training: bool, *shared: nn.Module) -> nn.Module:
    """Sets ``training`` on a ``from_*`` module and its new containers only: the ``shared``
    modules keep their own modes (a frozen BatchNorm in a training model stays in eval)."""
    modes = {m: m.training for s in shared for m in s.modules()}
    module.train(training)
    for m, mode in modes.items():
        m.training = mode
    return module


_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class PixelShuffleBN(_NormBase):
    """``PixelShuffle(r) -> BatchNorm2d(C) -> activation`` in one op. ``in_channels`` is the
    input's C*r*r. Parameters and buffers are those of ``nn.BatchNorm2d(C)``, so its state dict
    loads. (Not a subclass of ``_BatchNorm``: ``convert_sync_batchnorm`` must not replace it.)

    With ``sync=True`` or a ``process_group``, training under an initialised ``torch.distributed``
    with more than one process uses the statistics of the whole distributed batch
    (``nn.SyncBatchNorm`` semantics, see :mod:`uresnet_ops.distributed`)."""

    def __init__(self, in_channels: int, upscale_factor: int, activation="relu", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None, process_group=None, sync: bool = False):
        if upscale_factor < 1 or in_channels % (upscale_factor ** 2):
            raise ValueError(f"PixelShuffleBN: in_channels ({in_channels}) must be divisible by "
                             f"upscale_factor**2 ({upscale_factor}**2), with upscale_factor >= 1")
        super().__init__(in_channels // upscale_factor ** 2, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.upscale_factor = upscale_factor
        self.activation = activation
        self.process_group = process_group
        self.sync = sync
        parse_activation(activation, "PixelShuffleBN")

    @classmethod
    def from_modules(cls, pixel_shuffle: nn.PixelShuffle, bn: nn.BatchNorm2d, act: nn.Module | None = None):
        """The fused module of existing ``PixelShuffle``, ``BatchNorm2d`` (and activation)
        modules, sharing their parameters and buffers."""
        r = pixel_shuffle.upscale_factor
        module = cls(bn.num_features * r * r, r, _activation_of(act) if act is not None else "none",
                     bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        for name in _BN_STATE:
            setattr(module, name, getattr(bn, name))
        return module.train(bn.training)

    def plain(self) -> nn.Module:
        with torch.device("meta"):  # the fresh tensors are replaced right away
            module = _plain.PlainPixelShuffleBN(self.num_features, self.upscale_factor, self.activation, self.eps,
                                                self.momentum, self.affine, self.track_running_stats)
        for name in _BN_STATE:
            setattr(module, name, getattr(self, name))
        return module.train(self.training)

    def _check_input_dim(self, x):
        if x.dim() != 4:
            raise ValueError(f"PixelShuffleBN: expected a 4-D input (N, C*r*r, H, W), got shape {tuple(x.shape)}")

    def forward(self, x):
        self._check_input_dim(x)
        args = batch_norm_args(self)
        if sync_active(self.process_group, self.sync, args["training"]):
            del args["training"]
            return sync_pixel_shuffle_bn(x, self.upscale_factor, self.weight, self.bias, activation=self.activation,
                                         process_group=self.process_group, **args)
        return pixel_shuffle_bn(x, self.upscale_factor, self.weight, self.bias, activation=self.activation, **args)

    def extra_repr(self):
        return f"{super().extra_repr()}, upscale_factor={self.upscale_factor}, activation={self.activation!r}"


class _RemapStateDict:
    """Lets a module load state dicts whose keys use another layout: ``_KEY_PREFIXES`` maps
    a foreign prefix to ours."""
    _KEY_PREFIXES: dict[str, str] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for theirs, ours in self._KEY_PREFIXES.items():
            for key in [k for k in state_dict if k.startswith(prefix + theirs)]:
                state_dict[prefix + ours + key[len(prefix + theirs):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class EUCB(_RemapStateDict, nn.Module):
    """EMCAD's efficient up-convolution block: upsample -> depthwise 3x3 -> BatchNorm ->
    activation -> channel shuffle -> 1x1 conv, as one op. Attribute names follow EMCAD
    (``up_dwc``, ``pwc``); the state dict of ``nn.Sequential(Upsample, Conv2d(groups=C),
    BatchNorm2d, ReLU, ChannelShuffle, Conv2d)`` loads too.

    ``sync`` / ``process_group``: the BatchNorm's statistics in training, as for
    :class:`PixelShuffleBN` (set by the trainer under DDP)."""
    _KEY_PREFIXES = {"1.": "up_dwc.1.", "2.": "up_dwc.2.", "5.": "pwc.0."}
    sync, process_group = False, None

    def __init__(self, in_channels: int, out_channels: int, scale_factor: int = 2, mode: str = "nearest",
                 shuffle_groups: int = 1, activation="relu"):
        super().__init__()
        self.up_dwc = nn.Sequential(
            nn.Upsample(scale_factor=scale_factor, mode=mode),
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            activation_module(activation))
        self.pwc = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1))
        self.scale_factor, self.mode = scale_factor, mode
        self.shuffle_groups, self.activation = shuffle_groups, activation

    @classmethod
    def from_modules(cls, upsample: nn.Upsample, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: nn.Module | None,
                     pw: nn.Conv2d, shuffle_groups: int = 1):
        """The fused module of an existing ``Upsample -> Conv2d(3x3, groups) -> BatchNorm2d ->
        act -> channel_shuffle(shuffle_groups) -> Conv2d(1x1)`` chain, sharing its modules (so
        parameters, buffers, devices and modes carry over). The 3x3 conv may be grouped rather
        than depthwise: the op takes its groups from the weight's shape. Configurations are
        assumed checked (see :func:`uresnet_ops.fuse`)."""
        activation = _activation_of(act) if act is not None else "none"
        with torch.device("meta"):  # the fresh modules are replaced right away
            module = cls(conv.in_channels, pw.out_channels, _scale_of(upsample), upsample.mode,
                         shuffle_groups, activation)
        module.up_dwc = nn.Sequential(upsample, conv, bn, act if act is not None else nn.Identity())
        module.pwc = nn.Sequential(pw)
        return _set_mode(module, conv.training, upsample, conv, bn, pw, *([act] if act is not None else []))

    def fused_batch_norms(self) -> list:
        """The BatchNorms the fused op runs (synchronised by ``sync``, not by SyncBatchNorm)."""
        return [self.up_dwc[2]]

    def plain(self) -> nn.Module:
        return _set_mode(_plain.PlainEUCB(self.up_dwc, self.pwc, self.shuffle_groups), self.training,
                         self.up_dwc, self.pwc)

    def forward(self, x):
        bn, pw = self.up_dwc[2], self.pwc[0]
        return _shuffle_upsample(self, x, self.up_dwc[1].weight, pw.weight, pw.bias, bn, scale_factor=self.scale_factor,
                                 mode=self.mode, shuffle_groups=self.shuffle_groups, activation=self.activation)


def _shuffle_upsample(module, x, dw_weight, pw_weight, pw_bias, bn, **config):
    """shuffle_upsample with ``bn``'s parameters and statistics; synchronised when ``module``
    asks for it under torch.distributed."""
    args = batch_norm_args(bn)
    if sync_active(module.process_group, module.sync, args["training"]):
        del args["training"]
        return sync_shuffle_upsample(x, dw_weight, pw_weight, pw_bias, bn.weight, bn.bias, **args, **config,
                                     process_group=module.process_group)
    return shuffle_upsample(x, dw_weight, pw_weight, pw_bias, bn.weight, bn.bias, **args, **config)


class EUCBStar(nn.Module):
    """U-ResNet's improved EUCB: upsample, then ``stages`` x (grouped 3x3 conv with
    ``groups`` groups (default C/4) -> BatchNorm -> activation -> channel shuffle), then a 1x1
    conv. Each stage is one fused op; only the first upsamples."""
    sync, process_group = False, None

    def __init__(self, in_channels: int, out_channels: int, scale_factor: int = 2, mode: str = "bilinear",
                 stages: int = 2, groups: int | None = None, activation="relu"):
        super().__init__()
        groups = in_channels // 4 if groups is None else groups
        if groups < 1 or in_channels % groups:
            raise ValueError(f"EUCBStar: in_channels ({in_channels}) must be divisible by groups ({groups}); "
                             "the default groups is in_channels // 4")
        if stages < 1:
            raise ValueError(f"EUCBStar: stages must be >= 1, got {stages}")
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=groups, bias=False),
                          nn.BatchNorm2d(in_channels), activation_module(activation))
            for _ in range(stages))
        self.pwc = nn.Conv2d(in_channels, out_channels, 1)
        self.scale_factor, self.mode, self.groups, self.activation = scale_factor, mode, groups, activation

    @classmethod
    def from_modules(cls, upsample: nn.Upsample, stages, pw: nn.Conv2d):
        """The fused module of an existing ``Upsample -> [Conv2d(3x3, groups=g) -> BatchNorm2d ->
        act -> channel_shuffle(g)] x n -> Conv2d(1x1)`` chain (``stages``: (conv, bn, act) per
        stage), sharing its modules. Configurations are assumed checked."""
        conv, bn, act = stages[0]
        activation = _activation_of(act) if act is not None else "none"
        with torch.device("meta"):
            module = cls(conv.in_channels, pw.out_channels, _scale_of(upsample), upsample.mode,
                         len(stages), conv.groups, activation)
        module.stages = nn.ModuleList(nn.Sequential(c, b, a if a is not None else nn.Identity()) for c, b, a in stages)
        module.pwc = pw
        shared = [m for stage in stages for m in stage if m is not None]
        return _set_mode(module, stages[0][0].training, upsample, pw, *shared)

    def fused_batch_norms(self) -> list:
        return [stage[1] for stage in self.stages]

    def plain(self) -> nn.Module:
        up = nn.Upsample(scale_factor=self.scale_factor, mode=self.mode)
        return _set_mode(_plain.PlainEUCBStar(up, self.stages, self.pwc, self.groups), self.training,
                         self.stages, self.pwc)

    def forward(self, x):
        last = len(self.stages) - 1
        for i, (conv, bn, _) in enumerate(self.stages):
            x = _shuffle_upsample(self, x, conv.weight, self.pwc.weight if i == last else None,
                                  self.pwc.bias if i == last else None, bn,
                                  scale_factor=self.scale_factor if i == 0 else 1,
                                  mode=self.mode if i == 0 else "nearest", shuffle_groups=self.groups,
                                  activation=self.activation)
        return x


def _branch_conv(in_channels, out_channels, kernel_size, dilation, bias):
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                     dilation=dilation, bias=bias)


def fused_conv_branches(x, convs: Sequence[nn.Conv2d], bns: Sequence[nn.BatchNorm2d] | None, activation,
                        sync: bool = False, process_group=None):
    """``cat([act(bn_i(conv_i(x)))])`` through one multi_dilation_conv2d: eval-mode
    BatchNorm is folded into the weights; batch-statistics BatchNorm runs on the whole output
    at once (it is per channel), fused with the activation, with the statistics of every
    process under torch.distributed when ``sync`` or ``process_group`` asks for it."""
    dilations = [c.dilation[0] for c in convs]
    weights, biases = [c.weight for c in convs], [c.bias for c in convs]
    if bns is None:
        return multi_dilation_conv2d(x, weights, dilations, biases, activation)
    if not any(bn.training or bn.running_mean is None for bn in bns):
        folded = [_fold_batch_norm(w, b, bn) for w, b, bn in zip(weights, biases, bns)]
        return multi_dilation_conv2d(x, [w for w, _ in folded], dilations, [b for _, b in folded], activation)
    y = multi_dilation_conv2d(x, weights, dilations, biases, "none")
    args = [batch_norm_args(bn) for bn in bns]
    configs = {(a["training"], a["momentum"], a["eps"], a["running_mean"] is None) for a in args}
    if len(configs) > 1:
        raise ValueError("fused_conv_branches: the branches' BatchNorms must share momentum, eps, mode and "
                         "track_running_stats")

    def cat(name):
        return None if args[0][name] is None else torch.cat([a[name] for a in args])
    params = [None if bns[0].weight is None else torch.cat([bn.weight for bn in bns]),
              None if bns[0].bias is None else torch.cat([bn.bias for bn in bns])]
    running_mean, running_var = cat("running_mean"), cat("running_var")
    if sync_active(process_group, sync, args[0]["training"]):
        out = sync_pixel_shuffle_bn(y, 1, *params, running_mean, running_var, args[0]["momentum"], args[0]["eps"],
                                    activation, process_group)
    else:
        out = pixel_shuffle_bn(y, 1, *params, running_mean, running_var, args[0]["training"], args[0]["momentum"],
                               args[0]["eps"], activation)
    if running_mean is not None and args[0]["training"]:  # write the updated statistics back
        with torch.no_grad():
            for a, m, v in zip(args, running_mean.split([bn.num_features for bn in bns]),
                               running_var.split([bn.num_features for bn in bns])):
                a["running_mean"].copy_(m)
                a["running_var"].copy_(v)
    return out


class MultiDilationConv2d(nn.Module):
    """Parallel dilated convolutions (with per-branch BatchNorm and activation) whose outputs
    are concatenated, as one op. ``branches[i]`` is ``Sequential(Conv2d, BatchNorm2d,
    activation)`` (no BatchNorm when ``norm=False``), so that plain layout's state dict loads."""
    sync, process_group = False, None

    def __init__(self, in_channels: int, out_channels_per_branch, kernel_sizes=(1, 3, 3, 3),
                 dilations=(1, 6, 12, 18), norm: bool = True, activation="relu"):
        super().__init__()
        if len(kernel_sizes) != len(dilations) or not dilations:
            raise ValueError("MultiDilationConv2d: kernel_sizes and dilations must be non-empty and of equal length, "
                             f"got {kernel_sizes} and {dilations}")
        widths = ([out_channels_per_branch] * len(dilations) if isinstance(out_channels_per_branch, int)
                  else list(out_channels_per_branch))
        if len(widths) != len(dilations):
            raise ValueError(f"MultiDilationConv2d: {len(widths)} branch widths for {len(dilations)} branches")
        self.branches = nn.ModuleList(
            nn.Sequential(_branch_conv(in_channels, c, k, d, bias=not norm),
                          *([nn.BatchNorm2d(c)] if norm else []), activation_module(activation))
            for c, k, d in zip(widths, kernel_sizes, dilations))
        self.norm, self.activation = norm, activation

    @classmethod
    def from_branches(cls, branches):
        """The fused module of existing parallel branches, each ``(conv, bn or None, act or
        None)`` (all with or all without BatchNorm, one activation for all), sharing their modules.
        Configurations are assumed checked (see :func:`uresnet_ops.fuse`)."""
        norm = branches[0][1] is not None
        act = branches[0][2]
        activation = _activation_of(act) if act is not None else "none"
        convs = [b[0] for b in branches]
        with torch.device("meta"):
            module = cls(convs[0].in_channels, [c.out_channels for c in convs], [c.kernel_size[0] for c in convs],
                         [c.dilation[0] for c in convs], norm, activation)
        module.branches = nn.ModuleList(
            nn.Sequential(conv, *([bn] if norm else []), a if a is not None else nn.Identity())
            for conv, bn, a in branches)
        return _set_mode(module, convs[0].training, *(m for b in branches for m in b if m is not None))

    def fused_batch_norms(self) -> list:
        return [b[1] for b in self.branches] if self.norm else []

    def plain(self) -> nn.Module:
        return _set_mode(_plain.PlainMultiDilationConv2d(self.branches), self.training, self.branches)

    def forward(self, x):
        return fused_conv_branches(x, [b[0] for b in self.branches], self.fused_batch_norms() or None, self.activation,
                                   self.sync, self.process_group)


class ASPP(nn.Module):
    """DeepLabV3's Atrous Spatial Pyramid Pooling with torchvision's layout (``convs``,
    ``project``), so ``torchvision.models.segmentation.deeplabv3.ASPP`` state dicts load.
    The 1x1 and dilated branches run as one multi_dilation_conv2d; the image-pooling branch is
    constant over space, so its part of the projection is added as a per-image bias instead of
    being concatenated. ``sync`` / ``process_group``: the branches' BatchNorm statistics in
    training, as for :class:`PixelShuffleBN` (the pooling and projection BatchNorms are plain
    modules, which the trainer makes SyncBatchNorm)."""
    sync, process_group = False, None

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256):
        super().__init__()

        def conv_bn_relu(k, d):
            return nn.Sequential(_branch_conv(in_channels, out_channels, k, d, bias=False),
                                 nn.BatchNorm2d(out_channels), nn.ReLU())

        self.convs = nn.ModuleList([conv_bn_relu(1, 1)] + [conv_bn_relu(3, d) for d in atrous_rates] + [
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                          nn.BatchNorm2d(out_channels), nn.ReLU())])
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(0.5))

    @classmethod
    def from_torchvision(cls, aspp):
        """The fused module of a ``torchvision.models.segmentation.deeplabv3.ASPP``, sharing its
        modules (state-dict keys stay the same). Its layout is assumed checked (see
        :func:`uresnet_ops.fuse`)."""
        convs = list(aspp.convs)
        return cls.from_parts([tuple(branch) for branch in convs[:-1]], list(convs[-1]), aspp.project)

    @classmethod
    def from_parts(cls, branches, pooling, project, pool_position: int | None = None):
        """The fused module of an ASPP found by its structure, sharing its modules: ``branches``
        ``(conv, bn or None, act or None)`` (one BatchNorm configuration and activation for all),
        ``pooling`` the modules computing the 1x1 image-pooling map (``AdaptiveAvgPool2d(1)``
        first), ``project`` the module after the concatenation (a ``Conv2d`` 1x1, or a Sequential
        starting with one), ``pool_position`` the pooling branch's place among the concatenated
        ones (default: last). Configurations are assumed checked (see :func:`uresnet_ops.fuse`)."""
        conv = branches[0][0]
        with torch.device("meta"):
            module = cls(conv.in_channels, [1], conv.out_channels)
        module.convs = nn.ModuleList([nn.Sequential(*(m for m in b if m is not None)) for b in branches]
                                     + [nn.Sequential(*pooling)])
        module.project = project if isinstance(project, nn.Sequential) else nn.Sequential(project)
        act = branches[0][2]
        module.activation = _activation_of(act) if act is not None else "none"
        module.norm = branches[0][1] is not None
        module.pool_position = len(branches) if pool_position is None else pool_position
        shared = [m for b in branches for m in b if m is not None] + list(pooling) + [project]
        return _set_mode(module, conv.training, *shared)

    activation, norm, pool_position = "relu", True, None  # what __init__ builds (None: last)

    def fused_batch_norms(self) -> list:
        return [b[1] for b in self.convs[:-1]] if self.norm else []

    def plain(self) -> nn.Module:
        position = len(self.convs) - 1 if self.pool_position is None else self.pool_position
        return _set_mode(_plain.PlainASPP(self.convs, self.project, position), self.training, self.convs, self.project)

    def forward(self, x):
        branches = self.convs[:-1]
        y = fused_conv_branches(x, [b[0] for b in branches], self.fused_batch_norms() or None, self.activation,
                                self.sync, self.process_group)
        pooled = self.convs[-1](x)  # (N, C_pool, 1, 1): constant over space once broadcast
        conv = self.project[0]
        position = len(branches) if self.pool_position is None else self.pool_position
        start = sum(b[0].out_channels for b in branches[:position])
        stop = start + pooled.shape[1]
        weight = conv.weight
        main = torch.cat([weight[:, :start], weight[:, stop:]], 1)  # the columns of the conv branches
        out = F.conv2d(y, main, conv.bias) + F.conv2d(pooled, weight[:, start:stop])
        return self.project[1:](out)


class AtrousBlock(nn.Module):
    """The Cross-Building-Segmentation atrous block: four parallel convolutions (kernel sizes
    1, 3, 3, 3; dilations 1, 6, 12, 18; ``out_channels // 2`` each) as one op, plus a 3x3
    stride-1 max-pool branch, concatenated, then BatchNorm -> 1x1 conv -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_sizes=(1, 3, 3, 3), dilations=(1, 6, 12, 18)):
        super().__init__()
        width = out_channels // 2
        self.branches = nn.ModuleList(_branch_conv(in_channels, width, k, d, bias=True)
                                      for k, d in zip(kernel_sizes, dilations))
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.bn_in = nn.BatchNorm2d(width * len(dilations) + in_channels)
        self.conv = nn.Conv2d(width * len(dilations) + in_channels, out_channels, 1)
        self.bn_out = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def plain(self) -> nn.Module:
        parts = (self.branches, self.pool, self.bn_in, self.conv, self.bn_out, self.act)
        return _set_mode(_plain.PlainAtrousBlock(*parts), self.training, *parts)

    def forward(self, x):
        y = fused_conv_branches(x, list(self.branches), None, "none")
        y = self.bn_in(torch.cat([y, self.pool(x)], dim=1))
        return self.act(self.bn_out(self.conv(y)))
