"""Benchmarks of uresnet_ops.pixel_shuffle_bn: every backend vs the eager and the torch.compile'd
reference chain (cases in cases.py; timing and parametrization in conftest.py)."""
OP = "pixel_shuffle_bn"


def test_pixel_shuffle_bn(run_bench, spec):
    run_bench(spec)
