"""What ``uresnet bench`` times.

* The ops (``uresnet bench --op``): the median time of each fused op on every backend that runs
  here, next to the eager reference chain and ``torch.compile`` of it.
* The models (``uresnet bench --models``; benchmarks/bench_models.py is the standalone and the
  pytest-benchmark version, benchmarks/results/models.md the committed table): for each seed
  model, a training step (forward, backward, Adam) and an inference forward (eval, no_grad) at
  batch 1 and 8, of the plain model (``create_model(..., fused=False)``: plain PyTorch, the
  baseline), the fused model (for inference also folded, ``fuse(model, inference=True)``), and
  ``torch.compile`` of each (by default on CUDA only: on a small CPU it takes minutes per model
  and shape); ratios to the plain model; the memory of the training step (:func:`step_memory`,
  CPU too: its peak and what the forward holds for the backward); and a profile of the fused
  training step (:func:`time_shares`: the share of our ops and of the convolutions) with the
  Amdahl limit of the whole-model ratio (:func:`amdahl_limit`).

Both repeat their measurements with the implementations interleaved and report the spread
(``(max - min) / median`` of the repeats); :func:`noise_notes` says when the machine was busy or
the spread too wide for the ratios to be trusted.
"""
from __future__ import annotations

import os
import re
import statistics
import time

import torch

import uresnet_ops
from uresnet_ops import testing
from uresnet_ops.timing import measure, synchronize

from .constants import OPS
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
MODELS = [("resunet_atrous", "resnet50"), ("deresunet", "resnet50"), ("uresnet", "resnet34")]  # the seeds
EXTRA_MODELS = [("unet", "resnet34"), ("resunet", None)]  # on request (--models); None: the seed's own encoder
# plain: create_model(..., fused=False), every fused module replaced by the plain torch modules it
# stands for (the user's baseline); fused: the registered model; "+compile": torch.compile of it;
# fused+fold (inference only): uresnet_ops.fuse(fused, inference=True), every eval Conv -> BatchNorm
# folded into the convolution.
IMPLS = ("plain", "fused", "fused+fold", "plain+compile", "fused+compile")
MODEL_MODES = ("train", "infer")  # forward + backward + Adam step; eval forward under no_grad
BATCHES = (1, 8)
SIDES = {"small": {"cpu": 128, "cuda": 256}, "full": {"cpu": 256, "cuda": 512}}  # image side per --size


def model_label(name: str, encoder: str | None) -> str:
    return f"{name}({encoder or 'own encoder'})"


def model_shapes(size: str, device: str) -> list[tuple[int, int]]:
    """(batch, side) of each measured case: batch 1 and 8 at the side of ``size`` ("all": both sides)."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    sides = [SIDES[s][kind] for s in (SIDES if size == "all" else [size])]
    return [(batch, side) for side in sides for batch in BATCHES]


def compile_by_default(device) -> bool:
    """torch.compile is measured by default only on CUDA: on a small CPU, compiling a ResNet-50
    U-Net's train step takes minutes per model and shape (``--compile`` asks for it)."""
    return torch.device(device).type == "cuda"


def model_impls(compile: bool, mode: str = "infer") -> tuple[str, ...]:
    """The implementations measured in ``mode`` (fused+fold: inference only)."""
    return tuple(i for i in IMPLS if (compile or not i.endswith("+compile")) and (mode == "infer" or i != "fused+fold"))


def plain_and_fused(name: str, encoder: str | None, device, seed: int = 0, **kwargs) -> dict[str, torch.nn.Module]:
    """The fused model (``create_model``; ``kwargs`` go to it) and its plain PyTorch twin
    (``create_model(..., fused=False)``: every fused module replaced by the plain torch modules
    it stands for) with the same weights, on ``device``."""
    torch.manual_seed(seed)
    fused = create_model(name, encoder=encoder, num_classes=2, **kwargs)
    plain = create_model(name, encoder=encoder, num_classes=2, fused=False, **kwargs)
    plain.load_state_dict(fused.state_dict())  # same keys: a missing or extra one raises
    return {"plain": plain.to(device), "fused": fused.to(device)}


def make_step(model: torch.nn.Module, mode: str, x: torch.Tensor, target: torch.Tensor, optimizer=None):
    """One call of the returned function is one ``mode`` step on fixed inputs: "train" =
    forward, cross-entropy, backward, Adam (fused=True, as ``uresnet train`` uses it);
    "infer" = eval forward under ``torch.no_grad``."""
    if mode == "infer":
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
        return step
    if mode != "train":
        raise ValueError(f"mode: expected one of {MODEL_MODES}, got {mode!r}")
    model.train()
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.profiler.record_function(FORWARD):  # where step_memory reads the saved bytes
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
    return step


