"""multi_dilation_conv2d: every backend against uresnet_ops.reference (computed in float64)."""
import random

import pytest
import torch

import uresnet_ops
from uresnet_ops import reference
from uresnet_ops.backends import last_used

from helpers import LAYOUTS, activations_for, assert_close, backend_params, expected_format, layout

OP = "multi_dilation_conv2d"
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def make_case(seed, dtype, device="cpu", bias=True):
    rng = random.Random(seed)
    c_in, n = rng.choice([1, 3, 5]), rng.choice([1, 2])
    h, w = rng.randint(1, 9), rng.randint(2, 9)
    branches = rng.randint(1, 4)
    kernels = [rng.choice([1, 3, 5, 7]) for _ in range(branches)]
    dilations = [rng.choice([1, 2, 6, 12]) for _ in range(branches)]  # often larger than the map
    widths = [rng.randint(1, 4) for _ in range(branches)]
    x = torch.randn(n, c_in, h, w, device=device).to(dtype)
    weights = [(torch.randn(c, c_in, k, k, device=device) / (c_in * k * k) ** 0.5).to(dtype)
               for c, k in zip(widths, kernels)]
    biases = [torch.randn(c, device=device).to(dtype) for c in widths] if bias else None
    return x, weights, dilations, biases


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_forward_backward_matches_reference(backend, dtype, layout_name, bias):
    for seed, activation in enumerate(activations_for(dtype)):
        x, weights, dilations, biases = make_case(seed + 100 * bias, dtype, bias=bias)
        x = layout(x, layout_name).requires_grad_()
        weights = [w.requires_grad_() for w in weights]
        biases = biases and [b.requires_grad_() for b in biases]
        with uresnet_ops.use_backend(backend, OP):
            out = uresnet_ops.multi_dilation_conv2d(x, weights, dilations, biases, activation)
        assert last_used(OP) == backend
        x64 = x.detach().double().requires_grad_()
        w64 = [w.detach().double().requires_grad_() for w in weights]
        b64 = biases and [b.detach().double().requires_grad_() for b in biases]
        expected = reference.multi_dilation_conv2d(x64, w64, dilations, b64, activation)
        assert out.shape == expected.shape and out.is_contiguous(memory_format=expected_format(x))
        assert_close(out, expected, dtype, scale=5)
        grad_out = torch.randn_like(expected)
        out.backward(grad_out.to(dtype))
        expected.backward(grad_out)
        assert_close(x.grad, x64.grad, dtype, scale=10)
        for got, want in zip(weights + (biases or []), w64 + (b64 or [])):
            assert_close(got.grad, want.grad, dtype, scale=50)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_empty_batch_and_none_biases(backend):
    x, weights, dilations, _ = make_case(3, torch.float32)
    biases = [None] * len(weights)
    biases[0] = torch.randn(weights[0].shape[0])
    with uresnet_ops.use_backend(backend, OP):
        out = uresnet_ops.multi_dilation_conv2d(x, weights, dilations, biases)
        assert uresnet_ops.multi_dilation_conv2d(x[:0], weights, dilations).shape[0] == 0
    assert_close(out, reference.multi_dilation_conv2d(x.double(), [w.double() for w in weights], dilations,
                                                      [None if b is None else b.double() for b in biases]),
                 torch.float32)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_opcheck(backend):
    x, weights, dilations, biases = make_case(4, torch.float32)
    with uresnet_ops.use_backend(backend, OP):
        args = (x.requires_grad_(), [w.requires_grad_() for w in weights], dilations, biases, "relu", 0.01)
        torch.library.opcheck(torch.ops.uresnet_ops.multi_dilation_conv2d.default, args)
        out = torch.ops.uresnet_ops.multi_dilation_conv2d(*args)
        torch.library.opcheck(torch.ops.uresnet_ops.multi_dilation_conv2d_backward.default,
                              (torch.randn_like(out), x.detach(), [w.detach() for w in weights], dilations,
                               biases, "relu", 0.01))


