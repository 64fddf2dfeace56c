"""uresnet_ops.fuse: the rewritten model uses the fused modules and equals the original in
training (outputs, gradients, running statistics, num_batches_tracked) and eval; what cannot be
fused is left as it is and reported."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import uresnet_ops
from uresnet_ops.nn import ASPP, EUCB, EUCBStar, MultiDilationConv2d, PixelShuffleBN


def randomize_bn(module):
    """Non-trivial BatchNorm parameters and statistics, so equalities mean something."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return module


def fused_twin(plain):
    """``fuse`` of a deep copy of ``plain``, and the copy's memo: ``memo[id(t)]`` is the
    fused model's counterpart of ``plain``'s parameter or buffer ``t``."""
    memo = {}
    fused, report = uresnet_ops.fuse(copy.deepcopy(plain, memo), inplace=True, report=True)
    return fused, report, memo


def assert_equivalent(plain, x, steps=("train", "train", "eval", "train"), out=lambda y: y, tol=(1e-4, 1e-5)):
    """Fuse ``plain``, then run both through ``steps``; compare outputs, input and parameter
    gradients, and every buffer (running statistics, num_batches_tracked) after each step."""
    fused, report, memo = fused_twin(plain)
    own = {id(t) for t in list(fused.parameters()) + list(fused.buffers())}
    for name, t in list(plain.named_parameters()) + list(plain.named_buffers()):
        assert id(memo[id(t)]) in own, f"{name} was not carried over"
    rtol, atol = tol
    for step in steps:
        plain.train(step == "train"), fused.train(step == "train")
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(0)  # same dropout masks
        ya = out(plain(xa))
        torch.manual_seed(0)
        yb = out(fused(xb))
        torch.testing.assert_close(yb, ya, rtol=rtol, atol=atol)
        grad = torch.randn_like(ya)
        ya.backward(grad), yb.backward(grad)
        assert_grad_close(xb.grad, xa.grad, rtol, "input")
        scale = max(p.grad.abs().max().item() for p in plain.parameters() if p.grad is not None)
        for name, p in plain.named_parameters():
            assert_grad_close(memo[id(p)].grad, p.grad, rtol, name, rtol * 1e-2 * scale)
        for name, b in plain.named_buffers():
            torch.testing.assert_close(memo[id(b)], b, rtol=rtol, atol=atol, msg=name)
        plain.zero_grad(), fused.zero_grad()
    return fused, report


def assert_grad_close(actual, expected, rtol, name, atol=1e-7):
    """Gradients agree up to ``rtol`` of their largest magnitude, plus ``atol``: through a deep
    network, sums that nearly cancel (BatchNorm biases) leave only rounding, so elementwise
    is too strict; the caller's ``atol`` is a small fraction of the model's largest gradient."""
    assert actual is not None and actual.shape == expected.shape, name
    error = (actual - expected).abs().max().item()
    assert error <= rtol * expected.abs().max().item() + atol, f"{name}: max error {error:.3g}"


def types(model):
    return [type(m) for m in model.modules()]


def conv_bn_relu(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


# ----------------------------------------------------------------------------- nn.Sequential runs
@pytest.mark.parametrize("act", [nn.ReLU(inplace=True), nn.LeakyReLU(0.2), nn.SiLU(), None],
                         ids=["relu", "leaky_relu", "silu", "none"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_sequential_pixel_shuffle_bn(act, momentum):
    plain = randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 1), nn.PixelShuffle(2), nn.BatchNorm2d(4, momentum=momentum),
                                       *([act] if act else []), nn.Conv2d(4, 2, 3, padding=1)))
    fused, report = assert_equivalent(plain, torch.randn(2, 3, 5, 4))
    assert isinstance(fused[1], PixelShuffleBN) and fused[1].num_batches_tracked.item() == 3
    assert isinstance(fused[-1], nn.Conv2d) and all(isinstance(m, nn.Identity) for m in fused[2:-1])
    assert [e.detail for e in report.fused] == ["PixelShuffleBN"] and not report.skipped


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("shuffle", [None, 1, 3])
def test_sequential_eucb(mode, shuffle):
    c = 6
    plain = randomize_bn(nn.Sequential(
        nn.Upsample(scale_factor=2, mode=mode), nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
        nn.BatchNorm2d(c), nn.LeakyReLU(0.1), *([nn.ChannelShuffle(shuffle)] if shuffle else []), nn.Conv2d(c, 4, 1)))
    fused, report = assert_equivalent(plain, torch.randn(2, c, 4, 5))
    assert isinstance(fused[0], EUCB) and fused[0].shuffle_groups == (shuffle or 1)
    assert types(fused[0].up_dwc) == [nn.Sequential, nn.Upsample, nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU]


