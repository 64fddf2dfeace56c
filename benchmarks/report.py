"""Turn pytest-benchmark JSON (``--benchmark-json``) into a markdown report and a PNG chart.

    python benchmarks/report.py results.json [--out DIR] [--check]

Writes DIR/<name>.md and DIR/<name>.png (DIR defaults to the JSON's folder) and prints the
markdown. Per group (op, shape, mode, dtype): each implementation's median time, the ratios
eager/impl and compiled/impl (>1: faster than the eager / the torch.compile'd reference chain),
achieved GB/s (minimal bytes: inputs read once, outputs written once) and TFLOP/s (nominal flops
of the reference chain), the higher of the two as % of the measured device ceiling, and
`% roofline`: the time a kernel at the roofline would take (minimal bytes at the copy
bandwidth or useful flops at the matmul rate, whichever is longer) as % of the measured time.
On CUDA the time is the CUDA-event median (``extra_info["device_median_s"]``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path

BASELINES = ("eager", "compiled")


def load(path: Path) -> tuple[dict, dict[str, list[dict]]]:
    data = json.loads(path.read_text())
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "implementation" not in info:
            continue
        median = info.get("device_median_s") or bench["stats"]["median"]
        groups[bench.get("group") or bench["name"]].append(dict(info, median_s=median))
    return data.get("machine_info", {}), groups


def _order(impl: str) -> tuple:
    return (impl in BASELINES, BASELINES.index(impl) if impl in BASELINES else 0, impl)


def fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def rows_of(group: list[dict], ceilings: dict) -> list[dict]:
    by_impl = {r["implementation"]: r for r in group}
    eager, compiled = (by_impl.get(b, {}).get("median_s") for b in BASELINES)
    rows = []
    for impl in sorted(by_impl, key=_order):
        r = by_impl[impl]
        t = r["median_s"]
        gbps = r["bytes"] / t / 1e9 if r.get("bytes") else None
        tflops = r["flops"] / t / 1e12 if r.get("flops") else None
        pct = [(100 * v / ceilings[k], name) for v, k, name in
               ((gbps, "copy_GBps", "BW"), (tflops, "matmul_TFLOPs", "FLOP")) if v and ceilings.get(k)]
        # The roofline prediction: minimal bytes at copy bandwidth or useful flops at the
        # matmul rate, whichever binds (scripts/roofline.py tabulates it for the H200).
        t_mem, t_math = (v / ceilings[k] / s if v and ceilings.get(k) else 0.0
                         for v, k, s in ((r.get("bytes"), "copy_GBps", 1e9),
                                         (r.get("useful_flops"), "matmul_TFLOPs", 1e12)))
        roofline = max(t_mem, t_math) or None
        model = _model_time(r, t_mem, t_math) if roofline and r.get("device") == "cuda" else None
        peak = r.get("peak_mem_bytes")
        rows.append(dict(impl=impl, ran=r.get("backend_ran"), t=t, gbps=gbps, tflops=tflops,
                         peak_mb=None if peak is None else peak / 2 ** 20,
                         vs_eager=eager / t if eager else None, vs_compiled=compiled / t if compiled else None,
                         pct=max(pct) if pct else None, roofline_pct=100 * roofline / t if roofline else None,
                         model_pct=100 * roofline / model if model else None))
    return rows


def _model_time(r, t_mem, t_math):
    """The time scripts/roofline.py's model predicts for this backend (the eager chain is the
    reference backend's) on a CUDA device, or None where it has no prediction."""
    roofline = sys.modules.get("roofline")
    if roofline is None:
        spec = importlib.util.spec_from_file_location("roofline", Path(__file__).parents[1] / "scripts" / "roofline.py")
        roofline = importlib.util.module_from_spec(spec)
        sys.modules["roofline"] = roofline  # dataclasses look their module up there
        spec.loader.exec_module(roofline)
    impl = "reference" if r["implementation"] == "eager" else r["implementation"]
    prediction = roofline.PREDICTIONS.get((r.get("op"), impl))
    if prediction is None or r.get("dtype") not in prediction.memory:
        return None
    return roofline.predicted_time(prediction, r["dtype"], t_mem, t_math)


