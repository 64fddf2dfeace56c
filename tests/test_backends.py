"""The backend registry: listing, selecting, plugging in, falling back."""
import warnings

import pytest
import torch

import uresnet_ops
from uresnet_ops import backends
from uresnet_ops.backends import get_backend, last_used


@pytest.fixture
def plugin():
    """A user backend for pixel_shuffle_bn that runs the reference and counts its calls."""
    calls = {"forward": 0, "backward": 0}
    ref = backends._registry["pixel_shuffle_bn"]["reference"]

    def forward(*args):
        calls["forward"] += 1
        return ref.forward(*args)

    def backward(*args):
        calls["backward"] += 1
        return ref.backward(*args)

    uresnet_ops.register_backend("pixel_shuffle_bn", "mine", "cpu", forward, backward)
    yield calls
    del backends._registry["pixel_shuffle_bn"]["mine"]


def test_available_backends_lists_reference_and_built_ones():
    names = uresnet_ops.available_backends()
    assert "reference" in names
    if uresnet_ops._library.HAS_EXTENSION:
        assert "cpu" in uresnet_ops.available_backends("pixel_shuffle_bn")
    for op in backends.OPS:
        assert set(uresnet_ops.available_backends(op)) <= set(names)


def test_ops_are_registered_torch_ops():
    for op in backends.OPS:
        assert isinstance(getattr(torch.ops.uresnet_ops, op).default, torch._ops.OpOverload)
        assert isinstance(getattr(torch.ops.uresnet_ops, op + "_backward").default, torch._ops.OpOverload)


def test_registered_backend_runs_forward_and_backward(plugin):
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    with uresnet_ops.use_backend("mine", op="pixel_shuffle_bn"):
        assert get_backend("pixel_shuffle_bn", "cpu").name == "mine"
        y = uresnet_ops.pixel_shuffle_bn(x, 2)
    y.sum().backward()  # outside the block: backward still uses the forward's backend
    assert plugin == {"forward": 1, "backward": 1}
    assert last_used("pixel_shuffle_bn", "backward") == "mine"


def test_set_backend_global_and_per_op(plugin):
    x = torch.randn(2, 8, 3, 3)
    uresnet_ops.set_backend("reference")
    assert get_backend("pixel_shuffle_bn", "cpu").name == "reference"
    uresnet_ops.set_backend("mine", op="pixel_shuffle_bn")  # per op beats global
    uresnet_ops.pixel_shuffle_bn(x, 2)
    assert plugin["forward"] == 1
    with uresnet_ops.use_backend("reference"):  # any context beats set_backend
        assert get_backend("pixel_shuffle_bn", "cpu").name == "reference"
        with uresnet_ops.use_backend("mine", op="pixel_shuffle_bn"):
            # a per-op context beats an all-op one, inner or outer
            with uresnet_ops.use_backend("reference"):
                assert get_backend("pixel_shuffle_bn", "cpu").name == "mine"
                assert get_backend("shuffle_upsample", "cpu").name == "reference"
    uresnet_ops.set_backend(None, op="pixel_shuffle_bn")
    uresnet_ops.set_backend(None)
    assert get_backend("pixel_shuffle_bn", "cpu").name == backends.DEFAULT_ORDER["pixel_shuffle_bn"]["cpu"][0] \
        or not uresnet_ops._library.HAS_EXTENSION


def test_backend_for_another_device_is_passed_over(plugin):
    uresnet_ops.register_backend("pixel_shuffle_bn", "gpu_only", "cuda", lambda *a: 1 / 0)
    try:
        with uresnet_ops.use_backend("gpu_only"):
            uresnet_ops.pixel_shuffle_bn(torch.randn(2, 4, 2, 2), 2)  # CPU tensor: not run
        assert last_used("pixel_shuffle_bn") != "gpu_only"
    finally:
        del backends._registry["pixel_shuffle_bn"]["gpu_only"]


def test_declining_backend_hands_over_to_the_next():
    uresnet_ops.register_backend("multi_dilation_conv2d", "picky", "cpu", lambda *a: NotImplemented)
    try:
        with uresnet_ops.use_backend("picky"):
            uresnet_ops.multi_dilation_conv2d(torch.randn(1, 2, 4, 4), [torch.randn(3, 2, 3, 3)], [2])
        assert last_used("multi_dilation_conv2d") in ("reference", "cpu")
    finally:
        del backends._registry["multi_dilation_conv2d"]["picky"]


def test_unavailable_backend_warns_once_and_falls_back():
    uresnet_ops.register_backend("shuffle_upsample", "absent", "cpu", lambda *a: 1 / 0, available=False)
    try:
        assert "absent" not in uresnet_ops.available_backends("shuffle_upsample")
        x = torch.randn(2, 4, 3, 3)
        args = (x, torch.randn(4, 1, 3, 3), torch.randn(2, 4, 1, 1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with uresnet_ops.use_backend("absent"):
                uresnet_ops.shuffle_upsample(*args)
                uresnet_ops.shuffle_upsample(*args)
        assert sum("not available" in str(w.message) for w in caught) == 1
    finally:
        del backends._registry["shuffle_upsample"]["absent"]


def test_registry_argument_errors():
    with pytest.raises(ValueError, match="unknown op"):
        uresnet_ops.register_backend("conv", "x", "cpu", print)
    with pytest.raises(ValueError, match="device_type"):
        uresnet_ops.register_backend("pixel_shuffle_bn", "x", "tpu", print)
    with pytest.raises(TypeError, match="forward"):
        uresnet_ops.register_backend("pixel_shuffle_bn", "x", "cpu", None)
    with pytest.raises(ValueError, match="unknown backend"):
        uresnet_ops.set_backend("fastest")
    with pytest.raises(ValueError, match="unknown backend"):
        with uresnet_ops.use_backend("nope", op="pixel_shuffle_bn"):
            pass
    with pytest.raises(ValueError, match="unknown op"):
        uresnet_ops.available_backends("conv")
