"""uresnet_ops.unfuse: every fused module back to plain torch modules with the same state-dict
keys, computing the same thing (outputs, gradients, running statistics) in training and eval,
without the uresnet_ops ops."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import uresnet_models as um
import uresnet_ops
from uresnet_ops import nn as unn
from uresnet_ops.fuse import _FUSED_TYPES
from test_fuse import CrossBuildingAtrous, DeResUNetDecoder, EMCADEUCB, HandWrittenASPP, UResNetEUCBStar, \
    assert_grad_close, randomize_bn

@pytest.fixture(autouse=True)
def one_thread():
    """Small models: one thread is faster, and spares a loaded machine the thread pool's spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FUSED_MODULES = {  # each fused class, small, with the input it takes
    "pixel_shuffle_bn": (lambda: unn.PixelShuffleBN(16, 2, ("leaky_relu", 0.2), momentum=None), (2, 16, 3, 4)),
    "pixel_shuffle_bn_no_affine": (lambda: unn.PixelShuffleBN(8, 2, "silu", affine=False), (2, 8, 3, 3)),
    "eucb": (lambda: unn.EUCB(8, 4, mode="bilinear", shuffle_groups=4, activation="silu"), (2, 8, 4, 5)),
    "eucb_star": (lambda: unn.EUCBStar(8, 3, stages=2), (2, 8, 4, 3)),
    "multi_dilation": (lambda: unn.MultiDilationConv2d(5, (3, 2, 4), (1, 3, 3), (1, 2, 4)), (2, 5, 9, 8)),
    "multi_dilation_no_norm": (lambda: unn.MultiDilationConv2d(5, 3, norm=False, activation="none"), (2, 5, 9, 8)),
    "aspp": (lambda: unn.ASPP(6, (2, 3), 4), (2, 6, 9, 8)),
    "atrous_block": (lambda: unn.AtrousBlock(5, 6), (2, 5, 21, 20)),
}


def test_every_fused_class_is_covered():
    built = {type(make()) for make, _ in FUSED_MODULES.values()}
    assert built == set(_FUSED_TYPES)
    assert all(callable(getattr(cls, "plain", None)) for cls in _FUSED_TYPES)


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.name()))
        return func(*args, **(kwargs or {}))


def uresnet_ops_called(model, x):
    with OpRecorder() as rec:
        model(x.clone().requires_grad_()).sum().backward()
    return sorted(op for op in rec.ops if op.startswith("uresnet_ops"))


def assert_same_model(fused, plain, x, steps=("train", "train", "eval", "train"), tol=(1e-4, 1e-5)):
    """``fused`` and ``plain`` (separate copies with equal values) through ``steps``: outputs,
    input and parameter gradients, and every buffer after each step agree."""
    assert list(plain.state_dict()) == list(fused.state_dict())
    rtol, atol = tol
    for step in steps:
        fused.train(step == "train"), plain.train(step == "train")
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(0)  # same dropout masks
        ya = fused(xa)
        torch.manual_seed(0)
        yb = plain(xb)
        torch.testing.assert_close(yb, ya, rtol=rtol, atol=atol)
        grad = torch.randn_like(ya)
        ya.backward(grad), yb.backward(grad)
        assert_grad_close(xb.grad, xa.grad, rtol, "input")
        pa, pb = dict(fused.named_parameters()), dict(plain.named_parameters())
        assert list(pa) == list(pb)
        scale = max([p.grad.abs().max().item() for p in pa.values() if p.grad is not None], default=0.0)
        for name, p in pa.items():
            assert_grad_close(pb[name].grad, p.grad, rtol, name, rtol * 1e-2 * scale)
        for (name, a), (_, b) in zip(fused.named_buffers(), plain.named_buffers()):
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=name)
        fused.zero_grad(), plain.zero_grad()


@pytest.mark.parametrize("key", list(FUSED_MODULES))
def test_fused_module_and_its_plain_form(key):
    make, shape = FUSED_MODULES[key]
    fused = randomize_bn(make())
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    plain = uresnet_ops.unfuse(fused)
    assert not any(isinstance(m, _FUSED_TYPES) for m in plain.modules())
    assert type(plain).__module__ == "uresnet_ops.plain"
    # inplace=False: the fused module is untouched and shares no tensor with the result
    assert all(torch.equal(v, before[k]) for k, v in fused.state_dict().items())
    ids = {id(t) for t in list(fused.parameters()) + list(fused.buffers())}
    assert not ids & {id(t) for t in list(plain.parameters()) + list(plain.buffers())}
    x = torch.randn(shape)
    assert uresnet_ops_called(copy.deepcopy(fused), x) and not uresnet_ops_called(copy.deepcopy(plain), x)
    assert_same_model(fused, plain, x)
    # state dicts load both ways, strictly
    fresh = randomize_bn(make())
    fresh.load_state_dict(plain.state_dict())
    plain.load_state_dict(randomize_bn(make()).state_dict())