def test_sequential_eucb_star_and_grouped_eucb():
    c, g = 8, 2

    def stage():
        return [nn.Conv2d(c, c, 3, padding=1, groups=g, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.ChannelShuffle(g)]

    star = randomize_bn(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), *stage(), *stage(),
                                      nn.Conv2d(c, 5, 1)))
    fused, _ = assert_equivalent(star, torch.randn(2, c, 4, 3))
    assert isinstance(fused[0], EUCBStar) and len(fused[0].stages) == 2 and fused[0].groups == g
    one = randomize_bn(nn.Sequential(nn.Upsample(scale_factor=3), *stage()[:3], nn.Conv2d(c, 5, 1)))  # grouped, 1 stage
    fused, _ = assert_equivalent(one, torch.randn(2, c, 3, 3))
    assert isinstance(fused[0], EUCB) and fused[0].up_dwc[1].groups == g


def eucb_chain(up=None, conv=None, end=True):
    """Upsample -> depthwise 3x3 -> BN -> ReLU (-> 1x1 conv) with one part swapped."""
    return nn.Sequential(up or nn.Upsample(scale_factor=2), conv or nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
                         nn.BatchNorm2d(4), nn.ReLU(), *([nn.Conv2d(4, 2, 1)] if end else []))


@pytest.mark.parametrize("make,reason", [
    (lambda: eucb_chain(up=nn.Upsample(size=(8, 8))), "size="),
    (lambda: eucb_chain(up=nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)), "align_corners"),
    (lambda: eucb_chain(up=nn.Upsample(scale_factor=4, mode="bilinear")), "bilinear scale_factor"),
    (lambda: eucb_chain(up=nn.Upsample(scale_factor=2, mode="nearest-exact")), "mode"),
    (lambda: eucb_chain(up=nn.Upsample(scale_factor=1.5)), "scale_factor"),
    (lambda: eucb_chain(conv=nn.Conv2d(4, 4, 5, padding=2, groups=4, bias=False)), "kernel 5x5"),
    (lambda: eucb_chain(conv=nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False)), "stride"),
    (lambda: eucb_chain(conv=nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=True)), "bias"),
    (lambda: eucb_chain(end=False), "no 1x1 Conv2d"),
    (lambda: nn.Sequential(nn.PixelShuffle(2), nn.SyncBatchNorm(1)), "not a plain BatchNorm2d"),
], ids=["size", "align_corners", "bilinear_x4", "nearest_exact", "fractional", "kernel5", "stride2", "dw_bias",
        "no_pw", "sync_bn"])
def test_unsupported_configurations_are_left_and_reported(make, reason):
    plain = make()
    fused, report = uresnet_ops.fuse(plain, report=True)
    assert types(fused) == types(plain) and not report.fused
    assert len(report.skipped) == 1 and reason in report.skipped[0].detail, str(report)


