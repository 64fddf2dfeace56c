"""Backend registry: which implementations of each op exist, and which one runs.

Every public op (``torch.ops.uresnet_ops.<op>`` and its ``<op>_backward``) is one torch op
whose CPU/CUDA kernel is :func:`dispatch`: it resolves a backend for the tensors' device and
calls it. Resolution order for an op on a device:

1. the innermost :func:`use_backend` context (for this op, then for all ops),
2. :func:`set_backend` (for this op, then for all ops),
3. the op's default order for the device (fastest first: measured on CPU, predicted from the
   kernels' machine code on CUDA until a GPU run measures it).

The name ``"auto"`` (in either place, or ``URESNET_BACKEND=auto`` in the environment) measures
instead: the first call of each key (op, device, and every argument's dtype, shape and layout,
and the non-tensor arguments such as ``training``) times the forward of every backend that runs
on the device and accepts the call, and the fastest runs that key from then on (the choice is
kept for the process; :func:`auto_choices` lists it). Timing runs on copies of the arguments the
op writes (running statistics), so they change nothing. While ``torch.compile`` traces or a CUDA
graph captures, no timing happens: a key already measured keeps its choice, any other key takes
the default order.

A selected backend that does not run on the device (``"triton"`` for a CPU tensor, say) is
passed over for that device, so ``set_backend("triton")`` does not break CPU code. A backend
function may return ``NotImplemented`` for an argument combination it does not cover; the next
backend in the default order then runs. A selected backend that is not available here (built
without a compiler, Triton missing) degrades to the default order with one warning.

A measured dispatch policy is declared with the backend: ``register_backend(..., declines=pred)``
passes the calls for which ``pred(*args)`` holds to the next backend of the default order, but
only when the default order reached it; asked for by name (or measured fastest by ``"auto"``)
it runs them. multi_dilation_conv2d's "cpu" backend declines channels_last input that way
(oneDNN's convolutions, in the reference backend, measured faster there).

The hot path: where the compiled extension registers an op's public CPU/CUDA kernels and its
autograd in C++ (csrc/routing.h), the choice above is resolved once per (op, device) whenever
it changes and written to the extension's routing table; a call whose choice is a compiled
kernel then runs it with no Python in between, any other goes to this module. A use_backend
block sends its thread's calls here while it lasts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import warnings
from typing import Callable, Iterator

import torch

from .timing import measure

OPS = ("pixel_shuffle_bn", "shuffle_upsample", "multi_dilation_conv2d")
_DEVICES = ("cpu", "cuda")  # csrc/routing.h's device index
_PHASES = ("forward", "backward")
AUTO = "auto"  # the pseudo-backend that measures (see the module docstring)
AUTO_RUNS = 3  # timed forward calls per backend, after one warm-up call (JIT compile, autotune)

# The default order per device type, fastest first. CPU: measured (benchmarks/results/cpu.md).
# CUDA: predicted from each backend's machine code until a GPU run measures it (docs/roofline.md,
# whose --check keeps this in step; the CUDA kernels miss design needs, so they are not first).
DEFAULT_ORDER: dict[str, dict[str, list[str]]] = {
    "pixel_shuffle_bn": {"cpu": ["cpu", "reference"], "cuda": ["triton", "cuda", "reference"]},
    "shuffle_upsample": {"cpu": ["cpu", "reference"], "cuda": ["triton", "cuda", "reference"]},
    "multi_dilation_conv2d": {"cpu": ["cpu", "reference"], "cuda": ["triton", "reference", "cuda"]},
}


@dataclasses.dataclass
class Backend:
    name: str
    device_types: frozenset[str]
    forward: Callable
    backward: Callable | None = None
    # False when the backend is registered but cannot run here (extension or Triton missing).
    available: bool = True
    # (*forward args) -> bool: forward calls passed on unless the backend was asked for by name.
    declines: Callable | None = None
    # True for the compiled kernel ops themselves (register_native_backends), which the C++ hot
    # path runs without this module when they are the choice.
    compiled: bool = False


_registry: dict[str, dict[str, Backend]] = {op: {} for op in OPS}
_selected: dict[str | None, str] = {}  # op (None = every op) -> backend name
# Per thread: .stack, the (op or None, name) of the open use_backend blocks; .ran, (op, phase) ->
# the backend this module last ran (uresnet_ops/_library.py's autograd reads it for its backward).
_local = threading.local()
_warned: set[tuple[str, str]] = set()
_auto_cache: dict[tuple, str] = {}  # call key (see _call_key) -> the backend "auto" measured fastest
# (op, device, phase, chosen) -> _resolve's (candidates, chosen-but-unavailable), until a registration
_orders: dict[tuple, tuple[tuple[Backend, ...], bool]] = {}
_native = None  # the extension's routing functions (uresnet_ops._C), when it routes any op
_routed: set[str] = set()  # the ops whose public kernels are compiled (the C++ hot path)


class Route:  # csrc/routing.h's Route
    PYTHON, NATIVE, NATIVE_UNLESS_CHANNELS_LAST = 0, 1, 2


def declines_channels_last(x, *args) -> bool:
    """A ``declines`` policy: channels_last input (the hot path knows it too)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def register_backend(op: str, name: str, device_type, forward: Callable,
                     backward: Callable | None = None, *, available: bool = True,
                     declines: Callable | None = None) -> None:
    """Plug in an implementation of ``op`` called ``name`` for ``device_type`` ("cpu", "cuda",
    or a list of them).

    ``forward`` (and ``backward``) take exactly the arguments of ``torch.ops.uresnet_ops.<op>``
    (and ``<op>_backward``) and return what those return. Without ``backward``, the backward
    pass uses the next backend of the default order that has one. Registering a name again
    replaces it. ``available=False`` registers a backend that cannot run here (listed by
    name, skipped with a warning when selected). ``declines``, a predicate on the forward's
    arguments, is a measured dispatch policy: the calls it is true for go to the next backend
    of the default order, unless this backend was asked for by name (module docstring).
    """
    _check_op(op)
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_backend: 'name' must be a non-empty string, got {name!r}")
    if not callable(forward):
        raise TypeError(f"register_backend: 'forward' must be callable, got {type(forward).__name__}")
    for arg, value in (("backward", backward), ("declines", declines)):
        if value is not None and not callable(value):
            raise TypeError(f"register_backend: {arg!r} must be callable or None, got {type(value).__name__}")
    types = (device_type,) if isinstance(device_type, str) else tuple(device_type)
    if not types or not all(t in ("cpu", "cuda") for t in types):
        raise ValueError(f"register_backend: 'device_type' must be 'cpu', 'cuda' or a list of them, "
                         f"got {device_type!r}")
    _registry[op][name] = Backend(name, frozenset(types), forward, backward, available, declines)
    _orders.clear()
    _update_routes()