FORWARD = "uresnet_bench_forward"  # the profiler range of a train step's forward and loss (make_step)


def model_inputs(model, batch: int, side: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random input (3 channels, plus the depth channels of deresunet) and target."""
    gen = torch.Generator().manual_seed(seed)
    channels = 3 + getattr(model, "depth_channels", 0)
    x = torch.randn(batch, channels, side, side, generator=gen)
    return x.to(device), torch.randint(0, 2, (batch, side, side), generator=gen).to(device)


def step_memory(model: torch.nn.Module, step, device) -> dict:
    """The memory of one call of ``step`` (a train step of :func:`make_step`), in bytes above
    what was alive before it (parameters, optimizer state and inputs; the gradients are dropped
    first so that the step counts them):

    * ``peak_bytes``: the peak. CUDA: ``torch.cuda.max_memory_allocated``. CPU: the maximum of
      the running sum of the allocator events that ``torch.profiler(profile_memory=True)``
      records (c10's allocator, which every ATen tensor, ours included, comes from; oneDNN's
      scratchpads and the Python heap bypass it, as they bypass CUDA's).
    * ``saved_bytes``: what is alive when the forward and loss end (the :data:`FORWARD` range):
      the activations saved for the backward, plus the small output and loss. This is what a
      fused op saves memory on; the peak often comes later, in the encoder's backward, once
      the decoder's saved activations are freed and most gradients exist (benchmarks/README.md).
      The running sum of the same events, on the step's device; None if ``step`` marks no
      forward."""
    from torch.profiler import ProfilerActivity, profile
    device = torch.device(device)
    model.zero_grad(set_to_none=True)
    synchronize(device)
    cuda = device.type == "cuda"
    if cuda:
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        synchronize(device)
    # the raw allocator events (the FunctionEvents fold them into their ops' totals)
    events = list(prof.profiler.kineto_results.events())
    forward_end = max((e.start_ns() + e.duration_ns() for e in events if e.name() == FORWARD), default=None)
    memory = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type().name == device.type.upper())
    alive = peak = 0
    saved = None
    for time_ns, nbytes in memory:
        if forward_end is not None and saved is None and time_ns > forward_end:
            saved = alive
        alive += nbytes
        peak = max(peak, alive)
    if forward_end is not None and saved is None:
        saved = alive
    return dict(peak_bytes=torch.cuda.max_memory_allocated(device) - base if cuda else peak, saved_bytes=saved)


_CONV = re.compile(r"conv(\d|_transpose|_depthwise|olution)", re.IGNORECASE)


def _kind(name: str) -> str | None:
    """"fused" for our ops and their backward nodes, "conv" for torch's convolutions (forward
    and backward), else None."""
    if name.startswith("uresnet_ops::") or "uresnet::" in name or any(op in name for op in OPS):
        return "fused"
    return "conv" if _CONV.search(name) else None


def time_shares(step, device) -> dict:
    """Where one (warmed-up) call of ``step`` spends its time, by a ``torch.profiler`` trace:
    ``fused`` = the uresnet_ops ops (forward, and their autograd nodes in the backward),
    ``conv`` = torch's convolutions (``aten::conv2d``/``convolution``/``mkldnn_convolution`` and
    ``ConvolutionBackward``) outside them, ``other`` = the rest; each a share of the step's
    profiled time (CPU time on CPU; kernel time on CUDA). An event inside one already counted
    (a convolution inside a fused op) is not counted again. The profiler's own per-op cost
    inflates the small ops a little."""
    from torch.profiler import ProfilerActivity, profile, record_function
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with record_function("uresnet_bench_step"):
            step()
            synchronize(device)
    spent = {"fused": 0.0, "conv": 0.0}
    total = 0.0
    for event in prof.events():
        if cuda:
            total += event.self_device_time_total
        elif event.name == "uresnet_bench_step":
            total = event.cpu_time_total
        kind = _kind(event.name)
        parent = event.cpu_parent
        while kind and parent is not None:
            kind = None if _kind(parent.name) else kind  # counted with an outer fused op or convolution
            parent = parent.cpu_parent
        if kind:
            spent[kind] += event.device_time_total if cuda else event.cpu_time_total
    shares = {k: v / total for k, v in spent.items()}
    return {**shares, "other": 1 - sum(shares.values()), "profiled_s": total / 1e6}


def amdahl_limit(plain_s: float, fused_s: float, fused_share: float) -> float:
    """The whole-model speed-up over plain if the fused ops took no time at all."""
    return plain_s / (fused_s * (1 - fused_share))


def measure_case(models: dict, mode: str, batch: int, side: int, device, impls=IMPLS[:2], rounds: int = 3,
                 memory: bool = True, profile: bool = True, out=print) -> list[dict]:
    """Time ``mode`` steps of ``models`` (``{"plain": ..., "fused": ...}`` as :func:`plain_and_fused`
    gives them) at batch x side x side for each implementation in ``impls``: one warm-up call
    (it compiles; ``warmup_s``), for "train" the memory of one step (:func:`step_memory`),
    then ``rounds`` rounds with the implementations interleaved, in alternating order, so that a
    drift in the machine's speed hits all alike: ``median_s`` and ``spread`` ((max - min) / median)
    of the rounds, ``vs_plain`` = plain median / this median (>1 is faster), ``peak_vs_plain`` and
    ``saved_vs_plain`` (this / plain).
    "+compile" shares the eager model's parameters and optimizer (``torch.compile`` of it, from a
    reset compiler so that each case compiles from scratch); "fused+fold" is a folded copy of the
    fused model (``uresnet_ops.fuse(..., inference=True)``, "infer" only). With ``profile``, the fused train
    row also gets ``profile`` (:func:`time_shares` of one more step) and ``amdahl_limit``. A
    failing implementation is reported and left out."""
    device = torch.device(device)
    x, target = model_inputs(models["plain"], batch, side, device)
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-4, fused=True) for k, m in models.items()} \
        if mode == "train" else {}
    if any(i.endswith("+compile") for i in impls):
        torch._dynamo.reset()
    steps, rows = {}, {}
    for impl in impls:
        base = impl.split("+")[0]
        model = torch.compile(models[base]) if impl.endswith("+compile") else models[base]
        try:
            if impl == "fused+fold":  # a folded copy: the fused model stays trainable
                model = uresnet_ops.fuse(models[base].eval(), inference=True)
            step = make_step(model, mode, x, target, optimizers.get(base))
            start = time.perf_counter()
            step()
            synchronize(device)
            warmup_s = time.perf_counter() - start
            mem = step_memory(models[base], step, device) if memory and mode == "train" else {}
            if not mem:
                step()  # a second warm-up, as the memory step is for "train"
                synchronize(device)
        except Exception as error:  # noqa: BLE001  (e.g. a compile failure: report it, go on)
            out(f"  {impl} {mode} {batch}x{side}x{side}: skipped ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:120] if str(error) else ''})")
            continue
        steps[impl] = step
        rows[impl] = dict(mode=mode, batch=batch, side=side, implementation=impl, warmup_s=warmup_s,
                          peak_bytes=mem.get("peak_bytes"), saved_bytes=mem.get("saved_bytes"))
    times = interleaved_seconds(steps, device, rounds)
    for impl, row in rows.items():
        row.update(dict(zip(("median_s", "spread"), spread_of(times[impl]))), medians_s=times[impl])
    plain = rows.get("plain")
    for row in rows.values():
        row["vs_plain"] = plain["median_s"] / row["median_s"] if plain else None
        for key in ("peak", "saved"):
            mine, base = row[f"{key}_bytes"], plain and plain[f"{key}_bytes"]
            row[f"{key}_vs_plain"] = mine / base if mine and base else None
    fused = rows.get("fused")
    if profile and mode == "train" and fused:
        fused["profile"] = time_shares(steps["fused"], device)
        if plain:
            fused["amdahl_limit"] = amdahl_limit(plain["median_s"], fused["median_s"], fused["profile"]["fused"])
    return list(rows.values())


def step_seconds(step, device, rounds: int) -> list[float]:
    """Wall time of each of ``rounds`` calls of ``step`` (already warmed up), each waited for."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def interleaved_seconds(steps: dict, device, rounds: int) -> dict[str, list[float]]:
    """Wall times of ``rounds`` rounds of ``steps`` (name -> step, already warmed up), one call
    of each per round, in alternating order (forward, then backward), so that a drift in the
    machine's speed hits all alike."""
    times = {name: [] for name in steps}
    for round_ in range(rounds):
        for name in (list(steps) if round_ % 2 == 0 else list(steps)[::-1]):
            times[name] += step_seconds(steps[name], device, 1)
    return times


