"""Triton kernels. Registered as the ``triton`` backend where Triton imports and either a CUDA
GPU is present or ``TRITON_INTERPRET=1`` (then they also run on CPU tensors, for tests)."""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Device types the Triton kernels run on here.
DEVICE_TYPES = ("cuda", "cpu") if INTERPRET else ("cuda",)
AVAILABLE = HAS_TRITON and (INTERPRET or torch.cuda.is_available())

if HAS_TRITON:
    from . import pixel_shuffle_bn  # noqa: F401
    from . import multi_dilation_conv2d  # noqa: F401
    from . import shuffle_upsample  # noqa: F401
