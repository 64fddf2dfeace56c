"""Deployment: the fused ops written as standard ATen ops, for ONNX, torch.export and AOTInductor.

The ops of this package are defined in Python (``torch.library``), so a program that calls
them, an ``ExportedProgram`` saved with ``torch.export.save`` included, needs ``import
uresnet_ops`` to load and run, and an AOTInductor package or an ONNX file cannot contain them.
Each op is therefore given a decomposition: its reference chain (:mod:`uresnet_ops.reference`)
in ATen ops, which computes what the op computes, in training (batch statistics) and in eval
(running statistics).

* ONNX: ``torch.onnx.export(model.eval(), (x,), dynamo=True)`` (and the TorchScript-based
  ``dynamo=False`` where torch still has it) writes standard ONNX operators only
  (BatchNormalization with running statistics, DepthToSpace, Resize, Conv, ...): while an ONNX
  exporter traces, each op's front end calls its decomposition instead of the op
  (:func:`uresnet_ops._library.op_to_call`). :func:`export_onnx` is that call with dynamic
  shapes and a file.
* torch.export: the program keeps the fused ops; :func:`to_aten` lowers it, and the result needs
  nothing of this package (``torch.export.save``, AOTInductor, ``torch.onnx.export(program)``)::

    program = torch.export.export(model.eval(), (x,), dynamic_shapes=...)
    program = uresnet_ops.export.to_aten(program)
    torch._inductor.aoti_compile_and_package(program, package_path="model.pt2")

The decompositions are not put into torch's global decomposition table: inductor then refuses
to compile the ops when the environment variable CI is set ("make_fallback(...): a
decomposition exists"), so torch.compile of any model with a fused op would fail in users' CI.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from ._common import apply_activation, batch_norm_forward

__all__ = ["DECOMPOSITIONS", "decompositions", "to_aten", "export_onnx"]

_ops = torch.ops.uresnet_ops


def _pixel_shuffle_bn(x, upscale_factor, weight, bias, running_mean, running_var, training, eps,
                      activation, negative_slope):
    y, mean, var = batch_norm_forward(F.pixel_shuffle(x, upscale_factor), weight, bias, running_mean,
                                      running_var, training, eps)
    return apply_activation(y, activation, negative_slope), mean, var


def _shuffle_upsample(x, dw_weight, pw_weight, pw_bias, bn_weight, bn_bias, running_mean, running_var,
                      training, eps, scale_factor, mode, shuffle_groups, activation, negative_slope):
    y, mean, var = batch_norm_forward(reference.upsample_conv3x3(x, dw_weight, scale_factor, mode), bn_weight,
                                      bn_bias, running_mean, running_var, training, eps)
    y = apply_activation(y, activation, negative_slope)
    if shuffle_groups > 1:  # one group is the identity; views, as the legacy ONNX exporter lacks channel_shuffle
        y = y.unflatten(1, (shuffle_groups, -1)).transpose(1, 2).flatten(1, 2)
    return (y if pw_weight is None else F.conv2d(y, pw_weight, pw_bias)), mean, var


def _multi_dilation_conv2d(x, weights, dilations, biases, activation, negative_slope):
    return reference.multi_dilation_conv2d(x, weights, dilations, biases or None, (activation, negative_slope))


#: op overload -> its decomposition into ATen ops (the schemas' arguments, the ops' outputs).
DECOMPOSITIONS = {
    _ops.pixel_shuffle_bn.default: _pixel_shuffle_bn,
    _ops.shuffle_upsample.default: _shuffle_upsample,
    _ops.multi_dilation_conv2d.default: _multi_dilation_conv2d,
}


def decompositions():
    """``torch.export.default_decompositions()`` (everything to core ATen) with this package's
    ops added: the table for ``ExportedProgram.run_decompositions``."""
    table = torch.export.default_decompositions()
    for op, fn in DECOMPOSITIONS.items():
        table[op] = fn
    return table


def to_aten(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` lowered to core ATen, this package's ops included: it loads and runs
    (``torch.export.load``, AOTInductor, ONNX) without uresnet_ops."""
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"to_aten: expected a torch.export.ExportedProgram, got {type(program).__name__}")
    return program.run_decompositions(decompositions())


def export_onnx(module: torch.nn.Module, args: tuple, path=None, *, dynamic_shapes=None, **kwargs):
    """``torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes, **kwargs)``
    (put ``module`` in eval mode first): standard ONNX operators only. Returns the
    ``ONNXProgram``, saved to ``path`` when one is given."""
    onnx_program = torch.onnx.export(module, tuple(args), dynamo=True, dynamic_shapes=dynamic_shapes,
                                     verbose=False, **kwargs)
    if path is not None:
        onnx_program.save(str(path))
    return onnx_program
