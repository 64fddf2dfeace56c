"""The backend registry: listing, selecting, plugging in, falling back."""
import contextlib
import threading
import time
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
    backends.unregister_backend("pixel_shuffle_bn", "mine")


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


def test_threads_with_different_backends_each_run_their_own_forward_and_backward(plugin):
    # One thread inside use_backend("mine"), one on the default (the compiled kernel where built):
    # each call's backward runs its own forward's backend, whatever the other thread does.
    default = get_backend("pixel_shuffle_bn", "cpu").name
    ran, errors, barrier = {}, [], threading.Barrier(2)

    def work(name, context):
        try:
            # Its own generator: the global one is shared, and the threads would race for it.
            x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
            with context:
                barrier.wait()
                for _ in range(20):
                    y = uresnet_ops.pixel_shuffle_bn(x, 2)
                    assert last_used("pixel_shuffle_bn") == name
                    time.sleep(0)  # let the other thread run between forward and backward
                    (grad,) = torch.autograd.grad(y.sum(), x)
                    assert last_used("pixel_shuffle_bn", "backward") == name
            ran[name] = grad
        except (AssertionError, RuntimeError, ValueError, TypeError) as error:  # reported below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=("mine", uresnet_ops.use_backend("mine", "pixel_shuffle_bn"))),
               threading.Thread(target=work, args=(default, contextlib.nullcontext()))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert plugin == {"forward": 20, "backward": 20}
    torch.testing.assert_close(ran["mine"], ran[default])


@pytest.mark.skipif("pixel_shuffle_bn" not in backends._routed, reason="no compiled hot path here")
def test_the_compiled_hot_path_follows_every_change_of_choice(plugin):
    # csrc/routing.h: the table is rewritten on set_backend/register_backend/unregister_backend,
    # and a use_backend block sends the thread's calls to Python.
    x = torch.randn(2, 8, 3, 3, requires_grad=True)

    def ran():
        uresnet_ops.pixel_shuffle_bn(x, 2).sum().backward()
        return last_used("pixel_shuffle_bn"), last_used("pixel_shuffle_bn", "backward")

    assert ran() == ("cpu", "cpu")
    try:
        uresnet_ops.set_backend("mine", "pixel_shuffle_bn")
        assert ran() == ("mine", "mine")
        backends.unregister_backend("pixel_shuffle_bn", "mine")  # chosen, then gone: the default order
        assert ran() == ("cpu", "cpu")
        reference = \
            backends._registry["pixel_shuffle_bn"]["reference"]
        uresnet_ops.register_backend("pixel_shuffle_bn", "mine", "cpu", reference.forward, reference.backward)
        assert ran() == ("mine", "mine")
    finally:
        uresnet_ops.set_backend(None, "pixel_shuffle_bn")
    assert ran() == ("cpu", "cpu")
    with uresnet_ops.use_backend("reference"):
        assert ran() == ("reference", "reference")
    assert ran() == ("cpu", "cpu")


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


@pytest.fixture
def timed_backends():
    """Two user backends for pixel_shuffle_bn on CPU that compute the reference, one slower by a
    known 20 ms a call, and one that declines everything; counts their calls."""
    ref = backends._registry["pixel_shuffle_bn"]["reference"]
    calls = {"slow": 0, "quick": 0, "picky": 0}

    def make(name, delay):
        def forward(*args):
            calls[name] += 1
            time.sleep(delay)
            return ref.forward(*args)
        return forward

    def picky(*args):
        calls["picky"] += 1
        return NotImplemented

    uresnet_ops.register_backend("pixel_shuffle_bn", "slow", "cpu", make("slow", 0.1), ref.backward)
    uresnet_ops.register_backend("pixel_shuffle_bn", "quick", "cpu", make("quick", 0.0), ref.backward)
    uresnet_ops.register_backend("pixel_shuffle_bn", "picky", "cpu", picky, ref.backward)
    order = backends.DEFAULT_ORDER["pixel_shuffle_bn"]["cpu"]
    saved = list(order)
    order[:] = ["slow", "picky", "quick"]  # the static order would run the slow one
    backends.clear_auto_choices()
    yield calls
    order[:] = saved
    backends.clear_auto_choices()
    for name in ("slow", "quick", "picky"):
        del backends._registry["pixel_shuffle_bn"][name]


