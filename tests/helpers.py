"""Shared test helpers: backends to test per op and device, tolerances, input makers."""
import pytest
import torch

from uresnet_ops import testing

TOLERANCES = {  # (rtol, atol) against the reference computed in float64
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}
HALF_DTYPES = (torch.float16, torch.bfloat16)
ACTIVATIONS = ["none", "relu", ("leaky_relu", 0.2), "silu"]


def activations_for(dtype):
    """Activations whose gradients can be compared with a float64 reference at ``dtype``: in
    half precision, a pre-activation rounded across the kink of relu/leaky_relu flips its
    gradient, so only the smooth ones are compared there (forward covers all in float32)."""
    return ["none", "silu"] if dtype in HALF_DTYPES else ACTIVATIONS


def backends_for(op, device):
    """The backends of ``op`` that run on ``device`` here (reference included; Triton on CPU
    where its interpreter is on, as in the tests)."""
    return testing.runnable_backends(op, device, interpreter=True)


def backend_params(op, device="cpu"):
    return [pytest.param(name, id=name) for name in backends_for(op, device)]


def assert_close(actual, expected, dtype=None, scale=1.0, precision=None):
    """Compare ``actual`` (of ``dtype``) with a reference computed in higher precision, with
    the tolerance of ``precision`` (default: ``dtype``, the precision the inputs had)."""
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[precision or dtype]
    assert actual.dtype == dtype
    assert not actual.isnan().any(), "NaN in output (an element was never written?)"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


LAYOUTS = testing.LAYOUTS
layout = testing.to_layout  # (x, name): x in one of the tested LAYOUTS


def expected_format(x):
    return torch._prims_common.suggest_memory_format(x)


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of ``uresnet argv`` run in-process, argparse's exits included."""
    from uresnet_models.cli import main
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err
