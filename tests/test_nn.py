"""The drop-in modules equal the plain-torch module chains they replace, in training (outputs,
gradients, running statistics, num_batches_tracked) and in eval, and load their state dicts."""
import copy

import pytest
import torch
from torch import nn

from uresnet_ops.nn import ASPP, EUCB, AtrousBlock, EUCBStar, MultiDilationConv2d, PixelShuffleBN


def randomize_bn(module):
    """Non-trivial BatchNorm parameters and statistics, so equalities mean something."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, PixelShuffleBN)) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return module


def assert_same_behaviour(fused, plain, x, steps=("train", "train", "eval", "train")):
    """Run both through the same steps; compare outputs, input and parameter gradients, and
    every state-dict entry (keys of ``plain`` loaded into ``fused`` beforehand)."""
    fused.load_state_dict(plain.state_dict())
    for step in steps:
        fused.train(step == "train"), plain.train(step == "train")
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fused(xa), plain(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
        grad = torch.randn_like(yb)
        ya.backward(grad), yb.backward(grad)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
        fused_state = fused.state_dict()
        for key, value in plain.state_dict().items():
            torch.testing.assert_close(_remapped(fused, fused_state, key), value, rtol=1e-5, atol=1e-6, msg=key)
        fused_params = dict(fused.named_parameters())
        for key, p in plain.named_parameters():
            torch.testing.assert_close(_remapped(fused, fused_params, key).grad, p.grad, rtol=1e-4, atol=1e-4, msg=key)
        fused.zero_grad(), plain.zero_grad()


def _remapped(module, state, key):
    for theirs, ours in getattr(module, "_KEY_PREFIXES", {}).items():
        if key.startswith(theirs):
            return state[ours + key[len(theirs):]]
    return state[key]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("activation,act_module", [("relu", nn.ReLU()), ("silu", nn.SiLU()),
                                                   (("leaky_relu", 0.2), nn.LeakyReLU(0.2))])
def test_pixel_shuffle_bn_equals_pixel_shuffle_batchnorm(momentum, activation, act_module):
    bn = randomize_bn(nn.BatchNorm2d(3, momentum=momentum))
    plain = nn.Sequential(nn.PixelShuffle(2), bn, act_module)
    fused = PixelShuffleBN(12, 2, activation=activation, momentum=momentum)

    class Wrapped(nn.Module):  # keys as in the BatchNorm2d alone
        def __init__(self, seq):
            super().__init__()
            self.seq = seq

        def forward(self, x):
            return self.seq(x)

        def state_dict(self, *a, **k):
            return self.seq[1].state_dict(*a, **k)

        def named_parameters(self, *a, **k):
            return self.seq[1].named_parameters(*a, **k)

    assert_same_behaviour(fused, Wrapped(plain), torch.randn(4, 12, 5, 3))
    assert fused.num_batches_tracked.item() == bn.num_batches_tracked.item() == 3


def test_pixel_shuffle_bn_from_modules_shares_parameters():
    shuffle, bn, act = nn.PixelShuffle(2), randomize_bn(nn.BatchNorm2d(4)), nn.LeakyReLU(0.3)
    fused = PixelShuffleBN.from_modules(shuffle, bn, act)
    assert fused.weight is bn.weight and fused.running_mean is bn.running_mean
    x = torch.randn(2, 16, 3, 3)
    bn.eval(), fused.eval()
    torch.testing.assert_close(fused(x), act(bn(shuffle(x))))


def test_pixel_shuffle_bn_no_affine_no_tracking_and_sync_conversion():
    fused = PixelShuffleBN(8, 2, affine=False, track_running_stats=False)
    plain = nn.Sequential(nn.PixelShuffle(2), nn.BatchNorm2d(2, affine=False, track_running_stats=False), nn.ReLU())
    x = torch.randn(3, 8, 4, 4)
    for mode in (True, False):
        torch.testing.assert_close(fused.train(mode)(x), plain.train(mode)(x))
    # It is not a _BatchNorm, so convert_sync_batchnorm leaves the pixel shuffle in place.
    assert isinstance(nn.SyncBatchNorm.convert_sync_batchnorm(fused), PixelShuffleBN)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_eucb_equals_plain_sequential_and_loads_its_state_dict(mode):
    c_in, c_out = 6, 4
    plain = randomize_bn(nn.Sequential(
        nn.Upsample(scale_factor=2, mode=mode), nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in), nn.ReLU(), nn.ChannelShuffle(1), nn.Conv2d(c_in, c_out, 1)))
    assert_same_behaviour(EUCB(c_in, c_out, mode=mode), plain, torch.randn(2, c_in, 5, 4))


def test_eucb_star_equals_plain_chain():
    fused = randomize_bn(EUCBStar(8, 5, stages=2))
    g = fused.groups
    assert g == 2
    plain = copy.deepcopy(fused)
    s0, s1 = plain.stages

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages, self.pwc = plain.stages, plain.pwc

        def forward(self, x):
            x = nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = nn.functional.channel_shuffle(s0(x), g)
            return self.pwc(nn.functional.channel_shuffle(s1(x), g))

    assert_same_behaviour(fused, Chain(), torch.randn(2, 8, 4, 5))


@pytest.mark.parametrize("norm", [True, False])
def test_multi_dilation_conv2d_equals_cat_of_branches(norm):
    fused = randomize_bn(MultiDilationConv2d(5, [3, 2, 4, 2], dilations=(1, 2, 3, 5), norm=norm))
    plain = copy.deepcopy(fused)
    plain.forward = lambda x: torch.cat([b(x) for b in plain.branches], dim=1)
    assert_same_behaviour(fused, plain, torch.randn(3, 5, 7, 6))


def test_aspp_loads_torchvision_state_dict_and_equals_it():
    from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP
    plain = randomize_bn(TorchvisionASPP(16, [2, 4, 6], out_channels=8))
    plain.project[3].p = 0.0  # dropout draws differ between the two; its mask is not what is tested
    fused = ASPP(16, [2, 4, 6], out_channels=8)
    fused.project[3].p = 0.0
    assert_same_behaviour(fused, plain, torch.randn(2, 16, 9, 7))
    fused.eval(), plain.eval()
    fused.project[3].p = plain.project[3].p = 0.5  # eval ignores dropout anyway
    x = torch.randn(1, 16, 5, 5)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-5)


def test_atrous_block_equals_plain_chain():
    fused = randomize_bn(AtrousBlock(6, 8))
    plain = copy.deepcopy(fused)
    plain.forward = lambda x: plain.act(plain.bn_out(plain.conv(plain.bn_in(
        torch.cat([b(x) for b in plain.branches] + [plain.pool(x)], dim=1)))))
    assert_same_behaviour(fused, plain, torch.randn(2, 6, 20, 19))


def test_module_argument_errors():
    with pytest.raises(ValueError, match="divisible"):
        PixelShuffleBN(10, 2)
    with pytest.raises(ValueError, match="activation"):
        PixelShuffleBN(8, 2, activation="gelu")
    with pytest.raises(ValueError, match="divisible"):
        EUCBStar(6, 4, groups=4)
    with pytest.raises(ValueError, match="equal length"):
        MultiDilationConv2d(4, 2, kernel_sizes=(1, 3), dilations=(1,))
    with pytest.raises(ValueError, match="4-D"):
        PixelShuffleBN(8, 2)(torch.randn(8, 4, 4))