# ----------------------------------------------------------------------------- seed-style decoders
class DeResUNetDecoder(nn.Module):
    """DeResUNet style: PixelShuffle(2) -> BN -> ReLU, concat skip, 2x ConvBNReLU; head
    PixelShuffle(2) -> BN -> ReLU (functional) -> ConvBNReLU -> 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.lateral = nn.Conv2d(16, 4, 1)
        self.up = nn.Sequential(nn.PixelShuffle(2), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.convs = nn.Sequential(conv_bn_relu(8, 8), conv_bn_relu(8, 8))
        self.head_bn = nn.BatchNorm2d(2)
        self.head = nn.Sequential(conv_bn_relu(2, 4), nn.Conv2d(4, 3, 1))

    def forward(self, x):
        skip = F.interpolate(self.lateral(x), scale_factor=2)
        y = self.convs(torch.cat([self.up(x), skip], dim=1))
        return self.head(F.relu(self.head_bn(F.pixel_shuffle(y, 2))))


class EMCADEUCB(nn.Module):
    """EMCAD's EUCB (with torch's channel_shuffle; EMCAD's own view/transpose one is not traceable)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.in_channels = c_in
        self.up_dwc = nn.Sequential(nn.Upsample(scale_factor=2),
                                    nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False),
                                    nn.BatchNorm2d(c_in), nn.ReLU(inplace=True))
        self.pwc = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=True))

    def forward(self, x):
        return self.pwc(F.channel_shuffle(self.up_dwc(x), self.in_channels))


class CrossBuildingAtrous(nn.Module):
    """Cross-Building-Segmentation's atrous block: 4 convs k=(1,3,3,3), d=(1,6,12,18), out/2
    each, and a 3x3 max-pool branch, concat -> BN -> 1x1 conv -> BN -> ReLU."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out // 2, k, padding=d * (k // 2), dilation=d)
                                   for k, d in zip((1, 3, 3, 3), (1, 6, 12, 18)))
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(4 * (c_out // 2) + c_in)
        self.conv = nn.Conv2d(4 * (c_out // 2) + c_in, c_out, 1)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = torch.cat([conv(x) for conv in self.convs] + [self.pool(x)], dim=1)
        return self.relu(self.bn2(self.conv(self.bn1(y))))


class UResNetEUCBStar(nn.Module):
    """U-ResNet's EUCB*: bilinear x2 -> [grouped 3x3 (C/4 groups) -> BN -> ReLU -> shuffle] x2 -> 1x1."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.g = c_in // 4
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_in, 3, padding=1, groups=self.g, bias=False), nn.BatchNorm2d(c_in)
        self.conv2, self.bn2 = nn.Conv2d(c_in, c_in, 3, padding=1, groups=self.g, bias=False), nn.BatchNorm2d(c_in)
        self.pw = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        x = F.channel_shuffle(F.relu(self.bn2(self.conv2(x))), self.g)
        return self.pw(x)


@pytest.mark.parametrize("make,x_shape,expected", [
    (DeResUNetDecoder, (2, 16, 3, 4), {PixelShuffleBN: 2}),
    (lambda: EMCADEUCB(6, 4), (2, 6, 4, 4), {EUCB: 1}),
    (lambda: CrossBuildingAtrous(5, 6), (2, 5, 21, 20), {MultiDilationConv2d: 1}),
    (lambda: UResNetEUCBStar(8, 3), (2, 8, 4, 5), {EUCBStar: 1}),
], ids=["deresunet", "emcad_eucb", "cross_building", "uresnet_eucb_star"])
def test_seed_style_decoders(make, x_shape, expected):
    plain = randomize_bn(make())
    fused, report = assert_equivalent(plain, torch.randn(x_shape))
    for cls, count in expected.items():
        assert sum(isinstance(m, cls) for m in fused.modules()) == count, str(report)
    assert len(report.fused) == sum(expected.values()) and not report.skipped, str(report)
    # the state dict round-trips into another fused copy
    other = uresnet_ops.fuse(make())
    other.load_state_dict(fused.state_dict())
    fused.eval(), other.eval()
    x = torch.randn(x_shape)
    torch.testing.assert_close(other(x), fused(x))


def test_traced_forward_keeps_unused_modules_and_mode():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ps, self.bn, self.unused = nn.PixelShuffle(2), nn.BatchNorm2d(2), nn.Linear(3, 3)
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x):
            return F.silu(self.bn(self.ps(x))) * self.scale

    plain = randomize_bn(Block()).eval()
    fused, report = uresnet_ops.fuse(plain, report=True)
    assert isinstance(fused, fx.GraphModule) and type(fused).__name__ == "Block" and not fused.training
    assert isinstance(fused.ps, PixelShuffleBN) and fused.ps.activation == "silu" and not hasattr(fused, "bn")
    assert fused.unused is not None and "scale" in dict(fused.named_buffers())
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(fused(x), plain(x))


