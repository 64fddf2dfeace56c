"""The ``uresnet_ops`` torch library: loads the compiled kernels and defines the public ops.

The native kernel ops (``_<op>_native``) are defined in csrc/ops.cpp; the public ops are
defined here, so they exist (running the reference and Triton backends) even where the
extension could not be built. Each public op's CPU and CUDA kernel is
:func:`uresnet_ops.backends.dispatch`.
"""
from __future__ import annotations

import warnings

import torch

from . import backends

try:
    from . import _C  # noqa: F401  (registers the native ops)
    HAS_EXTENSION = True
    HAS_CUDA_KERNELS = bool(_C.cuda_built())
except ImportError as error:
    HAS_EXTENSION = HAS_CUDA_KERNELS = False
    warnings.warn(f"uresnet_ops: compiled kernels not available ({error}); the 'cpu' and 'cuda' "
                  "backends are disabled and the reference/Triton backends run instead. "
                  "Rebuild with `pip install --no-build-isolation .` to get them.", RuntimeWarning)

LIB = torch.library.Library("uresnet_ops", "FRAGMENT")


def define_op(name: str, schema: str, device_arg: int = 0) -> None:
    """Define ``uresnet_ops::<name>`` and route its CPU/CUDA calls through the backend
    registry; ``device_arg`` is the index of the tensor argument that decides the device.
    ``name`` is ``<op>`` (forward) or ``<op>_backward``."""
    LIB.define(name + schema)
    op, phase = (name[: -len("_backward")], "backward") if name.endswith("_backward") else (name, "forward")

    def kernel(*args):
        device_type = args[device_arg].device.type
        if torch.is_autocast_enabled(device_type):
            # The front end already cast to the autocast dtype; the kernels see the final dtypes.
            with torch.autocast(device_type, enabled=False):
                return backends.dispatch(op, phase, device_type, args)
        return backends.dispatch(op, phase, device_type, args)

    for key in ("CPU", "CUDA"):
        LIB.impl(name, kernel, key)


def native_op(name: str):
    """``torch.ops.uresnet_ops._<name>_native``, or None when the extension lacks it."""
    if not HAS_EXTENSION:
        return None
    return getattr(torch.ops.uresnet_ops, f"_{name}_native", None)


def op_to_call(name: str):
    """What a front end calls for ``uresnet_ops::<name>``: the op, or, while ``torch.onnx.export``
    traces a module (either exporter), its decomposition into ATen ops
    (:data:`uresnet_ops.export.DECOMPOSITIONS`). The exporters have no ONNX translation for a
    custom op; traced this way the file gets standard operators and needs nothing of this package."""
    op = getattr(torch.ops.uresnet_ops, name)
    if torch.onnx.is_in_onnx_export():
        from .export import DECOMPOSITIONS  # here, not at the top: export.py needs the ops defined
        return DECOMPOSITIONS[op.default]
    return op


def register_autograd(name: str, backward, setup_context) -> None:
    """Autograd for ``uresnet_ops::<name>`` as ``torch.library.register_autograd`` makes it (an
    autograd.Function at the Autograd key; same ``backward`` and ``setup_context`` signatures),
    without its per-call ``fill_defaults``: that rebuilds the schema's argument list once per
    argument (pytorch/pytorch#195110), 32 us a call for pixel_shuffle_bn's 10 arguments and 75 us
    for shuffle_upsample's 15, more than the CPU kernels take at small shapes and more than the
    GPU ones at most. Our schemas have no defaults to fill. Only for ops without Tensor[]
    arguments: autograd.Function does not look inside lists."""
    op = getattr(torch.ops.uresnet_ops, name).default
    below_autograd = torch._C._after_autograd_keyset

    def redispatch(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below_autograd, *args)

    def forward(ctx, keyset, *args):
        output = redispatch(keyset, args)
        setup_context(ctx, args, output)
        return output

    def function_backward(ctx, *grads):
        return (None, *backward(ctx, *grads))  # no gradient for the keyset

    function = type(f"{name}_function", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(function_backward)})

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function.apply(keyset, *args)
        return redispatch(keyset, args)

    LIB.impl(name, kernel, "Autograd", with_keyset=True)
