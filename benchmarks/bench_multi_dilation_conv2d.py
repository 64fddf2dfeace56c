"""Benchmarks of uresnet_ops.multi_dilation_conv2d: every backend vs the eager and the torch.compile'd
reference chain (cases in cases.py; timing and parametrization in conftest.py)."""
OP = "multi_dilation_conv2d"


def test_multi_dilation_conv2d(run_bench, spec):
    run_bench(spec)
