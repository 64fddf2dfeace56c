"""docs/roofline.md and benchmarks/results/*.md are generated and current; the useful-FLOP count is right."""
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


roofline = _load("roofline", ROOT / "scripts" / "roofline.py")
report = _load("bench_report", ROOT / "benchmarks" / "report.py")


def test_committed_report_is_current():
    assert roofline.main(["--check"]) == 0, "run: python scripts/roofline.py"


def test_multi_dilation_useful_flops_count_only_taps_inside_the_image():
    case = roofline.cases._mdc(2, 3, 7, 10, 4, kernel_sizes=(1, 3, 3), dilations=(1, 2, 8))
    ones = torch.ones(1, 1, 7, 10, dtype=torch.float64)
    inside = sum(F.conv2d(ones, torch.ones(1, 1, k, k, dtype=torch.float64), padding=d * (k // 2), dilation=d).sum()
                 for k, d in zip((1, 3, 3), (1, 2, 8), strict=False))  # per output: the taps that land in the image
    assert roofline.cases.useful_flops(case) == 2 * 2 * 3 * 4 * int(inside)


def test_benchmark_report_gives_the_share_of_the_roofline():
    ceilings = {"copy_GBps": 1000.0, "matmul_TFLOPs": 10.0}
    group = [  # 1 GB at 1000 GB/s = 1 ms, 5 TFLOP at 10 TFLOP/s = 0.5 s: the flops bind
        dict(implementation="cuda", median_s=1.0, bytes=1e9, flops=8e12, useful_flops=5e12),
        dict(implementation="eager", median_s=2.0, bytes=1e9, flops=8e12, useful_flops=None),
    ]
    rows = {r["impl"]: r for r in report.rows_of(group, ceilings)}
    assert rows["cuda"]["roofline_pct"] == 50.0
    assert rows["eager"]["roofline_pct"] == 0.05  # without useful flops: 1 ms of bytes in 2 s
    assert rows["cuda"]["vs_eager"] == 2.0


def test_committed_benchmark_results_are_current():
    results = ROOT / "benchmarks" / "results" / "cpu.json"
    assert report.main([str(results), "--check"]) == 0, f"run: python benchmarks/report.py {results}"


def test_default_order_on_cuda_is_the_predicted_one():
    assert roofline.order_mismatches() == []
    assert roofline.predicted_order("multi_dilation_conv2d")[-1] == "cuda"  # the WMMA engine: 8% of the tensor rate


def test_memory_share_follows_bytes_in_flight():
    needed = roofline.IN_FLIGHT_NEEDED
    assert roofline.memory_share(1024, 2, 1) == 1024 * 2 / needed
    assert roofline.memory_share(1024, 2, 2) == 2 * roofline.memory_share(1024, 2, 1)
    assert roofline.memory_share(2048, 16, 4) == roofline.MEMORY_CAP


def test_benchmark_report_puts_the_models_prediction_next_to_a_cuda_measurement():
    ceilings = {"copy_GBps": 4300.0, "matmul_TFLOPs": 790.0}
    common = dict(op="pixel_shuffle_bn", dtype="bfloat16", bytes=4.3e12, flops=None, useful_flops=None)
    group = [dict(implementation="cuda", device="cuda", median_s=2.0, **common),
             dict(implementation="triton", device="cuda", median_s=1.25, **common),
             dict(implementation="eager", device="cpu", median_s=4.0, **common)]
    rows = {r["impl"]: r for r in report.rows_of(group, ceilings)}
    # 1 s at the copy bandwidth; the model: one pass at the kernels' predicted memory share
    expected = roofline.PREDICTIONS["pixel_shuffle_bn", "cuda"].memory["bfloat16"]
    assert abs(rows["cuda"]["model_pct"] - 100 * expected) < 1e-9
    assert rows["triton"]["roofline_pct"] == 80.0
    assert rows["eager"]["model_pct"] is None  # no prediction off CUDA
