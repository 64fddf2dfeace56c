"""The H200 roofline of every fused op at the benchmark's full shapes: docs/roofline.md.

    python scripts/roofline.py            # rewrite docs/roofline.md
    python scripts/roofline.py --check    # exit 1 when the committed file is out of date (CI)

Per op, shape, mode and dtype: the minimal bytes (inputs read once, outputs written once, no
intermediate written) and the useful FLOPs (benchmarks/cases.py: useful_flops), the
limit that binds and the time the kernel would take at the H200's ceilings. The kernels' own
measured time is what the GPU benchmark adds next to it (benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import cases  # noqa: E402

REPORT = ROOT / "docs" / "roofline.md"
# Ceilings: copy bandwidth and the bf16 matrix rate as measured on an H200 of this workplace
# (device tool's KINDS.md); fp32 from the datasheet (no tensor cores: the reference compares
# with TF32 off). Bytes/s count bytes read + written.
COPY_BPS = 4.3e12
MATMUL_FLOPS = {torch.bfloat16: 790e12, torch.float32: 67e12}
DTYPES = (torch.bfloat16, torch.float32)

# What each kernel's design needs in its machine code, checked per kernel by the SASS gate.
DESIGN = {
    "pixel_shuffle_bn": "memory-bound at every shape: 16-byte vector loads/stores in the steady "
                        "state for NCHW and channels_last, no 64-bit division in the inner loop, "
                        "several waves in flight; statistics as a reduction of >= 8 blocks per SM.",
    "shuffle_upsample": "bf16: compute-bound only in the 1x1 GEMM, which needs tensor cores "
                        "(HGMMA/HMMA) fed by cp.async/TMA in >= 2 stages; the depthwise 3x3 on the "
                        "low-resolution input (2x2 taps per parity), the upsampled tensor never "
                        "written. fp32: the same, bound by the CUDA-core rate.",
    "multi_dilation_conv2d": "an implicit GEMM over all branches: HGMMA for bf16, cp.async/TMA "
                             "with >= 2 stages, no spills, 32-bit indices, taps that read only "
                             "padding skipped, the concatenated output written once in its slices.",
}


# ---- Predicted share of the limit per backend ----------------------------------------------
#
# A model, until a GPU run measures it (benchmarks/report.py's "% roofline"): what each backend's
# kernels reach follows from what their machine code has (docs/gpu_resources.md).
# * Memory: Little's law. To stream at COPY_BPS with LATENCY per access, an SM must keep
#   COPY_BPS * LATENCY / SMS bytes of loads in flight; a kernel keeps (threads per SM) x (bytes
#   per load) x (independent loads per thread). Capped at MEMORY_CAP, what the best streaming
#   kernels reach of the copy bandwidth.
# * Matrix: the share of the bf16 tensor rate (fp32: of the FMA rate) a GEMM engine keeps busy,
#   by instruction class (MATMUL_SHARE: assumptions stated there).
# * Passes: bytes a backend moves over the op's minimal bytes, at the first full shape (each
#   entry's comment derives it).
TF32_FLOPS = 395e12  # dense TF32 on tensor cores: half the bf16 rate (datasheet ratio)
SMS = 132
LATENCY = 450e-9   # s, a loaded HBM access (an assumption: the GPU run will tell)
MEMORY_CAP = 0.85
IN_FLIGHT_NEEDED = COPY_BPS * LATENCY / SMS  # bytes per SM, ~14.7 KB
MATMUL_SHARE = {
    "wgmma+async": 0.55,   # HGMMA fed by cp.async/TMA in >= 2 stages (Triton's Hopper GEMMs: 60-75%; masks cost)
    "cudnn": 0.40,         # cuDNN per branch (dilated 3x3: no specialised kernels; NCHW converted)
    "wmma": 0.08,          # 16 HMMA in ~1,900 instructions, scalar generic loads, 2 blocks/SM
    "fma": 0.60,           # fp32 on CUDA cores: FFMA with cp.async staging
    "fma-sync": 0.35,      # fp32 on CUDA cores, synchronous loads, bank conflicts
}


def memory_share(threads_per_sm, load_bytes, loads_in_flight):
    return min(MEMORY_CAP, threads_per_sm * load_bytes * loads_in_flight / IN_FLIGHT_NEEDED)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One backend's kernels for one op: the share of each limit they are predicted to reach."""
    memory: dict           # dtype -> share of copy bandwidth
    matmul: dict | None    # dtype -> share of the matrix rate (MATMUL_FLOPS); None: no FLOPs
    passes: float          # bytes moved / the op's minimal bytes
    why: str


