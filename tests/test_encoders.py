"""timm encoders as smp/timm users use them (issue 19): NHWC features, encoders with valid
padding, the ``tu-`` prefix, ``encoder_kwargs``, the encoder's preprocessing, uresnet_cls on
encoders that need a stride-multiple input, and a sweep over one encoder of every timm family
that supports ``features_only`` (marked ``slow``: ``-m "not slow"`` skips it)."""
import json

import pytest
import torch

import uresnet_models as um
from uresnet_models.encoders import TimmEncoder


pytestmark = pytest.mark.usefixtures("one_thread")


def test_nhwc_features_are_converted_to_nchw():
    enc = TimmEncoder("test_mambaout")  # timm gives NHWC features for it
    assert enc.channels_last_output
    x = torch.randn(1, 3, 64, 96)
    for f, c, r in zip(enc(x), enc.channels, enc.reductions):
        assert f.shape == (1, c, 64 // r, 96 // r)
    model = um.create_model("unet", encoder="test_mambaout", num_classes=3, decoder_channels=(16, 16, 16, 16, 16))
    assert model.eval()(torch.randn(1, 3, 37, 51)).shape == (1, 3, 37, 51)


@pytest.mark.parametrize("arch", ["unet", "uresnet"])
def test_valid_padding_encoder_gives_logits_at_the_input_size(arch):
    # legacy_xception's unpadded convolutions give maps smaller than input / reduction
    torch.manual_seed(0)
    kwargs = dict(decoder_channels=(16, 16, 16, 16, 16)) if arch == "unet" else dict(base_channels=4)
    model = um.create_model(arch, encoder="legacy_xception", num_classes=3, **kwargs).eval()
    x = torch.randn(1, 3, 64, 96)
    for f, r in zip(model.encoder(x), model.encoder.reductions):
        assert f.shape[-2:] == (64 // r, 96 // r)
    with torch.no_grad():
        assert model(x).shape == (1, 3, 64, 96)
        assert model(torch.randn(1, 3, 61, 90)).shape == (1, 3, 61, 90)


def test_valid_padding_features_stay_aligned_with_the_input():
    """A feature map is stretched over the input's whole extent, not cropped at one corner: a
    bright spot in the bottom-right of the image is strongest in the bottom-right of every map
    (an encoder whose stem sums its input over 1x1 'valid' convolutions)."""
    enc = TimmEncoder("legacy_xception").eval()
    x = torch.zeros(1, 3, 96, 96)
    x[..., 72:88, 72:88] = 5.0
    with torch.no_grad():
        base = enc(torch.zeros_like(x))
        feats = enc(x)
    for f, b in zip(feats[:3], base[:3]):
        response = (f - b).abs().sum(1)[0]
        h, w = response.shape
        iy, ix = divmod(int(response.argmax()), w)
        assert iy >= h // 2 and ix >= w // 2, (response.shape, iy, ix)


def test_tu_prefix_is_a_timm_alias():
    model = um.create_model("unet", encoder="tu-test_resnet", num_classes=2, decoder_channels=(8, 8, 8, 8, 8))
    assert model.encoder.name == "test_resnet"
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_preprocessing_comes_from_timm_pretrained_cfg():
    assert um.get_preprocessing("inception_v3")["mean"] == (0.5, 0.5, 0.5)
    assert um.get_preprocessing("tu-resnet18") == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                                                   "input_range": (0, 1)}
    assert um.get_preprocessing(None) is None
    model = um.create_model("unet", encoder="test_vit", num_classes=2, decoder_channels=(8, 8, 8, 8))
    assert model.preprocessing["mean"] == (0.5, 0.5, 0.5)
    assert um.create_model("uresnet", base_channels=4).preprocessing is None  # the seed's own encoder


def test_encoder_kwargs_are_passed_and_saved(tmp_path):
    # test_vit is a fixed-size model (160x160) unless timm is told otherwise
    model = um.create_model("unet", encoder="test_vit", num_classes=2, decoder_channels=(8, 8, 8, 8),
                            encoder_kwargs={"dynamic_img_size": True}).eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 2, 50, 70)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["kwargs"]["encoder_kwargs"] == {"dynamic_img_size": True}
    with torch.no_grad():
        assert torch.equal(um.from_pretrained(tmp_path).eval()(x), y)
    with pytest.raises(TypeError, match="encoder_kwargs"):
        um.create_model("unet", encoder="test_resnet", encoder_kwargs=["x"])
    with pytest.raises(ValueError, match="encoder_kwargs"):
        um.create_model("uresnet", encoder=None, encoder_kwargs={"drop_rate": 0.1})


