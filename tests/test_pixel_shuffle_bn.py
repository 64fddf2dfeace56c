"""pixel_shuffle_bn: every backend against uresnet_ops.reference (computed in float64)."""
import random

import pytest
import torch
import torch.nn.functional as F

import uresnet_ops
from uresnet_ops import reference
from uresnet_ops.backends import last_used

from helpers import LAYOUTS, activations_for, assert_close, backend_params, expected_format, layout

OP = "pixel_shuffle_bn"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def declines(backend, training, dtype):
    """Configurations a backend hands to the next one (its kernels are not written yet)."""
    return backend == "triton" and dtype == torch.float64  # Triton: float32/float16/bfloat16 only


def make_case(seed, dtype, param_dtype, training, device="cpu"):
    rng = random.Random(seed)
    n, c, r = rng.choice([1, 2, 3]), rng.choice([1, 3, 4]), rng.choice([1, 2, 3])
    h, w = rng.randint(1, 7), rng.randint(2, 7)
    x = torch.randn(n, c * r * r, h, w, device=device).to(dtype) * 2 + 0.5
    p = dict(weight=torch.randn(c, device=device).to(param_dtype),
             bias=torch.randn(c, device=device).to(param_dtype),
             running_mean=torch.randn(c, device=device).to(param_dtype),
             running_var=torch.rand(c, device=device).to(param_dtype) + 0.5)
    return x, r, p


