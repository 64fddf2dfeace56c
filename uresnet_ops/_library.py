"""The ``uresnet_ops`` torch library: loads the compiled kernels and defines the public ops.

The native kernel ops (``_<op>_native``) are defined in csrc/ops.cpp; the public ops are
defined here, so they exist (running the reference and Triton backends) even where the
extension could not be built. Each public op's CPU and CUDA kernel is
:func:`uresnet_ops.backends.dispatch`. Every op file registers its pieces with the helpers here:
:func:`define_op` (schema), :func:`register_autograd` (autograd), :func:`register_native_backends`
(the "cpu" and "cuda" backends).
"""
from __future__ import annotations

import warnings

import torch

from . import backends

try:
    from . import _C  # registers the native ops
    HAS_EXTENSION = True
    HAS_CUDA_KERNELS = bool(_C.cuda_built())
except ImportError as error:
    HAS_EXTENSION = HAS_CUDA_KERNELS = False
    warnings.warn(f"uresnet_ops: compiled kernels not available ({error}); the 'cpu' and 'cuda' "
                  "backends are disabled and the reference/Triton backends run instead. "
                  "Rebuild with `pip install --no-build-isolation .` to get them.", RuntimeWarning, stacklevel=2)

LIB = torch.library.Library("uresnet_ops", "FRAGMENT")
if HAS_EXTENSION:  # csrc/running_stats.cpp: it writes its first two arguments and returns nothing
    torch.library.register_fake("uresnet_ops::_update_running_stats", lib=LIB)(lambda *args: None)
_OVERLOADS: dict[str, torch._ops.OpOverload] = {}  # op_to_call's cache
_COMPILED: set[str] = set()  # the public ops whose CPU/CUDA kernels and autograd the extension registers


def define_op(name: str, schema: str, device_arg: int = 0) -> None:
    """Define ``uresnet_ops::<name>`` and route its CPU/CUDA calls through the backend
    registry; ``device_arg`` is the index of the tensor argument that decides the device.
    ``name`` is ``<op>`` (forward) or ``<op>_backward``.

    Where the extension compiled the op's public CPU/CUDA kernels (the C++ hot path,
    csrc/routing.h), they run the compiled kernel when it is the choice and otherwise call
    ``uresnet_ops::_<name>_python``, defined here with the same schema: the backend registry's
    kernels, autograd and fake kernel go on that twin."""
    LIB.define(name + schema)
    op, phase = (name[: -len("_backward")], "backward") if name.endswith("_backward") else (name, "forward")
    if HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(f"uresnet_ops::{name}", "CPU"):
        _COMPILED.add(name)
        LIB.define(python_twin(name) + schema)
        if phase == "forward":
            backends.enable_routing(_C, [op])

    def kernel(*args):
        device_type = args[device_arg].device.type
        if torch.is_autocast_enabled(device_type):
            # The front end already cast to the autocast dtype; the kernels see the final dtypes.
            with torch.autocast(device_type, enabled=False):
                return backends.dispatch(op, phase, device_type, args)
        return backends.dispatch(op, phase, device_type, args)

    for key in ("CPU", "CUDA"):
        LIB.impl(python_side(name), kernel, key)


def compiled_kernels(name: str) -> bool:
    """Whether the extension compiled ``uresnet_ops::<name>``'s public kernels (the hot path)."""
    return name in _COMPILED


def python_twin(name: str) -> str:
    return f"_{name}_python"


def python_side(name: str) -> str:
    """The op that carries ``name``'s Python kernels and autograd: the op, or its twin."""
    return python_twin(name) if compiled_kernels(name) else name


def register_fake(name: str, *also: str):
    """Decorator: the fake kernel of ``uresnet_ops::<name>``, its Python twin and the ops in
    ``also`` (kernel ops with the same schema, called by the compiled autograd)."""
    def decorate(fn):
        for target in {name, python_side(name), *(a for a in also if hasattr(torch.ops.uresnet_ops, a))}:
            torch.library.register_fake(f"uresnet_ops::{target}", lib=LIB)(fn)
        return fn
    return decorate


def native_op(name: str):
    """``torch.ops.uresnet_ops._<name>_native``, or None when the extension lacks it."""
    if not HAS_EXTENSION:
        return None
    return getattr(torch.ops.uresnet_ops, f"_{name}_native", None)


def op_to_call(name: str):
    """What a front end calls for ``uresnet_ops::<name>``: the op (its default overload: one
    Python layer less than the packet), or, while ``torch.onnx.export`` traces a module (either
    exporter), its decomposition into ATen ops (:data:`uresnet_ops.export.DECOMPOSITIONS`). The
    exporters have no ONNX translation for a custom op; traced this way the file gets standard
    operators and needs nothing of this package."""
    op = _OVERLOADS.get(name) or _OVERLOADS.setdefault(name, getattr(torch.ops.uresnet_ops, name).default)
    if torch.onnx.is_in_onnx_export():
        from .export import DECOMPOSITIONS  # here, not at the top: export.py needs the ops defined
        return DECOMPOSITIONS[op]
    return op