def test_an_encoder_instance_can_be_saved(tmp_path):
    enc = TimmEncoder("test_vit", dynamic_img_size=True)
    model = um.create_model("unet", encoder=enc, num_classes=2, decoder_channels=(8, 8, 8, 8))
    model.save_pretrained(tmp_path)
    kwargs = json.loads((tmp_path / "config.json").read_text())["kwargs"]
    assert kwargs["encoder"] == "test_vit" and kwargs["encoder_kwargs"] == {"dynamic_img_size": True}
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(um.from_pretrained(tmp_path).eval()(x), model.eval()(x))


@pytest.mark.parametrize("encoder", ["dla46_c", "hrnet_w18_small"])
def test_uresnet_cls_pads_to_the_encoder_stride(encoder):
    model = um.create_model("uresnet_cls", encoder=encoder, num_classes=3, unet=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 33, 45)).shape == (1, 3)  # 66x90 after the x2 upsampling


# --------------------------------------------------------------------------- the sweep
# One encoder (the smallest that builds) of each timm family whose models support features_only,
# random init, none downloaded: NCHW and NHWC outputs, first features at 1/2, 1/4, 1/8 and 1/16,
# padded ("same") and valid convolutions. Fixed-size models (ViT-style) get dynamic_img_size or
# img_size and run at that size; the others at an odd size. (name, timm kwargs, input H x W)
ODD = (61, 91)
SWEEP = [
    ("test_resnet", {}, ODD), ("test_efficientnet", {}, ODD), ("test_convnext", {}, ODD), ("test_byobnet", {}, ODD),
    ("test_nfnet", {}, ODD), ("test_mambaout", {}, ODD),                                   # NHWC
    ("test_vit", {"dynamic_img_size": True}, ODD), ("deit_tiny_patch16_224", {"dynamic_img_size": True}, ODD),
    ("test_coatnet", {"img_size": (64, 96)}, (64, 96)), ("test_maxvit", {"img_size": (64, 96)}, (64, 96)),
    ("legacy_xception", {}, ODD), ("inception_v3", {}, (97, 131)),                        # valid padding
    ("regnetx_002", {}, ODD), ("mobilenetv3_small_050", {}, ODD), ("ghostnet_050", {}, ODD), ("dla46_c", {}, ODD),
    ("hrnet_w18_small", {}, ODD), ("densenet121", {}, ODD), ("vgg11", {}, ODD), ("repvit_m0_9", {}, ODD),
    ("efficientvit_b0", {}, ODD), ("efficientvit_m0", {}, ODD), ("efficientvim_m1", {}, ODD),  # first at 1/16
    ("edgenext_xx_small", {}, ODD), ("pvt_v2_b0", {}, ODD), ("fastvit_t8", {}, ODD),
    ("mobilevit_xxs", {}, ODD), ("convnextv2_atto", {}, ODD), ("cspresnet50", {}, ODD), ("cs3darknet_focus_s", {}, ODD),
    ("cspnext_tiny", {}, ODD), ("dpn48b", {}, ODD), ("res2net50_14w_8s", {}, ODD), ("resnest14d", {}, ODD),
    ("selecsls42", {}, ODD), ("skresnet18", {}, ODD), ("rexnet_100", {}, ODD), ("hardcorenas_a", {}, ODD),
    ("tresnet_m", {}, ODD), ("lambda_resnet26t", {}, ODD), ("ese_vovnet19b_slim_dw", {}, ODD),
    ("xception41", {}, ODD), ("resnetv2_18", {}, ODD), ("legacy_seresnet18", {}, ODD),
    ("swin_tiny_patch4_window7_224", {"img_size": (64, 96), "window_size": 2}, (64, 96)),  # NHWC
    ("poolformerv2_s12", {}, ODD), ("inception_next_atto", {}, ODD), ("starnet_s050", {}, ODD),
    ("hgnetv2_b0", {}, ODD), ("efficientformerv2_s0", {"img_size": (64, 96)}, (64, 96)), ("fasternet_t0", {}, ODD),
    ("gcvit_xxtiny", {"img_size": (64, 96)}, (64, 96)), ("twins_svt_small", {}, ODD), ("focalnet_tiny_srf", {}, ODD),
    ("davit_tiny", {}, ODD), ("rdnet_tiny", {}, ODD), ("shvit_s1", {}, ODD), ("nest_tiny", {"img_size": 64}, (64, 64)),
    ("coat_lite_tiny", {"img_size": (64, 96)}, (64, 96)), ("levit_128s", {"img_size": 64}, (64, 64)),
    ("hiera_tiny_224", {"img_size": (64, 96)}, (64, 96)), ("xcit_nano_12_p16_224", {}, ODD),
    ("mvitv2_tiny", {"img_size": 64}, (64, 64)), ("cpubone_nano", {}, ODD), ("iformer_t", {}, ODD),
    ("lcnetv2_small", {}, ODD), ("lowformer_b0", {}, ODD), ("csatv2", {}, ODD),             # csatv2: first at 1/8
    ("convit_tiny", {"img_size": 64}, (64, 64)), ("vit_tiny_patch16_dinov3_qkvb", {"dynamic_img_size": True}, ODD),
    ("gmlp_ti16_224", {"img_size": 64}, (64, 64)), ("pit_ti_224", {"img_size": 64}, (64, 64)),
    ("visformer_tiny", {"img_size": 64}, (64, 64)), ("vit_tiny_r_s16_p8_224", {"dynamic_img_size": True}, ODD),
    ("vit_relpos_small_patch16_224", {"img_size": 64}, (64, 64)), ("samvit_base_patch16", {"img_size": 64}, (64, 64)),
    ("vitamin_small_224", {"img_size": 64}, (64, 64)),
    ("swinv2_cr_tiny_224", {"img_size": (64, 96), "window_size": 2}, (64, 96)),
    ("swinv2_tiny_window8_256", {"img_size": 64, "window_size": 2}, (64, 64)),             # NHWC
    ("nextvit_small", {}, ODD), ("repghostnet_050", {}, ODD), ("swiftformer_xs", {}, ODD),
    ("inception_v4", {}, (97, 131)), ("inception_resnet_v2", {}, (97, 131)), ("nasnetalarge", {}, (97, 131)),
    ("efficientformer_l1", {}, (224, 224)), ("tiny_vit_5m_224", {}, (224, 224)),            # fixed 224, no img_size
]


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,size", SWEEP, ids=[n for n, _, _ in SWEEP])
def test_encoder_sweep_forward(name, kwargs, size):
    """unet (the lightest decoder) on the encoder: logits at the input's size."""
    torch.manual_seed(0)
    enc = TimmEncoder(name, **kwargs)
    levels = len(um.blocks.decoder_levels(enc.reductions))
    model = um.create_model("unet", encoder=enc, num_classes=2, decoder_channels=(8,) * levels).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, *size))
    assert y.shape == (1, 2, *size) and torch.isfinite(y).all()


def test_reductions_that_are_not_powers_of_two_are_refused_clearly():
    # sequencer2d's 7x7 patches give features at 1/7, 1/14: no x2 decoder reaches full resolution
    with pytest.raises(ValueError, match="power of 2, got 14"):
        um.create_model("unet", encoder="sequencer2d_s", decoder_channels=(8,) * 4)


def test_a_vit_at_another_size_says_how_to_take_any():
    # a ViT takes the size its patch embedding was built for; the model pads 40 to 48 (stride 16)
    fixed = um.create_model("unet", encoder="vit_tiny_patch16_224", encoder_kwargs={"img_size": 32},
                            decoder_channels=(8,) * 4)
    with pytest.raises(ValueError, match=r"takes 32x32 inputs only, got 48x48 .*'dynamic_img_size': True"):
        fixed(torch.randn(1, 3, 40, 40))
    assert fixed(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)
    dynamic = um.create_model("unet", encoder="vit_tiny_patch16_224", encoder_kwargs={"dynamic_img_size": True},
                              decoder_channels=(8,) * 4)
    assert dynamic.encoder.fixed_size is None and dynamic(torch.randn(1, 3, 40, 40)).shape == (1, 1, 40, 40)