def _per_dtype(bf16, fp32):
    return {"bfloat16": bf16, "float32": fp32}


# Inputs of the model, per (op, backend). Threads per SM: 2048 unless registers limit them
# (65536 / registers, in whole blocks).
PREDICTIONS = {
    ("pixel_shuffle_bn", "triton"): Prediction(
        _per_dtype(memory_share(2048, 16, 1), memory_share(2048, 16, 1)), None, 1.0,
        "16-byte loads and stores in the steady state (the need met, docs/gpu_resources.md), 32-bit "
        "index math: at the bandwidth cap. One read, one write (eval); training adds one read for the "
        "statistics, the backward two reads and one write (the minimal bytes count them)."),
    ("pixel_shuffle_bn", "cuda"): Prediction(
        _per_dtype(memory_share(2048, 2, 1), memory_share(2048, 4, 1)), None, 1.0,
        "one scalar load per thread per grid-stride iteration (LDG 16/32 bits, not unrolled), one wave: "
        "2048 threads x 2 bytes in flight per SM in bf16. Misses its 16-byte-vector need: not the default."),
    ("pixel_shuffle_bn", "reference"): Prediction(
        _per_dtype(0.75, 0.75), None, 3.0,
        "torch's pixel_shuffle copy, batch_norm and the activation: three passes over the output "
        "(training: the statistics read it once more), each near the bandwidth."),
    # shuffle_upsample's fused backends write the grouped-conv output at high resolution and
    # read it back for the 1x1 GEMM (cuBLAS): 16x128x64x64->64 bf16: x 16.8 MB + 2 x 67.1 MB +
    # out 33.6 MB = 184 MB over 50.4 MB minimal (3.7x). The reference: interpolate, grouped conv,
    # batch_norm, activation, channel_shuffle, 1x1: about 14x.
    ("shuffle_upsample", "triton"): Prediction(
        _per_dtype(memory_share(512, 2, 9), memory_share(512, 4, 9)), _per_dtype(0.55, 0.6), 3.7,
        "the upsample + grouped 3x3 on the low-resolution input (every s*s output of a neighbourhood "
        "from one load of it), no 64-bit division in 32-bit index math; scalar loads, 9 independent "
        "per thread, ~512 threads per SM at 80-200 registers. The shuffled 1x1 is a cuBLAS GEMM on "
        "the intermediate, which is written and read once."),
    ("shuffle_upsample", "cuda"): Prediction(
        _per_dtype(memory_share(2048, 2, 1), memory_share(2048, 4, 1)), _per_dtype(0.55, 0.6), 4.7,
        "one output per thread, 24 64-bit divisions per output in the PTX, no tiling: each input "
        "value is loaded once per tap and output (9 s^2 scalar loads); in training the conv is "
        "computed twice (statistics, then output): 4.7x. Misses every need: not the default."),
    ("shuffle_upsample", "reference"): Prediction(
        _per_dtype(0.75, 0.75), _per_dtype(0.55, 0.6), 14.0,
        "every stage a torch kernel writing its full-resolution result."),
    # NCHW half input is copied to channels_last first (so its channels load by cp.async):
    # 8x256x64x64 bf16 x 16.8 MB read and written once more, over 33.6 MB minimal: 2x.
    ("multi_dilation_conv2d", "triton"): Prediction(
        _per_dtype(0.8, 0.8), _per_dtype(MATMUL_SHARE["wgmma+async"], MATMUL_SHARE["fma"]), 2.0,
        "one implicit GEMM over all branches: HGMMA (64-row tiles) with both operands staged by "
        "cp.async in 2-3 stages where the channel counts are multiples of 16 (weights padded to "
        "16; NCHW half input copied to channels_last once), cp.async in float32, 32-bit index "
        "math, padding-only taps skipped, each branch written into its slice. float32 with "
        "cuDNN's TF32 allowed (torch's default) is declined to the reference."),
    ("multi_dilation_conv2d", "cuda"): Prediction(
        _per_dtype(0.5, 0.5), _per_dtype(MATMUL_SHARE["wmma"], MATMUL_SHARE["fma-sync"]), 1.0,
        "the WMMA engine: 16 HMMA in ~1,900 instructions, 16-bit scalar generic loads, no cp.async, "
        "122-128 registers (2 blocks per SM); the fp32 engine has a 16-way shared-memory bank "
        "conflict. Misses its async-copy, wgmma and vector needs: not the default."),
    ("multi_dilation_conv2d", "reference"): Prediction(
        _per_dtype(0.75, 0.75),
        _per_dtype(MATMUL_SHARE["cudnn"], MATMUL_SHARE["cudnn"] * TF32_FLOPS / MATMUL_FLOPS[torch.float32]), 3.5,
        "cuDNN once per branch (x read 4 times), then torch.cat (the output written twice, read once). "
        "In float32 cuDNN runs TF32 on tensor cores (torch's default): far above the FMA rate."),
}
BACKENDS = ("triton", "cuda", "reference")