def markdown(machine: dict, groups: dict[str, list[dict]]) -> str:
    info = machine.get("uresnet", {})
    ceil = info.get("ceilings", {})
    out = ["# uresnet_ops benchmarks", ""]
    if info:
        out += [f"Device: **{info.get('device_name')}** ({info.get('device')}), torch {info.get('torch')}, "
                f"triton {info.get('triton')}, size `{info.get('bench_size')}`, "
                f"compiled kernels: {'yes' if info.get('extension_built') else 'no'}.  ",
                f"Measured ceilings: copy {ceil.get('copy_GBps', float('nan')):.1f} GB/s, "
                f"{ceil.get('matmul_dtype', '')} matmul {ceil.get('matmul_TFLOPs', float('nan')):.2f} TFLOP/s.  ",
                f"Default backends: {info.get('default_backend')}.  ",
                f"Allocator environment: {info.get('allocator_env') or 'default'}"
                f"{', CPU ISA capped at ' + info['cpu_isa_cap'] if info.get('cpu_isa_cap') else ''}.", ""]
    out += ["Ratios are baseline time / implementation time: **>1 means faster** than the eager "
            "(`×eager`) or torch.compile'd (`×compiled`) reference chain. `% ceil` is the higher of "
            "GB/s vs copy bandwidth (BW) and TFLOP/s vs matmul throughput (FLOP); over 100% means the ceiling "
            "was measured low (a busy machine) or the op is not bound by it. `% roofline` is the time a kernel "
            "at the roofline would take (scripts/roofline.py's model at the measured ceilings) as % of the "
            "measured time: 100% is as fast as the hardware allows. On CUDA, `predicted % roofline` is what "
            "docs/roofline.md's model predicts for that backend from its machine code.", ""]
    for name, group in groups.items():
        rows = rows_of(group, ceil)
        memory = any(r["peak_mb"] is not None for r in rows)  # CUDA: peak memory of one step
        model = any(r["model_pct"] is not None for r in rows)  # CUDA: the model's prediction
        out += [f"### {name}", "",
                "| implementation | median | ×eager | ×compiled | GB/s | TFLOP/s | % ceil | % roofline |"
                + (" predicted % roofline |" if model else "") + (" peak MiB |" if memory else ""),
                "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if model else "") + ("---:|" if memory else "")]
        for r in rows:
            impl = r["impl"] if not r["ran"] or r["ran"] == r["impl"] else f"{r['impl']} (ran {r['ran']})"
            cells = [impl, fmt_time(r["t"]), _num(r["vs_eager"], "×"), _num(r["vs_compiled"], "×"),
                     _num(r["gbps"]), _num(r["tflops"], digits=3),
                     f"{r['pct'][0]:.1f}% {r['pct'][1]}" if r["pct"] else "–",
                     _num(r["roofline_pct"], "%", digits=1)]
            cells += [_num(r["model_pct"], "%", digits=1)] if model else []
            out.append("| " + " | ".join(cells + ([_num(r["peak_mb"], digits=1)] if memory else [])) + " |")
        out.append("")
    return "\n".join(out)


def _num(v, suffix="", digits=2):
    return "–" if v is None else f"{v:.{digits}f}{suffix}"


def chart(groups: dict[str, list[dict]], path: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib is not installed, so no PNG chart "
              "(pip install matplotlib, or the 'plot' extra)", file=sys.stderr)
        return False
    names = list(groups)
    impls = sorted({r["implementation"] for g in groups.values() for r in g} - set(BASELINES), key=_order)
    if not names or not impls:
        return False
    height = max(3.0, 0.22 * len(names) * max(len(impls), 1) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(14, height), sharey=True)
    bar = 0.8 / len(impls)
    for ax, key, label in ((axes[0], "vs_eager", "eager / implementation"),
                           (axes[1], "vs_compiled", "compiled / implementation")):
        for i, impl in enumerate(impls):
            ys, xs = [], []
            for j, name in enumerate(names):
                row = next((r for r in rows_of(groups[name], {}) if r["impl"] == impl), None)
                if row and row[key]:
                    ys.append(j + (i - (len(impls) - 1) / 2) * bar)
                    xs.append(row[key])
            # Bars grow from 1 (no change): right is faster, left is slower.
            ax.barh(ys, [x - 1 for x in xs], height=bar, left=1, label=impl)
            for y, x in zip(ys, xs, strict=False):
                ax.text(x, y, f" {x:.3g} ", va="center", ha="left" if x >= 1 else "right", fontsize=6)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"speed-up ({label}; >1 is faster)")
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", type=Path, help="output folder (default: the JSON's folder)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; fail unless <name>.md is what the JSON gives (committed results)")
    args = parser.parse_args(argv)
    try:
        machine, groups = load(args.results)
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"cannot read {args.results}: {error}")
    if not groups:
        parser.error(f"{args.results}: no uresnet benchmarks in it (was it written by benchmarks/?)")
    out_dir = args.out or args.results.parent
    text = markdown(machine, groups)
    md_path, png_path = out_dir / f"{args.results.stem}.md", out_dir / f"{args.results.stem}.png"
    if args.check:
        if not md_path.exists() or md_path.read_text() != text + "\n":
            print(f"{md_path} is not what {args.results} gives: run python benchmarks/report.py {args.results}",
                  file=sys.stderr)
            return 1
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text + "\n")
    print(text)
    info = machine.get("uresnet", {})
    wrote_png = chart(groups, png_path, f"uresnet_ops on {info.get('device_name', '?')} ({info.get('device', '?')})")
    print(f"\nwrote {md_path}" + (f" and {png_path}" if wrote_png else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