def median_step_seconds(step, device, rounds: int) -> float:
    """Median wall time of ``rounds`` calls of ``step`` (already warmed up), each waited for."""
    return statistics.median(step_seconds(step, device, rounds))


def measure_models(device, size: str = "small", rounds: int = 3, models=None, compile: bool | None = None,
                   modes=MODEL_MODES, memory: bool = True, profile: bool = True, out=print) -> list[dict]:
    """The whole-model benchmark: for each of ``models`` (names; default the seeds, :data:`MODELS`),
    mode and shape of :func:`model_shapes`, :func:`measure_case` of plain, fused and (``compile``,
    default :func:`compile_by_default`) their ``torch.compile``. Prints a table line per
    case as it is measured (:func:`print_model_rows`); returns the rows (one per implementation,
    with ``model``)."""
    known = MODELS + EXTRA_MODELS
    wanted = models or [n for n, _ in MODELS]
    unknown = sorted(set(wanted) - {n for n, _ in known})
    if unknown:
        raise ValueError(f"models: unknown {', '.join(unknown)}; choose from {', '.join(n for n, _ in known)}")
    compile = compile_by_default(device) if compile is None else compile
    out(MODEL_TABLE_HEADER)
    rows = []
    for name, encoder in (m for m in known if m[0] in wanted):
        pair = plain_and_fused(name, encoder, device)
        for mode in modes:
            for batch, side in model_shapes(size, device):
                case = measure_case(pair, mode, batch, side, device, model_impls(compile, mode), rounds, memory,
                                    profile, out)
                for row in case:
                    row["model"] = model_label(name, encoder)
                print_model_rows(case, out)
                rows += case
        del pair
    return rows


