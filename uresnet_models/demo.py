"""``uresnet demo``: a list of steps (:data:`DEMO_STEPS`) that each print a section: the
environment, every backend of every op against the float64 reference, the ops' speed, a short
training run on synthetic shapes, and a train step of that model, fused vs its plain PyTorch
twin. A failed check makes the demo exit with status 1."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch

import uresnet_ops
from uresnet_ops import _library, testing
from uresnet_ops import nn as fused
from uresnet_ops.backends import last_used
from uresnet_ops.timing import device_name, synchronize

from .benchmark import SHAPES, interleaved_seconds, make_step, print_op_table, time_impls
from .constants import MODES, OPS
from .train import TrainConfig, build_data, build_model, fit


def _version(module: str):
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


class DemoContext:
    """What the demo steps share: the device, the arguments, and the outcome so far."""

    def __init__(self, args, device: torch.device):
        self.args = args
        self.device = device
        self.failures: list[str] = []

    def print(self, *parts):
        print(*parts, flush=True)


def demo_environment(ctx: DemoContext) -> None:
    ctx.print(f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}, "
              f"uresnet_ops {uresnet_ops.__version__}")
    threads = f", {torch.get_num_threads()} threads" if ctx.device.type == "cpu" else ""
    ctx.print(f"device: {ctx.device.type} ({device_name(ctx.device)}{threads})")
    ctx.print(f"compiled kernels: C++ {'built' if _library.HAS_EXTENSION else 'NOT built'}, "
              f"CUDA {'built' if _library.HAS_CUDA_KERNELS else 'not built'}")
    for op in OPS:
        ctx.print(f"  {op:<22} backends here: {', '.join(testing.runnable_backends(op, ctx.device.type)):<24} "
                  f"default: {uresnet_ops.get_backend(op, ctx.device.type).name}")


def demo_correctness(ctx: DemoContext) -> None:
    """Every backend that runs here vs the reference chain in float64: train forward, running
    statistics, gradients of every input, eval forward."""
    ctx.print("max abs error vs the float64 reference (train fwd + running stats + grads, eval fwd), float32:")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # true float32 on CUDA
    try:
        _check_all(ctx)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _check_all(ctx: DemoContext) -> None:
    for op in OPS:
        params = SHAPES["check"][op]
        ref, _ = _run_check(op, params, ctx.device, torch.float64, testing.EAGER, ctx.args.seed)
        for name in testing.runnable_backends(op, ctx.device.type):
            try:
                got, ran = _run_check(op, params, ctx.device, torch.float32, name, ctx.args.seed)
                err = max((g.double() - r).abs().max().item() for g, r in zip(got, ref, strict=True))
                scale = max(r.abs().max().item() for r in ref)
                ok = all(torch.allclose(g.double(), r, rtol=1e-3, atol=1e-4 * max(1.0, scale))
                         for g, r in zip(got, ref, strict=True))
                note = "" if ran == {name} else f"  (ran: {', '.join(sorted(n or '?' for n in ran))})"
                ctx.print(f"  {op:<22} {name:<10} max abs err {err:.2e}  {'PASS' if ok else 'FAIL'}{note}")
            except Exception as error:  # noqa: BLE001
                ok = False
                ctx.print(f"  {op:<22} {name:<10} ERROR {type(error).__name__}: {str(error).splitlines()[0][:100]}")
            if not ok:
                ctx.failures.append(f"{op}/{name}")


def _run_check(op, params, device, dtype, impl, seed):
    """Train forward, its gradients, the updated running statistics and an eval forward of
    ``impl`` on the seeded sample, and the backends that ran."""
    train = testing.run_sample(testing.sample_inputs(op, device, dtype, **params, training=True,
                                                     requires_grad=True, seed=seed), impl, grad_seed=seed + 1)
    with torch.no_grad():
        evaluated = testing.run_sample(testing.sample_inputs(op, device, dtype, **params, training=False,
                                                             seed=seed), impl)
    return [train.output, *train.grads, evaluated.output, *train.running_stats], set(train.ran)


def demo_speed(ctx: DemoContext) -> None:
    impls_extra = ["compiled"] if ctx.args.compile else []
    ctx.print("speed of each op's default backend vs the eager reference (small shapes, float32):")
    rows = []
    for op in OPS:
        default = uresnet_ops.get_backend(op, ctx.device.type).name
        for mode in MODES:
            if mode not in testing.op_modes(op):
                continue
            try:
                rows += time_impls(op, [default, "eager", *impls_extra], SHAPES["small"][op], ctx.device,
                                   torch.float32, mode, min_time=0.05, out=ctx.print)
            except Exception as error:  # noqa: BLE001
                ctx.print(f"  {op} {mode}: ERROR {type(error).__name__}: {str(error).splitlines()[0][:100]}")
    print_op_table(rows, out=ctx.print)


# The demo's model: U-ResNet as in the seed (own U-Net encoder, EUCB upsampling), narrowed so
# that under a minute of training on 2 CPU cores reaches a good IoU on 48x48 synthetic shapes
# (an epoch: 32 steps of 8 images).
DEMO_MODEL = dict(model="uresnet", encoder=None,
                  model_args=dict(base_channels=8, residual_widths=(16, 32, 16, 16), residual_out_channels=8))
DEMO_MIN_MIOU = 0.5  # the demo fails below this (predicting background everywhere gives about 0.22)


def demo_config(args, device):
    return TrainConfig(**DEMO_MODEL, format="synthetic", data="synthetic", image_size=48, train_samples=256,
                       val_samples=48, epochs=args.epochs, batch_size=8, lr=6e-3, seed=args.seed,
                       device=device.type, out=args.out, progress=False, overwrite=True)  # the demo's own folder


def demo_train(ctx: DemoContext) -> None:
    """Train the demo model on synthetic shapes; per-class IoU against a trivial baseline."""
    cfg = demo_config(ctx.args, ctx.device)
    result = fit(cfg, log=ctx.print)
    info, best = result["info"], result["history"][result["best_epoch"] - 1]
    val_set, _ = build_data(cfg, "val")
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
    """One training step (forward, backward, Adam) of the demo model (fused) vs its plain
    PyTorch twin (``uresnet_ops.unfuse``: same weights, plain torch modules), interleaved so
    that load affects both."""
    cfg = demo_config(ctx.args, ctx.device)
    train_set, info = build_data(cfg, "train")
    batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size)))
    x, target = batch["image"].to(ctx.device), batch["mask"].to(ctx.device)
    torch.manual_seed(ctx.args.seed)
    model = build_model(cfg, info).to(ctx.device)
    models = {"plain": uresnet_ops.unfuse(model), "fused": model}
    steps = {name: make_step(m, "train", x, target) for name, m in models.items()}
    for step in steps.values():  # warm-up
        step()
    synchronize(ctx.device)
    times = interleaved_seconds(steps, ctx.device, ctx.args.speed_rounds)
    ran = [f"{op}:{last_used(op, 'forward')}" for op in _fused_ops(model)]
    plain, fused_s = (statistics.median(times[k]) for k in models)
    shape = "x".join(map(str, x.shape))
    ctx.print(f"train step of the demo model ({info.num_classes} classes, batch {shape}), median of "
              f"{ctx.args.speed_rounds}:")
    ctx.print(f"  plain PyTorch (unfused)    {plain * 1e3:8.1f} ms")
    ctx.print(f"  fused (default backends)   {fused_s * 1e3:8.1f} ms   ops: {', '.join(ran) or '-'}")
    ctx.print(f"  fused vs plain {plain / fused_s:.2f}x (>1: the fused model is faster; "
              "uresnet bench --models: the seed models)")


def _fused_ops(model) -> list[str]:
    """The uresnet_ops ops that ``model``'s modules call."""
    kinds = {fused.EUCB: "shuffle_upsample", fused.EUCBStar: "shuffle_upsample",
             fused.PixelShuffleBN: "pixel_shuffle_bn", fused.MultiDilationConv2d: "multi_dilation_conv2d",
             fused.ASPP: "multi_dilation_conv2d",
             fused.AtrousBlock: "multi_dilation_conv2d"}
    return sorted({op for m in model.modules() for cls, op in kinds.items() if isinstance(m, cls)})


# The demo, in order.
DEMO_STEPS: list[tuple[str, Callable[[DemoContext], None]]] = [
    ("environment", demo_environment),
    ("op correctness", demo_correctness),
    ("op speed", demo_speed),
    ("train a model on synthetic shapes", demo_train),
    ("model speed: fused vs plain PyTorch", demo_model_speed),
]


def run_demo(args, device: torch.device) -> int:
    """Run :data:`DEMO_STEPS` with the ``uresnet demo`` arguments; 1 when a check failed, else 0."""
    torch.manual_seed(args.seed)
    ctx = DemoContext(args, device)
    start = time.perf_counter()
    for title, step in DEMO_STEPS:
        ctx.print(f"\n== {title} ==")
        step(ctx)
    ctx.print(f"\ndemo finished in {time.perf_counter() - start:.1f} s"
              + (f"; FAILED: {', '.join(ctx.failures)}" if ctx.failures else "; all checks passed"))
    return 1 if ctx.failures else 0
