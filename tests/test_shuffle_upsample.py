"""shuffle_upsample: every backend against uresnet_ops.reference (computed in float64)."""
import contextlib
import random

import pytest
import torch

import uresnet_ops
from uresnet_ops import reference
from uresnet_ops.backends import last_used

from helpers import LAYOUTS, activations_for, assert_close, backend_params, expected_format, layout

OP = "shuffle_upsample"
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
PARAMS = ("dw_weight", "pw_weight", "pw_bias", "bn_weight", "bn_bias")


def make_case(seed, dtype, param_dtype, device="cpu", pw=True):
    rng = random.Random(seed)
    c = rng.choice([4, 6, 8])
    conv_groups = rng.choice([c, c // 2, 1])          # depthwise (EUCB), grouped (EUCB*), dense
    shuffle_groups = rng.choice([1, 2, c // 2])
    mode = rng.choice(["nearest", "bilinear"])
    scale = rng.choice([1, 2, 3]) if mode == "nearest" else 2
    n, h, w, c_out = rng.choice([1, 2]), rng.randint(1, 5), rng.randint(2, 6), rng.choice([3, 5])
    x = torch.randn(n, c, h, w, device=device).to(dtype)
    t = dict(dw_weight=torch.randn(c, c // conv_groups, 3, 3, device=device).to(dtype) / 3,
             pw_weight=torch.randn(c_out, c, 1, 1, device=device).to(dtype) / c ** 0.5 if pw else None,
             pw_bias=torch.randn(c_out, device=device).to(dtype) if pw else None,
             bn_weight=torch.randn(c, device=device).to(param_dtype),
             bn_bias=torch.randn(c, device=device).to(param_dtype),
             running_mean=torch.randn(c, device=device).to(param_dtype),
             running_var=torch.rand(c, device=device).to(param_dtype) + 0.5)
    return x, t, dict(scale_factor=scale, mode=mode, shuffle_groups=shuffle_groups)


def double(t):
    return {k: None if v is None else v.detach().double().clone() for k, v in t.items()}


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,param_dtype", [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32)],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("pw", [True, False], ids=["pw", "no_pw"])
def test_forward_backward_matches_reference(backend, training, dtype, param_dtype, layout_name, pw):
    activation = random.Random(layout_name + str(dtype)).choice(activations_for(dtype))
    for seed in range(2):
        x, t, cfg = make_case(seed + 10 * pw, dtype, param_dtype, pw=pw)
        x = layout(x, layout_name).requires_grad_()
        t = {k: None if v is None else v.clone().requires_grad_(k in PARAMS) for k, v in t.items()}
        x64, t64 = x.detach().double().requires_grad_(), double(t)
        with uresnet_ops.use_backend(backend, OP):
            out = uresnet_ops.shuffle_upsample(x, **t, training=training, momentum=0.2, activation=activation, **cfg)
        assert last_used(OP) == backend
        for k in PARAMS:
            if t64[k] is not None:
                t64[k].requires_grad_()
        expected = reference.shuffle_upsample(x64, **t64, training=training, momentum=0.2, activation=activation, **cfg)
        assert out.shape == expected.shape and out.is_contiguous(memory_format=expected_format(x))
        assert_close(out, expected, dtype, scale=5)
        for k in ("running_mean", "running_var"):
            assert_close(t[k], t64[k], param_dtype, precision=dtype)
        grad_out = torch.randn_like(expected)
        out.backward(grad_out.to(dtype))
        expected.backward(grad_out)
        assert_close(x.grad, x64.grad, dtype, scale=10)
        for k in PARAMS:
            if t[k] is not None:
                assert_close(t[k].grad, t64[k].grad, t[k].dtype, scale=50, precision=dtype)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_empty_batch(backend):
    x, t, cfg = make_case(1, torch.float32, torch.float32)
    with uresnet_ops.use_backend(backend, OP):
        out = uresnet_ops.shuffle_upsample(x[:0], **t, **cfg)
    assert out.shape[0] == 0 and out.shape[1] == t["pw_weight"].shape[0]


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(backend, training):
    x, t, cfg = make_case(2, torch.float32, torch.float32)
    config = (training, 1e-5, cfg["scale_factor"], cfg["mode"], cfg["shuffle_groups"], "relu", 0.01)
    params = [t[k] for k in PARAMS]
    with uresnet_ops.use_backend(backend, OP):
        torch.library.opcheck(torch.ops.uresnet_ops.shuffle_upsample.default,
                              (x.requires_grad_(), *params, t["running_mean"], t["running_var"], *config))
        out, mean, var = torch.ops.uresnet_ops.shuffle_upsample(x, *params, None, None, *config) if training else \
            torch.ops.uresnet_ops.shuffle_upsample(x, *params, t["running_mean"], t["running_var"], *config)
        torch.library.opcheck(torch.ops.uresnet_ops.shuffle_upsample_backward.default,
                              (torch.randn_like(out), x.detach(), *params, mean, var, *config))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_gradcheck_float64(training, mode):
    x, t, cfg = make_case(4, torch.float64, torch.float64)
    x = x[:2, :, :3, :3]  # keep the Jacobian small
    cfg["mode"], cfg["scale_factor"] = mode, 2
    params = [t[k].requires_grad_() for k in PARAMS]
    x.requires_grad_()
    rm, rv = t["running_mean"], t["running_var"]
    torch.autograd.gradcheck(lambda x, *p: uresnet_ops.shuffle_upsample(
        x, *p, rm.clone(), rv.clone(), training=training, activation="silu", **cfg), (x, *params))


@pytest.mark.skipif(OP not in uresnet_ops.backends._routed, reason="no compiled hot path here")
def test_threads_on_the_hot_path_and_in_python_each_run_their_own_backend():
    # One thread on the compiled hot path (csrc/autograd/shuffle_upsample.cpp), one inside
    # use_backend("reference") (the Python twin): each call's backward runs its forward's backend.
    import threading
    ran, errors, barrier = {}, [], threading.Barrier(2)

    def work(name):
        try:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
            dw, pw = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(6, 4, 1, 1, generator=g,
                                                                                                dtype=torch.float64)
            with uresnet_ops.use_backend(name, OP) if name != "cpu" else contextlib.nullcontext():
                barrier.wait()
                for _ in range(10):
                    out = uresnet_ops.shuffle_upsample(x, dw, pw, shuffle_groups=2)
                    assert last_used(OP) == name
                    (grad,) = torch.autograd.grad(out.square().sum(), x)
                    assert last_used(OP, "backward") == name
            ran[name] = (out.detach(), grad)
        except (AssertionError, RuntimeError, ValueError, TypeError) as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(name,)) for name in ("cpu", "reference")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    torch.testing.assert_close(ran["cpu"], ran["reference"])


def test_autocast_casts_conv_operands_keeps_bn_float32():
    x, t, cfg = make_case(5, torch.float32, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = uresnet_ops.shuffle_upsample(x, **{k: v if v is None else v.clone() for k, v in t.items()}, **cfg)
        expected = reference.shuffle_upsample(x, **{k: v if v is None else v.clone() for k, v in t.items()}, **cfg)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close(out, expected.float(), torch.bfloat16, scale=5)


def _bad_calls():
    yield "x", dict(x=torch.randn(4, 5, 5))
    yield "x", dict(x=torch.ones(1, 4, 5, 5, dtype=torch.int32))
    yield "dw_weight", dict(dw_weight=torch.randn(4, 1, 5, 5))              # kernel not 3x3
    yield "dw_weight", dict(dw_weight=torch.randn(4, 3, 3, 3))              # 4 % 3
    yield "dw_weight", dict(dw_weight=torch.randn(4, 1, 3, 3, dtype=torch.float64))
    yield "pw_weight", dict(pw_weight=torch.randn(6, 5, 1, 1))
    yield "pw_bias", dict(pw_bias=torch.randn(5))
    yield "pw_bias", dict(pw_weight=None)
    yield "bn_weight", dict(bn_weight=torch.ones(3))
    yield "scale_factor", dict(scale_factor=0)
    yield "scale_factor", dict(scale_factor=1.5)
    yield "mode", dict(mode="bicubic")
    yield "bilinear", dict(mode="bilinear", scale_factor=3)
    yield "shuffle_groups", dict(shuffle_groups=3)
    yield "activation", dict(activation="tanh")
    yield "more than 1 value", dict(x=torch.randn(1, 4, 1, 1), scale_factor=1)
    if torch.cuda.is_available():
        yield "device", dict(pw_weight=torch.randn(6, 4, 1, 1, device="cuda"))


@pytest.mark.parametrize("route", ["default", "reference"])  # the compiled kernel where built, and Python
@pytest.mark.parametrize("match,override", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_raises_clear_error(match, override, route):
    args = dict(x=torch.randn(2, 4, 5, 5), dw_weight=torch.randn(4, 1, 3, 3), pw_weight=torch.randn(6, 4, 1, 1),
                pw_bias=torch.randn(6), bn_weight=torch.ones(4), bn_bias=torch.zeros(4),
                running_mean=torch.zeros(4), running_var=torch.ones(4))
    args.update(override)
    with pytest.raises((ValueError, TypeError), match=match), \
            (uresnet_ops.use_backend(route, OP) if route != "default" else contextlib.nullcontext()):
        uresnet_ops.shuffle_upsample(**args)


def _bad_backward_calls():
    yield "grad_out", dict(grad_out=torch.randn(2, 6, 9, 10))                       # not the output's shape
    yield "grad_out", dict(grad_out=torch.randn(2, 6, 10, 10, dtype=torch.float64))  # not x's dtype
    yield "mean", dict(mean=torch.zeros(3))
    yield "dw_weight", dict(dw_weight=torch.randn(4, 3, 3, 3))
    yield "mode", dict(mode="area")


@pytest.mark.skipif(not uresnet_ops._library.HAS_EXTENSION, reason="native kernels not built")
@pytest.mark.parametrize("match,override", list(_bad_backward_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_backward_ops_check_their_arguments(match, override):
    args = dict(grad_out=torch.randn(2, 6, 10, 10), x=torch.randn(2, 4, 5, 5), dw_weight=torch.randn(4, 1, 3, 3),
                pw_weight=torch.randn(6, 4, 1, 1), pw_bias=torch.randn(6), bn_weight=None, bn_bias=None,
                mean=torch.zeros(4), var=torch.ones(4), training=True, eps=1e-5, scale_factor=2, mode="nearest",
                shuffle_groups=1, activation="relu", negative_slope=0.01)
    args.update(override)
    ops = torch.ops.uresnet_ops
    for op in (ops._shuffle_upsample_native_backward, ops.shuffle_upsample_backward):
        with pytest.raises((ValueError, TypeError), match=match):
            op(**args)


# --- batch statistics far from zero, the identities of docs/design.md §3.2, kernel-level errors ----

@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("mode,scale", [("nearest", 2), ("nearest", 3), ("bilinear", 2)])
@pytest.mark.parametrize("conv_groups", [4, 2], ids=["depthwise", "grouped"])
def test_batch_statistics_accurate_far_from_zero(backend, mode, scale, conv_groups):
    # Conv output with mean ~1e4 and std ~1 per channel: a float32 E[z^2] - E[z]^2 would lose
    # every digit of the variance; the kernels must use shifted sums or Welford/Chan merges.
    n, c, h, w = 2, 4, 5, 6
    x = 1e4 + torch.randn(n, c, h, w)
    cg = c // conv_groups
    dw = torch.zeros(c, cg, 3, 3)
    dw[torch.arange(c), torch.arange(c) % cg, 1, 1] = torch.rand(c) + 0.5  # centre taps only
    config = (True, 1e-5, scale, mode, 1, "none", 0.0)
    with uresnet_ops.use_backend(backend, OP):
        out, mean, var = torch.ops.uresnet_ops.shuffle_upsample(x, dw, None, None, None, None, None, None, *config)
    assert last_used(OP) == backend
    z = reference.upsample_conv3x3(x.double(), dw.double(), scale, mode)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), z.mean((0, 2, 3)), rtol=0, atol=2e-3)
    torch.testing.assert_close(var.double(), z.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-3)
    # and the output is normalised with them: per channel mean ~0 and variance ~1
    torch.testing.assert_close(out.double().mean((0, 2, 3)), torch.zeros(c, dtype=torch.float64), rtol=0, atol=5e-3)
    torch.testing.assert_close(out.double().var((0, 2, 3), unbiased=False), torch.ones(c, dtype=torch.float64),
                               rtol=0, atol=5e-3)


@pytest.mark.parametrize("c,groups", [(4, 1), (4, 2), (6, 3), (8, 4), (8, 8), (12, 4)])
def test_channel_shuffle_identity_folds_into_pointwise_weight(c, groups):
    # conv1x1(channel_shuffle(y, g), pw) == conv1x1(y, shuffled_pointwise_weight(pw, g))
    from uresnet_ops.shuffle_upsample import shuffled_pointwise_weight
    y = torch.randn(2, c, 5, 3, dtype=torch.float64)
    pw = torch.randn(7, c, 1, 1, dtype=torch.float64)
    expected = torch.nn.functional.conv2d(torch.nn.functional.channel_shuffle(y, groups), pw)
    folded = shuffled_pointwise_weight(pw, groups)
    assert folded.shape == (7, c)
    torch.testing.assert_close(torch.nn.functional.conv2d(y, folded[..., None, None]), expected)
    # it is a permutation of pw's columns, so the weight gradient maps back by the inverse one
    assert sorted(folded.flatten().tolist()) == sorted(pw.flatten().tolist())
    torch.testing.assert_close(torch.nn.functional.channel_shuffle(folded.view_as(pw), groups), pw)


@pytest.mark.parametrize("c,conv_groups", [(4, 4), (6, 3), (4, 1)], ids=["depthwise", "grouped", "dense"])
@pytest.mark.parametrize("h,w", [(5, 6), (3, 7), (1, 2)])
def test_nearest_x2_is_per_parity_2x2_conv_on_low_res(c, conv_groups, h, w):
    # docs/design.md §3.2: nearest x2 then 3x3 conv (padding 1) equals, per output parity (a, b), a
    # 2x2 conv on the low-res input with summed taps: a=0 rows {i-1: w0, i: w1+w2}; a=1 rows
    # {i: w0+w1, i+1: w2}; columns alike.
    F = torch.nn.functional
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    weight = torch.randn(c, c // conv_groups, 3, 3, dtype=torch.float64)
    expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1, groups=conv_groups)
    rows = {0: (weight[:, :, 0:1], weight[:, :, 1:3].sum(2, keepdim=True)),   # a=0: rows i-1, i
            1: (weight[:, :, 0:2].sum(2, keepdim=True), weight[:, :, 2:3])}   # a=1: rows i, i+1
    for a in (0, 1):
        wr = torch.cat(rows[a], 2)  # (C, C/g, 2, 3)
        cols = {0: (wr[..., 0:1], wr[..., 1:3].sum(3, keepdim=True)),
                1: (wr[..., 0:2].sum(3, keepdim=True), wr[..., 2:3])}
        for b in (0, 1):
            k = torch.cat(cols[b], 3)  # (C, C/g, 2, 2)
            padded = F.pad(x, (1 - b, b, 1 - a, a))  # low-res taps {i-1, i} (parity 0) or {i, i+1} (parity 1)
            torch.testing.assert_close(F.conv2d(padded, k, groups=conv_groups), expected[:, :, a::2, b::2])


def _kernel_pairs():
    from uresnet_ops._library import native_op
    pairs = []
    if native_op("shuffle_upsample_conv") is not None:
        pairs.append(pytest.param(torch.ops.uresnet_ops._shuffle_upsample_conv_native,
                                  torch.ops.uresnet_ops._shuffle_upsample_conv_native_backward, id="native"))
    if "triton" in uresnet_ops.available_backends(OP):
        from uresnet_ops.triton import shuffle_upsample as triton_kernels
        if "cpu" in uresnet_ops.triton.DEVICE_TYPES:
            pairs.append(pytest.param(triton_kernels.KERNELS.forward, triton_kernels.KERNELS.backward, id="triton"))
    return pairs or [pytest.param(None, None, marks=pytest.mark.skip(reason="no kernel-level ops here"))]


def _bad_kernel_calls():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3)
    yield "weight", "forward", (x, w.double(), None, 2, "nearest", "none", 0.0, False)    # not the acc dtype
    yield "weight", "forward", (x.double(), w, None, 2, "nearest", "none", 0.0, False)    # float64 x wants float64
    yield "weight", "forward", (x, torch.randn(4, 3, 3, 3), None, 2, "nearest", "none", 0.0, False)  # 4 % 3
    yield "weight", "forward", (x, torch.randn(4, 1, 5, 5), None, 2, "nearest", "none", 0.0, True)   # not 3x3
    yield "weight", "forward", (x, torch.randn(6, 1, 3, 3), None, 2, "nearest", "none", 0.0, False)  # C mismatch
    yield "bias", "forward", (x, w, torch.randn(4, dtype=torch.float64), 2, "nearest", "none", 0.0, False)
    yield "mode", "forward", (x, w, None, 2, "bicubic", "none", 0.0, False)
    yield "scale_factor", "forward", (x, w, None, 3, "bilinear", "none", 0.0, False)
    yield "activation", "forward", (x, w, None, 2, "nearest", "tanh", 0.0, False)
    yield "weight", "backward", (torch.randn(2, 4, 10, 10), x, w.double(), 2, "nearest")
    yield "grad", "backward", (torch.randn(2, 4, 5, 5), x, w, 2, "nearest")             # not upsampled shape
    yield "grad", "backward", (torch.randn(2, 4, 10, 10).double(), x, w, 2, "nearest")  # dtype differs from x


@pytest.mark.parametrize("forward,backward", _kernel_pairs())
@pytest.mark.parametrize("match,phase,args", list(_bad_kernel_calls()),
                         ids=[f"{m}-{p}-{i}" for i, (m, p, _) in enumerate(_bad_kernel_calls())])
def test_bad_kernel_input_raises_clear_error(forward, backward, match, phase, args):
    with pytest.raises((ValueError, TypeError), match=match):
        (forward if phase == "forward" else backward)(*args)


# --- the CPU backward's two passes through BatchNorm (z recomputed from x, never stored) ------

_HAS_BN_PASSES = hasattr(torch.ops.uresnet_ops, "_shuffle_upsample_bn_sums_native")
needs_bn_passes = pytest.mark.skipif(not _HAS_BN_PASSES, reason="the C++ extension is not built")


def _bn_pass_case(seed, dtype, layout_name="contiguous"):
    x, t, cfg = make_case(seed, dtype, torch.float32)
    x = layout(x, layout_name)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    c = x.shape[1]
    weight = t["dw_weight"].to(stat)
    scale, shift, mean = torch.randn(c, dtype=stat), torch.randn(c, dtype=stat), torch.randn(c, dtype=stat)
    grad = torch.randn(x.shape[0], c, x.shape[2] * cfg["scale_factor"], x.shape[3] * cfg["scale_factor"]).to(dtype)
    return x, weight, scale, shift, mean, grad, cfg


@needs_bn_passes
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize("activation", ["relu", ("leaky_relu", 0.2), "silu"], ids=str)
def test_batch_norm_passes_match_formula(dtype, layout_name, activation):
    from uresnet_ops._common import activation_backward, apply_activation
    act, slope = activation if isinstance(activation, tuple) else (activation, 0.0)
    for seed in range(3):
        x, weight, scale, shift, mean, grad, cfg = _bn_pass_case(seed, dtype, layout_name)
        s, mode = cfg["scale_factor"], cfg["mode"]
        z = reference.upsample_conv3x3(x.double(), weight.double(), s, mode)  # float64 truth
        view = lambda v: v.double().view(1, -1, 1, 1)  # noqa: E731
        pre = z * view(scale) + view(shift)
        grad_pre = activation_backward(grad.double(), pre, act, slope)
        y, sums = torch.ops.uresnet_ops._shuffle_upsample_bn_sums_native(
            grad, x, weight, scale, shift, mean, s, mode, act, slope, True)
        assert_close(y, apply_activation(pre, act, slope), dtype, scale=5)
        expected_sums = torch.stack([grad_pre.sum((0, 2, 3)), (grad_pre * (z - view(mean))).sum((0, 2, 3))])
        assert_close(sums, expected_sums, sums.dtype, scale=50, precision=dtype)
        centered, constant = torch.randn_like(scale), torch.randn_like(scale)
        grad_z = view(scale) * grad_pre + view(centered) * (z - view(mean)) + view(constant)
        x64 = x.detach().double().requires_grad_()
        w64 = weight.detach().double().requires_grad_()
        reference.upsample_conv3x3(x64, w64, s, mode).backward(grad_z)
        grad_x, grad_weight = torch.ops.uresnet_ops._shuffle_upsample_bn_backward_native(
            grad, x, weight, scale, shift, mean, centered, constant, s, mode, act, slope)
        assert_close(grad_x, x64.grad, dtype, scale=20)
        assert_close(grad_weight, w64.grad, weight.dtype, scale=200, precision=dtype)


@needs_bn_passes
def test_batch_norm_passes_opcheck():
    x, weight, scale, shift, mean, grad, cfg = _bn_pass_case(3, torch.float32)
    config = (cfg["scale_factor"], cfg["mode"], "relu", 0.0)
    torch.library.opcheck(torch.ops.uresnet_ops._shuffle_upsample_bn_sums_native.default,
                          (grad, x, weight, scale, shift, mean, *config, True))
    torch.library.opcheck(torch.ops.uresnet_ops._shuffle_upsample_bn_backward_native.default,
                          (grad, x, weight, scale, shift, mean, scale.clone(), shift.clone(), *config))


def _bad_bn_pass_calls():
    x, w, v = torch.randn(2, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.randn(4)
    grad = torch.randn(2, 4, 10, 10)
    yield "scale", "sums", (grad, x, w, v.double(), v, v, 2, "nearest", "relu", 0.0, True)   # not the acc dtype
    yield "shift", "sums", (grad, x, w, v, torch.randn(3), v, 2, "nearest", "relu", 0.0, True)  # not (C,)
    yield "grad", "sums", (grad[:, :, :9], x, w, v, v, v, 2, "nearest", "relu", 0.0, False)
    yield "weight", "sums", (grad, x, w.double(), v, v, v, 2, "nearest", "relu", 0.0, False)
    yield "activation", "sums", (grad, x, w, v, v, v, 2, "nearest", "gelu", 0.0, False)
    yield "centered", "backward", (grad, x, w, v, v, v, torch.randn(5), v, 2, "nearest", "relu", 0.0)
    yield "constant", "backward", (grad, x, w, v, v, v, v, v.double(), 2, "nearest", "relu", 0.0)
    yield "mean", "backward", (grad, x, w, v, v, torch.randn(2, 2), v, v, 2, "nearest", "relu", 0.0)
    yield "mode", "backward", (grad, x, w, v, v, v, v, v, 2, "area", "relu", 0.0)


@needs_bn_passes
@pytest.mark.parametrize("match,op,args", list(_bad_bn_pass_calls()),
                         ids=[f"{m}-{p}-{i}" for i, (m, p, _) in enumerate(_bad_bn_pass_calls())])
def test_batch_norm_passes_bad_input_raises_clear_error(match, op, args):
    fn = (torch.ops.uresnet_ops._shuffle_upsample_bn_sums_native if op == "sums"
          else torch.ops.uresnet_ops._shuffle_upsample_bn_backward_native)
    with pytest.raises((ValueError, TypeError), match=match):
        fn(*args)


@needs_bn_passes
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pw", [True, False], ids=["pw", "no_pw"])
def test_batch_slices_match_reference(training, pw):
    """The CPU op runs the conv + 1x1 GEMM (and the backward's BatchNorm passes) in batch slices
    of about 2 MiB of conv output (csrc/cpu/shuffle_upsample.cpp): with about 1.1 MB of it a
    sample, one sample a slice, the results (outputs, gradients, running statistics) must not change."""
    for seed, layout_name in enumerate(("contiguous", "channels_last")):
        x, t, cfg = make_case(seed + 20 * pw, torch.float64, torch.float64, pw=pw)
        c = x.shape[1]
        cfg.update(scale_factor=2, mode="nearest")
        x = torch.randn(3, c, 160 // c, 220, dtype=torch.float64)  # conv output c * (160/c) * 220 * 4 * 8 bytes
        x = layout(x, layout_name).requires_grad_()
        t = {k: None if v is None else v.clone().requires_grad_(k in PARAMS) for k, v in t.items()}
        x64, t64 = x.detach().clone().requires_grad_(), double(t)
        with uresnet_ops.use_backend("cpu", OP):
            out = uresnet_ops.shuffle_upsample(x, **t, training=training, activation="relu", **cfg)
        assert last_used(OP) == "cpu"
        for k in PARAMS:
            if t64[k] is not None:
                t64[k].requires_grad_()
        expected = reference.shuffle_upsample(x64, **t64, training=training, activation="relu", **cfg)
        assert_close(out, expected)
        grad_out = torch.randn_like(expected)
        out.backward(grad_out)
        expected.backward(grad_out)
        assert_close(x.grad, x64.grad)
        for k in PARAMS:
            if t[k] is not None:
                assert_close(t[k].grad, t64[k].grad)
        for k in ("running_mean", "running_var"):
            assert_close(t[k], t64[k])


# --- the Triton kernels' 32-bit and 64-bit index math --------------------------------------

def _triton_kernels():
    if "triton" not in uresnet_ops.available_backends(OP):
        pytest.skip("Triton is not available")
    from uresnet_ops.triton import shuffle_upsample as kernels
    if "cpu" not in uresnet_ops.triton.DEVICE_TYPES:
        pytest.skip("the Triton kernels run on a GPU only here")
    return kernels


def test_triton_wide_only_when_an_offset_can_reach_2_31():
    kernels = _triton_kernels()
    meta = dict(device="meta")  # shapes and strides only, nothing allocated
    assert not kernels._wide(torch.empty(2, 64, 512, 512, **meta), torch.empty(0, **meta))
    assert kernels._wide(torch.empty(2, 64, 2048, 8192, **meta))  # 2**31 elements
    big_stride = torch.empty(1, **meta).as_strided((3, 2, 4, 5), (2 ** 30, 20, 5, 1))
    assert big_stride.numel() < 2 ** 31 and kernels._wide(big_stride)


@pytest.mark.parametrize("dtype,layout_name,mode,scale,tiles,h,w", [
    (torch.float32, "contiguous", "nearest", 2, 1, 5, 7),
    (torch.bfloat16, "channels_last", "nearest", 3, 2, 5, 7),
    (torch.float64, "strided", "bilinear", 2, 1, 5, 7),
    (torch.float16, "channels_last", "bilinear", 2, 2, 5, 7),
    (torch.float32, "strided", "nearest", 1, 2, 2, 37),  # rows wider than a tile, 3 tiles
], ids=lambda v: str(v).replace("torch.", ""))
def test_triton_64_bit_index_path_matches_the_32_bit_one(dtype, layout_name, mode, scale, tiles, h, w, monkeypatch):
    # The kernels take 32-bit index math unless an offset can reach 2**31 (no 64-bit division
    # on the GPU); the 64-bit path is forced here by lowering the limit. tiles=2: the weight
    # gradient's loop over several tiles per program (one tile under the interpreter otherwise).
    kernels = _triton_kernels()
    if tiles > 1:
        monkeypatch.setattr(kernels, "_chunks", lambda t, planes, device: (tiles, -(-t // tiles)))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n, c, cg = 2, 4, 2  # 5 x 7: two tiles of 32 low-res pixels under the interpreter
    x = layout(torch.randn(n, c, h, w).to(dtype), layout_name)
    weight = torch.randn(c, cg, 3, 3, dtype=acc) / 3
    bias = torch.randn(c, dtype=acc)
    grad = layout(torch.randn(n, c, h * scale, w * scale).to(dtype), layout_name)
    assert not kernels._wide(x, grad)
    results = []
    for limit in (kernels._INT32_LIMIT, 1):
        monkeypatch.setattr(kernels, "_INT32_LIMIT", limit)
        assert kernels._wide(x) == (limit == 1)
        _, mean, var = kernels.KERNELS.forward(x, weight, None, scale, mode, "none", 0.0, True)
        out, _, _ = kernels.KERNELS.forward(x, weight, bias, scale, mode, "leaky_relu", 0.2, False)
        grad_x, grad_w = kernels.KERNELS.backward(grad, x, weight, scale, mode)
        results.append((mean, var, out, grad_x, grad_w))
    for narrow, wide in zip(*results):
        torch.testing.assert_close(narrow, wide, rtol=0, atol=0)
    # and the 64-bit path is right
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    z = reference.upsample_conv3x3(x64, w64, scale, mode)
    z.backward(grad.double())
    mean, var, out, grad_x, grad_w = results[1]
    assert_close(mean, z.mean((0, 2, 3)), acc, scale=5, precision=dtype)
    assert_close(var, z.var((0, 2, 3), unbiased=False), acc, scale=5, precision=dtype)
    expected = torch.nn.functional.leaky_relu(z + bias.double().view(1, -1, 1, 1), 0.2)
    assert_close(out, expected, dtype, scale=5)
    assert_close(grad_x, x64.grad, dtype, scale=10)
    assert_close(grad_w, w64.grad, acc, scale=50, precision=dtype)