def unregister_backend(op: str, name: str) -> None:
    """Remove backend ``name`` of ``op`` (a plugin's, say); the choice is resolved again."""
    del _registry[_check_op(op)][name]
    _orders.clear()
    _update_routes()


def mark_compiled(op: str, name: str) -> None:
    """Record that backend ``name`` of ``op`` is the compiled kernel op pair itself, which the
    extension's C++ kernels run directly when ``routed`` (the public op's kernels are compiled)."""
    _registry[_check_op(op)][name].compiled = True
    _update_routes()


def enable_routing(extension, ops) -> None:
    """Hand the choice of ``ops`` to ``extension``'s routing table (csrc/routing.h) from now on."""
    global _native
    _native = extension
    _routed.update(ops)
    _update_routes()


def available_backends(op: str | None = None) -> list[str]:
    """Names of the backends built and importable here, for ``op`` or for any op."""
    ops = OPS if op is None else (_check_op(op),)
    names = []
    for o in ops:
        names += [b.name for b in _registry[o].values() if b.available and b.name not in names]
    return names


def set_backend(name: str | None, op: str | None = None) -> None:
    """Make ``name`` the default backend (for ``op``, or for every op); ``None`` resets;
    ``"auto"`` measures (see the module docstring)."""
    _check_name(name, op)
    if name is None:
        _selected.pop(op, None)
    else:
        _selected[op] = name
    _update_routes()


def set_backend_from_environment() -> None:
    """``set_backend(os.environ["URESNET_BACKEND"])`` when that variable is set and not empty."""
    name = os.environ.get("URESNET_BACKEND", "")
    if not name:
        return
    try:
        set_backend(name)
    except ValueError as error:
        raise ValueError(f"environment variable URESNET_BACKEND: {error}") from None


