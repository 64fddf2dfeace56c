"""docs/roofline.md is generated and current; its useful-FLOP count is right."""
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("roofline", ROOT / "scripts" / "roofline.py")
roofline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(roofline)


def test_committed_report_is_current():
    assert roofline.main(["--check"]) == 0, "run: python scripts/roofline.py"


def test_multi_dilation_useful_flops_count_only_taps_inside_the_image():
    case = roofline.cases._mdc(2, 3, 7, 10, 4, kernels=(1, 3, 3), dilations=(1, 2, 8))
    ones = torch.ones(1, 1, 7, 10, dtype=torch.float64)
    inside = sum(F.conv2d(ones, torch.ones(1, 1, k, k, dtype=torch.float64), padding=d * (k // 2), dilation=d).sum()
                 for k, d in zip((1, 3, 3), (1, 2, 8)))  # per output: the taps that land in the image
    assert roofline.useful_flops(case) == 2 * 2 * 3 * 4 * int(inside)
