"""What ``uresnet bench`` times.

* The ops (``uresnet bench --op``): the median time of each fused op on every backend that runs
  here, next to the eager reference chain and ``torch.compile`` of it.
* The models (``uresnet bench --models``, benchmarks/bench_models.py is the pytest-benchmark
  version): one training step (forward + backward + Adam) of the seed models with the fused
  backends vs the same model under ``uresnet_ops.use_backend("reference")``, and our ``unet`` vs
  segmentation_models_pytorch's ``Unet`` (when installed).

Both repeat their measurements with the implementations interleaved and report the spread
(``(max - min) / median`` of the repeats); :func:`noise_notes` says when the machine was busy or
the spread too wide for the ratios to be trusted.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time

import torch

import uresnet_ops
from uresnet_ops import testing
from uresnet_ops.timing import measure, synchronize

from .registry import create_model

# Op shapes per `bench --size`, and for the demo (uresnet_ops.testing.sample_inputs keywords);
# benchmarks/cases.py has the full benchmark set.
SHAPES = {
    "small": {"pixel_shuffle_bn": dict(shape=(2, 256, 16, 16), upscale_factor=2),
              "shuffle_upsample": dict(shape=(1, 64, 32, 32), out_channels=32),
              "multi_dilation_conv2d": dict(shape=(1, 128, 32, 32), out_channels=32)},
    "full": {"pixel_shuffle_bn": dict(shape=(8, 2048, 16, 16), upscale_factor=2),
             "shuffle_upsample": dict(shape=(8, 320, 32, 32), out_channels=128),
             "multi_dilation_conv2d": dict(shape=(8, 256, 32, 32), out_channels=64)},
    # Tiny shapes for the demo's correctness check; 20x20 makes the dilated taps fall into padding.
    "check": {"pixel_shuffle_bn": dict(shape=(2, 16, 6, 6), upscale_factor=2),
              "shuffle_upsample": dict(shape=(2, 8, 6, 6), out_channels=12),
              "multi_dilation_conv2d": dict(shape=(2, 8, 20, 20), out_channels=6)},
}


# --------------------------------------------------------------------------- ops
def time_impls(op, impls, params, device, dtype, mode, *, min_time=0.2, repeats=1, out=print) -> list[dict]:
    """Median time of each implementation of ``op``, measured ``repeats`` times with the
    implementations interleaved (a drift in the machine's speed hits all alike): ``median_s``
    is the median of the repeats' medians, ``spread`` their (max - min) / median. A compile
    failure is reported, not raised."""
    from uresnet_ops.backends import last_used
    steps, labels, medians, failed = {}, {}, {}, set()
    for _ in range(repeats):
        for impl in (i for i in impls if i not in failed):
            try:
                fn, ctx = testing.implementation(op, impl)  # a fresh single-use context per measurement
                with ctx:
                    if impl not in steps:
                        sample = testing.sample_inputs(op, device, dtype, **params, **testing.mode_flags(mode))
                        steps[impl] = testing.step_function(sample, fn, mode)
                    res = measure(steps[impl], device=device, warmup=3, min_time=min_time)
                labels[impl] = impl
                if impl not in testing.BASELINES:  # a backend may hand a case to the next one: show what ran
                    ran = {last_used(op, "forward")} | ({last_used(op, "backward")} if mode == "train_fwdbwd"
                                                        else set())
                    labels[impl] = impl if ran == {impl} else f"{impl}>{'+'.join(sorted(map(str, ran)))}"
                medians.setdefault(impl, []).append(res["median_s"])
            except Exception as error:  # noqa: BLE001  (a broken or declining implementation: report, go on)
                failed.add(impl)
                medians.pop(impl, None)
                out(f"  {op} {impl} {mode}: skipped ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
    rows = []
    for impl, times in medians.items():
        median, spread = spread_of(times)
        rows.append(dict(op=op, shape=list(params["shape"]), mode=mode, implementation=labels[impl], median_s=median,
                         spread=spread, repeats=len(times), medians_s=times))
    base = {r["implementation"]: r["median_s"] for r in rows}
    for r in rows:
        for b in testing.BASELINES:
            r[f"vs_{b}"] = base[b] / r["median_s"] if b in base else None
    return rows


def spread_of(times: list[float]) -> tuple[float, float]:
    """(median, (max - min) / median) of repeated timings."""
    median = statistics.median(times)
    return median, (max(times) - min(times)) / median


def machine_load() -> float | None:
    """The 1-minute load average (runnable processes, ours included), None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def noise_notes(load_before: float | None, spreads: list[float], repeats: int, threshold: float = 0.1) -> list[str]:
    """Notes that the timings may not be trusted: other work on the machine (a load average
    above half a core before the timing began) and spreads above ``threshold``."""
    notes = []
    cores = os.cpu_count() or 1
    if load_before is not None and load_before > 0.5:
        notes.append(f"the machine was busy: load average {load_before:.1f} on {cores} core(s) before the timing "
                     "began, so the times and ratios are noisy; repeat on an idle machine")
    wide = [s for s in spreads if s > threshold]
    if wide:
        notes.append(f"{len(wide)} of {len(spreads)} measurement(s) spread by more than {threshold:.0%} over {repeats} "
                     f"repeat(s) (up to {max(wide):.0%}): a ratio within that is noise; more --repeats or --min-time "
                     "narrow it")
    elif repeats < 2:
        notes.append("one repeat: no spread measured (use --repeats 3 or more)")
    return notes


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:8.1f} us" if s < 1e-3 else f"{s * 1e3:8.2f} ms"


