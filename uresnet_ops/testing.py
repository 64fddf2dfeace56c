"""The op harness: sample inputs for each op, the ways to call it, one step of each mode.

One place builds the inputs of every fused op, for the tests, the benchmarks
(``benchmarks/cases.py``), ``scripts/run_each_kernel.py`` and the ``uresnet bench`` / ``demo``
commands. It is public and needs no pytest::

    from uresnet_ops import testing

    sample = testing.sample_inputs("pixel_shuffle_bn", "cpu", torch.float32, shape=(2, 16, 6, 6),
                                   upscale_factor=2, training=True, requires_grad=True)
    out = sample.call()  # uresnet_ops.pixel_shuffle_bn(*sample.args, **sample.kwargs)
    ours = testing.run_sample(sample.clone(), "cpu")  # output, gradients, running statistics, what ran
    ref = testing.run_sample(sample.clone(torch.float64), testing.EAGER, grad_out=ours.grad_out)

Names of implementations (the ``impl`` arguments below):

* a backend name (``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``, ``"auto"``, a plugin):
  the public op ``uresnet_ops.<op>`` inside ``use_backend(impl, op)``. The backend
  ``"reference"`` runs the reference chain behind the op's dispatcher and autograd formula;
* ``DEFAULT`` (``"default"``): the public op with whatever backend is selected;
* ``EAGER`` (``"eager"``): the ground truth, :mod:`uresnet_ops.reference` (the op's chain of
  plain ``torch.nn.functional`` calls, docs/design.md §3), called directly in eager mode, with
  torch's own autograd; the baseline the benchmarks compare against (``×eager``);
* ``COMPILED`` (``"compiled"``): ``torch.compile`` of that chain, the other baseline.

Modes (:data:`MODES`): ``eval_fwd`` (running statistics, no autograd), ``train_fwd`` (batch
statistics, running statistics updated, no autograd), ``train_fwdbwd`` (``train_fwd`` and
``torch.autograd.grad`` to every input that takes a gradient). An op without BatchNorm
(``multi_dilation_conv2d``) has no ``train_fwd``: see :func:`op_modes`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Callable, ContextManager, Sequence

import torch

import uresnet_ops
from uresnet_ops import reference
from uresnet_ops.backends import OPS

__all__ = [
    "OPS", "MODES", "LAYOUTS", "BASELINES", "EAGER", "COMPILED", "DEFAULT",
    "Sample", "SampleResult", "sample_inputs", "mode_flags", "op_modes", "to_layout",
    "implementation", "runnable_backends", "step_function", "run_sample",
]

MODES = ("eval_fwd", "train_fwd", "train_fwdbwd")
LAYOUTS = ("contiguous", "channels_last", "strided")
EAGER, COMPILED, DEFAULT = "eager", "compiled", "default"
BASELINES = (EAGER, COMPILED)  # the plain PyTorch chain, eager and torch.compile'd
_HAS_BATCHNORM = {"pixel_shuffle_bn": True, "shuffle_upsample": True, "multi_dilation_conv2d": False}


# --------------------------------------------------------------------------- argument checks
def _check_choice(where: str, argument: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{where}: argument '{argument}' must be one of {', '.join(map(repr, choices))}, "
                         f"got {value!r}")


def _check_op(op, where: str) -> str:
    _check_choice(where, "op", op, OPS)
    return op


def _check_mode(mode, where: str) -> str:
    _check_choice(where, "mode", mode, MODES)
    return mode


def mode_flags(mode: str) -> dict:
    """``dict(training=..., requires_grad=...)`` for :func:`sample_inputs` in ``mode``."""
    _check_mode(mode, "mode_flags")
    return dict(training=mode != "eval_fwd", requires_grad=mode == "train_fwdbwd")


def op_modes(op: str) -> tuple:
    """The modes that differ for ``op``: all of :data:`MODES`, but without ``train_fwd`` for an op
    without BatchNorm (its training and eval forward are the same computation)."""
    _check_op(op, "op_modes")
    return MODES if _HAS_BATCHNORM[op] else ("eval_fwd", "train_fwdbwd")


def to_layout(x: torch.Tensor, layout) -> torch.Tensor:
    """``x`` in ``layout``: "contiguous", "channels_last", "strided" (a view into a larger tensor,
    so that no layout is contiguous) or a ``torch.memory_format``."""
    if isinstance(layout, torch.memory_format):
        return x.contiguous(memory_format=layout)
    _check_choice("to_layout", "layout", layout, LAYOUTS)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        big = torch.zeros(*x.shape[:-1], x.shape[-1] * 2 + 1, dtype=x.dtype, device=x.device)
        view = big[..., 1::2]
        view.copy_(x)
        return view
    return x.contiguous()


# --------------------------------------------------------------------------- the sample
@dataclasses.dataclass
class Sample:
    """Everything one call of ``op`` needs: ``uresnet_ops.<op>(*args, **kwargs)``.

    ``grad_inputs`` are the tensors a gradient is taken to (x, weights, biases, BatchNorm
    affine parameters; they require grad when the sample was made with ``requires_grad=True``),
    ``grad_names`` their names; ``running_stats`` the tensors a training call updates in place
    (running mean and variance); ``out_shape`` the output's shape."""
    op: str
    args: tuple
    kwargs: dict
    grad_inputs: list
    grad_names: list
    running_stats: list
    out_shape: tuple

    def call(self, fn: Callable | None = None):
        """``fn(*args, **kwargs)``; ``fn`` defaults to the public op ``uresnet_ops.<op>``."""
        return (fn or getattr(uresnet_ops, self.op))(*self.args, **self.kwargs)

    @property
    def x(self) -> torch.Tensor:
        return self.args[0]

    @property
    def arguments(self) -> dict:
        """Every argument by the op's parameter names (e.g. ``["running_mean"]``, ``["weights"]``)."""
        bound = inspect.signature(getattr(reference, self.op)).bind(*self.args, **self.kwargs)
        return dict(bound.arguments)

    @property
    def requires_grad(self) -> bool:
        return bool(self.grad_inputs) and all(t.requires_grad for t in self.grad_inputs)

    def grad_output(self, seed: int = 1) -> torch.Tensor:
        """A random output gradient of ``out_shape`` in x's dtype and device (the same values for
        the same seed in every dtype)."""
        x = self.x
        if x.device.type == "meta":
            return torch.empty(self.out_shape, device=x.device, dtype=x.dtype)
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(self.out_shape, generator=gen).to(device=x.device, dtype=x.dtype)

    def clone(self, dtype: torch.dtype | None = None, *, device=None, requires_grad: bool | None = None,
              layout=None) -> Sample:
        """Fresh leaf copies of every tensor (cast to floating ``dtype`` and moved to ``device`` when
        given; ``layout`` applied to x): e.g. ``clone(torch.float64)`` for a reference in double
        precision whose running statistics start where this sample's do. The gradient inputs
        require grad as here, or as ``requires_grad`` says."""
        grad_ids = {id(t) for t in self.grad_inputs}
        stat_ids = {id(t) for t in self.running_stats}
        new_grads, new_stats = {}, {}

        def copy(t):
            if isinstance(t, (list, tuple)):
                return type(t)(copy(v) for v in t)
            if not isinstance(t, torch.Tensor):
                return t
            c = t.detach().to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None,
                              copy=True)
            if t is self.x and layout is not None:
                c = to_layout(c, layout)
            if id(t) in grad_ids:
                c.requires_grad_(t.requires_grad if requires_grad is None else requires_grad)
                new_grads[id(t)] = c
            if id(t) in stat_ids:
                new_stats[id(t)] = c
            return c

        args = copy(self.args)
        kwargs = {k: copy(v) for k, v in self.kwargs.items()}
        return Sample(self.op, args, kwargs, [new_grads[id(t)] for t in self.grad_inputs], list(self.grad_names),
                      [new_stats[id(t)] for t in self.running_stats], self.out_shape)