@contextlib.contextmanager
def use_backend(name: str, op: str | None = None) -> Iterator[None]:
    """Within the block, run ``op`` (or every op) with backend ``name``."""
    _check_name(name, op)
    stack = _stack()
    stack.append((op, name))
    if _native is not None:
        _native.open_use_backend(1)
    try:
        yield
    finally:
        stack.pop()
        if _native is not None:
            _native.open_use_backend(-1)


def get_backend(op: str, device_type: str, phase: str = "forward") -> Backend:
    """The backend that would run ``op`` for tensors on ``device_type`` right now (under
    ``"auto"``, whose choice depends on the call, the default order's first; a backend's
    ``declines`` policy and a returned ``NotImplemented`` depend on the call too:
    :func:`last_used` says what ran; for meta tensors, the reference: it only computes shapes)."""
    backend = next(iter(_candidates(_check_op(op), device_type, phase, _chosen_name(op))), None)
    if backend is None and device_type == "meta":
        backend = _registry[op].get("reference")
    if backend is None:
        raise RuntimeError(f"uresnet_ops.{op}: no backend runs the {phase} on {device_type!r} tensors")
    return backend


def last_used(op: str, phase: str = "forward") -> str | None:
    """The backend that ran the last ``phase`` of ``op`` in this thread (the one that did not
    decline): for tests and debugging."""
    ran = _ran().get((_check_op(op), phase))
    if op in _routed:  # or the compiled kernel, if the hot path ran it since
        ran = _native.native_run(OPS.index(op), _PHASES.index(phase), 0) or ran
    return ran


def forget_last_used(op: str, phase: str) -> None:
    """Clear :func:`last_used` for this thread (before a call whose backend is to be known)."""
    _ran().pop((op, phase), None)
    if op in _routed:
        _native.native_run(OPS.index(op), _PHASES.index(phase), 1)


def auto_choices() -> dict[tuple, str]:
    """What ``"auto"`` chose so far: call key -> backend name (a copy)."""
    return dict(_auto_cache)


def clear_auto_choices() -> None:
    """Forget what ``"auto"`` measured (the next call of each key measures again)."""
    _auto_cache.clear()


def dispatch(op: str, phase: str, device_type: str, args: tuple):
    """Run ``op``'s ``phase`` ("forward" or "backward") with the resolved backend."""
    chosen = _chosen_name(op)
    if phase == "forward" and chosen == AUTO:
        fastest = _auto_pick(op, device_type, args)
        if fastest is not None:
            with use_backend(fastest, op):  # as if asked for by name: it does not decline
                return dispatch(op, phase, device_type, args)
    for backend in _candidates(op, device_type, phase, chosen):
        if phase == "forward" and backend.declines is not None and backend.name != chosen and backend.declines(*args):
            continue
        result = getattr(backend, phase)(*args)
        if result is not NotImplemented:
            forget_last_used(op, phase)
            _ran()[(op, phase)] = backend.name
            return result
    raise RuntimeError(f"uresnet_ops.{op}: no backend could run this {phase} on {device_type}")


def _candidates(op: str, device_type: str, phase: str, chosen: str | None, warn: bool = True) -> tuple[Backend, ...]:
    """The backends that may run the call, in order (resolved once per key, until a registration);
    ``warn``: once per op, that the chosen backend is not available here."""
    key = (op, device_type, phase, chosen)
    if key not in _orders:
        _orders[key] = _resolve(op, device_type, phase, chosen)
    candidates, unavailable = _orders[key]
    if warn and unavailable and (op, chosen) not in _warned:
        _warned.add((op, chosen))
        order = DEFAULT_ORDER[op].get(device_type, ["reference"])
        warnings.warn(f"uresnet_ops: backend {chosen!r} is not available here for {op}; "
                      f"falling back to {order}", RuntimeWarning, stacklevel=4)
    return candidates


def _resolve(op: str, device_type: str, phase: str, chosen: str | None) -> tuple[tuple[Backend, ...], bool]:
    """(the candidates, whether the chosen backend runs on the device but is not available)."""
    backends = _registry[op]
    if chosen == AUTO:
        chosen = None  # not measured for this call: the default order
    order = DEFAULT_ORDER[op].get(device_type, ["reference"])
    names = ([chosen] if chosen else []) + [n for n in order if n != chosen]
    candidates, unavailable = [], False
    for name in names:
        backend = backends.get(name)
        if backend is None or device_type not in backend.device_types:
            continue
        if not backend.available:
            unavailable = unavailable or name == chosen
            continue
        if getattr(backend, phase) is not None:
            candidates.append(backend)
    return tuple(candidates), unavailable