def test_untraceable_and_mode_dependent_forwards_are_left():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.ps, self.bn = nn.PixelShuffle(2), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.ps(x)) if x.sum() > 0 else x

    class ModeDependent(DataDependent):
        def forward(self, x):
            y = self.bn(self.ps(x))
            return y if self.training else y * 2

    for cls, reason in ((DataDependent, "not traceable"), (ModeDependent, "train and eval")):
        plain = cls()
        fused, report = uresnet_ops.fuse(plain, report=True)
        assert type(fused) is cls and types(fused) == types(plain) and not report.fused
        assert len(report.skipped) == 1 and reason in report.skipped[0].detail, str(report)


def test_cat_branches_with_unsupported_conv_are_partly_fused():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(4, 3, 1, bias=False), nn.BatchNorm2d(3), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(4, 3, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(3), nn.ReLU())
            self.c = nn.Conv2d(4, 2, 3, padding=1, groups=2)  # grouped: not a branch of ours

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x), self.c(x)], 1)

    plain = randomize_bn(Branches())
    fused, report = assert_equivalent(plain, torch.randn(2, 4, 8, 8))
    assert isinstance(fused.branches_fused, MultiDilationConv2d) and fused.branches_fused.norm
    assert len(report.fused) == 1 and "groups=2" in report.skipped[0].detail


# ----------------------------------------------------------------------------- torchvision, no-ops
@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large"])
def test_torchvision_deeplabv3(name):
    from torchvision.models import segmentation
    torch.manual_seed(0)
    plain = randomize_bn(getattr(segmentation, name)(weights=None, weights_backbone=None))
    fused, report = assert_equivalent(plain, torch.randn(2, 3, 49, 49), steps=("train", "eval"),
                                      out=lambda y: y["out"], tol=(1e-4, 1e-4))
    assert isinstance(fused.classifier[0], ASPP) and [e.path for e in report.fused] == ["classifier.0"]
    assert fused.state_dict().keys() == plain.state_dict().keys()  # torchvision checkpoints load as they are


def test_model_with_nothing_to_fuse_is_unchanged():
    plain = nn.Sequential(conv_bn_relu(3, 4), nn.MaxPool2d(2), conv_bn_relu(4, 4), nn.Upsample(scale_factor=2),
                          nn.Conv2d(4, 2, 1))  # Upsample followed by a 1x1 conv: no EUCB
    modules = list(plain.modules())
    same, report = uresnet_ops.fuse(plain, inplace=True, report=True)
    assert same is plain and list(same.modules()) == modules
    assert not report.fused and str(report).startswith("fused 0")
    copied = uresnet_ops.fuse(plain)
    assert copied is not plain and types(copied) == types(plain)
    for (ka, a), (kb, b) in zip(copied.state_dict().items(), plain.state_dict().items()):
        assert ka == kb and torch.equal(a, b) and a is not b


def test_carries_requires_grad_dtype_modes_and_leaves_the_original():
    plain = randomize_bn(nn.Sequential(nn.Conv2d(2, 8, 1), nn.PixelShuffle(2), nn.BatchNorm2d(2), nn.ReLU(),
                                       nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 3, padding=1, groups=2, bias=False),
                                       nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 3, 1))).double()
    plain[2].weight.requires_grad_(False)
    plain[6].eval()  # a frozen BatchNorm in a training model stays frozen
    fused = uresnet_ops.fuse(plain)
    assert isinstance(plain[1], nn.PixelShuffle)  # inplace=False: the original is untouched
    assert isinstance(fused[1], PixelShuffleBN) and isinstance(fused[4], EUCB)
    assert not fused[1].weight.requires_grad and fused[1].weight.dtype == torch.float64
    assert fused.training and fused[4].training and not fused[4].up_dwc[2].training
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(fused(x), plain(x))
    torch.testing.assert_close(fused[4].up_dwc[2].running_mean, plain[6].running_mean)  # eval BN: unchanged