def predicted_time(prediction, dtype, t_mem, t_math):
    """The model's time for a case whose minimal bytes take ``t_mem`` at the copy bandwidth and
    useful FLOPs ``t_math`` at the matrix rate (any unit; benchmarks/report.py passes seconds)."""
    return max(t_mem * prediction.passes / prediction.memory[dtype],
               t_math / prediction.matmul[dtype] if prediction.matmul else 0.0)


def predicted_us(row, prediction):
    """The time the model predicts for one roofline row."""
    return predicted_time(prediction, row["dtype"], row["t_mem"], row["t_math"])


def predicted_total_us(op, backend, dtype):
    """The predicted time of ``op``'s ``dtype`` rows at the full shapes, summed."""
    return sum(predicted_us(r, PREDICTIONS[op, backend]) for r in rows() if r["op"] == op and r["dtype"] == dtype)


def predicted_order(op, dtype="bfloat16"):
    """Backends of ``op`` on CUDA, predicted fastest first."""
    return sorted(BACKENDS, key=lambda b: predicted_total_us(op, b, dtype))


@functools.cache
def rows() -> tuple:
    return tuple(_rows())


def _rows():
    for op in cases.OPS:
        for case in cases.cases(op, "full", "cuda"):
            for dtype in DTYPES:
                for mode in case.modes():
                    inputs = cases.build(case, mode, "meta", dtype)
                    moved = inputs.bytes[mode]
                    flops = inputs.useful_flops[mode] or 0
                    nominal = inputs.flops[mode] or 0
                    t_mem, t_math = moved / COPY_BPS, flops / MATMUL_FLOPS[dtype]
                    yield dict(op=op, shape=case.label, mode=mode, dtype=str(dtype).replace("torch.", ""),
                               mb=moved / 1e6, gflop=flops / 1e9, nominal=nominal / 1e9,
                               intensity=flops / moved, bound="memory" if t_mem >= t_math else "compute",
                               t_mem=t_mem * 1e6, t_math=t_math * 1e6, t=max(t_mem, t_math) * 1e6)