MODEL_TABLE_HEADER = (f"{'model':<26} {'mode':<5} {'shape':<10} {'plain':>9} {'fused':>16} {'fused+fold':>16} "
                      f"{'plain+compile':>16} {'fused+compile':>16} {'spread':>6} {'peak plain':>10} "
                      f"{'peak fused':>10} {'fused/plain':>11} {'saved plain':>11} {'saved fused':>11} "
                      f"{'fused/plain':>11}")


def print_model_rows(case: list[dict], out=print) -> None:
    """One table line for the rows of one case (times; ratios to plain, >1 is faster; peak
    and saved training memory, :func:`step_memory`), then for the fused train step where its time went."""
    by_impl = {r["implementation"]: r for r in case}
    if not by_impl:
        return
    first = case[0]
    plain, fused = by_impl.get("plain"), by_impl.get("fused")
    cells = [_ms(plain["median_s"]) if plain else "-"] + [
        f"{_ms(by_impl[i]['median_s'])} {_ratio(by_impl[i]['vs_plain'])}" if i in by_impl else "-" for i in IMPLS[1:]]
    memory = []
    for key in ("peak", "saved"):
        memory += [f"{r[key + '_bytes'] / 2**30:.2f}G" if r and r.get(key + "_bytes") else "-" for r in (plain, fused)]
        memory.append(f"{fused[key + '_vs_plain']:.2f}" if fused and fused.get(key + "_vs_plain") else "-")
    shape = f"{first['batch']}x{first['side']}x{first['side']}"
    out(f"{first.get('model', ''):<26} {first['mode']:<5} {shape:<10} {cells[0]:>9} "
        + " ".join(f"{c:>16}" for c in cells[1:])
        + f" {max(r['spread'] for r in case):>6.0%} {memory[0]:>10} {memory[1]:>10} "
        + " ".join(f"{m:>11}" for m in memory[2:]))
    if fused and fused.get("profile"):
        out("  " + profile_line(fused))


def profile_line(fused: dict) -> str:
    """"where the time goes" of a fused train row, with the Amdahl limit."""
    p = fused["profile"]
    line = (f"where the fused train step's time goes (profiled): uresnet_ops ops {p['fused']:.0%}, "
            f"convolutions {p['conv']:.0%}, other {p['other']:.0%}")
    if fused.get("amdahl_limit"):
        line += f"; fused vs plain {fused['vs_plain']:.2f}x, limit with free fused ops {fused['amdahl_limit']:.2f}x"
    return line


def _ms(s: float) -> str:
    return f"{s * 1e3:7.1f}ms"
