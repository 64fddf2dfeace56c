"""CUDA-only checks (skipped without a GPU): the CUDA and Triton kernels on the GPU against the
reference computed in float64, 64-bit indexing (contiguous and channels_last), grids beyond
65535 tiles, CUDA graph capture. The tests named *2_pow_31* need 12-24 GiB and run serially in
scripts/gpu_check.sh."""
import random

import pytest
import torch
import triton

import uresnet_ops
from uresnet_ops import reference
from uresnet_ops.backends import last_used
from uresnet_ops.testing import sample_inputs

from helpers import LAYOUTS, assert_close, backend_params, layout

pytestmark = pytest.mark.cuda  # skipped without a GPU (conftest.py)
OP = "pixel_shuffle_bn"


def case(dtype, param_dtype=torch.float32, n=3, c=5, r=2, h=7, w=9, seed=0):
    """(x, r, BatchNorm weight/bias/running statistics by name) on the GPU (uresnet_ops.testing)."""
    sample = sample_inputs(OP, "cuda", dtype, shape=(n, c * r * r, h, w), upscale_factor=r, param_dtype=param_dtype,
                           seed=seed)
    p = {k: sample.arguments[k] for k in ("weight", "bias", "running_mean", "running_var")}
    return sample.x, r, p


def assert_graph_replay_matches_eager(step, refill):
    """Warm ``step`` up on a side stream (Triton compiles and autotunes, allocator pools), capture
    it in a CUDA graph, ``refill()`` its inputs in place, replay, and compare the captured
    outputs with a fresh eager ``step()``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    refill()
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for actual, want in zip(captured, expected, strict=False):
        torch.testing.assert_close(actual, want, rtol=1e-4, atol=1e-4)


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
@pytest.mark.parametrize("layout_name", ["contiguous", "channels_last"])
def test_over_2_pow_31_elements(backend, layout_name):
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2 ** 30:
        pytest.skip("needs 12 GiB of free GPU memory")
    x = torch.ones(1, 4, 2 ** 15, 2 ** 15 // 2 + 8, device="cuda", dtype=torch.float16)  # > 2^31 elements
    x[..., -1] = 3
    x = layout(x, layout_name)  # channels_last: the strided (non-contiguous) 64-bit index path
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


@pytest.mark.parametrize("backend", backend_params(OP, "cuda") if torch.cuda.is_available() else [])
@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["none", "relu", ("leaky_relu", 0.1), "silu"])
def test_forward_backward_on_gpu(backend, dtype, param_dtype, layout_name, training, activation):
    if dtype != torch.float32 and activation in ("relu", ("leaky_relu", 0.1)):
        activation = "silu"  # half-precision rounding across the kink flips the gradient (see helpers)
    x, r, p = case(dtype, param_dtype)
    x = layout(x, layout_name).requires_grad_()
    params = {k: v.clone().requires_grad_(k in ("weight", "bias")) for k, v in p.items()}
    with uresnet_ops.use_backend(backend, OP):
        out = uresnet_ops.pixel_shuffle_bn(x, r, **params, training=training, momentum=0.3, activation=activation)
        assert last_used(OP) == backend
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    assert out.is_contiguous(memory_format=torch._prims_common.suggest_memory_format(x))
    x64 = x.detach().double().requires_grad_()
    p64 = {k: v.double().clone().requires_grad_(k in ("weight", "bias")) for k, v in p.items()}
    expected = reference.pixel_shuffle_bn(x64, r, **p64, training=training, momentum=0.3, activation=activation)
    expected.backward(grad_out.double())
    assert_close(out, expected.detach(), dtype)
    for name in ("running_mean", "running_var"):
        assert_close(params[name], p64[name].detach(), param_dtype, precision=dtype)
    scale = 10.0 if dtype != torch.float32 else 1.0
    assert_close(x.grad, x64.grad, dtype, scale=scale)
    for name in ("weight", "bias"):
        assert_close(params[name].grad, p64[name].grad, param_dtype, scale=scale * 10, precision=dtype)


@pytest.mark.parametrize("backend", backend_params(OP, "cuda") if torch.cuda.is_available() else [])
def test_stable_variance_large_mean_on_gpu(backend):
    x = torch.randn(4, 8, 64, 64, device="cuda") + 1e4
    rm, rv = torch.zeros(2, device="cuda"), torch.ones(2, device="cuda")
    with uresnet_ops.use_backend(backend, OP):
        out = uresnet_ops.pixel_shuffle_bn(x, 2, None, None, rm, rv, training=True, activation="none")
    expected = reference.pixel_shuffle_bn(x.double(), 2, None, None, training=True, activation="none")
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("backend", backend_params(OP, "cuda") if torch.cuda.is_available() else [])
@pytest.mark.parametrize("layout_name", ["contiguous", "channels_last"])
def test_training_over_2_pow_31_elements(backend, layout_name):
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2 ** 30:
        pytest.skip("needs 24 GiB of free GPU memory")
    x = torch.ones(1, 4, 2 ** 15, 2 ** 14 + 8, device="cuda", dtype=torch.float16)  # > 2^31 elements
    x[..., -1] = 3
    x = layout(x, layout_name)
    p = 1.0 / x.shape[-1]  # share of the 3s: mean 1 + 2p, biased variance 4p(1-p)
    with uresnet_ops.use_backend(backend, OP):
        out, mean, var = torch.ops.uresnet_ops.pixel_shuffle_bn(x, 2, None, None, None, None, True, 0.0, "none", 0.0)
        assert x.numel() > 2 ** 31
        f64 = torch.float64
        torch.testing.assert_close(mean.double().cpu(), torch.tensor([1 + 2 * p], dtype=f64), rtol=1e-5, atol=0)
        torch.testing.assert_close(var.double().cpu(), torch.tensor([4 * p * (1 - p)], dtype=f64), rtol=1e-3, atol=0)
        std = (4 * p * (1 - p)) ** 0.5
        assert abs(out[0, 0, -1, -1].item() - (2 - 2 * p) / std) < 0.05 * (2 - 2 * p) / std
        assert abs(out[0, 0, 0, 0].item() + 2 * p / std) < 0.05 * 2 * p / std
        del out
        grad_x, grad_w, grad_b = torch.ops.uresnet_ops.pixel_shuffle_bn_backward(
            torch.ones(1, 1, 2 ** 16, 2 ** 15 + 16, device="cuda", dtype=torch.float16), x, 2, None, None, mean, var,
            True, 0.0, "none", 0.0)
    assert grad_b.item() == pytest.approx(x.numel(), rel=1e-3)  # sum(dy); sum(dy xhat) = 0, so grad_x = 0
    assert abs(grad_x[0, 0, 0, 0].item()) < 1e-2 and abs(grad_x[0, 3, -1, -1].item()) < 1e-2


@pytest.mark.parametrize("backend", backend_params(OP, "cuda") if torch.cuda.is_available() else [])
def test_cuda_graph_capture_training_step(backend):
    x, r, p = case(torch.float32)
    grad_out = torch.randn(x.shape[0], x.shape[1] // r ** 2, x.shape[2] * r, x.shape[3] * r, device="cuda")
    w, b = p["weight"], p["bias"]

    def step():
        out, mean, var = torch.ops.uresnet_ops.pixel_shuffle_bn(x, r, w, b, None, None, True, 1e-5, "relu", 0.01)
        grads = torch.ops.uresnet_ops.pixel_shuffle_bn_backward(grad_out, x, r, w, b, mean, var, True, 1e-5,
                                                                "relu", 0.01)
        return (out, mean, var, *grads)

    def refill():
        x.copy_(torch.randn_like(x) * 3 + 1)
        grad_out.copy_(torch.randn_like(grad_out))

    with uresnet_ops.use_backend(backend, OP):
        assert_graph_replay_matches_eager(step, refill)
    assert last_used(OP) == backend


# ---- multi_dilation_conv2d on the GPU ---------------------------------------------------------

MDC = "multi_dilation_conv2d"


def mdc_case(dtype, c_in=70, widths=(65, 3, 17, 1), kernels=(1, 3, 3, 5), dilations=(1, 6, 12, 18), n=2, h=21,
             w=19, bias=True, seed=0):
    """Ragged sizes: more than one pixel / channel tile, branches of one channel, taps in padding."""
    sample = sample_inputs(MDC, "cuda", dtype, shape=(n, c_in, h, w), out_channels=list(widths),
                           kernel_sizes=kernels, dilations=dilations, bias=bias, seed=seed)
    a = sample.arguments
    return sample.x, a["weights"], a["dilations"], a["biases"]


def _mdc_check(backend, x, weights, dilations, biases, activation, dtype):
    x = x.requires_grad_()
    weights = [w.requires_grad_() for w in weights]
    biases = biases and [b.requires_grad_() for b in biases]
    with uresnet_ops.use_backend(backend, MDC):
        out = uresnet_ops.multi_dilation_conv2d(x, weights, dilations, biases, activation)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    assert last_used(MDC) == backend and last_used(MDC, "backward") == backend
    assert out.is_contiguous(memory_format=torch._prims_common.suggest_memory_format(x))
    x64 = x.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in weights]
    b64 = biases and [b.detach().double().requires_grad_() for b in biases]
    expected = reference.multi_dilation_conv2d(x64, w64, dilations, b64, activation)
    expected.backward(grad_out.double())
    assert_close(out, expected.detach(), dtype, scale=5)
    assert_close(x.grad, x64.grad, dtype, scale=10)
    for got, want in zip(weights + (biases or []), w64 + (b64 or []), strict=False):
        assert_close(got.grad, want.grad, dtype, scale=50)


@pytest.mark.parametrize("backend", backend_params(MDC, "cuda") if torch.cuda.is_available() else [])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("activation", ["none", "relu", ("leaky_relu", 0.1), "silu"])
def test_multi_dilation_forward_backward_on_gpu(backend, dtype, layout_name, bias, activation):
    if dtype != torch.float32 and activation in ("relu", ("leaky_relu", 0.1)):
        activation = "silu"  # half-precision rounding across the kink flips the gradient (see helpers)
    x, weights, dilations, biases = mdc_case(dtype, bias=bias)
    _mdc_check(backend, layout(x, layout_name), weights, dilations, biases, activation, dtype)


@pytest.mark.parametrize("backend", backend_params(MDC, "cuda") if torch.cuda.is_available() else [])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_dilation_many_branches_and_small_maps_on_gpu(backend, dtype):
    # 18 branches (more than one launch's branch table in the CUDA kernels), a map smaller than
    # most dilations, odd sizes.
    rng = torch.Generator().manual_seed(0)
    kernels = [int(k) for k in torch.tensor([1, 3, 5, 7]).repeat(5)[:18]]
    dilations = [int(d) for d in torch.randint(1, 9, (18,), generator=rng)]
    x, weights, dilations, biases = mdc_case(dtype, c_in=5, widths=[2] * 18, kernels=kernels, dilations=dilations,
                                             n=3, h=5, w=3)
    _mdc_check(backend, x, weights, dilations, biases, "silu", dtype)


@pytest.mark.parametrize("backend", backend_params(MDC, "cuda") if torch.cuda.is_available() else [])
def test_multi_dilation_cuda_graph_capture_training_step(backend):
    x, weights, dilations, biases = mdc_case(torch.float32)
    grad_out = torch.randn(x.shape[0], sum(w.shape[0] for w in weights), *x.shape[2:], device="cuda")

    def step():
        out = torch.ops.uresnet_ops.multi_dilation_conv2d(x, weights, dilations, biases, "relu", 0.01)
        grad_x, grad_w, grad_b = torch.ops.uresnet_ops.multi_dilation_conv2d_backward(
            grad_out, x, weights, dilations, biases, "relu", 0.01)
        return (out, grad_x, *grad_w, *grad_b)

    def refill():
        x.copy_(torch.randn_like(x))
        grad_out.copy_(torch.randn_like(grad_out))

    with uresnet_ops.use_backend(backend, MDC):
        assert_graph_replay_matches_eager(step, refill)
    assert last_used(MDC) == backend


# ---- shuffle_upsample on the GPU ------------------------------------------------------------
SU = "shuffle_upsample"
PARAMS = ("dw_weight", "pw_weight", "pw_bias", "bn_weight", "bn_bias")  # the ones that take a gradient


def su_sample(dtype, param_dtype, seed=0, **params):
    """(x, tensors by name, configuration) of a shuffle_upsample call on the GPU (uresnet_ops.testing)."""
    sample = sample_inputs(SU, "cuda", dtype, param_dtype=param_dtype, seed=seed, **params)
    a = sample.arguments
    t = {k: a[k] for k in (*PARAMS, "running_mean", "running_var")}
    return sample.x, t, {k: a[k] for k in ("scale_factor", "mode", "shuffle_groups")}


def random_su_case(seed, dtype, param_dtype):
    """A random small configuration (depthwise, grouped or dense 3x3; shuffle groups; nearest x1-3 or bilinear x2)."""
    rng = random.Random(seed)
    c = rng.choice([4, 6, 8])
    conv_groups = rng.choice([c, c // 2, 1])
    shuffle_groups = rng.choice([1, 2, c // 2])
    mode = rng.choice(["nearest", "bilinear"])
    scale = rng.choice([1, 2, 3]) if mode == "nearest" else 2
    n, h, w, c_out = rng.choice([1, 2]), rng.randint(1, 5), rng.randint(2, 6), rng.choice([3, 5])
    return su_sample(dtype, param_dtype, seed, shape=(n, c, h, w), out_channels=c_out, conv_groups=conv_groups,
                     scale_factor=scale, mode=mode, shuffle_groups=shuffle_groups)


@pytest.mark.parametrize("backend", backend_params(SU, "cuda") if torch.cuda.is_available() else [])
@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("seed", range(4))
def test_shuffle_upsample_forward_backward_on_gpu(backend, dtype, param_dtype, layout_name, training, seed):
    x, t, cfg = random_su_case(seed, dtype, param_dtype)
    x = layout(x, layout_name).requires_grad_()
    t = {k: None if v is None else v.clone().requires_grad_(k in PARAMS) for k, v in t.items()}
    x64 = x.detach().double().requires_grad_()
    t64 = {k: None if v is None else v.detach().double().clone().requires_grad_(k in PARAMS) for k, v in t.items()}
    with uresnet_ops.use_backend(backend, SU):
        out = uresnet_ops.shuffle_upsample(x, **t, training=training, activation="silu", **cfg)
        assert last_used(SU) == backend
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    expected = reference.shuffle_upsample(x64, **t64, training=training, activation="silu", **cfg)
    expected.backward(grad_out.double())
    assert out.is_contiguous(memory_format=torch._prims_common.suggest_memory_format(x))
    assert_close(out, expected.detach(), dtype, scale=5)
    for name in ("running_mean", "running_var"):
        assert_close(t[name], t64[name].detach(), param_dtype, precision=dtype)
    assert_close(x.grad, x64.grad, dtype, scale=10)
    for name in PARAMS:
        assert_close(t[name].grad, t64[name].grad, t[name].dtype, scale=50, precision=dtype)


@pytest.mark.parametrize("backend", backend_params(SU, "cuda") if torch.cuda.is_available() else [])
def test_shuffle_upsample_cuda_graph_capture(backend):
    x, t, cfg = random_su_case(3, torch.float32, torch.float32)
    args = [t[k] for k in ("dw_weight", "pw_weight", "pw_bias", "bn_weight", "bn_bias")]
    config = (True, 1e-5, cfg["scale_factor"], cfg["mode"], cfg["shuffle_groups"], "relu", 0.01)
    with uresnet_ops.use_backend(backend, SU):
        assert_graph_replay_matches_eager(lambda: torch.ops.uresnet_ops.shuffle_upsample(x, *args, None, None, *config),
                                          lambda: x.copy_(torch.randn_like(x)))


def shuffle_upsample_case(dtype, scale, mode, n=2, c=8, groups=2, h=7, w=9, c_out=5, param_dtype=torch.float32):
    """An EUCB-like case with grouped 3x3 weights (``groups`` groups), on the GPU."""
    return su_sample(dtype, param_dtype, shape=(n, c, h, w), out_channels=c_out, conv_groups=groups,
                     scale_factor=scale, mode=mode, shuffle_groups=2)


def _shuffle_upsample_check(backend, x, t, cfg, dtype, param_dtype, training, activation="silu"):
    x = x.requires_grad_()
    t = {k: v.clone().requires_grad_(k in PARAMS) for k, v in t.items()}
    x64 = x.detach().double().requires_grad_()
    t64 = {k: v.detach().double().clone().requires_grad_(k in PARAMS) for k, v in t.items()}
    with uresnet_ops.use_backend(backend, SU):
        out = uresnet_ops.shuffle_upsample(x, **t, training=training, activation=activation, **cfg)
        assert last_used(SU) == backend
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    expected = reference.shuffle_upsample(x64, **t64, training=training, activation=activation, **cfg)
    expected.backward(grad_out.double())
    assert_close(out, expected.detach(), dtype, scale=5)
    assert_close(x.grad, x64.grad, dtype, scale=10)
    for name in PARAMS:
        assert_close(t[name].grad, t64[name].grad, t[name].dtype, scale=50, precision=dtype)


@pytest.mark.parametrize("backend", backend_params(SU, "cuda") if torch.cuda.is_available() else [])
@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("scale,mode", [(1, "nearest"), (2, "nearest"), (3, "nearest"), (4, "nearest"),
                                        (8, "nearest"), (2, "bilinear")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_shuffle_upsample_scales_and_dtypes_on_gpu(backend, dtype, param_dtype, scale, mode, training):
    x, t, cfg = shuffle_upsample_case(dtype, scale, mode, param_dtype=param_dtype)
    _shuffle_upsample_check(backend, x, t, cfg, dtype, param_dtype, training)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_shuffle_upsample_triton_grad_weight_several_tiles_per_program(monkeypatch, mode):
    # A realistic map: the weight-gradient programs take several pixel tiles each (ONE_TILE=False).
    if "triton" not in [p.values[0] for p in backend_params(SU, "cuda")]:
        pytest.skip("no Triton backend")
    import uresnet_ops.triton.shuffle_upsample as su
    launches = []
    kernel = su._grad_weight_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs["ONE_TILE"])
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(su, "_grad_weight_kernel", Spy())
    x, t, cfg = shuffle_upsample_case(torch.float32, 2, mode, n=2, c=16, h=97, w=95)
    _shuffle_upsample_check("triton", layout(x, "channels_last"), t, cfg, torch.float32, torch.float32, True)
    assert launches == [False]


@pytest.mark.parametrize("backend", backend_params(SU, "cuda") if torch.cuda.is_available() else [])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_shuffle_upsample_more_than_65535_tiles_per_plane(backend, mode):
    # 2900 x 2900 low-res pixels: more than 65535 tiles of 128 in one plane (CUDA's limit on grid axes 1 and 2).
    x, t, cfg = shuffle_upsample_case(torch.float32, 2, mode, n=1, c=2, groups=1, h=2900, w=2900, c_out=2)
    assert triton.cdiv(2900 * 2900, 128) > 65535
    _shuffle_upsample_check(backend, x, t, cfg, torch.float32, torch.float32, True, activation="none")