def render() -> str:
    lines = [
        "# Roofline of the fused ops on the H200",
        "",
        "Generated by `python scripts/roofline.py` (CI checks it is current with `--check`); do not edit.",
        "",
        f"Ceilings: {COPY_BPS / 1e12:.1f} TB/s copy (read + write), "
        f"{MATMUL_FLOPS[torch.bfloat16] / 1e12:.0f} TFLOP/s dense bf16 (both measured on an H200 here), "
        f"{MATMUL_FLOPS[torch.float32] / 1e12:.0f} TFLOP/s fp32 without tensor cores (datasheet).",
        "Bytes: inputs read once, outputs written once, nothing intermediate written "
        "(benchmarks/cases.py). Useful GFLOP: padding-only taps skipped, nearest-x2 3x3 taps merged "
        "to 2x2; `nominal` is the reference chain's (every tap, full-resolution depthwise). "
        "Predicted µs = max(bytes / bandwidth, FLOPs / rate): what a kernel at the roofline takes.",
        "Below about 5 µs a launch's own latency (2–4 µs a kernel, more for the Python op call) binds "
        "instead: those rows are for CUDA graphs or torch.compile, not for eager calls. In float32 "
        "the eager baseline's convolutions run in TF32 on tensor cores (cuDNN's default), so the "
        "fp32 rows bound by the FLOP rate are ones where a fp32 kernel cannot beat eager without TF32.",
        "",
    ]
    current = None
    for r in rows():
        if r["op"] != current:
            current = r["op"]
            lines += ["", f"## {current}", "", DESIGN[current], "",
                      "| shape | mode | dtype | MB | useful GFLOP | nominal GFLOP | FLOP/B | bound "
                      "| µs at bandwidth | µs at FLOP rate | predicted µs |",
                      "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        lines.append(f"| {r['shape']} | {r['mode']} | {r['dtype']} | {r['mb']:.1f} | {r['gflop']:.2f} | "
                     f"{r['nominal']:.2f} | {r['intensity']:.1f} | {r['bound']} | {r['t_mem']:.1f} | "
                     f"{r['t_math']:.1f} | {r['t']:.1f} |")
    return "\n".join(lines + prediction_lines()) + "\n"


def prediction_lines():
    lines = ["", "## Predicted share of the limit, and the backend order on CUDA", "",
             "A model until a GPU run measures it (scripts/roofline.py, PREDICTIONS): memory shares by "
             f"Little's law ({IN_FLIGHT_NEEDED / 1e3:.1f} KB of loads in flight per SM for "
             f"{COPY_BPS / 1e12:.1f} TB/s at {LATENCY * 1e9:.0f} ns, capped at {MEMORY_CAP:.0%}) from "
             "each kernel's load width, threads and independent loads; matrix shares by the "
             "instruction classes in its machine code (docs/gpu_resources.md); passes = bytes moved / "
             "minimal bytes. Predicted µs: the sum over the op's full shapes and modes above.", "",
             "| op | backend | bf16 memory share | bf16 matrix share | fp32 memory share | fp32 matrix share "
             "| passes | predicted µs bf16 | predicted µs fp32 | why |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for op in cases.OPS:
        for backend in predicted_order(op):
            p = PREDICTIONS[op, backend]
            total = {dt: predicted_total_us(op, backend, dt) for dt in ("bfloat16", "float32")}
            matmul = {dt: f"{p.matmul[dt]:.0%}" if p.matmul else "–" for dt in total}
            lines.append(f"| {op} | {backend} | {p.memory['bfloat16']:.0%} | {matmul['bfloat16']} | "
                         f"{p.memory['float32']:.0%} | {matmul['float32']} | {p.passes:.1f} | "
                         f"{total['bfloat16']:.0f} | {total['float32']:.0f} | {p.why} |")
    lines += ["", "The default order on CUDA (`uresnet_ops.backends.DEFAULT_ORDER`) is the bf16 prediction's, "
              "fastest first; `--check` fails when they differ. A backend whose kernels miss a design "
              "need in their machine code is not first (the sm_90 gate checks it). In float32 the "
              "model puts the reference's cuDNN (TF32) ahead for multi_dilation_conv2d: "
              "`set_backend(\"auto\")` measures and picks per dtype and shape.", ""]
    lines += [f"- {op}: " + ", ".join(f"`{b}`" for b in predicted_order(op)) for op in cases.OPS]
    return lines


def order_mismatches():
    """Ops whose DEFAULT_ORDER on CUDA is not the predicted order."""
    from uresnet_ops.backends import DEFAULT_ORDER
    return [f"{op}: DEFAULT_ORDER['{op}']['cuda'] is {DEFAULT_ORDER[op]['cuda']}, the prediction {predicted_order(op)}"
            for op in cases.OPS if DEFAULT_ORDER[op]["cuda"] != predicted_order(op)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when docs/roofline.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not REPORT.exists() or REPORT.read_text() != text:
            print(f"{REPORT.relative_to(ROOT)} is out of date: run python scripts/roofline.py", file=sys.stderr)
            return 1
        mismatches = order_mismatches()
        for mismatch in mismatches:
            print(mismatch, file=sys.stderr)
        return 1 if mismatches else 0
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(text)
    print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
