"""Whole-model benchmarks: the plain PyTorch model (``create_model(..., fused=False)``) vs the
fused one (and ``torch.compile`` of each) for resunet_atrous(resnet50), deresunet(resnet50) and
uresnet(resnet34): a training step (forward, backward, Adam) and an inference forward (eval,
no_grad) at batch 1 and 8; ratios to plain, the training step's memory (CPU too: its peak and
what the forward holds for the backward), and where
the fused training step's time goes. The measuring code is uresnet_models/benchmark.py
(``uresnet bench --models`` runs it too).

Sizes: ``small`` = 128x128 on CPU (256x256 on CUDA), ``full`` = 256x256 on CPU (512x512 on
CUDA), ``all`` (standalone only) = both. torch.compile is measured by default on CUDA only:
compiling a ResNet-50 U-Net's training step takes minutes per model and shape on a small CPU
(``--compile`` / ``--bench-compile`` ask for it there). Run::

    python benchmarks/bench_models.py --threads 1 --rounds 5 --markdown benchmarks/results/models.md
    python benchmarks/bench_models.py --report run1.json run2.json --markdown out.md   # runs of several models
    pytest benchmarks/bench_models.py --benchmark-json=bench-results/models.json

pytest-benchmark: one ``benchmark.group`` per (mode, model, shape), the implementations
("plain", "fused", "fused+fold" (inference: ``uresnet_ops.fuse(model, inference=True)``, every
Conv -> BatchNorm folded), "plain+compile", "fused+compile") as its members; ``extra_info`` holds the
train step's memory (``peak_memory_bytes``, ``saved_memory_bytes``). The smp test times our ``unet`` against
``segmentation_models_pytorch.Unet`` (skipped when smp is not installed).
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path

import pytest
import torch

try:
    import uresnet_models  # noqa: F401
except ImportError:  # a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import uresnet_ops

from uresnet_models import benchmark as mb
from uresnet_ops.timing import device_name, synchronize

_CASES = [(name, encoder, mode, batch) for name, encoder in mb.MODELS for mode in mb.MODEL_MODES
          for batch in mb.BATCHES]


@functools.lru_cache(maxsize=1)
def _models(name, encoder, device):
    """The plain and fused model of the last model asked for (the parametrization keeps one
    model's cases together)."""
    return mb.plain_and_fused(name, encoder, device)


# ----------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("impl", mb.IMPLS)
@pytest.mark.parametrize("name,encoder,mode,batch", _CASES, ids=[f"{n}-{e}-{m}-b{b}" for n, e, m, b in _CASES])
def test_model_step(benchmark, bench_options, request, name, encoder, mode, batch, impl):
    device = torch.device(bench_options.device)
    if impl.endswith("+compile") and not (request.config.getoption("bench_compile")
                                          or mb.compile_by_default(device)):
        pytest.skip("torch.compile of whole models: on CUDA, or with --bench-compile")
    (side,) = {s for _, s in mb.model_shapes(bench_options.size, device.type)}
    models = _models(name, encoder, device)
    if impl not in mb.model_impls(True, mode):
        pytest.skip(f"{impl}: inference only")
    base = impl.split("+")[0]
    model = torch.compile(models[base]) if impl.endswith("+compile") else models[base]
    if impl == "fused+fold":
        model = uresnet_ops.fuse(models[base].eval(), inference=True)
    x, target = mb.model_inputs(models[base], batch, side, device)
    step = mb.make_step(model, mode, x, target)
    benchmark.group = f"{mode} {mb.model_label(name, encoder)} {batch}x{side}x{side}"
    step()  # warm-up (compiles)
    synchronize(device)
    memory = mb.step_memory(models[base], step, device) if mode == "train" else {}

    def target_fn():
        step()
        synchronize(device)

    benchmark.pedantic(target_fn, rounds=3 if bench_options.size == "small" else 10, warmup_rounds=1)
    benchmark.extra_info.update(model=mb.model_label(name, encoder), implementation=impl, mode=mode,
                                device=device.type, batch=batch, side=side, bench_size=bench_options.size,
                                peak_memory_bytes=memory.get("peak_bytes"),
                                saved_memory_bytes=memory.get("saved_bytes"), torch_version=torch.__version__)


@pytest.mark.parametrize("name", ["unet", "smp:Unet"])
def test_unet_vs_smp_train_step(benchmark, bench_options, name):
    device = torch.device(bench_options.device)
    if name == "smp:Unet":
        smp = pytest.importorskip("segmentation_models_pytorch")
        model = smp.Unet("resnet34", encoder_weights=None, classes=2).to(device)
    else:
        model = mb.create_model("unet", encoder="resnet34", num_classes=2).to(device)
    batch, side = mb.model_shapes(bench_options.size, device.type)[0]
    benchmark.group = f"train unet(resnet34) vs smp {batch}x{side}x{side}"
    step = mb.make_step(model, "train", *mb.model_inputs(model, batch, side, device))
    step()
    synchronize(device)

    def target_fn():
        step()
        synchronize(device)

    benchmark.pedantic(target_fn, rounds=3 if bench_options.size == "small" else 10, warmup_rounds=1)
    benchmark.extra_info.update(model=f"{name}(resnet34)", implementation=name, device=device.type, batch=batch,
                                side=side, bench_size=bench_options.size, mode="train", torch_version=torch.__version__)


# ----------------------------------------------------------------------------- standalone
def _cell(row: dict | None, plain: bool) -> str:
    if row is None:
        return "-"
    return f"{row['median_s'] * 1e3:.0f} ms" + ("" if plain else f" ({row['vs_plain']:.2f}x)")


def markdown(runs: list[dict]) -> str:
    """The results of one or more runs (``{"meta": ..., "rows": ...}``, as ``--json`` writes
    them) as a markdown table (benchmarks/results/models.md)."""
    lines = [f"# Whole models: plain PyTorch vs fused ({runs[0]['meta']['device']})", ""]
    for meta in (run["meta"] for run in runs):
        lines += [f"Made with `{meta['command']}` on {meta['date']}: {meta['device_name']}, {meta['threads']} "
                  f"thread(s), {meta['rounds']} interleaved rounds per case, torch {meta['torch']}, backends "
                  f"{', '.join(meta['backends'])}, load average {meta['load']:.1f} before the run. {meta['note']}", ""]
    lines += ["x = plain median / median (>1 is faster than the plain PyTorch model); spread = (max - min) / median "
              "of the rounds (the widest of the case's implementations); peak = the training step's own peak "
              "allocations (gradients and activations; parameters, optimizer state and inputs excluded; CPU: "
              "torch.profiler's allocator events); saved = what is alive when the forward and loss end (the "
              "activations saved for the backward: what a fused op can save); fused/plain = fused / plain.", "",
              "| model | mode | shape | " + " | ".join(mb.IMPLS) + " | spread | peak plain | peak fused | "
              "fused/plain | saved plain | saved fused | fused/plain |",
              "|---|---|---|" + "---|" * len(mb.IMPLS) + "---|---|---|---|---|---|---|"]
    latest = {}  # a case measured again in a later run: the later measurement
    for row in (row for run in runs for row in run["rows"]):
        latest[row["model"], row["mode"], row["batch"], row["side"], row["implementation"]] = row
    rows = list(latest.values())
    cases: dict = {}
    for r in rows:
        cases.setdefault((r["model"], r["mode"], r["batch"], r["side"]), {})[r["implementation"]] = r
    for (model, mode, batch, side), by_impl in cases.items():
        times = [_cell(by_impl.get(impl), impl == "plain") for impl in mb.IMPLS]
        plain, fused = by_impl.get("plain", {}), by_impl.get("fused", {})
        mem = []
        for key in ("peak", "saved"):  # runs from before saved_bytes have none: "-"
            mem += [f"{r[key + '_bytes'] / 2**20:.0f} MiB" if r.get(key + "_bytes") else "-" for r in (plain, fused)]
            mem.append(f"{fused[key + '_vs_plain']:.2f}" if fused.get(key + "_vs_plain") else "-")
        spread = max(r["spread"] for r in by_impl.values())
        lines.append(f"| {model} | {mode} | {batch}x{side}x{side} | {' | '.join(times)} | {spread:.0%} | "
                     f"{' | '.join(mem)} |")
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        lines += ["", "Where the fused training step's time goes (one torch.profiler trace of it; the shares of "
                  "its CPU time): the uresnet_ops ops (forward and their backward nodes), torch's convolutions "
                  "outside them, the rest; the Amdahl limit is the fused-vs-plain ratio if our ops took no time.",
                  "", "| model | shape | uresnet_ops ops | convolutions | other | fused vs plain | Amdahl limit |",
                  "|---|---|---|---|---|---|---|"]
        for r in profiled:
            p = r["profile"]
            limit = f"{r['amdahl_limit']:.2f}x" if r.get("amdahl_limit") else "-"
            lines.append(f"| {r['model']} | {r['batch']}x{r['side']}x{r['side']} | {p['fused']:.1%} | "
                         f"{p['conv']:.1%} | {p['other']:.1%} | {r['vs_plain']:.2f}x | {limit} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=("small", "full", "all"), default="small",
                        help="image side: small 128 (CUDA 256), full 256 (CUDA 512), all both (default small)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per case (default 3)")
    parser.add_argument("--models", default=",".join(n for n, _ in mb.MODELS),
                        help="comma-separated subset of " + ", ".join(n for n, _ in mb.MODELS + mb.EXTRA_MODELS))
    parser.add_argument("--modes", default=",".join(mb.MODEL_MODES), help="train, infer or both (default both)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="also torch.compile each model (default: on CUDA only)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    parser.add_argument("--markdown", type=Path, help="write the table as markdown")
    parser.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                        help="measure nothing: write --markdown from these --json files (each a run or a list of "
                             "runs; a case measured again in a later run shows the later measurement)")
    args = parser.parse_args(argv)
    if args.report:
        loaded = [json.loads(path.read_text()) for path in args.report]  # a run, or a list of runs
        runs = [run for data in loaded for run in (data if isinstance(data, list) else [data])]
        text = markdown(runs)
        if args.markdown:
            args.markdown.write_text(text)
        print(text)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    load = mb.machine_load()
    print(f"device={args.device} size={args.size} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"backends={uresnet_ops.available_backends()} load={load}", flush=True)
    started = time.time()
    rows = mb.measure_models(args.device, args.size, args.rounds, args.models.split(","), args.compile,
                             modes=args.modes.split(","), out=lambda *a: print(*a, flush=True))
    notes = mb.noise_notes(load, [r["spread"] for r in rows], args.rounds)
    for note in notes:
        print(f"note: {note}")
    print(f"({time.time() - started:.0f} s)")
    compile = mb.compile_by_default(args.device) if args.compile is None else args.compile
    meta = dict(device=args.device, device_name=device_name(args.device), threads=torch.get_num_threads(),
                torch=torch.__version__, backends=uresnet_ops.available_backends(), load=load,
                rounds=args.rounds, date=time.strftime("%Y-%m-%d"), platform=platform.platform(),
                command="python benchmarks/bench_models.py " + " ".join(sys.argv[1:] if argv is None else argv),
                note=" ".join(n[0].upper() + n[1:] + "." for n in notes)
                + ("" if compile else " torch.compile not measured (see --compile)."))
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    if args.markdown:
        args.markdown.write_text(markdown([dict(meta=meta, rows=rows)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
