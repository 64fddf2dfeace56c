"""The ``uresnet`` command line: ``demo | train | eval | predict | export | bench | list-models``.

    uresnet demo                       # environment, op checks and speed, a short training run
    uresnet train --data synthetic --epochs 5 --out runs/shapes
    uresnet eval --checkpoint runs/shapes --data synthetic
    uresnet predict --checkpoint runs/shapes --input photos/ --out masks/
    uresnet export --checkpoint runs/shapes --format onnx --dynamic --out shapes.onnx
    uresnet bench --op pixel_shuffle_bn --no-compile
    python -m uresnet demo             # the same without the console script

``demo`` is a list of steps (:data:`DEMO_STEPS`). torch is imported inside the commands so that
``--help`` stays fast. Errors a user can fix (bad arguments, paths, files) end with one line
on stderr and exit status 2 (``URESNET_DEBUG=1`` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable

OPS = ("pixel_shuffle_bn", "shuffle_upsample", "multi_dilation_conv2d")
BASELINES = ("eager", "compiled")
MODES = ("eval_fwd", "train_fwd", "train_fwdbwd")

# Shapes for `bench` (per --size) and `demo`; see benchmarks/cases.py for the full benchmark set.
SHAPES = {
    "small": {"pixel_shuffle_bn": dict(x=(2, 256, 16, 16), r=2),
              "shuffle_upsample": dict(x=(1, 64, 32, 32), cout=32),
              "multi_dilation_conv2d": dict(x=(1, 128, 32, 32), per_branch=32)},
    "full": {"pixel_shuffle_bn": dict(x=(8, 2048, 16, 16), r=2),
             "shuffle_upsample": dict(x=(8, 320, 32, 32), cout=128),
             "multi_dilation_conv2d": dict(x=(8, 256, 32, 32), per_branch=64)},
    # Tiny shapes for the correctness check; 20x20 makes the dilated taps fall into padding.
    "check": {"pixel_shuffle_bn": dict(x=(2, 16, 6, 6), r=2),
              "shuffle_upsample": dict(x=(2, 8, 6, 6), cout=12),
              "multi_dilation_conv2d": dict(x=(2, 8, 20, 20), per_branch=6)},
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- op inputs
def make_inputs(op: str, params: dict, device, dtype, *, training: bool, requires_grad: bool, seed: int = 0):
    """``(args, kwargs, grad_tensors)`` for ``uresnet_ops.<op>(*args, **kwargs)`` with random
    inputs. The same seed gives the same values in every dtype; BatchNorm parameters and
    running statistics are float32 (float64 for float64 inputs), as in mixed precision."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    stat = torch.float64 if dtype == torch.float64 else torch.float32

    def rand(*shape, dt=dtype, scale=1.0, positive=False):
        t = torch.rand(shape, generator=gen) + 0.5 if positive else torch.randn(shape, generator=gen) * scale
        return t.to(device=device, dtype=dt).requires_grad_(requires_grad)

    def bn(c):
        return (rand(c, dt=stat, positive=True), rand(c, dt=stat),
                (torch.randn(c, generator=gen) * 0.1).to(device, stat), (torch.rand(c, generator=gen) + 0.5).to(device, stat))

    n, c, h, w = params["x"]
    x = rand(n, c, h, w)
    if op == "pixel_shuffle_bn":
        r = params["r"]
        weight, bias, rm, rv = bn(c // (r * r))
        return (x, r, weight, bias, rm, rv), dict(training=training, activation="relu"), [x, weight, bias]
    if op == "shuffle_upsample":
        cout = params["cout"]
        dw, pw, pb = rand(c, 1, 3, 3, scale=1 / 3), rand(cout, c, 1, 1, scale=c ** -0.5), rand(cout)
        bw, bb, rm, rv = bn(c)
        kwargs = dict(training=training, scale_factor=2, mode="nearest", shuffle_groups=1, activation="relu")
        return (x, dw, pw, pb, bw, bb, rm, rv), kwargs, [x, dw, pw, pb, bw, bb]
    if op == "multi_dilation_conv2d":
        per, kernels = params["per_branch"], params.get("kernels", (1, 3, 3, 3))
        weights = [rand(per, c, k, k, scale=(c * k * k) ** -0.5) for k in kernels]
        biases = [rand(per) for _ in kernels]
        dilations = list(params.get("dilations", (1, 6, 12, 18)))
        return (x, weights, dilations, biases), dict(activation="relu"), [x, *weights, *biases]
    raise CliError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")


def make_step(op: str, impl: str, params: dict, device, dtype, mode: str):
    """A no-argument callable running one iteration of ``mode`` with implementation ``impl``
    (a backend name, "eager" or "compiled"), and the context manager to run it in."""
    import contextlib

    import torch
    import uresnet_ops
    backward = mode == "train_fwdbwd"
    args, kwargs, grads = make_inputs(op, params, device, dtype, training=mode != "eval_fwd", requires_grad=backward)
    if impl == "eager":
        fn, ctx = getattr(uresnet_ops.reference, op), contextlib.nullcontext()
    elif impl == "compiled":
        fn, ctx = torch.compile(getattr(uresnet_ops.reference, op), dynamic=False), contextlib.nullcontext()
    else:
        fn, ctx = getattr(uresnet_ops, op), uresnet_ops.use_backend(impl, op)
    if not backward:
        def step():
            with torch.no_grad():
                return fn(*args, **kwargs)
        return step, ctx
    grad_out = []

    def step_backward():
        out = fn(*args, **kwargs)
        if not grad_out:
            grad_out.append(torch.randn_like(out))
        return torch.autograd.grad(out, grads, grad_out[0])
    return step_backward, ctx


def runnable_backends(op: str, device_type: str) -> list[str]:
    """The backends of ``op`` that run on ``device_type`` here (Triton's CPU interpreter left out)."""
    import uresnet_ops
    names = []
    for name in uresnet_ops.available_backends(op):
        with uresnet_ops.use_backend(name, op):
            if uresnet_ops.get_backend(op, device_type).name == name and not (name == "triton" and device_type == "cpu"):
                names.append(name)
    return names


def time_impls(op, impls, params, device, dtype, mode, *, min_time=0.2, out=print) -> list[dict]:
    """Median time of each implementation; a compile failure is reported, not raised."""
    from uresnet_ops.timing import measure
    rows = []
    for impl in impls:
        try:
            step, ctx = make_step(op, impl, params, device, dtype, mode)
            with ctx:
                res = measure(step, device=device, warmup=3, min_time=min_time)
            label = impl
            if impl not in BASELINES:  # a backend may hand a case to the next one: show what ran
                from uresnet_ops.backends import last_used
                ran = {last_used(op, "forward")} | ({last_used(op, "backward")} if mode == "train_fwdbwd" else set())
                label = impl if ran == {impl} else f"{impl}>{'+'.join(sorted(map(str, ran)))}"
            rows.append(dict(op=op, shape=list(params["x"]), mode=mode, implementation=label, **res))
        except Exception as error:  # noqa: BLE001  (a broken or declining implementation: report, go on)
            out(f"  {op} {impl} {mode}: skipped ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
    base = {r["implementation"]: r["median_s"] for r in rows}
    for r in rows:
        for b in BASELINES:
            r[f"vs_{b}"] = base[b] / r["median_s"] if b in base else None
    return rows


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:8.1f} us" if s < 1e-3 else f"{s * 1e3:8.2f} ms"


def _ratio(v) -> str:
    return f"{v:7.2f}x" if v else "      -"


def print_table(rows: list[dict], out=print) -> None:
    out(f"  {'op':<22} {'shape':<18} {'mode':<13} {'implementation':<15} {'median':>11} {'xeager':>8} {'xcompiled':>9}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        out(f"  {r['op']:<22} {shape:<18} {r['mode']:<13} {r['implementation']:<15} {_fmt_time(r['median_s'])} "
            f"{_ratio(r.get('vs_eager'))} {_ratio(r.get('vs_compiled')):>9}")
    out("  (x = baseline time / implementation time; >1 is faster)")


# --------------------------------------------------------------------------- commands
def _device(name: str | None):
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA device is available here")
    return torch.device(name)


def cmd_bench(args) -> int:
    import torch
    device = _device(args.device)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise CliError(f"--json {args.json}: the folder does not exist")
    size = args.size or ("full" if device.type == "cuda" else "small")
    if args.models is not None:  # the model-level train-step benchmark
        from .benchmark import MODELS, print_table as print_model_table
        known = [n for n, _ in MODELS] + ["unet"]
        models = args.models.split(",") if args.models else known
        unknown = sorted(set(models) - set(known))
        if unknown:
            raise CliError(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        print(f"uresnet bench --models: train step (forward + backward + Adam), fused vs use_backend('reference'), "
              f"{device.type} ({_device_name(device)}), size {size}", flush=True)
        rows = print_model_table(str(device), size, rounds=args.rounds, models=models,
                           out=lambda line: print(line, flush=True))
        _write_json(args.json, {"device": _device_name(device), "size": size, "rounds": args.rounds, "models": rows})
        return 0
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        print(f"note: {args.dtype} on CPU is slow and not what the kernels are tuned for", file=sys.stderr)
    ops = OPS if args.op == "all" else (args.op,)
    modes = MODES if args.mode == "all" else (args.mode,)
    print(f"uresnet bench: {device.type} ({_device_name(device)}), {args.dtype}, size {size}")
    rows = []
    for op in ops:
        impls = runnable_backends(op, device.type) + ["eager"] + ([] if args.no_compile else ["compiled"])
        for mode in modes:
            if op == "multi_dilation_conv2d" and mode == "train_fwd":
                continue  # no BatchNorm: the same as eval_fwd
            rows += time_impls(op, impls, SHAPES[size][op], device, dtype, mode, min_time=args.min_time)
    print_table(rows)
    _write_json(args.json, {"device": _device_name(device), "dtype": args.dtype, "size": size, "results": rows})
    return 0


def _write_json(path: str | None, results: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {path}")


class DemoContext:
    """What the demo steps share: the device, the arguments, and the outcome so far."""

    def __init__(self, args):
        self.args = args
        self.device = _device(args.device)
        self.failures: list[str] = []

    def print(self, *parts):
        print(*parts, flush=True)


def demo_environment(ctx: DemoContext) -> None:
    import torch
    import uresnet_ops
    from uresnet_ops import _library
    ctx.print(f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}, "
              f"uresnet_ops {uresnet_ops.__version__}")
    threads = f", {torch.get_num_threads()} threads" if ctx.device.type == "cpu" else ""
    ctx.print(f"device: {ctx.device.type} ({_device_name(ctx.device)}{threads})")
    ctx.print(f"compiled kernels: C++ {'built' if _library.HAS_EXTENSION else 'NOT built'}, "
              f"CUDA {'built' if _library.HAS_CUDA_KERNELS else 'not built'}")
    for op in OPS:
        ctx.print(f"  {op:<22} backends here: {', '.join(runnable_backends(op, ctx.device.type)):<24} "
                  f"default: {uresnet_ops.get_backend(op, ctx.device.type).name}")


def demo_correctness(ctx: DemoContext) -> None:
    """Every backend that runs here vs the reference chain in float64: train forward, running
    statistics, gradients of every input, eval forward."""
    import torch
    ctx.print("max abs error vs the float64 reference (train fwd + running stats + grads, eval fwd), float32:")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # true float32 on CUDA
    try:
        _check_all(ctx)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _check_all(ctx: DemoContext) -> None:
    import torch
    import uresnet_ops
    from uresnet_ops import backends as registry
    for op in OPS:
        params = SHAPES["check"][op]
        ref = _run_check(op, params, ctx.device, torch.float64, getattr(uresnet_ops.reference, op), ctx.args.seed)
        for name in runnable_backends(op, ctx.device.type):
            try:
                with uresnet_ops.use_backend(name, op):
                    got = _run_check(op, params, ctx.device, torch.float32, getattr(uresnet_ops, op), ctx.args.seed)
                    ran = {registry.last_used(op, "forward"), registry.last_used(op, "backward")}
                err = max((g.double() - r).abs().max().item() for g, r in zip(got, ref))
                scale = max(r.abs().max().item() for r in ref)
                ok = all(torch.allclose(g.double(), r, rtol=1e-3, atol=1e-4 * max(1.0, scale)) for g, r in zip(got, ref))
                note = "" if ran == {name} else f"  (ran: {', '.join(sorted(n or '?' for n in ran))})"
                ctx.print(f"  {op:<22} {name:<10} max abs err {err:.2e}  {'PASS' if ok else 'FAIL'}{note}")
            except Exception as error:  # noqa: BLE001  (report and carry on)
                ok = False
                ctx.print(f"  {op:<22} {name:<10} ERROR {type(error).__name__}: {str(error).splitlines()[0][:100]}")
            if not ok:
                ctx.failures.append(f"{op}/{name}")


def _run_check(op, params, device, dtype, fn, seed):
    import torch
    args, kwargs, grads = make_inputs(op, params, device, dtype, training=True, requires_grad=True, seed=seed)
    out = fn(*args, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    results = [out.detach(), *torch.autograd.grad(out, grads, grad_out)]
    stats = [a for a in args[-2:] if isinstance(a, torch.Tensor) and not a.requires_grad]  # running mean/var
    eval_args, eval_kwargs, _ = make_inputs(op, params, device, dtype, training=False, requires_grad=False, seed=seed)
    with torch.no_grad():
        results.append(fn(*eval_args, **eval_kwargs))
    return results + [s.clone() for s in stats]


def demo_speed(ctx: DemoContext) -> None:
    import torch
    import uresnet_ops
    impls_extra = ["compiled"] if ctx.args.compile else []
    ctx.print("speed of each op's default backend vs the eager reference (small shapes, float32):")
    rows = []
    for op in OPS:
        default = uresnet_ops.get_backend(op, ctx.device.type).name
        for mode in MODES:
            if op == "multi_dilation_conv2d" and mode == "train_fwd":
                continue  # no BatchNorm: the same as eval_fwd
            try:
                rows += time_impls(op, [default, "eager", *impls_extra], SHAPES["small"][op], ctx.device,
                                   torch.float32, mode, min_time=0.15, out=ctx.print)
            except Exception as error:  # noqa: BLE001
                ctx.print(f"  {op} {mode}: ERROR {type(error).__name__}: {str(error).splitlines()[0][:100]}")
    print_table(rows, out=ctx.print)


# The demo's model: U-ResNet as in the seed (own U-Net encoder, EUCB upsampling), narrowed so
# that a minute of CPU training reaches a good IoU on 64x64 synthetic shapes.
DEMO_MODEL = dict(model="uresnet", encoder=None,
                  model_args=dict(base_channels=8, residual_widths=(16, 32, 16, 16), residual_out_channels=8))
DEMO_MIN_MIOU = 0.5  # the demo fails below this (predicting background everywhere gives about 0.22)


def demo_config(args, device):
    from .train import TrainConfig
    return TrainConfig(**DEMO_MODEL, format="synthetic", data="synthetic", image_size=64, train_samples=512,
                       val_samples=96, epochs=args.epochs, batch_size=16, lr=3e-3, seed=args.seed,
                       device=device.type, out=args.out, progress=False)


def demo_train(ctx: DemoContext) -> None:
    """Train the demo model on synthetic shapes; per-class IoU against a trivial baseline."""
    import torch
    from . import train as training
    cfg = demo_config(ctx.args, ctx.device)
    result = training.fit(cfg, log=ctx.print)
    info, best = result["info"], result["history"][result["best_epoch"] - 1]
    val_set, _ = training.build_data(cfg, "val")
    counts = torch.bincount(torch.cat([val_set[i]["mask"].flatten() for i in range(len(val_set))]),
                            minlength=info.num_classes).double()
    baseline = (counts[0] / counts.sum()).item() / info.num_classes  # mIoU of "background everywhere"
    ctx.print(f"validation IoU per class (best epoch {result['best_epoch']}):")
    for name, iou, share in zip(info.class_names, best["val_iou"], (counts / counts.sum()).tolist()):
        ctx.print(f"  {name:<11} IoU {iou:.3f}   ({share:.1%} of pixels)")
    ok = best["val_miou"] >= DEMO_MIN_MIOU
    ctx.print(f"  mean IoU {best['val_miou']:.3f}  (predicting background everywhere: {baseline:.3f}; "
              f"demo threshold {DEMO_MIN_MIOU}) {'PASS' if ok else 'FAIL'}")
    out = result["out"]
    for name, what in (("samples.png", "inputs / true masks / predictions"), ("curves.png", "loss and IoU curves")):
        if (out / name).is_file():
            ctx.print(f"wrote {out / name} ({what})")
    if not ok:
        ctx.failures.append("demo training IoU")


def demo_model_speed(ctx: DemoContext) -> None:
    """One training step (forward, backward, Adam) of the demo model with the default (fused)
    backends vs every op on its reference backend, interleaved so that load affects both."""
    import contextlib
    import statistics

    import torch
    import uresnet_ops
    from uresnet_ops.backends import last_used
    from . import train as training
    cfg = demo_config(ctx.args, ctx.device)
    train_set, info = training.build_data(cfg, "train")
    batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size)))
    x, target = batch["image"].to(ctx.device), batch["mask"].to(ctx.device)
    torch.manual_seed(ctx.args.seed)
    model = training.build_model(cfg, info).to(ctx.device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)

    impls = {"fused": contextlib.nullcontext, "reference": lambda: uresnet_ops.use_backend("reference")}
    times, ran = {k: [] for k in impls}, {}
    for round_ in range(ctx.args.speed_rounds + 1):
        for name, make_ctx in impls.items():
            with make_ctx():
                start = time.perf_counter()
                step()
                if round_:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
                ran[name] = [f"{op}:{last_used(op, 'forward')}" for op in _fused_ops(model)]
    fused, ref = (statistics.median(times[k]) for k in impls)
    shape = "x".join(map(str, x.shape))
    ctx.print(f"train step of the demo model ({info.num_classes} classes, batch {shape}), median of "
              f"{ctx.args.speed_rounds}:")
    ctx.print(f"  fused (default backends)   {fused * 1e3:8.1f} ms   ops: {', '.join(ran['fused']) or '-'}")
    ctx.print(f"  reference (plain PyTorch)  {ref * 1e3:8.1f} ms")
    ctx.print(f"  speed-up {ref / fused:.2f}x")