def test_reference_backend_tight_and_saved_model_loads():
    plain = randomize_bn(UResNetEUCBStar(8, 3))
    with uresnet_ops.use_backend("reference"):
        fused, _ = assert_equivalent(plain, torch.randn(2, 8, 4, 4), steps=("train", "eval"), tol=(1e-5, 1e-6))
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).eval()
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(loaded(x), fused.eval()(x))


@pytest.mark.slow
def test_fused_model_under_torch_compile():
    plain = randomize_bn(DeResUNetDecoder()).eval()
    fused = uresnet_ops.fuse(plain)
    x = torch.randn(2, 16, 3, 4)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), plain(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- state and keys (issue 17)
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _assert_state(model, state):
    tensors, modes = state
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    changed = [k for k in tensors if not torch.equal(now[k], tensors[k])]
    assert not changed, f"{len(changed)} entries changed, e.g. {changed[:3]}"
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False])
def test_fuse_leaves_the_state_of_timm_models_untouched(inplace, momentum, training):
    # timm's BatchNormAct2d is a BatchNorm subclass with its own forward: tracing it used to run
    # its num_batches_tracked update on the model's buffers (46 counters 0 -> 1 here).
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_large_100", pretrained=False).train(training)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    state = _state(model)
    fused = uresnet_ops.fuse(model, inplace=inplace)
    _assert_state(fused, state)
    _assert_state(model, state)


class _CountingBN(nn.BatchNorm2d):
    """A BatchNorm subclass whose own forward touches its buffers (as timm's norm+act layers do)."""

    def __init__(self, c):
        super().__init__(c, momentum=None)
        self.ps = nn.PixelShuffle(1)  # a child: fuse traces this forward

    def forward(self, x):
        self.num_batches_tracked.add_(1)
        self.running_mean.add_(1.0)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.0, self.eps)


@pytest.mark.parametrize("inplace", [False, True])
def test_tracing_does_not_run_on_the_model_buffers(inplace):
    plain = nn.Sequential(nn.Conv2d(3, 8, 1), nn.PixelShuffle(2), nn.BatchNorm2d(2), nn.ReLU(), _CountingBN(2))
    state = _state(plain)
    fused, report = uresnet_ops.fuse(plain, inplace=inplace, report=True)
    _assert_state(fused, state)
    assert isinstance(fused[1], PixelShuffleBN)


def _branchy():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 3, 3, padding=d, dilation=d, bias=False),
                                                     nn.BatchNorm2d(3), nn.ReLU()) for d in (1, 2))
            self.up = nn.Sequential(nn.Conv2d(6, 8, 1), nn.PixelShuffle(2), nn.BatchNorm2d(2), nn.ReLU())

        def forward(self, x):
            return self.up(torch.cat([conv(x) for conv in self.convs], 1))
    return randomize_bn(Branches())


@pytest.mark.parametrize("make,channels", [
    (_branchy, 4),
    (lambda: randomize_bn(nn.Sequential(nn.Conv2d(3, 16, 1), nn.PixelShuffle(2), nn.BatchNorm2d(4), nn.ReLU())), 3),
    (lambda: randomize_bn(eucb_chain()), 4),
    (lambda: randomize_bn(UResNetEUCBStar(8, 3)), 8),
], ids=["cat_branches", "sequential_pixel_shuffle", "sequential_eucb", "traced_eucb_star"])
def test_state_dict_keys_are_kept_and_load_both_ways(make, channels):
    plain = make()
    fused = uresnet_ops.fuse(plain)
    assert list(fused.state_dict()) == list(plain.state_dict())  # same keys, same order
    fresh = make()
    fused.load_state_dict(fresh.state_dict(), strict=True)
    plain.load_state_dict(fused.state_dict(), strict=True)
    for model in (fused, copy.deepcopy(fused)):  # the key hooks pickle with the model and its deep copy
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        assert list(torch.load(buffer, weights_only=False).state_dict()) == list(plain.state_dict())
    assert list(copy.deepcopy(fused).state_dict()) == list(plain.state_dict())
    x = torch.randn(2, channels, 4, 4)
    fresh.eval(), fused.eval()
    torch.testing.assert_close(fused(x), fresh(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["DeepLabV3", "DeepLabV3Plus"])
def test_smp_checkpoints_and_save_pretrained(arch, tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    plain = randomize_bn(getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=3)).eval()
    state = _state(plain)
    fused, report = uresnet_ops.fuse(plain, report=True)
    _assert_state(plain, state)
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(fused.state_dict(), strict=True)
    fused.save_pretrained(tmp_path)
    loaded = type(plain).from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), plain(x))
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-4)
    if arch == "DeepLabV3Plus":  # separable ASPP branches: reported, with the reason
        assert any("separable" in e.detail for e in report.skipped), str(report)


