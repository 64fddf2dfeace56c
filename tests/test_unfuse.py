"""uresnet_ops.unfuse: every fused module back to plain torch modules with the same state-dict
keys, computing the same thing (outputs, gradients, running statistics) in training and eval,
without the uresnet_ops ops."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import uresnet_ops
from uresnet_ops import nn as unn
from uresnet_ops.fuse import _FUSED_TYPES
from test_fuse import CrossBuildingAtrous, DeResUNetDecoder, EMCADEUCB, HandWrittenASPP, UResNetEUCBStar, \
    assert_grad_close, randomize_bn

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
