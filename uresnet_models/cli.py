"""The ``uresnet`` command line: ``demo | bench | list-models | train | eval | predict``.

    uresnet demo                       # environment, op correctness and speed on this machine
    uresnet bench --op pixel_shuffle_bn --no-compile
    python -m uresnet_models demo      # the same without the console script

``demo`` is a list of steps (:data:`DEMO_STEPS`); the model and training steps of later issues
are appended there. torch is imported inside the commands so that ``--help`` stays fast.
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
NOT_IMPLEMENTED = "not implemented yet (model-library and training issues)"

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
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        print(f"note: {args.dtype} on CPU is slow and not what the kernels are tuned for", file=sys.stderr)
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise CliError(f"--json {args.json}: the folder does not exist")
    size = args.size or ("full" if device.type == "cuda" else "small")
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": _device_name(device), "dtype": args.dtype, "size": size, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


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


# The demo, in order; later issues append model building and a short training run here.
DEMO_STEPS: list[tuple[str, Callable[[DemoContext], None]]] = [
    ("environment", demo_environment),
    ("op correctness", demo_correctness),
    ("op speed", demo_speed),
]


def cmd_demo(args) -> int:
    import torch
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
            encoder = "-" if default is None else str(default.default)
            print(f"{name:<18} {encoder:<18} {count / 1e6:>11.2f}M")
        except Exception as error:  # noqa: BLE001 - a broken plugin must not hide the others
            print(f"{name:<18} {'?':<18} {'error: ' + str(error)[:60]:>12}")
    return 0


def cmd_not_implemented(args) -> int:
    print(f"uresnet {args.command}: {NOT_IMPLEMENTED}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """Errors as one line (no usage block, no traceback), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="uresnet", description="Fused U-Net/ResNet ops and models: demo, benchmarks, "
                     "training (later issues).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="environment, op correctness and speed on this machine (no downloads)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the reference (slow on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="quick timing of every backend vs the eager and compiled reference")
    p.add_argument("--op", choices=("all", *OPS), default="all")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--size", choices=("small", "full"), help="default: full on CUDA, small on CPU")
    p.add_argument("--mode", choices=("all", *MODES), default="train_fwd")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per measurement")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("list-models", help="registered model names (with --params: parameter counts)")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. '*resunet*'")
    p.add_argument("--params", action="store_true", help="show the default encoder and parameter count "
                   "(num_classes=1) of each model")
    p.set_defaults(func=cmd_list_models)

    for name, what in (("train", "train a model"), ("eval", "evaluate a checkpoint"), ("predict", "run a model on images")):
        p = sub.add_parser(name, help=f"{what}: {NOT_IMPLEMENTED}", add_help=False)
        p.set_defaults(func=cmd_not_implemented, accepts_any=True)  # any arguments: not implemented
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_any", False):
        subparser = parser._subparsers._group_actions[0].choices.get(args.command, parser) if args.command else parser
        subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except CliError as error:
        print(f"uresnet {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"uresnet {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


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