def sample_inputs(op: str, device="cpu", dtype: torch.dtype = torch.float32, *, shape: Sequence[int] | None = None,
                  training: bool = True, requires_grad: bool = False, seed: int = 0, layout="contiguous",
                  param_dtype: torch.dtype | None = None, stats_dtype: torch.dtype | None = None,
                  activation="relu", **params) -> Sample:
    """Random inputs for one call of ``op`` on ``device``: x and convolution weights/biases in
    ``dtype``, BatchNorm weight/bias in ``param_dtype`` and running statistics in ``stats_dtype``
    (default: float32, float64 for float64 inputs: the mixed-precision case ``nn.BatchNorm2d``
    allows; ``stats_dtype`` defaults to ``param_dtype``). The same ``seed`` gives the same values
    in every dtype, on every device and in every layout (values are drawn on the CPU, then
    cast). On the ``meta`` device nothing is drawn (shapes only).

    ``shape`` is x's (N, C, H, W); ``layout`` x's memory layout (:func:`to_layout`).
    ``training`` goes to the op (BatchNorm); ``requires_grad`` makes the gradient inputs require
    grad (:func:`mode_flags` gives both for a mode). ``activation`` as the ops take it.

    Per op (keyword ``params``, defaults in brackets):

    * ``pixel_shuffle_bn``: ``upscale_factor`` [2], ``affine`` [True] (weight and bias, else None),
      ``track_running_stats`` [True] (running mean/var, else None), ``momentum`` [0.1], ``eps``
      [1e-5]; shape [(2, 16, 6, 6)], C divisible by upscale_factor².
    * ``shuffle_upsample``: ``out_channels`` [C] (of the 1x1 conv), ``conv_groups`` [C: depthwise;
      the 3x3 weight is (C, C/conv_groups, 3, 3)], ``scale_factor`` [2], ``mode`` ["nearest"],
      ``shuffle_groups`` [1], ``pointwise`` [True] (False: no 1x1 conv, pw_weight=pw_bias=None),
      ``bias`` [True] (pw_bias), ``affine``, ``track_running_stats``, ``momentum``, ``eps``;
      shape [(2, 8, 6, 6)].
    * ``multi_dilation_conv2d``: ``out_channels`` [3] (per branch: an int, or one width per
      branch), ``kernel_sizes`` [(1, 3, 3, 3)], ``dilations`` [(1, 6, 12, 18)], ``bias`` [True]
      (else biases=None); shape [(2, 4, 13, 13)]: some dilated taps land partly, the d=18 ones
      wholly in the padding. ``training`` has no effect.

    Values: x ~ N(0, 1); convolution weights ~ N(0, 1/fan_in) (the 3x3 of shuffle_upsample
    N(0, 1/9)), biases ~ N(0, 1); BatchNorm weight ~ U(0.5, 1.5), bias ~ N(0, 1), running mean ~
    N(0, 0.01), running var ~ U(0.5, 1.5).
    """
    _check_op(op, "sample_inputs")
    builder = _BUILDERS[op]
    allowed = set(inspect.signature(builder).parameters) - {"ctx", "shape"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise TypeError(f"sample_inputs: {op} takes no parameter {', '.join(map(repr, unknown))} "
                        f"(its parameters: {', '.join(sorted(allowed))})")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"sample_inputs: argument 'dtype' must be a floating torch.dtype, got {dtype!r}")
    if not isinstance(layout, torch.memory_format):
        _check_choice("sample_inputs", "layout", layout, LAYOUTS)
    default_param = torch.float64 if dtype == torch.float64 else torch.float32
    param_dtype = param_dtype or default_param
    ctx = _Draw(torch.device(device), dtype, param_dtype, stats_dtype or param_dtype, seed)
    shape = tuple(shape) if shape is not None else _DEFAULT_SHAPES[op]
    if len(shape) != 4:
        raise ValueError(f"sample_inputs: argument 'shape' must be (N, C, H, W), got {shape!r}")
    x = ctx.draw(shape)
    args, kwargs, grads, names, stats, out_shape = builder(ctx, shape, **params)
    x = to_layout(x, layout)
    args = (x, *args)
    grads, names = [x, *grads], ["x", *names]
    for t in grads:
        t.requires_grad_(requires_grad)
    if _HAS_BATCHNORM[op]:
        kwargs = dict(training=training, **kwargs)
    kwargs["activation"] = activation
    return Sample(op, args, kwargs, grads, names, stats, tuple(out_shape))