def _fused_ops(model) -> list[str]:
    """The uresnet_ops ops that ``model``'s modules call."""
    from uresnet_ops import nn as fused
    kinds = {fused.EUCB: "shuffle_upsample", fused.EUCBStar: "shuffle_upsample", fused.PixelShuffleBN: "pixel_shuffle_bn",
             fused.MultiDilationConv2d: "multi_dilation_conv2d", fused.ASPP: "multi_dilation_conv2d",
             fused.AtrousBlock: "multi_dilation_conv2d"}
    return sorted({op for m in model.modules() for cls, op in kinds.items() if isinstance(m, cls)})


# The demo, in order.
DEMO_STEPS: list[tuple[str, Callable[[DemoContext], None]]] = [
    ("environment", demo_environment),
    ("op correctness", demo_correctness),
    ("op speed", demo_speed),
    ("train a model on synthetic shapes", demo_train),
    ("model speed: fused vs reference", demo_model_speed),
]


def cmd_demo(args) -> int:
    import torch
    _set_threads(args.threads)
    torch.manual_seed(args.seed)
    ctx = DemoContext(args)
    start = time.perf_counter()
    for title, step in DEMO_STEPS:
        ctx.print(f"\n== {title} ==")
        step(ctx)
    ctx.print(f"\ndemo finished in {time.perf_counter() - start:.1f} s"
              + (f"; FAILED: {', '.join(ctx.failures)}" if ctx.failures else "; all checks passed"))
    return 1 if ctx.failures else 0


