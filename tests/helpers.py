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


# --------------------------------------------------------------------------- dataset files
def write_idx(path, array):
    """An IDX file (MNIST's format) of a uint8 array, gzipped where ``path`` ends in .gz."""
    import gzip

    import numpy as np
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def fake_cifar10(root, monkeypatch, per_batch=2, data=None):
    """``root/cifar-10-batches-py`` with five training batches and a test batch of ``per_batch``
    images each (``data(name, labels)`` makes a batch's N x 3 x 32 x 32 uint8 array; default
    random) and batches.meta; torchvision's checksums patched to these files' (monkeypatch)."""
    import hashlib
    import pickle

    import numpy as np
    from torchvision.datasets import CIFAR10
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    md5 = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        if name == "batches.meta":
            content = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                       "truck"]}
        else:
            labels = rng.integers(0, 10, per_batch).tolist()
            images = data(name, labels) if data else rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
            content = {"data": images.reshape(per_batch, -1), "labels": labels}
        (folder / name).write_bytes(pickle.dumps(content))
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5[n]] for n in md5 if n.startswith("data_batch")])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    return root