def _update_routes() -> None:
    """Write the process-wide choice of every routed op and device to the routing table."""
    for op in _routed:
        for index, device_type in enumerate(_DEVICES):
            _native.set_route(OPS.index(op), index, _route(op, device_type))


def _route(op: str, device_type: str) -> int:
    chosen = _global_choice(op)
    if chosen == AUTO:
        return Route.PYTHON
    first = {phase: next(iter(_candidates(op, device_type, phase, chosen, warn=False)), None) for phase in _PHASES}
    backend = first["forward"]
    if backend is None or not backend.compiled or first["backward"] is not backend:
        return Route.PYTHON
    if backend.declines is None or backend.name == chosen:
        return Route.NATIVE
    return Route.NATIVE_UNLESS_CHANNELS_LAST if backend.declines is declines_channels_last else Route.PYTHON


def _auto_pick(op: str, device_type: str, args: tuple) -> str | None:
    """The backend "auto" runs for this call: measured on the key's first call, cached after."""
    key = _call_key(op, device_type, args)
    if key in _auto_cache:
        return _auto_cache[key]
    if torch.compiler.is_compiling() or (device_type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return None  # no timing while tracing or capturing: the default order
    timings = {}
    for backend in _candidates(op, device_type, "forward", AUTO):
        seconds = _time_forward(op, backend, device_type, args)
        if seconds is not None:
            timings[backend.name] = seconds
    if not timings:
        return None
    _auto_cache[key] = min(timings, key=timings.get)
    return _auto_cache[key]


def _time_forward(op: str, backend: Backend, device_type: str, args: tuple) -> float | None:
    """Median seconds of ``backend``'s forward on ``args``, or None when it declines. The
    arguments the op writes are copied, so the caller's running statistics stay as they were."""
    written = _written_args(op)
    call_args = tuple(a.clone() if i in written and isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
    # Called directly, as if asked for by name: a backend's ``declines`` policy does not apply.
    if backend.forward(*call_args) is NotImplemented:  # the warm-up: compiles, autotunes
        return None
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), device_type)
    return measure(lambda: backend.forward(*call_args), device=device, warmup=0, reps=AUTO_RUNS)["median_s"]


def _call_key(op: str, device_type: str, args: tuple) -> tuple:
    def describe(a):
        if isinstance(a, torch.Tensor):
            layout = ("channels_last" if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last)
                      and not a.is_contiguous() else "contiguous" if a.is_contiguous() else "strided")
            return (a.dtype, tuple(a.shape), layout, a.device.index)
        if isinstance(a, (list, tuple)):
            return tuple(describe(b) for b in a)
        return a
    return (op, device_type, *(describe(a) for a in args))


def _written_args(op: str) -> set[int]:
    schema = getattr(torch.ops.uresnet_ops, op).default._schema
    return {i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write}


def _chosen_name(op: str) -> str | None:
    """The backend chosen for ``op`` in this thread: its innermost use_backend block, else the global choice."""
    for scope in (op, None):
        for s, name in reversed(_stack()):
            if s == scope:
                return name
    return _global_choice(op)


def _global_choice(op: str) -> str | None:
    """The process-wide choice for ``op`` (set_backend; the routing table's): its own, else every op's."""
    return _selected.get(op) or _selected.get(None)


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _ran() -> dict:
    if not hasattr(_local, "ran"):
        _local.ran = {}
    return _local.ran


def _check_op(op) -> str:
    if op not in _registry:
        raise ValueError(f"uresnet_ops: unknown op {op!r}; expected one of {list(OPS)}")
    return op


def _check_name(name, op) -> None:
    if op is not None:
        _check_op(op)
    if name is None or name == AUTO:
        return
    known = {n for o in ([op] if op else OPS) for n in _registry[o]}
    if name not in known:
        raise ValueError(f"uresnet_ops: unknown backend {name!r}"
                         f"{' for ' + op if op else ''}; registered: {sorted(known)}, or {AUTO!r}")