def register_native_backends(op: str, *, declines=None) -> None:
    """Register ``op``'s "cpu" and "cuda" backends: the compiled ops
    ``torch.ops.uresnet_ops._<op>_native`` and ``_<op>_native_backward`` (csrc/ops.cpp), whose
    schemas are the op's and its backward's. Both are registered in every build, so that they can
    be named; they are available where the extension has both ops, "cuda" where they also have
    CUDA kernels. ``declines`` maps a device type to its backend's measured dispatch policy
    (``declines`` of :func:`uresnet_ops.backends.register_backend`).
    """
    forward = native_op(op)
    backward = None if forward is None else getattr(torch.ops.uresnet_ops, f"_{op}_native_backward", None)
    for device_type in ("cpu", "cuda"):
        if backward is None:
            functions, available = (_not_built, _not_built), False
        else:
            functions = (forward, backward)
            available = device_type == "cpu" or torch._C._dispatch_has_kernel_for_dispatch_key(
                forward.default.name(), "CUDA")
        backends.register_backend(op, device_type, device_type, *functions, available=available,
                                  declines=(declines or {}).get(device_type))
        if available:
            backends.mark_compiled(op, device_type)


def _not_built(*args):
    raise RuntimeError("uresnet_ops: the compiled kernels are not built")  # registered unavailable: never runs


def register_autograd(name: str, backward, setup_context) -> None:
    """Autograd for ``uresnet_ops::<name>``, the one mechanism of every op: what
    ``torch.library.register_autograd`` makes (an autograd.Function at the Autograd key; the same
    ``backward`` and ``setup_context`` signatures: ``setup_context(ctx, inputs, output)`` gets the
    op's arguments, ``backward(ctx, *grads)`` returns one gradient per argument, a list of them
    for a ``Tensor[]`` argument), without its per-call ``fill_defaults``: that rebuilds the
    schema's argument list once per argument (pytorch/pytorch#195110), 32 us a call for
    pixel_shuffle_bn's 10 arguments and 75 us for shuffle_upsample's 15, more than the CPU kernels
    take at small shapes and more than the GPU ones at most. Our schemas have no defaults to fill.

    autograd.Function tracks only the tensors among its positional arguments, not those inside
    lists: each ``Tensor[]`` argument's tensors are passed to it one by one in the list's place,
    the list is rebuilt for the op and ``setup_context``, and ``backward``'s list of gradients is
    spread back the same way.
    """
    public, name = name, python_side(name)
    op = getattr(torch.ops.uresnet_ops, name).default
    arity = len(op._schema.arguments)
    positions = tuple(i for i, a in enumerate(op._schema.arguments)
                      if a.type.isSubtypeOf(torch._C.ListType.ofTensors()))
    lists = frozenset(positions)
    below_autograd = torch._C._after_autograd_keyset

    def spread(values, lengths):
        """``values`` (one per argument) with each Tensor[] argument's entries in its place (for a
        gradient of None, one None per tensor)."""
        if not lists:
            return values
        flat, sizes = [], iter(lengths)
        for i, value in enumerate(values):
            if i in lists:
                n = next(sizes)
                flat += [None] * n if value is None else value
            else:
                flat.append(value)
        return flat

    def gather(flat, lengths):
        """The inverse of ``spread``: the arguments, with their lists."""
        if not lists:
            return flat
        args, sizes, k = [], iter(lengths), 0
        for i in range(arity):
            n = next(sizes) if i in lists else None
            args.append(list(flat[k:k + n]) if n is not None else flat[k])
            k += 1 if n is None else n
        return tuple(args)

    def redispatch(keyset, args):
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below_autograd, *args)

    def forward(ctx, keyset, lengths, *flat):
        args = gather(flat, lengths)
        backends.forget_last_used(public, "forward")  # setup_context reads which backend this call ran
        output = redispatch(keyset, args)
        setup_context(ctx, args, output)
        ctx.list_lengths = lengths
        return output

    def function_backward(ctx, *grads):
        return (None, None, *spread(backward(ctx, *grads), ctx.list_lengths))  # none for keyset, lengths

    function = type(f"{name}_function", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(function_backward)})

    def kernel(keyset, *args):
        if torch.is_grad_enabled():
            lengths = tuple(len(args[i]) for i in positions)
            flat = spread(args, lengths)
            if any(isinstance(a, torch.Tensor) and a.requires_grad for a in flat):
                return function.apply(keyset, lengths, *flat)
        return redispatch(keyset, args)

    LIB.impl(name, kernel, "Autograd", with_keyset=True)
