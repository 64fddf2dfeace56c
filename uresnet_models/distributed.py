"""Training under ``torchrun`` (DDP; the batch size is per process): the process group, the
model's BatchNorms synchronised, and the DDP wrapper.

BatchNorm is synchronised: the fused modules (``PixelShuffleBN``, ``EUCB``, ``EUCBStar``,
``MultiDilationConv2d``, ``ASPP``) get ``sync=True`` (the fused ops' own sync path, for the
BatchNorms they run), every other plain ``BatchNorm2d`` becomes ``SyncBatchNorm`` on GPUs
(timm's converter, which also knows timm's norm+act layers) and, on CPU where
``torch.nn.SyncBatchNorm`` refuses to run, ``PixelShuffleBN`` with factor 1 (the same module,
state dict unchanged).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """This process's place: rank, number of processes, device."""
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Dist:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on GPUs,
    gloo on CPU; each process takes the GPU of its ``LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if world <= 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(),
                torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu"))


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm use the statistics of the whole distributed batch (see the module doc)."""
    from uresnet_ops.nn import PixelShuffleBN
    fused_bns = set()  # the BatchNorms a fused op runs itself: its ``sync`` synchronises them
    for m in model.modules():
        if isinstance(m, PixelShuffleBN) or hasattr(m, "fused_batch_norms"):
            m.sync = True
            fused_bns.update(id(bn) for bn in getattr(m, "fused_batch_norms", list)())
    if device.type != "cpu":
        from timm.layers import convert_sync_batchnorm as convert
    else:
        convert = _cpu_sync_batchnorm
    return _convert_batchnorms(model, fused_bns, convert)


def _convert_batchnorms(module: nn.Module, keep: set, convert: Callable) -> nn.Module:
    """``convert(module)``, leaving the BatchNorms whose ids are in ``keep`` as they are."""
    if id(module) in keep:
        return module
    if not any(id(m) in keep for m in module.modules()):
        return convert(module)
    for name, child in module.named_children():
        module._modules[name] = _convert_batchnorms(child, keep, convert)
    return module


def _cpu_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Plain ``BatchNorm2d`` -> ``PixelShuffleBN`` with factor 1 and ``sync=True`` (same state dict)."""
    from uresnet_ops.nn import PixelShuffleBN
    if type(module) is nn.BatchNorm2d:  # subclasses (norm+act layers) keep local statistics
        fused = PixelShuffleBN.from_modules(nn.PixelShuffle(1), module)
        fused.sync = True
        return fused
    for name, child in module.named_children():
        module._modules[name] = _cpu_sync_batchnorm(child)
    return module


def unused_parameters(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the trainable parameters that a forward and backward on ``example`` leave
    without a gradient (an encoder of which only some features are used: hrnet under
    uresnet_cls). Run in eval mode, so no running statistic moves; gradients are cleared after."""
    was_training = model.training
    model.eval()
    try:
        out = model(example)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        sum(o.float().sum() for o in outs).backward()
        return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def distributed_model(model: nn.Module, device: torch.device, example: torch.Tensor, say=print):
    """``model`` in DistributedDataParallel, told to look for unused parameters only where it
    has some (that search costs a graph traversal every step)."""
    unused = unused_parameters(model, example)
    if unused:
        say(f"{len(unused)} parameter(s) get no gradient (e.g. {unused[0]}): DDP looks for unused parameters")
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=bool(unused))