def run_reference(x, r, p, **kw):
    p64 = {k: v.double().clone() for k, v in p.items()}
    out = reference.pixel_shuffle_bn(x.double(), r, **p64, **kw)
    return out, p64


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,param_dtype", [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32),
                                                                          (torch.float16, torch.float32),
                                                                          (torch.float64, torch.float32),
                                                                          (torch.float32, torch.float64)],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_forward_backward_matches_reference(backend, training, dtype, param_dtype, layout_name):
    for seed, activation in zip(range(2), random.Random(str((backend, dtype))).sample(activations_for(dtype), 2)):
        x, r, p = make_case(seed, dtype, param_dtype, training)
        x = layout(x, layout_name).requires_grad_()
        params = {k: v.clone().requires_grad_(k in ("weight", "bias")) for k, v in p.items()}
        with uresnet_ops.use_backend(backend, OP):
            out = uresnet_ops.pixel_shuffle_bn(x, r, **params, training=training, momentum=0.3, activation=activation)
        assert (last_used(OP) == backend) != declines(backend, training, dtype)
        expected, p64 = run_reference(x.detach(), r, p, training=training, momentum=0.3, activation=activation)
        assert out.shape == expected.shape and out.is_contiguous(memory_format=expected_format(x))
        assert_close(out, expected, dtype)
        coarser = max(dtype, param_dtype, key=lambda d: torch.finfo(d).eps)
        for name in ("running_mean", "running_var"):  # updated in place, as F.batch_norm does
            assert params[name].dtype == param_dtype
            assert_close(params[name], p64[name], param_dtype, precision=coarser)

        grad_out = torch.randn_like(expected)
        out.backward(grad_out.to(dtype))
        x64 = x.detach().double().requires_grad_()
        w64, b64 = (p[k].double().requires_grad_() for k in ("weight", "bias"))
        reference.pixel_shuffle_bn(x64, r, w64, b64, p["running_mean"].double(), p["running_var"].double(),
                                   training=training, activation=activation).backward(grad_out)
        grad_scale = 10.0 if dtype in (torch.float16, torch.bfloat16) else 1.0
        assert_close(x.grad, x64.grad, dtype, scale=grad_scale)
        assert_close(params["weight"].grad, w64.grad, param_dtype, scale=grad_scale * 10, precision=coarser)
        assert_close(params["bias"].grad, b64.grad, param_dtype, scale=grad_scale * 10, precision=coarser)


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_no_affine_no_running_stats(backend, affine, track):
    x, r, p = make_case(7, torch.float32, torch.float32, True)
    w, b = (p["weight"], p["bias"]) if affine else (None, None)
    rm, rv = (p["running_mean"].clone(), p["running_var"].clone()) if track else (None, None)
    with uresnet_ops.use_backend(backend, OP):
        out = uresnet_ops.pixel_shuffle_bn(x, r, w, b, rm, rv, training=True)
        w64, b64 = (None, None) if w is None else (w.double(), b.double())
        assert_close(out, reference.pixel_shuffle_bn(x.double(), r, w64, b64, training=True), torch.float32)
        if track:
            out = uresnet_ops.pixel_shuffle_bn(x, r, w, b, rm, rv, training=False)
            assert_close(out, reference.pixel_shuffle_bn(x, r, w, b, rm, rv, training=False))


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(backend, training):
    x = torch.randn(0, 8, 3, 5)
    rm, rv = torch.randn(2), torch.rand(2) + 0.5
    before = rm.clone(), rv.clone()
    with uresnet_ops.use_backend(backend, OP):
        out = uresnet_ops.pixel_shuffle_bn(x, 2, torch.ones(2), torch.zeros(2), rm, rv, training=training)
    assert out.shape == (0, 2, 6, 10)
    torch.testing.assert_close((rm, rv), before)  # F.batch_norm leaves them untouched too


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("layout_name", ["contiguous", "channels_last"])
def test_empty_batch_backward(backend, layout_name):
    x = layout(torch.randn(0, 8, 3, 5), layout_name).requires_grad_()
    w, b = torch.ones(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    with uresnet_ops.use_backend(backend, OP):
        uresnet_ops.pixel_shuffle_bn(x, 2, w, b, training=True).sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close((w.grad, b.grad), (torch.zeros(2), torch.zeros(2)))


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("r,activation", [(2, "relu"), (3, ("leaky_relu", 0.1)), (1, "silu")])
def test_larger_shapes(backend, layout_name, r, activation):
    # Longer rows and more pixels than make_case: the kernels' unrolled/chunked loops run.
    x = layout(torch.randn(3, 2 * r * r, 9, 21) * 3 - 1, layout_name).requires_grad_()
    w, b = torch.rand(2, requires_grad=True), torch.randn(2, requires_grad=True)
    rm, rv = torch.zeros(2), torch.ones(2)
    with uresnet_ops.use_backend(backend, OP):
        out = uresnet_ops.pixel_shuffle_bn(x, r, w, b, rm, rv, training=True, activation=activation)
    assert last_used(OP) == backend
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    rm64, rv64 = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    expected = reference.pixel_shuffle_bn(x64, r, w64, b64, rm64, rv64, training=True, activation=activation)
    expected.backward(grad_out.double())
    assert_close(out, expected)
    for actual, want in ((rm, rm64), (rv, rv64), (x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert_close(actual, want, torch.float32, scale=10)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_stable_variance_large_mean(backend):
    x = torch.randn(4, 8, 16, 16) + 1e4  # mean 1e4, std 1: one-pass E[x^2]-E[x]^2 fails here
    rm, rv = torch.zeros(2), torch.ones(2)
    with uresnet_ops.use_backend(backend, OP):
        out = uresnet_ops.pixel_shuffle_bn(x, 2, None, None, rm, rv, training=True, activation="none")
    expected = reference.pixel_shuffle_bn(x.double(), 2, None, None, training=True, activation="none")
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * F.pixel_shuffle(x.double(), 2).var(dim=(0, 2, 3)),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(backend, training):
    x, r, p = make_case(3, torch.float32, torch.float32, training)
    args = (x.requires_grad_(), r, p["weight"].requires_grad_(), p["bias"], p["running_mean"], p["running_var"],
            training, 1e-5, "relu", 0.01)
    with uresnet_ops.use_backend(backend, OP):
        torch.library.opcheck(torch.ops.uresnet_ops.pixel_shuffle_bn.default, args)
        grad_out = torch.randn(x.shape[0], x.shape[1] // r ** 2, x.shape[2] * r, x.shape[3] * r)
        mean, var = p["running_mean"], p["running_var"]
        torch.library.opcheck(torch.ops.uresnet_ops.pixel_shuffle_bn_backward.default,
                              (grad_out, x.detach(), r, p["weight"].detach(), p["bias"], mean, var, training,
                               1e-5, "relu", 0.01))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["none", "silu", ("leaky_relu", 0.1)])
def test_gradcheck_float64(training, activation):
    x = torch.randn(2, 8, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5
    torch.autograd.gradcheck(lambda x, w, b: uresnet_ops.pixel_shuffle_bn(
        x, 2, w, b, rm.clone(), rv.clone(), training=training, activation=activation), (x, w, b))


@pytest.mark.slow
def test_compile_fullgraph_no_graph_break():
    module = uresnet_ops.nn.PixelShuffleBN(8, 2)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    reference_module = uresnet_ops.nn.PixelShuffleBN(8, 2)
    out = compiled(x)
    expected = reference_module(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(module.running_var, reference_module.running_var)
    out.sum().backward()
    assert x.grad is not None and module.weight.grad is not None


def test_autocast_and_float32_params_on_half_input():
    x, r, p = make_case(5, torch.bfloat16, torch.float32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = uresnet_ops.pixel_shuffle_bn(x, r, **{k: v.clone() for k, v in p.items()})
        expected = reference.pixel_shuffle_bn(x, r, **{k: v.clone() for k, v in p.items()})
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close(out, expected.float(), torch.bfloat16)


def _bad_calls():
    x = torch.randn(2, 8, 4, 4)
    c = torch.ones(2)
    yield "x", dict(x=torch.randn(8, 4, 4))                                           # wrong rank
    yield "x", dict(x=torch.ones(2, 8, 4, 4, dtype=torch.int64))                      # integer tensor
    yield "upscale_factor", dict(upscale_factor=0)                                    # non-positive
    yield "upscale_factor", dict(upscale_factor=2.0)
    yield "not divisible", dict(upscale_factor=3)                                     # 8 % 9
    yield "weight", dict(weight=torch.ones(3))                                        # wrong size
    yield "bias", dict(bias=torch.ones(2, dtype=torch.int32))
    yield "running_var", dict(running_var=torch.ones(4))
    yield "both", dict(running_var=None)
    yield "eval mode", dict(running_mean=None, running_var=None, training=False)
    yield "activation", dict(activation="gelu")
    yield "activation", dict(activation=("leaky_relu", "x"))
    yield "more than 1 value", dict(x=torch.randn(1, 4, 1, 1), upscale_factor=1, weight=torch.ones(4),
                                    bias=None, running_mean=None, running_var=None)
    yield "eps", dict(eps=-1.0)
    if torch.cuda.is_available():
        yield "device", dict(weight=c.cuda())
    del x


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("match,override", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_clear_error(backend, match, override):
    args = dict(x=torch.randn(2, 8, 4, 4), upscale_factor=2, weight=torch.ones(2), bias=torch.zeros(2),
                running_mean=torch.zeros(2), running_var=torch.ones(2), training=True)
    args.update(override)
    with uresnet_ops.use_backend(backend, OP), pytest.raises((ValueError, TypeError), match=match):
        uresnet_ops.pixel_shuffle_bn(**args)


def _bad_native_calls():
    """The native kernels' own checks (they are callable directly, past the front end)."""
    x, c = torch.randn(2, 8, 4, 4), torch.ones(2)
    fwd = dict(x=x, upscale_factor=2, weight=c, bias=c, running_mean=c, running_var=c, training=True,
               eps=1e-5, activation="relu", negative_slope=0.01)
    yield "fwd", "4-D", dict(x=torch.randn(8, 4, 4))
    yield "fwd", "must be float32", dict(x=x.int())
    yield "fwd", "upscale_factor' must be >= 1", dict(upscale_factor=0)
    yield "fwd", "divisible", dict(upscale_factor=3)
    yield "fwd", "'weight' must have shape", dict(weight=torch.ones(3))
    yield "fwd", "'bias' must be float32", dict(bias=torch.ones(2, dtype=torch.int32))
    yield "fwd", "both be given", dict(running_var=None)
    yield "fwd", "required in eval mode", dict(running_mean=None, running_var=None, training=False)
    yield "fwd", "activation", dict(activation="gelu")
    yield "fwd", "more than 1 value", dict(x=torch.randn(1, 4, 1, 1), upscale_factor=1, weight=None, bias=None,
                                           running_mean=torch.ones(4), running_var=torch.ones(4))
    yield "fwd", "eps", dict(eps=-1.0)
    bwd = dict(grad_out=torch.randn(2, 2, 8, 8), x=x, upscale_factor=2, weight=c, bias=c, mean=c, var=c,
               training=True, eps=1e-5, activation="relu", negative_slope=0.01)
    yield "bwd", "'grad_out' must have shape", dict(grad_out=torch.randn(2, 2, 8, 7))
    yield "bwd", "'grad_out' must have x's dtype", dict(grad_out=torch.randn(2, 2, 8, 8, dtype=torch.float64))
    yield "bwd", "'mean' must have shape", dict(mean=torch.ones(3))
    yield "bwd", "'weight' must have shape", dict(weight=torch.ones(1))
    yield "bwd", "divisible", dict(x=torch.randn(2, 6, 4, 4))
    yield "bwd", "activation", dict(activation="tanh")
    if torch.cuda.is_available():
        yield "fwd", "device", dict(weight=c.cuda())
    del fwd, bwd


@pytest.mark.skipif(not uresnet_ops._library.HAS_EXTENSION, reason="native kernels not built")
@pytest.mark.parametrize("phase,match,override", list(_bad_native_calls()),
                         ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_native_kernel_checks(phase, match, override):
    c = torch.ones(2)
    if phase == "fwd":
        args = dict(x=torch.randn(2, 8, 4, 4), upscale_factor=2, weight=c, bias=c, running_mean=c, running_var=c,
                    training=True, eps=1e-5, activation="relu", negative_slope=0.01)
        op = torch.ops.uresnet_ops._pixel_shuffle_bn_native
    else:
        args = dict(grad_out=torch.randn(2, 2, 8, 8), x=torch.randn(2, 8, 4, 4), upscale_factor=2, weight=c,
                    bias=c, mean=c, var=c, training=True, eps=1e-5, activation="relu", negative_slope=0.01)
        op = torch.ops.uresnet_ops._pixel_shuffle_bn_native_backward
    args.update(override)
    with pytest.raises((ValueError, TypeError), match=match):
        op(**args)


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_triton_64_bit_index_path_matches_the_32_bit_one(layout_name, monkeypatch):
    # The kernels take 32-bit index math unless an offset can reach 2**31 (no 64-bit division
    # on the GPU); the 64-bit path is forced here by lowering the limit.
    if "triton" not in uresnet_ops.available_backends(OP):
        pytest.skip("Triton is not available")
    from uresnet_ops.triton import pixel_shuffle_bn as kernels
    x, r, p = make_case(3, torch.float32, torch.float32, True)
    x = layout(x, layout_name)
    assert not kernels._wide(x)
    results = []
    for limit in (kernels._INT32_LIMIT, 1):
        monkeypatch.setattr(kernels, "_INT32_LIMIT", limit)
        assert kernels._wide(x) == (limit == 1)
        xi = x.clone().requires_grad_()
        params = {k: v.clone().requires_grad_(k in ("weight", "bias")) for k, v in p.items()}
        with uresnet_ops.use_backend("triton", OP):
            out = uresnet_ops.pixel_shuffle_bn(xi, r, **params, training=True, activation="silu")
            out.backward(torch.ones_like(out))
        assert last_used(OP) == "triton" and last_used(OP, "backward") == "triton"
        results.append((out, xi.grad, params["weight"].grad, params["running_mean"], params["running_var"]))
    for narrow, wide in zip(*results):
        torch.testing.assert_close(narrow, wide, rtol=1e-6, atol=1e-6)
    expected, _ = run_reference(x, r, p, training=True, activation="silu")
    assert_close(results[1][0], expected, torch.float32)


# The Triton tilings (uresnet_ops/triton/pixel_shuffle_bn.py): "pixels" where x's channels are
# contiguous and r is a power of two, "rows" otherwise (r padded to a power of two when it is
# not one). tile: elements per program (smaller than the default, so that several column or
# channel blocks and several loop steps run); split: the GPU's programs per channel, not the
# interpreter's one.
_TILING_CASES = [
    # (n, c, h, w), r, layout, dtype, tile, split, expected tiling
    ((2, 2, 3, 16), 2, "contiguous", torch.float32, None, False, "rows"),     # aligned: vector path
    ((1, 2, 2, 16), 4, "contiguous", torch.float16, None, False, "rows"),
    ((2, 3, 6, 16), 1, "contiguous", torch.bfloat16, 64, True, "rows"),
    ((2, 3, 2, 21), 2, "contiguous", torch.float32, 32, True, "rows"),       # several column blocks
    ((2, 2, 3, 5), 3, "contiguous", torch.float32, 32, True, "rows"),        # r padded to 4
    ((2, 2, 3, 5), 3, "channels_last", torch.float16, None, False, "rows"),  # odd r: rows, any strides
    ((2, 2, 3, 6), 2, "strided", torch.float32, 64, True, "rows"),
    ((2, 16, 2, 4), 2, "channels_last", torch.float32, None, False, "pixels"),  # aligned: vector path
    ((1, 16, 2, 2), 4, "channels_last", torch.bfloat16, None, False, "pixels"),
    ((2, 3, 3, 5), 1, "channels_last", torch.float16, 16, True, "pixels"),
    ((2, 20, 3, 3), 2, "channels_last", torch.float32, 64, True, "pixels"),  # 2 channel blocks, C % block
    ((1, 2, 2, 3), 8, "channels_last", torch.float32, None, False, "pixels"),
]


@pytest.mark.parametrize("shape,r,layout_name,dtype,tile,split,tiling", _TILING_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-r{c[1]}-{c[2]}-{str(c[3])[6:]}-tile{c[4]}"
                              f"{'-split' if c[5] else ''}" for c in _TILING_CASES])
def test_triton_tilings_match_reference(shape, r, layout_name, dtype, tile, split, tiling, monkeypatch):
    if "triton" not in uresnet_ops.available_backends(OP):
        pytest.skip("Triton is not available")
    from uresnet_ops.triton import pixel_shuffle_bn as kernels
    if tile is not None:
        monkeypatch.setattr(kernels, "_TILE", tile)
    if split:  # the GPU's split into several programs per channel (block) under the interpreter
        split_ = kernels._split
        monkeypatch.setattr(kernels, "_split", lambda u, b, g, device: split_(u, b, g, torch.device("meta")))
    n, c, h, w = shape
    x = layout((torch.randn(n, c * r * r, h, w) * 2 + 0.5).to(dtype), layout_name)
    assert kernels._tiling(x, r)[0]["PIXELS"] == (tiling == "pixels")
    if split:
        assert kernels._reduction_grid(x, r, c)[3] > 1
    p = dict(weight=torch.randn(c), bias=torch.randn(c), running_mean=torch.randn(c), running_var=torch.rand(c) + 0.5)
    params = {k: v.clone().requires_grad_(k in ("weight", "bias")) for k, v in p.items()}
    xi = x.clone().requires_grad_()
    with uresnet_ops.use_backend("triton", OP):
        out = uresnet_ops.pixel_shuffle_bn(xi, r, **params, training=True, momentum=0.3, activation="silu")
        assert last_used(OP) == "triton"
        # grad_out in the other layout than out's: the kernels read it by its strides
        grad_out = layout(torch.randn(out.shape), "contiguous" if layout_name == "channels_last" else "channels_last")
        out.backward(grad_out.to(dtype))
        eval_out = uresnet_ops.pixel_shuffle_bn(x, r, **{k: v.detach() for k, v in params.items()}, training=False,
                                                activation="silu")
    expected, p64 = run_reference(x, r, p, training=True, momentum=0.3, activation="silu")
    assert out.is_contiguous(memory_format=expected_format(x))
    assert_close(out, expected, dtype)
    for name in ("running_mean", "running_var"):
        assert_close(params[name], p64[name], torch.float32, precision=dtype)
    x64 = x.double().requires_grad_()
    w64, b64 = (p[k].double().requires_grad_() for k in ("weight", "bias"))
    reference.pixel_shuffle_bn(x64, r, w64, b64, training=True, activation="silu").backward(grad_out.double())
    scale = 10.0 if dtype != torch.float32 else 1.0
    assert_close(xi.grad, x64.grad, dtype, scale=scale)
    assert_close(params["weight"].grad, w64.grad, torch.float32, scale=scale * 10, precision=dtype)
    assert_close(params["bias"].grad, b64.grad, torch.float32, scale=scale * 10, precision=dtype)
    expected_eval = reference.pixel_shuffle_bn(x.double(), r, p64["weight"], p64["bias"], p64["running_mean"],
                                               p64["running_var"], training=False, activation="silu")
    assert_close(eval_out, expected_eval, dtype)