def _ratio(v) -> str:
    return f"{v:7.2f}x" if v else "      -"


def print_op_table(rows: list[dict], out=print) -> None:
    """The rows of :func:`time_impls` with their ratios to the baselines."""
    out(f"  {'op':<22} {'shape':<18} {'mode':<13} {'implementation':<15} {'median':>11} {'spread':>7} {'xeager':>8} "
        f"{'xcompiled':>9}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        out(f"  {r['op']:<22} {shape:<18} {r['mode']:<13} {r['implementation']:<15} {_fmt_time(r['median_s'])} "
            f"{r['spread']:>6.0%} {_ratio(r.get('vs_eager'))} {_ratio(r.get('vs_compiled')):>9}")
    out("  (x = baseline time / implementation time; >1 is faster; spread = (max - min) / median of the repeats)")


# --------------------------------------------------------------------------- models
MODELS = [("resunet_atrous", "resnet50"), ("deresunet", "resnet50"), ("uresnet", "resnet34")]
IMPLS = ("fused", "reference")


def model_shape(size: str, device: str) -> tuple[int, int]:
    """(batch, side) of the train step."""
    if size == "full":
        return (16 if device == "cuda" else 4), 256
    return (4 if device == "cuda" else 2), 128


def create_bench_model(name: str, encoder: str):
    """``smp:Unet`` is segmentation_models_pytorch's U-Net; any other name is ours."""
    if name == "smp:Unet":
        import segmentation_models_pytorch as smp  # optional (the `bench` extra): ImportError if missing
        return smp.Unet(encoder, encoder_weights=None, classes=2)
    return create_model(name, encoder=encoder, num_classes=2)


