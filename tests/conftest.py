"""Test setup: Triton runs under its CPU interpreter where no GPU is present (set before
anything imports triton; on a GPU machine the kernels are compiled and run on the GPU), float32
convolutions and matmuls are true float32 (no TF32), kernel outputs are poisoned, every test
gets a fresh seed."""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import uresnet_ops

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip where no GPU is present (``pytest -m cuda`` selects them)."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_poison(request):
    # A fresh, reproducible seed per test; printed by pytest on failure via the test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    # cuDNN and cuBLAS run float32 in TF32 on Ampere and later by default (~1e-3 relative error):
    # a reference computed on the GPU would be off by more than the float32 tolerances.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    # Deterministic mode makes torch.empty (also at::empty inside the kernels) fill new
    # memory with NaN, so an output element a kernel forgets to write shows up as NaN.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)
    uresnet_ops.set_backend(None)


@pytest.fixture
def one_thread():
    """One intra-op thread for the model-level tests: on two cores shared with other jobs, more
    threads oversubscribe them and run about 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
