"""What users do with a model besides calling it: pickle it whole (torch.save, copy.deepcopy) and
torch.compile it, then feed it images of varying sizes; for every registered model."""
import copy
import io

import pytest
import torch

import uresnet_models as um
import uresnet_ops

# The smallest configuration of each registered model (a new model must be added here).
TINY = {
    "uresnet": dict(base_channels=4, residual_widths=(4, 4, 4, 4), residual_out_channels=4),
    "uresnet_cls": dict(encoder="test_resnet", base_channels=4, unet_depth=2),
    "deresunet": dict(encoder="test_resnet", decoder_channels=(8,) * 5, bottleneck_channels=8),
    "resunet_atrous": dict(encoder="test_resnet", decoder_channels=(8,) * 5),
    "resunet": dict(encoder_channels=(4, 8, 8), decoder_channels=(8, 4)),
    "unet": dict(encoder="test_resnet", decoder_channels=(8,) * 5),
}
# A multiple of 32 first, then two sizes that are not, the batch size changing too.
SIZES = [(2, 64, 64), (3, 37, 45), (1, 50, 33)]


def tiny(name, **kwargs):
    torch.manual_seed(0)
    return um.create_model(name, num_classes=2, **TINY[name], **kwargs)


def _input(name, n, h, w):
    return torch.randn(n, 4 if name == "deresunet" else 3, h, w)


def test_every_registered_model_has_a_tiny_configuration():
    assert sorted(TINY) == um.list_models()


def _equal_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(TINY))
def test_models_pickle_and_deepcopy(name):
    model = tiny(name, activation="softmax").train()
    model(_input(name, 2, 32, 32))  # moved BatchNorm statistics must come along
    model.eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    x = _input(name, 1, 35, 29)
    with torch.no_grad():
        expected = model(x)
        for again in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
            assert type(again) is type(model) and again.model_config == model.model_config
            assert _equal_state(again, model) and not again.training
            assert torch.equal(again(x), expected)


@pytest.mark.parametrize("module,shape", [
    (uresnet_ops.nn.PixelShuffleBN(8, 2, activation=("leaky_relu", 0.2)), (1, 8, 5, 5)),
    (uresnet_ops.nn.EUCB(4, 6, shuffle_groups=2), (1, 4, 5, 5)),
    (uresnet_ops.nn.EUCBStar(8, 4), (1, 8, 5, 5)),
    (uresnet_ops.nn.MultiDilationConv2d(4, 2, dilations=(1, 2, 3, 4)), (1, 4, 9, 9)),
    (uresnet_ops.nn.ASPP(4, (2, 3), out_channels=4), (2, 4, 9, 9)),
    (uresnet_ops.nn.AtrousBlock(4, 4), (1, 4, 9, 9)),
], ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else "")
def test_fused_modules_pickle(module, shape):
    module.eval()
    x = torch.randn(shape)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    with torch.no_grad():
        for again in (torch.load(buffer, weights_only=False), copy.deepcopy(module)):
            assert _equal_state(again, module) and torch.equal(again(x), module(x))


def _compare_at_sizes(name, eager, compiled_model, compiled, train):
    """Train (forward, backward) or eval steps at :data:`SIZES`: outputs, input and parameter
    gradients and the BatchNorm statistics of the compiled model match eager's."""
    eager.train(train), compiled_model.train(train)
    for n, h, w in SIZES:
        x = _input(name, n, h, w)
        with torch.set_grad_enabled(train):
            xa, xb = x.clone().requires_grad_(train), x.clone().requires_grad_(train)
            out, expected = compiled(xa), eager(xb)
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5, msg=f"{name} {(n, h, w)}")
            if not train:
                continue
            out.square().mean().backward(), expected.square().mean().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
        for (key, a), b in zip(compiled_model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
        compiled_model.zero_grad(), eager.zero_grad()
        for (key, a), b in zip(compiled_model.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_compiled_models_match_eager_at_three_sizes(name, dynamic):
    """Dynamo, AOT autograd with inductor's decompositions and its min-cut partitioner (where a
    symbolic ``(-w) % 32`` of the padding used to fail on the second size, or at once with
    ``dynamic=True``), without inductor's code generation: a few seconds per model instead of a
    minute."""
    torch._dynamo.reset()
    eager = tiny(name)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, dynamic=dynamic, backend="aot_eager_decomp_partition")
    for train in (True, False):
        _compare_at_sizes(name, eager, compiled_model, compiled, train)