def model_step(name: str, encoder: str, device, batch: int, side: int, seed: int = 0):
    """A model, its Adam optimizer and a callable running one train step on fixed inputs."""
    torch.manual_seed(seed)
    model = create_bench_model(name, encoder).to(device).train()
    channels = 3 + (model.depth_channels if name == "deresunet" else 0)
    x = torch.randn(batch, channels, side, side, device=device)
    target = torch.randint(0, 2, (batch, side, side), device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as `uresnet train` uses it
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        return loss

    return model, step


def step_seconds(step, device, rounds: int) -> list[float]:
    """Wall time of each of ``rounds`` calls of ``step`` (already warmed up), each waited for."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_step_seconds(step, device, rounds: int) -> float:
    """Median wall time of ``rounds`` calls of ``step`` (already warmed up), each waited for."""
    return statistics.median(step_seconds(step, device, rounds))


def measure_model(name, encoder, impl, device, size, rounds=3) -> dict:
    """Median seconds per train step (and CUDA peak memory) of one model and implementation."""
    batch, side = model_shape(size, torch.device(device).type)
    ctx = uresnet_ops.use_backend("reference") if impl == "reference" else contextlib.nullcontext()
    cuda = torch.device(device).type == "cuda"
    with ctx:
        model, step = model_step(name, encoder, device, batch, side)
        step()  # warm-up (allocator, cuDNN/oneDNN primitives)
        synchronize(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        median_s, spread = spread_of(step_seconds(step, device, rounds))
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
    del model, step
    return dict(model=f"{name}({encoder})", impl=impl, batch=batch, side=side, median_s=median_s, spread=spread,
                peak_bytes=peak)


def measure_model_pair(name, encoder, device, size, rounds=3) -> tuple[dict, dict]:
    """:func:`measure_model` of the fused and the reference implementation of one model, with
    their rounds interleaved (fused, reference, fused, ...) so that a drift in the machine's speed
    (a shared VM's drifts by tens of percent over minutes) hits both alike; ``spread`` is
    (max - min) / median of the rounds. CUDA peak memory is
    measured per implementation in one extra step, as the step's own allocations (inputs,
    parameters and optimizer state of both models excluded)."""
    batch, side = model_shape(size, torch.device(device).type)
    cuda = torch.device(device).type == "cuda"
    contexts = {"fused": contextlib.nullcontext, "reference": lambda: uresnet_ops.use_backend("reference")}
    steps, times, peaks = {}, {impl: [] for impl in IMPLS}, {}
    for impl in IMPLS:
        with contexts[impl]():
            _, steps[impl] = model_step(name, encoder, device, batch, side)
            steps[impl]()  # warm-up (allocator, cuDNN/oneDNN primitives)
            synchronize(device)
            if cuda:
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                steps[impl]()
                synchronize(device)
                peaks[impl] = torch.cuda.max_memory_allocated(device) - base
    for _ in range(rounds):
        for impl in IMPLS:
            with contexts[impl]():
                times[impl] += step_seconds(steps[impl], device, 1)
    return tuple(dict(model=f"{name}({encoder})", impl=impl, batch=batch, side=side,
                      **dict(zip(("median_s", "spread"), spread_of(times[impl]))), peak_bytes=peaks.get(impl))
                 for impl in IMPLS)


def print_model_table(device: str, size: str, rounds: int = 3, models=None, out=print) -> list[dict]:
    """Measure and print the fused-vs-reference train-step table of ``models`` (names; default:
    all of MODELS, plus "unet": ours vs smp's), one line per model as it is measured; returns the
    measurements (one ``{"fused": ..., "reference": ...}`` per model, as :func:`measure_model`
    gives them)."""
    wanted = set(models or [n for n, _ in MODELS] + ["unet"])
    rows = []
    out(f"{'model':<26} {'shape':<12} {'fused':>10} {'reference':>10} {'speedup':>8} {'spread':>7} {'mem fused':>10} "
        f"{'mem ref':>10} {'mem saved':>9}")
    for name, encoder in MODELS:
        if name not in wanted:
            continue
        fused, ref = measure_model_pair(name, encoder, device, size, rounds)
        rows.append({"fused": fused, "reference": ref})
        mem = ("", "", "")
        if fused["peak_bytes"]:
            mem = (f"{fused['peak_bytes'] / 2**30:.2f}G", f"{ref['peak_bytes'] / 2**30:.2f}G",
                   f"{1 - fused['peak_bytes'] / ref['peak_bytes']:.0%}")
        shape = f"{fused['batch']}x{fused['side']}x{fused['side']}"
        out(f"{fused['model']:<26} {shape:<10} {fused['median_s'] * 1e3:>8.0f}ms "
            f"{ref['median_s'] * 1e3:>8.0f}ms {ref['median_s'] / fused['median_s']:>7.2f}x "
            f"{max(fused['spread'], ref['spread']):>6.0%} {mem[0]:>10} {mem[1]:>10} {mem[2]:>9}")
    if "unet" in wanted:
        try:
            ours, theirs = (measure_model(name, "resnet50", "fused", device, size, rounds)
                            for name in ("unet", "smp:Unet"))
        except ImportError:
            out("segmentation_models_pytorch is not installed: no unet vs smp comparison")
            return rows
        rows.append({"fused": ours, "smp": theirs})
        out(f"unet(resnet50) {ours['median_s'] * 1e3:.0f}ms vs smp.Unet(resnet50) {theirs['median_s'] * 1e3:.0f}ms "
            f"(smp / ours: {theirs['median_s'] / ours['median_s']:.2f}x; spread "
            f"{max(ours['spread'], theirs['spread']):.0%})")
    return rows