def _bn_args(channels=3):
    return torch.zeros(channels), torch.ones(channels)


def test_auto_measures_once_per_key_and_runs_the_fastest(timed_backends):
    x = torch.randn(2, 12, 3, 5, requires_grad=True)
    mean, var = _bn_args()
    with uresnet_ops.use_backend("auto"):
        y = uresnet_ops.pixel_shuffle_bn(x, 2, None, None, mean, var, training=True)
        assert last_used("pixel_shuffle_bn") == "quick"
        measured = dict(timed_backends)
        # each backend: one warm-up and AUTO_RUNS timed calls; the declining one once
        assert measured["slow"] == 1 + backends.AUTO_RUNS and measured["picky"] == 1
        assert measured["quick"] == 2 + backends.AUTO_RUNS  # ... and the real call
        y.sum().backward()  # the backward follows the forward's backend
        assert last_used("pixel_shuffle_bn", "backward") == "quick"
        uresnet_ops.pixel_shuffle_bn(x.detach(), 2, None, None, mean, var, training=True)
        assert timed_backends == {**measured, "quick": measured["quick"] + 1}  # cached: no timing
        uresnet_ops.pixel_shuffle_bn(x.detach(), 2, None, None, mean, var, training=False)  # a new key
        assert timed_backends["slow"] == measured["slow"] + 1 + backends.AUTO_RUNS
    keys = backends.auto_choices()
    assert len(keys) == 2 and set(keys.values()) == {"quick"}


def test_auto_key_separates_shape_dtype_and_layout(timed_backends):
    mean, var = _bn_args()
    with uresnet_ops.use_backend("auto", op="pixel_shuffle_bn"):
        for x in (torch.randn(2, 12, 3, 5), torch.randn(2, 12, 4, 5), torch.randn(2, 12, 4, 5).double(),
                  torch.randn(2, 12, 4, 5).to(memory_format=torch.channels_last)):
            uresnet_ops.pixel_shuffle_bn(x, 2, None, None, mean, var, training=False)
    assert len(backends.auto_choices()) == 4


def test_auto_timing_leaves_running_statistics_as_one_call_does(timed_backends):
    x = torch.randn(4, 12, 3, 5)
    expected_mean, expected_var = _bn_args()
    uresnet_ops.reference.pixel_shuffle_bn(x, 2, None, None, expected_mean, expected_var, training=True)
    mean, var = _bn_args()
    uresnet_ops.set_backend("auto")
    uresnet_ops.pixel_shuffle_bn(x, 2, None, None, mean, var, training=True)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var)


def test_auto_does_not_time_while_compiling(timed_backends, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with uresnet_ops.use_backend("auto"):
        uresnet_ops.pixel_shuffle_bn(torch.randn(2, 12, 3, 5), 2, None, None, *_bn_args(), training=False)
    assert timed_backends == {"slow": 1, "quick": 0, "picky": 0}  # the default order, untimed
    assert backends.auto_choices() == {}


def test_auto_times_a_backend_whose_policy_declines_the_call():
    # multi_dilation's cpu backend declines channels_last input by its registered policy
    # (declines=), which binds the default order only; auto times it (and it may win) as if it
    # had been asked for by name.
    x = torch.randn(1, 4, 6, 7).to(memory_format=torch.channels_last)
    weights = [torch.randn(3, 4, 1, 1), torch.randn(3, 4, 3, 3)]
    backends.clear_auto_choices()
    try:
        with uresnet_ops.use_backend("auto"):
            y = uresnet_ops.multi_dilation_conv2d(x, weights, [1, 2])
        choice = next(iter(backends.auto_choices().values()))
        assert last_used("multi_dilation_conv2d") == choice
        torch.testing.assert_close(y, uresnet_ops.reference.multi_dilation_conv2d(x, weights, [1, 2]))
    finally:
        backends.clear_auto_choices()


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("URESNET_BACKEND", "auto")
    backends.set_backend_from_environment()
    assert backends._chosen_name("shuffle_upsample") == "auto"
    monkeypatch.setenv("URESNET_BACKEND", "fastest")
    with pytest.raises(ValueError, match="URESNET_BACKEND.*unknown backend 'fastest'"):
        backends.set_backend_from_environment()