@pytest.mark.parametrize("activation", ["none", "silu"])
def test_gradcheck_float64(activation):
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(2, 2, k, k, dtype=torch.float64, requires_grad=True) for k in (1, 3, 3)]
    biases = [torch.randn(2, dtype=torch.float64, requires_grad=True) for _ in weights]
    torch.autograd.gradcheck(lambda x, *p: uresnet_ops.multi_dilation_conv2d(x, p[:3], [1, 2, 6], p[3:], activation),
                             (x, *weights, *biases))


def test_autograd_sees_the_tensors_inside_the_lists():
    # _library.register_autograd hands each Tensor[] argument's tensors to autograd.Function one
    # by one: a weight shared by two branches gets both gradients; a bias without grad gets none.
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64)
    uresnet_ops.multi_dilation_conv2d(x, [w, w], [1, 2], [b, b], "silu").sum().backward()
    w64 = w.detach().clone().requires_grad_()
    reference.multi_dilation_conv2d(x, [w64, w64], [1, 2], [b, b], "silu").sum().backward()
    torch.testing.assert_close(w.grad, w64.grad)
    assert b.grad is None


def test_autocast_casts_operands():
    x, weights, dilations, biases = make_case(6, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = uresnet_ops.multi_dilation_conv2d(x, weights, dilations, biases, "relu")
        expected = reference.multi_dilation_conv2d(x, weights, dilations, biases, "relu")
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close(out, expected.float(), torch.bfloat16)


def _bad_calls():
    w3 = torch.randn(2, 4, 3, 3)
    yield "x", dict(x=torch.randn(4, 5, 5))
    yield "x", dict(x=torch.ones(1, 4, 5, 5, dtype=torch.int64))
    yield "weights", dict(weights=[])                                        # no branches
    yield "dilations", dict(dilations=[1])                                  # lengths differ
    yield "weights\\[1\\]", dict(weights=[w3, torch.randn(2, 3, 3, 3)])      # wrong input channels
    yield "odd k", dict(weights=[w3, torch.randn(2, 4, 2, 2)])              # even kernel
    yield "weights\\[1\\]", dict(weights=[w3, w3.double()])                  # mixed dtypes
    yield "dilations\\[0\\]", dict(dilations=[0, 2])
    yield "biases\\[1\\]", dict(biases=[torch.randn(2), torch.randn(3)])
    yield "biases", dict(biases=[torch.randn(2)])
    yield "activation", dict(activation="elu")
    if torch.cuda.is_available():
        yield "weights\\[0\\]", dict(weights=[w3.cuda(), w3])


@pytest.mark.parametrize("match,override", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_clear_error(match, override):
    w3 = torch.randn(2, 4, 3, 3)
    args = dict(x=torch.randn(2, 4, 5, 5), weights=[w3, w3], dilations=[1, 2], biases=None)
    args.update(override)
    with pytest.raises((ValueError, TypeError), match=match):
        uresnet_ops.multi_dilation_conv2d(**args)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_backward_runs_on_selected_backend(backend):
    # Each backend registers its own backward (no silent fallback to another backend's).
    x, weights, dilations, biases = make_case(7, torch.float32)
    x.requires_grad_()
    with uresnet_ops.use_backend(backend, OP):
        uresnet_ops.multi_dilation_conv2d(x, weights, dilations, biases, "silu").sum().backward()
    assert last_used(OP, "backward") == backend


@pytest.mark.skipif("cpu" not in uresnet_ops.available_backends(OP), reason="C++ kernels not built")
def test_cpu_default_leaves_channels_last_to_onednn():
    x = torch.randn(2, 8, 9, 9)
    weights, dilations = [torch.randn(4, 8, 3, 3), torch.randn(4, 8, 1, 1)], [2, 1]
    uresnet_ops.multi_dilation_conv2d(x, weights, dilations)
    assert last_used(OP) == "cpu"
    expected = uresnet_ops.multi_dilation_conv2d(x, weights, dilations)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out = uresnet_ops.multi_dilation_conv2d(x_cl, weights, dilations)
    assert last_used(OP) == "reference"  # measured faster for channels_last on CPU
    with uresnet_ops.use_backend("cpu", OP):
        out_cpu = uresnet_ops.multi_dilation_conv2d(x_cl, weights, dilations)
    assert last_used(OP) == "cpu"
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out_cpu, expected)


@pytest.mark.skipif("cpu" not in uresnet_ops.available_backends(OP), reason="the C++ extension is not built")
@pytest.mark.parametrize("dtype,c_in,width", [(torch.float64, 192, 192), (torch.float32, 320, 224)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("layout_name", ["contiguous", "channels_last"])
def test_cpu_kernel_wide_weights_match_reference(dtype, c_in, width, layout_name):
    """Taps whose weight matrix exceeds 256 KiB and whose valid region is not whole rows run one
    GEMM over a shifted, zero-filled copy of the input (small ones run a GEMM per row): the
    forward, the transposed pass and the weight gradients of that path against the reference."""
    torch.manual_seed(7)
    x = layout(torch.randn(2, c_in, 7, 9, dtype=dtype), layout_name).requires_grad_()
    weights = [(torch.randn(width, c_in, k, k, dtype=dtype) / (c_in * k * k) ** 0.5).requires_grad_()
               for k in (1, 3, 3)]
    biases = [torch.randn(width, dtype=dtype).requires_grad_() for _ in weights]
    dilations = [1, 2, 5]  # partial rows and columns on a 7x9 map
    with uresnet_ops.use_backend("cpu", OP):
        out = uresnet_ops.multi_dilation_conv2d(x, weights, dilations, biases, "relu")
    assert last_used(OP) == "cpu"
    x64 = x.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in weights]
    b64 = [b.detach().double().requires_grad_() for b in biases]
    expected = reference.multi_dilation_conv2d(x64, w64, dilations, b64, "relu")
    assert_close(out, expected, dtype, scale=5)
    grad_out = torch.randn_like(expected)
    out.backward(grad_out.to(dtype))
    expected.backward(grad_out)
    assert_close(x.grad, x64.grad, dtype, scale=10)
    for got, want in zip(weights + biases, w64 + b64):
        assert_close(got.grad, want.grad, dtype, scale=50)


def _triton_kernels():
    if "triton" not in uresnet_ops.available_backends(OP):
        pytest.skip("Triton is not available")
    from uresnet_ops.triton import multi_dilation_conv2d as kernels
    return kernels


def _run_triton(x, weights, dilations, biases, activation, grad_out):
    """(out, x.grad, weight grads, bias grads) of the triton backend."""
    x = x.detach().clone().requires_grad_()
    weights = [w.detach().clone().requires_grad_() for w in weights]
    biases = [b.detach().clone().requires_grad_() for b in biases]
    with uresnet_ops.use_backend("triton", OP):
        out = uresnet_ops.multi_dilation_conv2d(x, weights, dilations, biases, activation)
        out.backward(grad_out)
    assert last_used(OP) == "triton" and last_used(OP, "backward") == "triton"
    return out, x.grad, [w.grad for w in weights], [b.grad for b in biases]


def test_triton_pack_pads_rows_to_the_alignment():
    kernels = _triton_kernels()
    weights = [torch.randn(5, 3, 3, 3), torch.randn(16, 3, 1, 1), torch.randn(2, 3, 3, 3)]
    packed, offsets = kernels._pack(weights, (2, 3, 1, 0))  # (k, k, Cin, Cout padded)
    align = kernels._ALIGN.value
    assert all(o % align == 0 for o in offsets) and packed.numel() % align == 0
    for wt, off in zip(weights, offsets):
        cout, c_in, k = wt.shape[0], wt.shape[1], wt.shape[-1]
        block = packed[off:off + k * k * c_in * kernels._padded(cout)].view(k, k, c_in, -1)
        torch.testing.assert_close(block[..., :cout], wt.permute(2, 3, 1, 0), rtol=0, atol=0)
        assert not block[..., cout:].any()  # zero padding


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_triton_vector_layout_copies_only_aligned_half_tensors(dtype, layout_name):
    kernels = _triton_kernels()
    for c, aligned in ((16, True), (5, False)):
        x = layout(torch.randn(2, c, 3, 4).to(dtype), layout_name)
        y = kernels._vector_layout(x, aligned)
        copied = aligned and dtype != torch.float32 and layout_name != "channels_last"
        assert (y is not x) == copied
        assert y.is_contiguous(memory_format=torch.channels_last) or not copied
        torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("widths", [(16, 16), (16, 5)], ids=["aligned", "unaligned_widths"])
def test_triton_aligned_channels_match_reference(dtype, layout_name, widths):
    # 16 input channels: half inputs are read channels_last (copied from NCHW), the weights
    # padded per row; aligned widths: CH_ALIGN = 16 (grad_out copied to channels_last for "none").
    kernels = _triton_kernels()
    torch.manual_seed(3)
    x = layout(torch.randn(1, 16, 5, 6).to(dtype), layout_name)
    weights = [(torch.randn(c, 16, k, k) / (16 * k * k) ** 0.5).to(dtype) for c, k in zip(widths, (3, 1))]
    biases = [torch.randn(c).to(dtype) for c in widths]
    dilations = [2, 1]
    assert kernels._channel_align(widths) == (16 if widths == (16, 16) else 1)
    for activation in ("none", "silu"):
        x64, w64 = x.double().requires_grad_(), [w.double().requires_grad_() for w in weights]
        b64 = [b.double().requires_grad_() for b in biases]
        expected = reference.multi_dilation_conv2d(x64, w64, dilations, b64, activation)
        grad_out = layout(torch.randn_like(expected), layout_name)
        expected.backward(grad_out)
        out, gx, gw, gb = _run_triton(x, weights, dilations, biases, activation, grad_out.to(dtype))
        assert out.is_contiguous(memory_format=expected_format(x))
        assert_close(out, expected, dtype, scale=5)
        assert_close(gx, x64.grad, dtype, scale=10)
        for got, want in zip(gw + gb, w64 + b64):
            assert_close(got, want.grad, dtype, scale=50)


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_triton_64_bit_index_path_matches_the_32_bit_one(layout_name, monkeypatch):
    # The kernels take 32-bit index math unless an offset can reach 2**31 (no 64-bit division
    # on the GPU); the 64-bit path is forced here by lowering the limit.
    kernels = _triton_kernels()
    torch.manual_seed(5)
    x = layout(torch.randn(2, 3, 5, 7), layout_name)
    weights = [torch.randn(c, 3, k, k) for c, k in ((4, 3), (2, 1), (3, 3))]
    biases = [torch.randn(w.shape[0]) for w in weights]
    dilations = [1, 1, 3]
    grad_out = torch.randn(2, 9, 5, 7)
    assert not kernels._wide(x)
    results = []
    for limit in (kernels._INT32_LIMIT, 1):
        monkeypatch.setattr(kernels, "_INT32_LIMIT", limit)
        assert kernels._wide(x) == (limit == 1)
        out, gx, gw, gb = _run_triton(x, weights, dilations, biases, "silu", grad_out)
        results.append([out, gx, *gw, *gb])
    for narrow, wide in zip(*results):
        torch.testing.assert_close(narrow, wide, rtol=1e-6, atol=1e-6)
    expected = reference.multi_dilation_conv2d(x.double(), [w.double() for w in weights], dilations,
                                               [b.double() for b in biases], "silu")
    assert_close(results[1][0], expected, torch.float32, scale=5)


def test_triton_declines_float32_on_the_gpu_while_cudnn_may_use_tf32(monkeypatch):
    # The reference's cuDNN convolutions run TF32 on tensor cores there (docs/roofline.md); the
    # Triton kernel's float32 is IEEE on CUDA cores. Asked for by name it still runs.
    triton_mdc = pytest.importorskip("uresnet_ops.triton.multi_dilation_conv2d")
    with uresnet_ops.use_backend("triton"):
        declines = uresnet_ops.backends.get_backend(OP, "cpu").declines

    class OnGpu:
        def __init__(self, dtype):
            self.device, self.dtype = torch.device("cuda"), dtype

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert declines is triton_mdc._tf32_convolutions_are_faster
    assert declines(OnGpu(torch.float32)) and not declines(OnGpu(torch.bfloat16))
    assert not declines(torch.zeros(1))  # a CPU tensor (the interpreter)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert not declines(OnGpu(torch.float32))