def cmd_list_models(args) -> int:
    import uresnet_models
    names = uresnet_models.list_models(args.pattern)
    if not names:
        print(f"no models match {args.pattern!r}")
        return 0
    if not args.params:
        for name in names:
            print(name)
        return 0
    print(f"{'model':<18} {'default encoder':<18} {'parameters':>12}")
    for name in names:
        try:  # built on the meta device: no memory, no initialisation
            count = uresnet_models.count_parameters(name)
            import inspect
            default = inspect.signature(uresnet_models.model_entrypoint(name)).parameters.get("encoder")
            encoder = "-" if default is None or default.default is None else str(default.default)
            encoder = "(own)" if default is not None and default.default is None else encoder
            print(f"{name:<18} {encoder:<18} {count / 1e6:>11.2f}M")
        except Exception as error:  # noqa: BLE001 - a broken plugin must not hide the others
            print(f"{name:<18} {'?':<18} {'error: ' + str(error)[:60]:>12}")
    return 0


def _model_args(items) -> dict:
    """``--model-arg key=value`` pairs; values are Python literals (8, (16, 32), True) or strings."""
    import ast
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise CliError(f"--model-arg {item!r}: expected KEY=VALUE, e.g. base_channels=16")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _image_size(text: str):
    """``64`` or ``HxW`` (argparse type)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sizes, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _check_data_args(data: str, fmt: str) -> None:
    if fmt == "synthetic" and data != "synthetic":
        raise CliError(f"--data {data}: a dataset path needs --format (binary, cityscapes, sunrgbd, cifar10 or "
                       "imagefolder)")
    if fmt != "synthetic":
        if data == "synthetic":
            raise CliError(f"--format {fmt} needs --data PATH (the dataset folder)")
        if not os.path.exists(data):
            raise CliError(f"--data {data}: no such file or folder")


def _set_threads(n: int | None) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


def _quiet_cpp_extension_log() -> None:
    """torch.compile imports torch.utils.cpp_extension, which logs "No CUDA runtime is found,
    using CUDA_HOME=..." on a machine with a CUDA toolkit but no GPU: about building CUDA
    extensions, nothing to do with a CPU compile, so not shown there."""
    import logging

    import torch
    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def cmd_train(args) -> int:
    from .train import DEFAULT, TrainConfig, fit
    _set_threads(args.threads)
    if args.compile:
        _quiet_cpp_extension_log()
    fmt = args.format or ("synthetic" if args.data == "synthetic" else None)
    if fmt is None:
        raise CliError(f"--data {args.data}: give the dataset's --format "
                       "(binary, cityscapes, sunrgbd, cifar10 or imagefolder)")
    _check_data_args(args.data, fmt)
    if args.task and fmt != "synthetic":
        raise CliError(f"--task is for --format synthetic ({fmt} has its own task)")
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.lr > 0:
        raise CliError("--lr must be positive")
    if args.resume and not os.path.exists(args.resume if args.resume != "auto" else os.path.join(args.out, "last")):
        raise CliError(f"--resume: {args.resume if args.resume != 'auto' else os.path.join(args.out, 'last')} "
                       "does not exist")
    encoder = DEFAULT if args.encoder is None else (None if args.encoder.lower() == "none" else args.encoder)
    cfg = TrainConfig(
        model=args.model, encoder=encoder, model_args=_model_args(args.model_arg), format=fmt, data=args.data,
        task=args.task, num_classes=args.num_classes, image_size=args.image_size, train_samples=args.train_samples,
        val_samples=args.val_samples, val_fraction=args.val_fraction, augment=not args.no_augment,
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, optimizer=args.optimizer, loss=args.loss, bce_weight=args.bce_weight,
        aux_weight=args.aux_weight, plateau_patience=args.plateau_patience, plateau_factor=args.plateau_factor,
        early_stop=args.early_stop, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
        seed=args.seed, deterministic=args.deterministic, workers=args.workers, device=args.device,
        out=args.out, resume=(os.path.join(args.out, "last") if args.resume == "auto" else args.resume),
        progress=not args.no_progress, pretrained=args.pretrained, freeze_encoder=args.freeze_encoder,
        check_data=not args.no_data_check)
    fit(cfg)
    return 0


def _eval_config(meta: dict, args):
    """The training config of a checkpoint with the data options of this command."""
    from .train import TrainConfig
    known = set(TrainConfig.__dataclass_fields__)
    cfg = TrainConfig(**{k: v for k, v in meta.get("config", {}).items() if k in known})
    if args.data is not None:
        cfg.data = args.data
        cfg.format = args.format or ("synthetic" if args.data == "synthetic" else None)
        if cfg.format is None:
            raise CliError(f"--data {args.data}: give the dataset's --format")
    elif args.format:
        raise CliError("--format needs --data")
    if cfg.format != "synthetic":
        cfg.task = None
    _check_data_args(cfg.data, cfg.format)
    if args.image_size is not None:
        cfg.image_size = args.image_size
    if isinstance(cfg.image_size, list):
        cfg.image_size = tuple(cfg.image_size)
    cfg.workers, cfg.device = args.workers, args.device
    return cfg


def cmd_eval(args) -> int:
    import torch
    from torch.utils.data import DataLoader
    from . import train as training
    if not os.path.exists(args.checkpoint):
        raise CliError(f"--checkpoint {args.checkpoint}: no such folder")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise CliError(f"--json {args.json}: the folder does not exist")
    device = _device(args.device)
    model, saved_info, meta = training.load_checkpoint(args.checkpoint, device)
    cfg = _eval_config(meta, args)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # normalised as in training (the checkpoint's mean/std: the encoder's or the dataset's)
    dataset, info = training.build_data(cfg, args.split, train_transform=False,
                                        normalization=(saved_info.mean, saved_info.std))
    if (info.num_classes, info.task) != (saved_info.num_classes, saved_info.task):
        raise CliError(f"the checkpoint predicts {saved_info.num_classes} classes ({saved_info.task}) but "
                       f"{cfg.format} has {info.num_classes} ({info.task})")
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=training._default_workers(cfg))
    task = training.Task(info, cfg)
    print(f"evaluating {args.checkpoint} ({model.model_config['architecture']}, epoch {meta.get('epoch')}) on "
          f"{cfg.format} {args.split}: {len(dataset)} samples", flush=True)
    metrics = training.evaluate(model, loader, task, device, amp=args.amp, channels_last=args.channels_last,
                                progress=not args.no_progress)
    print(f"loss {metrics['loss']:.4f}  " + "  ".join(f"{k} {metrics[k]:.4f}" for k in
                                                     ("miou", "iou_foreground", "mdice", "dice_foreground", "pixel_acc",
                                                      "top1", "top5") if k in metrics))
    if "iou_foreground" in metrics:
        print("(miou: the mean of the background and foreground IoU; iou_foreground: the foreground's alone, what "
              "torchmetrics' and smp's binary IoU report)")
    if "iou" in metrics:
        names = _class_names(info, len(metrics["iou"]))
        print(f"{'class':<20} {'IoU':>7} {'Dice':>7}")
        for name, iou, dice in zip(names, metrics["iou"], metrics["dice"]):
            print(f"{name:<20} {iou:>7.4f} {dice:>7.4f}")
    if "confusion_matrix" in metrics:
        names = _class_names(info, len(metrics["class_accuracy"]))
        width = max(6, *(len(n) for n in names)) + 1
        print(f"{'class':<20} {'accuracy':>8}   confusion matrix (rows: true class, columns: predicted)")
        print(" " * 31 + "".join(f"{n[:width - 1]:>{width}}" for n in names))
        for name, acc, row in zip(names, metrics["class_accuracy"], metrics["confusion_matrix"]):
            print(f"{name:<20} {acc:>8.4f}  " + "".join(f"{v:>{width}}" for v in row))
    _write_json(args.json, {"checkpoint": args.checkpoint, "format": cfg.format, "split": args.split, **metrics})
    return 0


def _class_names(info, n: int) -> list[str]:
    names = list(info.class_names or [])[:n]
    return names + [str(i) for i in range(len(names), n)]


def cmd_predict(args) -> int:
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from . import train as training
    from .data import IMAGE_EXTENSIONS, build_transform, read_image
    from .metrics import predictions
    for flag, path in (("--checkpoint", args.checkpoint), ("--input", args.input)):
        if not os.path.exists(path):
            raise CliError(f"{flag} {path}: no such file or folder")
    if args.depth and not os.path.isdir(args.depth):
        raise CliError(f"--depth {args.depth}: no such folder")
    device = _device(args.device)
    model, info, meta = training.load_checkpoint(args.checkpoint, device)
    if os.path.isdir(args.input):
        files = sorted(os.path.join(args.input, f) for f in os.listdir(args.input)
                       if f.lower().endswith(IMAGE_EXTENSIONS))
    else:
        files = [args.input]
    if not files:
        raise CliError(f"--input {args.input}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    if info.depth_channels and not args.depth:
        raise CliError("this checkpoint takes RGB + depth: give --depth FOLDER (depth maps with the images' names)")
    size = args.image_size or meta.get("config", {}).get("image_size")
    size = tuple(size) if isinstance(size, list) else size
    transform = build_transform(info, train=False, image_size=size)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    from torchvision import tv_tensors
    from tqdm.auto import tqdm

    def load(path):
        image = read_image(path, "RGB")
        x = transform(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        if info.depth_channels:
            stem = os.path.splitext(os.path.basename(path))[0]
            matches = [f for f in os.listdir(args.depth) if os.path.splitext(f)[0] == stem]
            if not matches:
                raise CliError(f"no depth map for {path} in {args.depth}")
            depth = read_image(os.path.join(args.depth, matches[0]), "depth").unsqueeze(0)
            x = torch.cat([x, F.interpolate(depth, size=x.shape[-2:], mode="nearest")[0]])
        return path, image.shape[-2:], x

    def run(batch):
        with torch.no_grad():
            out = model(torch.stack([x for _, _, x in batch]).to(device))
        seg_all = out[0] if isinstance(out, (tuple, list)) else out
        for j, (path, image_size, _) in enumerate(batch):
            stem = os.path.splitext(os.path.basename(path))[0]
            if info.task == "cls":
                probs = out[j].float().softmax(0).cpu()
                k = int(probs.argmax())
                name = info.class_names[k] if k < len(info.class_names) else str(k)
                rows.append((path, k, name, float(probs[k])))
                bar.write(f"{path}: {name} ({probs[k]:.3f})")
                continue
            seg = F.interpolate(seg_all[j:j + 1].float(), size=image_size, mode="bilinear", align_corners=False)
            mask = predictions(seg)[0].cpu()
            if args.color:
                pixels = training.colorize(mask).permute(1, 2, 0).numpy()
            else:  # class ids; one binary channel as 0/255, the binary format's own mask convention
                pixels = (mask * (255 if info.num_classes == 1 else 1)).clamp(0, 255).to(torch.uint8).numpy()
            target = os.path.join(args.out, stem + ".png")
            Image.fromarray(pixels).save(target)
            rows.append((path, target))
        bar.update(len(batch))

    # consecutive images with the same model-input size share a forward pass
    bar = tqdm(total=len(files), desc="predict", unit="image", disable=args.no_progress)
    pending = []
    for path in files:
        item = load(path)
        if pending and (len(pending) >= args.batch_size or pending[0][2].shape != item[2].shape):
            run(pending)
            pending = []
        pending.append(item)
    if pending:
        run(pending)
    bar.close()
    if info.task == "cls":
        import csv
        target = os.path.join(args.out, "predictions.csv")
        with open(target, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "class_id", "class", "probability"])
            writer.writerows(rows)
        print(f"wrote {target}")
    else:
        print(f"wrote {len(rows)} mask(s) to {args.out}")
    return 0


def cmd_export(args) -> int:
    import torch
    from . import export
    from . import train as training
    if not os.path.exists(args.checkpoint):
        raise CliError(f"--checkpoint {args.checkpoint}: no such folder")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise CliError(f"--out {args.out}: the folder does not exist")
    model, info, meta = training.load_checkpoint(args.checkpoint, "cpu")
    size = args.image_size or meta.get("config", {}).get("image_size") or 64
    h, w = (size, size) if isinstance(size, int) else size
    if args.dynamic and min(h, w) < 2:
        raise CliError(f"--image-size {h}x{w}: --dynamic needs H and W of at least 2")
    example = torch.randn(2 if args.dynamic else 1, info.in_channels, h, w)
    print(f"exporting {args.checkpoint} ({model.model_config['architecture']}) as {args.format}, input "
          f"{'(N, ' if args.dynamic else '(1, '}{info.in_channels}, {'H, W) dynamic' if args.dynamic else f'{h}, {w})'}",
          flush=True)
    path = export.export_model(model, args.out, args.format, example=example, dynamic=args.dynamic)
    # The check: a random input, of another size and batch where those are dynamic.
    check = torch.randn(1, info.in_channels, h + 3, w + 5) if args.dynamic else example
    difference = export.max_difference(model, path, args.format, check)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB); max difference vs eager on a random "
          f"{'x'.join(map(str, check.shape))} input: {difference:.2e}")
    return 0


# --------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """Errors as one line (no usage block, no traceback), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(prog="uresnet", description="Fused U-Net/ResNet ops and models: demo, training, evaluation, "
                     "inference and benchmarks.")
    parser.add_argument("--version", action="version", version=f"uresnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="environment, op checks and speed, then a short training run (no downloads)",
                       description="Environment, op correctness and speed, then trains a small U-ResNet on synthetic "
                       "shapes for about a minute (CPU), reports IoU, writes samples.png and curves.png to --out, "
                       "and times a train step with the fused ops vs the reference ones.")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the reference (slow on CPU)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--epochs", type=_positive_int, default=5, help="training epochs (32 steps each; default 5)")
    p.add_argument("--out", default="uresnet-demo", help="folder for the checkpoint, logs and PNGs (default: "
                   "./uresnet-demo)")
    p.add_argument("--speed-rounds", type=_positive_int, default=5, help="timed train steps per implementation "
                   "(default 5)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's, one per core; on cores "
                   "busy with other jobs 1 can be several times faster)")
    p.set_defaults(func=cmd_demo)

    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_predict_parser(sub)
    _add_export_parser(sub)

    p = sub.add_parser("bench", help="quick timing of every backend vs the eager and compiled reference",
                       description="Median time of each op on every backend that runs here, next to the eager "
                       "reference chain and torch.compile of it (ratios: >1 is faster than the baseline); with "
                       "--models, a training step of whole models with the fused ops vs the reference backends. "
                       "The full benchmark set is pytest benchmarks/ (see benchmarks/README.md).")
    p.add_argument("--op", choices=("all", *OPS), default="all", help="default: all")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="default: float32")
    p.add_argument("--size", choices=("small", "full"), help="default: full on CUDA, small on CPU")
    p.add_argument("--mode", choices=("all", *MODES), default="train_fwd", help="default: train_fwd")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per measurement "
                   "(default 0.3)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--models", nargs="?", const="", metavar="NAMES",
                   help="instead of the ops: the model train-step benchmark (fused vs reference backends) of "
                        "these comma-separated models (default: resunet_atrous, deresunet, uresnet, and unet vs "
                        "segmentation_models_pytorch when installed)")
    p.add_argument("--rounds", type=int, default=3, help="timed train steps per model (--models; default 3)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("list-models", help="registered model names (with --params: parameter counts)")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. '*resunet*'")
    p.add_argument("--params", action="store_true", help="show the default encoder and parameter count "
                   "(num_classes=1) of each model")
    p.set_defaults(func=cmd_list_models)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _add_train_parser(sub) -> None:
    from .constants import FORMATS, LOSSES
    p = sub.add_parser("train", help="train a segmentation or classification model",
                       description="Train a model on a dataset read from a local folder (or synthetic shapes). "
                       "Writes best/ and last/ checkpoints, log.csv, log.json, curves.png and samples.png to --out. "
                       "Several processes: torchrun --nproc_per_node=N -m uresnet train ... (DDP, --batch-size "
                       "per process).")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="uresnet", help="registered name (uresnet list-models); default uresnet")
    g.add_argument("--encoder", help="timm encoder name, or 'none' for the seed's own; default: the model's")
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="extra create_model argument, repeatable (e.g. base_channels=16, upsample=eucb_star, "
                   "encoder_kwargs={'dynamic_img_size':True})")
    g.add_argument("--pretrained", action="store_true", help="start from the timm encoder's pretrained weights "
                   "(downloaded once, then cached); the images are normalised as those weights expect")
    g.add_argument("--freeze-encoder", action="store_true", help="train only the decoder and heads (the encoder's "
                   "weights and BatchNorm statistics stay as they are; usually with --pretrained)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", help="dataset folder, or 'synthetic' (default)")
    g.add_argument("--format", choices=FORMATS, help="layout of --data (default: synthetic)")
    g.add_argument("--task", choices=("seg", "cls", "joint"), help="synthetic only: segmentation (default), "
                   "classification, or both (a model with an aux classification head)")
    g.add_argument("--num-classes", type=_positive_int, help="synthetic: classes incl. background (2-4); binary: 1 "
                   "(sigmoid, default) or 2 (softmax)")
    g.add_argument("--image-size", type=_image_size, default=64, help="N or HxW: training crop / eval resize "
                   "(default 64)")
    g.add_argument("--train-samples", type=_positive_int, help="synthetic training set size (default 256)")
    g.add_argument("--val-samples", type=_positive_int, help="synthetic validation set size (default 64)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="held out when the folder has no train/ and "
                   "val/ (default 0.1)")
    g.add_argument("--no-augment", action="store_true", help="no flip, brightness/contrast or random crop")
    g.add_argument("--no-data-check", action="store_true", help="skip reading every file once before training "
                   "(sizes, readability, label range)")
    g.add_argument("--workers", type=int, help="data loader processes (default 0 for synthetic, else up to 4)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="default 10")
    g.add_argument("--batch-size", type=int, default=8, help="per process (default 8)")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4, the seeds')")
    g.add_argument("--weight-decay", type=float, default=0.0, help="default 0")
    g.add_argument("--optimizer", choices=("adam", "adamw"), default="adam", help="default adam")
    g.add_argument("--loss", choices=LOSSES,
                   help="segmentation loss (default: ce; bce_dice for one binary channel); focal, tversky and "
                   "lovasz (hinge for one channel, softmax otherwise) with their default parameters")
    g.add_argument("--bce-weight", type=float, default=0.5, help="BCE share of bce_dice (default 0.5)")
    g.add_argument("--aux-weight", type=float, default=0.4, help="weight of the classification loss of --task joint")
    g.add_argument("--steps-per-epoch", type=_positive_int, help="cap on training steps per epoch")
    g.add_argument("--plateau-patience", type=int, default=3, help="ReduceLROnPlateau patience (epochs; default 3)")
    g.add_argument("--plateau-factor", type=float, default=0.5, help="ReduceLROnPlateau factor (default 0.5)")
    g.add_argument("--early-stop", type=int, default=0, metavar="EPOCHS",
                   help="stop after this many epochs without improvement (default 0: never)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/uresnet", help="output folder (default runs/uresnet)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="RUN",
                   help="continue a run from its last/ checkpoint (default: the one in --out)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype (default none)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    g.add_argument("--seed", type=int, default=0, help="data order, augmentation and initialisation (default 0)")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    g.add_argument("--threads", type=_positive_int, help="CPU threads per process (default: torch's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def _add_eval_parser(sub) -> None:
    from .constants import FORMATS
    p = sub.add_parser("eval", help="metrics of a checkpoint on a dataset",
                       description="Loss, IoU per class and mean, Dice, pixel accuracy (segmentation) or top-1 "
                       "(classification) of a checkpoint on a dataset split. The data options default to the "
                       "ones the checkpoint was trained with.")
    p.add_argument("--checkpoint", required=True, help="a run folder (its best/ is used) or a checkpoint folder")
    p.add_argument("--data", help="dataset folder or 'synthetic' (default: the training data)")
    p.add_argument("--format", choices=FORMATS)
    p.add_argument("--split", choices=("train", "val"), default="val")
    p.add_argument("--image-size", type=_image_size, help="resize to N or HxW (default: the training size)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="default 8")
    p.add_argument("--workers", type=int)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="default none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def _add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="run a checkpoint on images: masks as PNG (or classes as CSV)",
                       description="Writes one PNG per input image to --out: class ids (0/255 for a one-channel "
                       "binary model), or colours with --color; classifiers print the class and write "
                       "predictions.csv.")
    p.add_argument("--checkpoint", required=True, help="a run folder (its best/ is used) or a checkpoint folder")
    p.add_argument("--input", required=True, help="an image or a folder of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--depth", help="folder of depth maps with the images' names (RGB-D checkpoints)")
    p.add_argument("--image-size", type=_image_size, help="model input size (default: the training size); "
                   "masks are written at the image's own size")
    p.add_argument("--color", action="store_true", help="write colour masks instead of class ids")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default 8; "
                   "consecutive images of the same model-input size are batched)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)


def _add_export_parser(sub) -> None:
    from .constants import EXPORT_FORMATS
    p = sub.add_parser("export", help="export a checkpoint to ONNX, a torch.export program or an AOTInductor package",
                       description="Writes the checkpoint's model (eval mode) with the fused ops lowered to standard "
                       "ops: onnx (onnxruntime, TensorRT, OpenVINO), pt2 (torch.export.load) or aoti (AOTInductor "
                       "package, CPU; slow to compile). None needs uresnet to load. Then runs the file on a random "
                       "input and prints the largest difference from eager PyTorch.")
    p.add_argument("--checkpoint", required=True, help="a run folder (its best/ is used) or a checkpoint folder")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--image-size", type=_image_size, help="the example input's N or HxW (default: the training "
                   "size); without --dynamic the only size the file takes")
    p.add_argument("--dynamic", action="store_true", help="any batch size and any H, W (one file for all sizes)")
    p.set_defaults(func=cmd_export)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    if os.environ.get("URESNET_DEBUG"):
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except CliError as error:
        return _fail(args, error, 2)
    except (ValueError, TypeError, LookupError, RuntimeError) as error:
        # bad model arguments, dataset layouts, files (DataError), checkpoints that do not fit
        return _fail(args, error, 2)
    except OSError as error:
        return _fail(args, error, 1)
    except KeyboardInterrupt:
        print(f"\nuresnet {args.command}: interrupted", file=sys.stderr)
        return 130


def _fail(args, error: Exception, status: int) -> int:
    """One line on stderr. A data-loader worker's error carries the worker traceback in its
    message: its last line is the original error."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    text = lines[-1].strip() if "Original Traceback" in str(error) else lines[0]
    hint = "" if isinstance(error, CliError) else " (URESNET_DEBUG=1 shows the traceback)"
    print(f"uresnet {args.command}: error: {text}{hint}", file=sys.stderr)
    return status


def _device_name(device) -> str:
    from uresnet_ops.timing import device_name
    return device_name(device)


def _version(module: str):
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
