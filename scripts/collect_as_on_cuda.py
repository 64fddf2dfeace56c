"""A pytest plugin for ``scripts/gpu_check.sh --rehearse``: collect as the GPU machine does.

``pytest -p collect_as_on_cuda --collect-only ...`` (with scripts/ on PYTHONPATH) makes
``torch.cuda.is_available()`` answer True before any conftest or test module is imported, so the
CUDA tests and benchmarks are parametrized over the backends they have there. For collecting
only: nothing may run with it.
"""
import sys

import torch

if "--collect-only" not in sys.argv and "--co" not in sys.argv:
    sys.exit("collect_as_on_cuda: for `pytest --collect-only` only (there is no GPU here)")
torch.cuda.is_available = lambda: True