@pytest.mark.parametrize("act", [nn.GELU(), nn.ReLU6(), nn.Hardswish()], ids=["gelu", "relu6", "hardswish"])
def test_activations_left_out_are_reported(act):
    fused, report = uresnet_ops.fuse(nn.Sequential(nn.PixelShuffle(2), nn.BatchNorm2d(2), act), report=True)
    assert isinstance(fused[0], PixelShuffleBN) and fused[0].activation == "none" and isinstance(fused[2], type(act))
    assert type(act).__name__ + " after it left out" in report.fused[0].detail
    _, report = uresnet_ops.fuse(eucb_chain(), report=True)  # control: ReLU is fused
    assert report.fused and not report.skipped
    chain = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
                          nn.BatchNorm2d(4), act, nn.Conv2d(4, 2, 1))
    _, report = uresnet_ops.fuse(chain, report=True)
    assert not report.fused and f"activation {type(act).__name__}" in report.skipped[0].detail, str(report)


# ----------------------------------------------------------------------------- ASPP by structure
class HandWrittenASPP(nn.Module):
    """An ASPP nobody's library wrote: functional torch.relu, the pooling branch inline and in
    the middle of the concatenation, a projection with a bias followed by BN and ReLU."""

    def __init__(self, c=6, o=4, act=torch.relu):
        super().__init__()
        self.act = act
        self.c1, self.b1 = nn.Conv2d(c, o, 1, bias=False), nn.BatchNorm2d(o)
        self.c2, self.b2 = nn.Conv2d(c, o, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(o)
        self.pool, self.pc, self.pb = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, o, 1, bias=False), nn.BatchNorm2d(o)
        self.proj, self.pbn = nn.Conv2d(3 * o, o, 1), nn.BatchNorm2d(o)

    def forward(self, x):
        p = F.interpolate(torch.relu(self.pb(self.pc(self.pool(x)))), size=x.shape[-2:], mode="bilinear",
                          align_corners=False)
        y = torch.cat([self.act(self.b1(self.c1(x))), p, self.act(self.b2(self.c2(x)))], 1)
        return torch.relu(self.pbn(self.proj(y)))


def test_hand_written_aspp_is_matched_by_structure():
    plain = randomize_bn(HandWrittenASPP())
    fused, report = assert_equivalent(plain, torch.randn(2, 6, 9, 8))
    assert isinstance(fused.aspp_fused, ASPP) and fused.aspp_fused.pool_position == 1, str(report)
    assert "per-image bias" in report.fused[0].detail and not report.skipped
    assert list(fused.state_dict()) == list(plain.state_dict())


def test_aspp_with_an_activation_the_op_lacks_is_reported():
    plain = HandWrittenASPP(act=F.gelu)
    fused, report = uresnet_ops.fuse(plain, report=True)
    assert not report.fused and types(fused) == types(plain)
    assert any("activation GELU" in e.detail for e in report.skipped), str(report)


def test_smp_deeplabv3_aspp_pooling_as_bias():
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    plain = randomize_bn(smp.DeepLabV3(encoder_name="resnet18", encoder_weights=None, classes=3))
    fused, report = assert_equivalent(plain, torch.randn(2, 3, 40, 40), steps=("train", "eval"), tol=(1e-4, 1e-4))
    assert isinstance(fused.decoder.aspp, ASPP) and [e.path for e in report.fused] == ["decoder.aspp"], str(report)
    assert list(fused.state_dict()) == list(plain.state_dict())
