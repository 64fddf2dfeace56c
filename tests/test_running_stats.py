"""The running-statistics update every op with a BatchNorm ends its training forward with
(uresnet_ops._common.update_running_stats; compiled: csrc/running_stats.cpp)."""
import pytest
import torch
import torch.nn.functional as F

from uresnet_ops import _library
from uresnet_ops._common import update_running_stats


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
def test_update_matches_batch_norm(stats_dtype, momentum):
    torch.manual_seed(0)
    y = torch.randn(3, 5, 4, 2, dtype=torch.float64)
    running = (torch.randn(5).to(stats_dtype), torch.rand(5).add(0.5).to(stats_dtype))
    expected = tuple(t.double() for t in running)
    F.batch_norm(y, *expected, training=True, momentum=momentum)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    mean, var = (t.to(torch.float64 if stats_dtype == torch.float64 else torch.float32) for t in (mean, var))
    update_running_stats(*running, mean, var, y.numel() // 5, momentum)
    for got, want in zip(running, expected):
        torch.testing.assert_close(got, want.to(stats_dtype), rtol=1e-3 if stats_dtype == torch.float16 else 1e-6,
                                   atol=1e-3 if stats_dtype == torch.float16 else 1e-7)


@pytest.mark.skipif(not _library.HAS_EXTENSION, reason="extension not built")
def test_compiled_update_passes_opcheck_and_checks_its_arguments():
    op = torch.ops.uresnet_ops._update_running_stats.default
    stats = (torch.zeros(4), torch.ones(4), torch.randn(4), torch.rand(4))
    torch.library.opcheck(op, (*stats, 10, 0.1))
    with pytest.raises(ValueError, match="one value per channel"):
        op(torch.zeros(4), torch.ones(3), torch.randn(4), torch.rand(4), 10, 0.1)