_DEFAULT_SHAPES = {"pixel_shuffle_bn": (2, 16, 6, 6), "shuffle_upsample": (2, 8, 6, 6),
                   "multi_dilation_conv2d": (2, 4, 13, 13)}


class _Draw:
    """Draws values in a fixed order from one CPU generator, then casts and moves them."""

    def __init__(self, device, dtype, param_dtype, stats_dtype, seed):
        self.device, self.dtype, self.param_dtype, self.stats_dtype = device, dtype, param_dtype, stats_dtype
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self, shape, dtype=None, scale=1.0, uniform=False):
        dtype = dtype or self.dtype
        if self.device.type == "meta":
            return torch.empty(shape, device=self.device, dtype=dtype)
        t = torch.rand(shape, generator=self.gen) + 0.5 if uniform else torch.randn(shape, generator=self.gen) * scale
        return t.to(device=self.device, dtype=dtype)

    def batch_norm(self, channels, affine, track_running_stats):
        """(weight, bias, running_mean, running_var), each None when switched off (drawn anyway,
        so that switching one off leaves the other values as they were)."""
        weight = self.draw((channels,), self.param_dtype, uniform=True)
        bias = self.draw((channels,), self.param_dtype)
        mean = self.draw((channels,), self.stats_dtype, scale=0.1)
        var = self.draw((channels,), self.stats_dtype, uniform=True)
        return (weight if affine else None, bias if affine else None,
                mean if track_running_stats else None, var if track_running_stats else None)


