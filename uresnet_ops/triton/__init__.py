"""Triton kernels. Registered as the ``triton`` backend where Triton imports and either a CUDA
GPU is present or ``TRITON_INTERPRET=1`` (then they also run on CPU tensors, for tests)."""
from __future__ import annotations

import os

import torch

try:
    import triton
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's CPU interpreter cannot run with these versions, or None. Supported: Triton 3.6
    (the oldest supported, the GPU machine's) with numpy < 2.4; newer Triton with any numpy. On a
    GPU the kernels are compiled, not interpreted, and numpy does not matter."""
    def major_minor(version):
        return tuple(int(part) for part in version.split(".")[:2])
    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"TRITON_INTERPRET=1: triton {triton_version}'s interpreter fails with numpy {numpy_version} "
                "(\"only 0-dimensional arrays can be converted to Python scalars\"); install numpy<2.4 "
                "or a newer triton (3.8 is tested), or unset TRITON_INTERPRET")
    return None


if INTERPRET and HAS_TRITON:
    import numpy

    _problem = interpreter_problem(triton.__version__, numpy.__version__)
    if _problem:
        raise ImportError(_problem)
# Device types the Triton kernels run on here.
DEVICE_TYPES = ("cuda", "cpu") if INTERPRET else ("cuda",)
AVAILABLE = HAS_TRITON and (INTERPRET or torch.cuda.is_available())

if HAS_TRITON:
    from . import pixel_shuffle_bn  # noqa: F401
    from . import multi_dilation_conv2d  # noqa: F401
    from . import shuffle_upsample  # noqa: F401