def test_inplace_shares_tensors_and_keeps_modes():
    model = nn.Sequential(unn.EUCB(8, 4), unn.PixelShuffleBN(16, 2)).train()
    model[0].up_dwc[2].eval()  # a frozen BatchNorm stays frozen
    tensors = [id(t) for t in model.state_dict(keep_vars=True).values()]
    plain = uresnet_ops.unfuse(model, inplace=True)
    assert plain is model and isinstance(plain[0], uresnet_ops.plain.PlainEUCB)
    assert [id(t) for t in plain.state_dict(keep_vars=True).values()] == tensors
    assert plain[0].training and not plain[0].up_dwc[2].training and plain[1].training
    assert isinstance(uresnet_ops.unfuse(unn.PixelShuffleBN(16, 2).eval()), uresnet_ops.plain.PlainPixelShuffleBN)
    assert not uresnet_ops.unfuse(unn.PixelShuffleBN(16, 2).eval()).training


def test_shared_fused_module_stays_shared():
    block = unn.PixelShuffleBN(16, 2)
    plain = uresnet_ops.unfuse(nn.ModuleList([block, block]))
    assert plain[0] is plain[1]


@pytest.mark.parametrize("make,shape", [
    (DeResUNetDecoder, (2, 16, 3, 4)), (lambda: EMCADEUCB(6, 4), (2, 6, 4, 4)),
    (lambda: CrossBuildingAtrous(5, 6), (2, 5, 21, 20)), (lambda: UResNetEUCBStar(8, 3), (2, 8, 4, 5)),
    (HandWrittenASPP, (2, 6, 9, 8)),
], ids=["deresunet", "emcad_eucb", "cross_building", "uresnet_eucb_star", "aspp"])
def test_unfuse_of_fuse(make, shape):
    """fuse() of a plain torch model, then unfuse(): keys stay the original's, outputs equal."""
    original = randomize_bn(make())
    fused = uresnet_ops.fuse(original)
    assert any(isinstance(m, _FUSED_TYPES) for m in fused.modules())
    plain = uresnet_ops.unfuse(fused)
    assert not any(isinstance(m, _FUSED_TYPES) for m in plain.modules())
    assert list(plain.state_dict()) == list(fused.state_dict()) == list(original.state_dict())
    original.load_state_dict(plain.state_dict())
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    buffer.seek(0)
    assert list(torch.load(buffer, weights_only=False).state_dict()) == list(original.state_dict())
    assert_same_model(fused, plain, torch.randn(shape), steps=("train", "eval"))


# ----------------------------------------------------------------------------- create_model(fused=False)
SMALL_MODELS = {  # every registered model, small (see tests/test_models.py)
    "uresnet": dict(base_channels=8, residual_widths=(8, 16, 8, 8), residual_out_channels=8),
    "uresnet_cls": dict(encoder="test_resnet", base_channels=4),
    "deresunet": dict(encoder="test_resnet", decoder_channels=(32, 16, 16, 8, 8), bottleneck_channels=32),
    "resunet_atrous": dict(encoder="test_resnet", decoder_channels=(32, 16, 16, 8, 8)),
    "resunet": dict(encoder="test_resnet", decoder_channels=(32, 16, 16, 8, 8)),
    "unet": dict(encoder="test_resnet", decoder_channels=(32, 16, 16, 8, 8)),
}


def model_input(name, n=2):
    return torch.randn(n, 4 if name == "deresunet" else 3, 32, 32)


@pytest.mark.parametrize("name", um.list_models())
def test_plain_model_of_every_registered_model(name):
    assert name in SMALL_MODELS, f"add a small configuration of {name!r} to SMALL_MODELS"
    fused = randomize_bn(um.create_model(name, num_classes=2, **SMALL_MODELS[name]))
    plain = um.create_model(name, num_classes=2, fused=False, **SMALL_MODELS[name])
    assert not any(isinstance(m, _FUSED_TYPES) for m in plain.modules())
    assert list(plain.state_dict()) == list(fused.state_dict())
    plain.load_state_dict(fused.state_dict())
    assert plain.model_config["kwargs"]["fused"] is False and "fused" not in fused.model_config["kwargs"]
    # eval, then one training step: outputs, gradients and the running statistics after it
    assert_same_model(fused, plain, model_input(name), steps=("eval", "train"), tol=(1e-4, 1e-4))