def _present(names_values):
    pairs = [(n, v) for n, v in names_values if v is not None]
    return [v for _, v in pairs], [n for n, _ in pairs]


def _pixel_shuffle_bn(ctx, shape, *, upscale_factor=2, affine=True, track_running_stats=True, momentum=0.1,
                      eps=1e-5):
    n, c, h, w = shape
    r = upscale_factor
    if c % (r * r):
        raise ValueError(f"sample_inputs: pixel_shuffle_bn needs C divisible by upscale_factor**2 = {r * r}, "
                         f"got shape {tuple(shape)}")
    weight, bias, mean, var = ctx.batch_norm(c // (r * r), affine, track_running_stats)
    grads, names = _present([("weight", weight), ("bias", bias)])
    stats = [t for t in (mean, var) if t is not None]
    return ((r, weight, bias, mean, var), dict(momentum=momentum, eps=eps), grads, names, stats,
            (n, c // (r * r), h * r, w * r))


def _shuffle_upsample(ctx, shape, *, out_channels=None, conv_groups=None, scale_factor=2, mode="nearest",
                      shuffle_groups=1, pointwise=True, bias=True, affine=True, track_running_stats=True,
                      momentum=0.1, eps=1e-5):
    n, c, h, w = shape
    cout = c if out_channels is None else out_channels
    groups = c if conv_groups is None else conv_groups
    if c % groups:
        raise ValueError(f"sample_inputs: shuffle_upsample needs C divisible by conv_groups, got C={c}, "
                         f"conv_groups={groups}")
    dw = ctx.draw((c, c // groups, 3, 3), scale=1 / 3)
    pw = ctx.draw((cout, c, 1, 1), scale=c ** -0.5)
    pw_bias = ctx.draw((cout,))
    if not pointwise:
        pw = pw_bias = None
    elif not bias:
        pw_bias = None
    bn_w, bn_b, mean, var = ctx.batch_norm(c, affine, track_running_stats)
    grads, names = _present([("dw_weight", dw), ("pw_weight", pw), ("pw_bias", pw_bias),
                             ("bn_weight", bn_w), ("bn_bias", bn_b)])
    stats = [t for t in (mean, var) if t is not None]
    kwargs = dict(momentum=momentum, eps=eps, scale_factor=scale_factor, mode=mode, shuffle_groups=shuffle_groups)
    return ((dw, pw, pw_bias, bn_w, bn_b, mean, var), kwargs, grads, names, stats,
            (n, cout if pointwise else c, h * scale_factor, w * scale_factor))


def _multi_dilation_conv2d(ctx, shape, *, out_channels=3, kernel_sizes=(1, 3, 3, 3), dilations=(1, 6, 12, 18),
                           bias=True):
    n, c, h, w = shape
    kernel_sizes, dilations = list(kernel_sizes), list(dilations)
    widths = [out_channels] * len(kernel_sizes) if isinstance(out_channels, int) else list(out_channels)
    if not len(widths) == len(kernel_sizes) == len(dilations):
        raise ValueError(f"sample_inputs: multi_dilation_conv2d needs one kernel size, dilation and width per "
                         f"branch, got {len(kernel_sizes)}, {len(dilations)} and {len(widths)}")
    weights = [ctx.draw((o, c, k, k), scale=(c * k * k) ** -0.5) for o, k in zip(widths, kernel_sizes, strict=True)]
    biases = [ctx.draw((o,)) for o in widths]
    biases = biases if bias else None
    grads = weights + (biases or [])
    names = [f"weights[{i}]" for i in range(len(weights))] + [f"biases[{i}]" for i in range(len(biases or []))]
    return (weights, dilations, biases), {}, grads, names, [], (n, sum(widths), h, w)


_BUILDERS = {"pixel_shuffle_bn": _pixel_shuffle_bn, "shuffle_upsample": _shuffle_upsample,
             "multi_dilation_conv2d": _multi_dilation_conv2d}


# --------------------------------------------------------------------------- implementations
def implementation(op: str, impl: str) -> tuple[Callable, ContextManager]:
    """``(fn, context)``: call ``fn`` like the op, inside ``context`` (a fresh, single-use context
    manager). ``impl``: a backend name, :data:`DEFAULT`, :data:`EAGER` or :data:`COMPILED` (see the
    module docstring)."""
    _check_op(op, "implementation")
    if impl == EAGER:
        return getattr(reference, op), contextlib.nullcontext()
    if impl == COMPILED:
        _raise_recompile_limits()
        return torch.compile(getattr(reference, op), dynamic=False), contextlib.nullcontext()
    fn = getattr(uresnet_ops, op)
    if impl == DEFAULT or impl is None:
        return fn, contextlib.nullcontext()
    return fn, uresnet_ops.use_backend(impl, op)


def runnable_backends(op: str, device_type: str, *, interpreter: bool = False) -> list[str]:
    """The backends of ``op`` that run on ``device_type`` here, in registry order ("reference"
    included). Triton on CPU runs only under its interpreter (``TRITON_INTERPRET=1``, a test mode):
    left out unless ``interpreter``."""
    _check_op(op, "runnable_backends")
    names = []
    for name in uresnet_ops.available_backends(op):
        if name == "triton" and device_type == "cpu" and not interpreter:
            continue
        with uresnet_ops.use_backend(name, op):
            if uresnet_ops.get_backend(op, device_type).name == name:
                names.append(name)
    return names


def step_function(sample: Sample, fn: Callable, mode: str, *, grad_seed: int = 1) -> Callable[[], object]:
    """A no-argument callable running one iteration of ``mode`` on ``sample`` with ``fn`` (from
    :func:`implementation`; run it inside that context): the forward under ``torch.no_grad``, or
    for ``train_fwdbwd`` the forward and ``torch.autograd.grad`` to every gradient input (nothing
    accumulates between calls) with a fixed output gradient (:meth:`Sample.grad_output`)."""
    _check_mode(mode, "step_function")
    training = sample.kwargs.get("training", mode != "eval_fwd")
    if training != (mode != "eval_fwd"):
        raise ValueError(f"step_function: mode {mode!r} needs a sample made with training={mode != 'eval_fwd'}")
    if mode != "train_fwdbwd":
        def run():
            with torch.no_grad():
                return sample.call(fn)
        return run
    if not sample.requires_grad:
        raise ValueError("step_function: mode 'train_fwdbwd' needs a sample made with requires_grad=True")
    grad_out = sample.grad_output(grad_seed)

    def run_backward():
        return torch.autograd.grad(sample.call(fn), sample.grad_inputs, grad_out)
    return run_backward


@dataclasses.dataclass
class SampleResult:
    """What one call did: ``output``; ``grads`` to the sample's gradient inputs (empty when they
    do not require grad), with ``grad_out`` the output gradient used; ``running_stats`` after the
    call (copies); ``ran``: the backends that ran the forward and the backward (None for the
    baselines, and for the backward when there was none)."""
    output: torch.Tensor
    grads: list
    grad_out: torch.Tensor | None
    running_stats: list
    ran: tuple
    names: list

    def named(self) -> list[tuple[str, torch.Tensor]]:
        """``[("output", out), ("grad x", ...), ..., ("running_mean", ...), ("running_var", ...)]``."""
        return list(zip(self.names, [self.output, *self.grads, *self.running_stats], strict=True))


def run_sample(sample: Sample, impl: str = DEFAULT, *, grad_out: torch.Tensor | None = None,
             grad_seed: int = 1) -> SampleResult:
    """Call the op on ``sample`` with ``impl`` (see :func:`implementation`); when the sample's
    gradient inputs require grad, also take the gradients with ``grad_out`` (cast to the output's
    dtype; default :meth:`Sample.grad_output`). The sample's running statistics are updated in
    place, as by any training call: pass ``sample.clone()`` to keep them."""
    fn, context = implementation(sample.op, impl)
    backend = impl not in BASELINES
    with context:
        output = sample.call(fn)
        grads = []
        if sample.requires_grad:
            if grad_out is None:
                grad_out = sample.grad_output(grad_seed)
            grad_out = grad_out.to(device=output.device, dtype=output.dtype)
            grads = list(torch.autograd.grad(output, sample.grad_inputs, grad_out))
        ran = (uresnet_ops.backends.last_used(sample.op, "forward") if backend else None,
               uresnet_ops.backends.last_used(sample.op, "backward") if backend and grads else None)
    arguments = sample.arguments
    names = ["output", *(f"grad {n}" for n in sample.grad_names[:len(grads)]),
             *(next(k for k, v in arguments.items() if v is t) for t in sample.running_stats)]
    stats = [s.detach().clone() for s in sample.running_stats]
    return SampleResult(output.detach(), grads, grad_out, stats, ran, names)


def _raise_recompile_limits():
    # Every (shape, mode, dtype) recompiles the same reference function; do not let dynamo fall
    # back to eager silently after the default 8 recompiles.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))
