"""CUDA-only checks (skipped without a GPU): the CUDA and Triton kernels on the GPU against the
reference, 64-bit indexing, CUDA graph capture."""
import pytest
import torch

import uresnet_ops
from uresnet_ops import reference
from uresnet_ops.backends import last_used

from helpers import LAYOUTS, assert_close, backend_params, layout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
OP = "pixel_shuffle_bn"


def case(dtype, param_dtype=torch.float32, n=3, c=5, r=2, h=7, w=9):
    x = torch.randn(n, c * r * r, h, w, device="cuda", dtype=dtype)
    p = dict(weight=torch.randn(c, device="cuda", dtype=param_dtype),
             bias=torch.randn(c, device="cuda", dtype=param_dtype),
             running_mean=torch.randn(c, device="cuda", dtype=param_dtype),
             running_var=torch.rand(c, device="cuda", dtype=param_dtype) + 0.5)
    return x, r, p


@pytest.mark.parametrize("backend", backend_params(OP, "cuda") if torch.cuda.is_available() else [])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("activation", ["none", "relu", ("leaky_relu", 0.1), "silu"])
def test_eval_forward_on_gpu(backend, dtype, layout_name, activation):
    x, r, p = case(dtype)
    x = layout(x, layout_name)
    with uresnet_ops.use_backend(backend, OP):
        out = uresnet_ops.pixel_shuffle_bn(x, r, **p, training=False, activation=activation)
    assert last_used(OP) == backend
    expected = reference.pixel_shuffle_bn(x.double(), r, **{k: v.double() for k, v in p.items()},
                                          training=False, activation=activation)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("backend", backend_params(OP, "cuda") if torch.cuda.is_available() else [])
def test_over_2_pow_31_elements(backend):
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2 ** 30:
        pytest.skip("needs 12 GiB of free GPU memory")
    x = torch.ones(1, 4, 2 ** 15, 2 ** 15 // 2 + 8, device="cuda", dtype=torch.float16)  # > 2^31 elements
    x[..., -1] = 3
    c = torch.ones(1, device="cuda")
    with uresnet_ops.use_backend(backend, OP):
        out = uresnet_ops.pixel_shuffle_bn(x, 2, c * 2, c * 0, c * 0, c, training=False, activation="none", eps=0.0)
    assert out.numel() > 2 ** 31
    assert out[0, 0, -1, -1].item() == 6 and out[0, 0, 0, 0].item() == 2


def test_cuda_graph_capture_and_replay():
    x, r, p = case(torch.float32)
    out = uresnet_ops.pixel_shuffle_bn(x, r, **p, training=False)  # warm up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = uresnet_ops.pixel_shuffle_bn(x, r, **p, training=False)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(captured, uresnet_ops.pixel_shuffle_bn(x, r, **p, training=False))
    assert not torch.equal(captured, out)