def test_plain_checkpoint_reloads_plain(tmp_path):
    kwargs = dict(num_classes=2, **SMALL_MODELS["deresunet"])
    plain = randomize_bn(um.create_model("deresunet", fused=False, **kwargs)).eval()
    plain.save_pretrained(tmp_path / "plain")
    loaded = um.from_pretrained(tmp_path / "plain")
    assert not any(isinstance(m, _FUSED_TYPES) for m in loaded.modules())
    x = model_input("deresunet", 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), plain(x))
        fused = um.from_pretrained(tmp_path / "plain", fused=True)  # the same weights, fused
        assert any(isinstance(m, _FUSED_TYPES) for m in fused.modules())
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-4)
        fused.save_pretrained(tmp_path / "fused")
        again = um.from_pretrained(tmp_path / "fused", fused=False)
        assert not any(isinstance(m, _FUSED_TYPES) for m in again.modules())
        torch.testing.assert_close(again(x), plain(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("value", ["no", None, 0, 1])
def test_fused_must_be_a_bool(value):
    with pytest.raises(TypeError, match="fused must be True .* or False .*got"):
        um.create_model("unet", fused=value, **SMALL_MODELS["unet"])


# ----------------------------------------------------------------------------- fuse(inference=True)
def batch_norms(model):
    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, unn.PixelShuffleBN)) for m in model.modules())


def assert_folds(original, x, tol=(1e-4, 1e-5)):
    """fuse(original, inference=True): same eval output, ``original`` untouched, the report's
    count of BatchNorms left true. Returns the folded model and the report."""
    original = randomize_bn(original).eval()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    folded, report = uresnet_ops.fuse(original, inference=True, report=True)
    assert list(original.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in original.state_dict().items())
    assert report.batch_norms_left == batch_norms(folded) == batch_norms(original) - len(report.folded)
    assert f"folded {len(report.folded)} BatchNorm(s)" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), original(x), rtol=tol[0], atol=tol[1])
    return folded, report


@pytest.mark.parametrize("name", um.list_models())
def test_inference_folding_of_every_registered_model(name):
    model = um.create_model(name, num_classes=2, **SMALL_MODELS[name])
    folded, report = assert_folds(model, model_input(name, 1), tol=(1e-4, 1e-4))
    assert report.batch_norms_left < len(report.folded)  # most are gone (those left: after a cat or an
    # activation, or inside EUCB's fused op)
    assert not any(isinstance(m, nn.BatchNorm2d) and "encoder" in n for n, m in folded.named_modules()), report


class ConvThenPixelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(3, 16, 1, bias=False)
        self.up = nn.Sequential(nn.PixelShuffle(2), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.up(self.pre(x))


@pytest.mark.parametrize("make,shape,left", [
    (ConvThenPixelShuffle, (2, 3, 4, 5), 0),  # conv -> PixelShuffleBN in a traced forward
    (lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.PixelShuffle(2), nn.BatchNorm2d(4)), (2, 3, 4, 5), 0),
    (lambda: CrossBuildingAtrous(5, 6), (2, 5, 21, 20), 1),  # the 1x1 conv -> bn2; bn1 follows the cat
    (HandWrittenASPP, (2, 6, 9, 8), 0),  # branches, pooling conv and projection
    (lambda: unn.MultiDilationConv2d(5, 3), (2, 5, 9, 8), 0),
    (lambda: unn.ASPP(6, (2, 3), 4), (2, 6, 9, 8), 0),
    (lambda: unn.EUCB(8, 4), (2, 8, 4, 5), 1),  # inside the fused op: left
], ids=["conv_pixel_shuffle_bn", "sequential_pixel_shuffle_bn", "atrous_block", "aspp_by_structure",
        "multi_dilation", "aspp", "eucb"])
def test_folds_around_and_inside_fused_modules(make, shape, left):
    folded, report = assert_folds(make(), torch.randn(shape))
    assert report.batch_norms_left == left, str(report)
    if isinstance(folded, (unn.MultiDilationConv2d, unn.ASPP)):
        assert not folded.norm


def test_timm_batch_norm_act_is_folded_with_its_activation_kept():
    from timm.layers import BatchNormAct2d
    folded, report = assert_folds(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.SiLU)),
                                  torch.randn(2, 3, 6, 6))
    assert report.batch_norms_left == 0 and isinstance(folded[1][1], nn.SiLU)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.other = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.other(x)
        return self.bn(self.conv(x)) + self.conv(x) + self.bn2(y) + y  # conv called twice; y used twice


def test_conv_called_twice_or_output_used_twice_is_not_folded():
    _, report = assert_folds(SharedConv(), torch.randn(2, 3, 4, 4))
    assert not report.folded and report.batch_norms_left == 2


def test_inference_folding_needs_eval_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="eval mode .* the model is in training mode"):
        uresnet_ops.fuse(model, inference=True)
    model.eval()[1].train()
    with pytest.raises(ValueError, match="eval mode .* 1 is in training mode"):
        uresnet_ops.fuse(model, inference=True)
