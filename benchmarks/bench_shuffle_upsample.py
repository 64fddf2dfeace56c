"""Benchmarks of uresnet_ops.shuffle_upsample: every backend vs the eager and the torch.compile'd
reference chain (cases in cases.py; timing and parametrization in conftest.py)."""
OP = "shuffle_upsample"


def test_shuffle_upsample(run_bench, spec):
    run_bench(spec)
