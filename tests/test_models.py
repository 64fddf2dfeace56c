"""uresnet_models architectures: every model x encoder builds and runs on odd sizes, aux head,
RGB-D input, save/load, backends, channels_last, torch.export / torch.compile."""
import pytest
import torch
from huggingface_hub import ModelCard

import uresnet_models as um
import uresnet_ops

ENCODERS = ["resnet18", "efficientnet_b0", "convnext_atto", "mobilenetv3_small_100"]
SEG_MODELS = ["uresnet", "deresunet", "resunet_atrous", "resunet", "unet"]
# small widths where the architecture has a width knob (keeps the suite fast)
_DEC = dict(decoder_channels=(32, 16, 16, 8, 8))  # one width per level of a stride-32 encoder
SMALL = {
    "uresnet": dict(base_channels=8, residual_widths=(8, 16, 8, 8), residual_out_channels=8),
    "deresunet": dict(_DEC, bottleneck_channels=32), "resunet_atrous": _DEC, "resunet": _DEC, "unet": _DEC,
}


def small(name, own_encoder=False):
    """SMALL[name], without the 5-level decoder widths for the seeds' own (shallower) encoders."""
    kwargs = dict(SMALL[name])
    if own_encoder and name == "resunet":
        kwargs.pop("decoder_channels")
    return kwargs


def _input(name, n=1, h=37, w=45, in_channels=3):
    return torch.randn(n, in_channels + (1 if name == "deresunet" else 0), h, w)


def test_registered_names():
    assert set(um.list_models()) >= {"uresnet", "uresnet_cls", "deresunet", "resunet_atrous", "resunet", "unet"}


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", SEG_MODELS)
def test_forward_odd_size(name, encoder):
    model = um.create_model(name, encoder=encoder, num_classes=3, **SMALL[name]).eval()
    with torch.no_grad():
        y = model(_input(name))
    assert y.shape == (1, 3, 37, 45)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name,encoder", [("uresnet", "convnext_atto"), ("deresunet", "mobilenetv3_small_100"),
                                          ("resunet_atrous", "efficientnet_b0"), ("resunet", None),
                                          ("unet", "resnet18")])
def test_backward(name, encoder):
    model = um.create_model(name, encoder=encoder, num_classes=2, **small(name, encoder is None)).train()
    x = _input(name, n=2, h=33, w=29).requires_grad_()
    y = model(x)
    assert y.shape == (2, 2, 33, 29)
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


def test_resnet50_and_97x131():
    with torch.device("meta"):  # the default encoder, without initialising 171M parameters
        assert um.create_model("resunet_atrous").encoder.name == "resnet50"
    model = um.create_model("unet", encoder="resnet50", num_classes=2, **_DEC).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 35, 33)).shape == (1, 2, 35, 33)
    model = um.create_model("resunet_atrous", encoder="mobilenetv3_small_100", num_classes=2, **_DEC).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 131)).shape == (1, 2, 97, 131)


@pytest.mark.parametrize("name", SEG_MODELS)
def test_own_defaults_and_aux_head(name):
    kwargs = small(name, own_encoder=True)
    if name in ("deresunet", "resunet_atrous", "unet"):
        kwargs["encoder"] = "mobilenetv3_small_100"
    model = um.create_model(name, num_classes=2, aux_classes=5, **kwargs).eval()
    with torch.no_grad():
        seg, cls = model(_input(name, n=2, h=40, w=27))
    assert seg.shape == (2, 2, 40, 27) and cls.shape == (2, 5)


@pytest.mark.parametrize("upsample", ["eucb", "eucb_star", "bilinear", "transpose", "pixel_shuffle_bn"])
def test_uresnet_upsample_choices(upsample):
    model = um.create_model("uresnet", upsample=upsample, **SMALL["uresnet"]).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 21, 19)).shape == (1, 1, 21, 19)


def test_eucb_kinds_mean_one_interpolation():
    def modes(model):
        return {b.up.up.mode for b in model.decoder.blocks}, model.residual.up.mode

    # the seed's "eucb": nearest in the U path; its ResBlock branch's EUCB is bilinear, "eucb_bilinear"
    assert modes(um.create_model("uresnet", **SMALL["uresnet"])) == ({"nearest"}, "bilinear")
    assert modes(um.create_model("uresnet", upsample="eucb_bilinear", **SMALL["uresnet"])) == ({"bilinear"}, "bilinear")
    model = um.create_model("unet", encoder="mobilenetv3_small_100", upsample="eucb_bilinear", **_DEC).eval()
    assert {b.up.up.mode for b in model.decoder.blocks} == {"bilinear"}
    with torch.no_grad():
        assert model(torch.randn(1, 3, 19, 23)).shape == (1, 1, 19, 23)


@pytest.mark.parametrize("name,upsample", [("unet", "pixel_shuffle_bn"), ("unet", "eucb_star"),
                                           ("deresunet", "transpose"), ("resunet_atrous", "eucb"),
                                           ("resunet", "bilinear")])
def test_other_upsample_choices(name, upsample):
    model = um.create_model(name, encoder="mobilenetv3_small_100", upsample=upsample).eval()
    with torch.no_grad():
        assert model(_input(name, h=19, w=23)).shape == (1, 1, 19, 23)


def test_deresunet_rgbd_input():
    model = um.create_model("deresunet", encoder="mobilenetv3_small_100", num_classes=4).eval()
    assert model.depth_channels == 1
    with torch.no_grad():
        assert model(torch.randn(1, 4, 30, 30)).shape == (1, 4, 30, 30)
        with pytest.raises(ValueError, match="4 input channels"):
            model(torch.randn(1, 3, 30, 30))
    two = um.create_model("deresunet", encoder="mobilenetv3_small_100", depth_channels=2).eval()
    with torch.no_grad():
        assert two(torch.randn(1, 5, 30, 30)).shape == (1, 1, 30, 30)


def test_in_channels_not_3():
    for name in ("unet", "resunet_atrous"):
        model = um.create_model(name, encoder="convnext_atto", in_channels=5).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 5, 25, 26)).shape == (1, 1, 25, 26)


def test_uresnet_cls_cifar():
    model = um.create_model("uresnet_cls", encoder="resnet18", num_classes=10, base_channels=4).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # SU: 64x64 inside
    own = um.create_model("uresnet_cls", encoder=None, num_classes=10, base_channels=4, unet_depth=2,
                          selected_upsampling=False).train()
    out = own(torch.randn(2, 3, 16, 16))
    out.sum().backward()
    assert out.shape == (2, 10)


def test_uresnet_cls_own_encoder_width_and_depth():
    small = um.create_model("uresnet_cls", encoder=None, in_channels=1, num_classes=10, residual_widths=(8, 16, 32, 64),
                            residual_blocks=1, unet=False, selected_upsampling=False)
    assert small.encoder.channels == [8, 16, 32, 64] and [len(s) for s in small.encoder.stages] == [1, 1, 1, 1]
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="residual_widths and residual_blocks shape uresnet_cls's own encoder"):
        um.create_model("uresnet_cls", encoder="resnet18", residual_blocks=1)


def test_resunet_own_encoder_projection_shortcut():
    model = um.create_model("resunet")
    assert model.encoder.reductions == [1, 2, 4]
    assert isinstance(model.encoder.stages[0].shortcut, torch.nn.Conv2d)  # 3 -> 64 needs a projection


def test_channels_last():
    model = um.create_model("uresnet", encoder="resnet18", **SMALL["uresnet"]).eval()
    x = torch.randn(1, 3, 35, 41)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_save_load_roundtrip(tmp_path):
    model = um.create_model("deresunet", encoder="mobilenetv3_small_100", num_classes=3, aux_classes=2,
                            **SMALL["deresunet"])
    model.train()(torch.randn(2, 4, 32, 32))  # move the BatchNorm statistics
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and (tmp_path / "ckpt" / "config.json").is_file()
    loaded = um.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded) is type(model) and loaded.depth_channels == 1
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 4, 29, 31)
    with torch.no_grad():
        for y, z in zip(model(x), loaded(x)):
            assert torch.equal(y, z)


def test_backend_changes_speed_not_outputs():
    """Every fused op in play: PixelShuffleBN (deresunet), EUCB (uresnet), the atrous block."""
    models = [(um.create_model("deresunet", encoder="mobilenetv3_small_100", **SMALL["deresunet"]), 4),
              (um.create_model("uresnet", **SMALL["uresnet"]), 3),
              (um.create_model("resunet_atrous", encoder="mobilenetv3_small_100", **_DEC), 3)]
    for model, channels in models:
        x = torch.randn(2, channels, 33, 31)
        for train in (True, False):
            model.train(train)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            y = model(x)
            fused_state = model.state_dict()
            model.load_state_dict(state)
            with uresnet_ops.use_backend("reference"):
                ref = model(x)
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
            for k, v in model.state_dict().items():  # running statistics updated alike
                torch.testing.assert_close(fused_state[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", [("deresunet", dict(encoder="mobilenetv3_small_100", **SMALL["deresunet"])),
                                         ("uresnet", dict(encoder="resnet18", **SMALL["uresnet"]))])
def test_export(name, kwargs):
    model = um.create_model(name, **kwargs).eval()
    x = _input(name, h=37, w=45)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compile(backend):
    """fullgraph: the fused ops and the pad/crop trace without graph breaks. Inductor once, on the
    tiniest model (compiling costs 10+ s here); aot_eager checks a second model's graph cheaply."""
    if backend == "inductor":
        model = um.create_model("resunet", upsample="pixel_shuffle_bn", encoder_channels=(8, 16, 16),
                                decoder_channels=(16, 8)).eval()
    else:
        model = um.create_model("uresnet", base_channels=4, residual_widths=(8, 8, 8, 8), residual_out_channels=4)
        model.eval()
    x = torch.randn(1, 3, 19, 21)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- issue 19
def test_activation_and_predict():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 33, 41)
    model = um.create_model("unet", encoder="test_resnet", num_classes=3, activation="softmax", **SMALL["unet"])
    model.train()
    probs = model.predict(x)
    assert model.training  # restored
    assert probs.shape == (2, 3, 33, 41) and torch.allclose(probs.sum(1), torch.ones(2, 33, 41), atol=1e-5)
    assert not probs.requires_grad
    with torch.no_grad():  # forward applies it, as smp's head: predict is forward in eval mode
        assert torch.equal(probs, model.eval()(x))
        model.activation = None
        assert torch.allclose(probs, model(x).softmax(1))
    assert model.model_config["kwargs"]["activation"] == "softmax"
    sig = um.create_model("unet", encoder="test_resnet", activation="sigmoid", **SMALL["unet"]).predict(x)
    assert 0 <= sig.min() and sig.max() <= 1
    custom = um.create_model("unet", encoder="test_resnet", activation=lambda t: t * 0 + 7, **SMALL["unet"])
    assert (custom.predict(x) == 7).all()
    plain = um.create_model("unet", encoder="test_resnet", **SMALL["unet"]).eval()
    with torch.no_grad():
        assert torch.equal(plain.predict(x), plain(x))
    with pytest.raises(ValueError, match="activation='relu6'"):
        um.create_model("unet", activation="relu6")
    with pytest.raises(TypeError, match="activation"):
        um.create_model("unet", activation=3)


def test_activation_is_kept_through_save_and_given_when_loading(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    model = um.create_model("unet", encoder="test_resnet", num_classes=2, **SMALL["unet"]).eval()
    model.save_pretrained(tmp_path / "plain")
    probs = um.from_pretrained(tmp_path / "plain", activation="softmax").eval()
    with torch.no_grad():
        torch.testing.assert_close(probs(x), model(x).softmax(1))
    probs.save_pretrained(tmp_path / "probs")
    assert um.from_pretrained(tmp_path / "probs").model_config["kwargs"]["activation"] == "softmax"
    cls = um.create_model("uresnet_cls", encoder="resnet18", num_classes=4, activation="softmax").eval()
    with torch.no_grad():
        torch.testing.assert_close(cls(x).sum(1), torch.ones(1))


def test_training_refuses_an_activation(tmp_path):
    from uresnet_models.train import TrainConfig, fit
    with pytest.raises(ValueError, match="activation='sigmoid'.*logits"):
        fit(TrainConfig(data="synthetic", epochs=1, model_args={"activation": "sigmoid"}, out=str(tmp_path)))


def test_freeze_and_unfreeze_encoder():
    model = um.create_model("unet", encoder="test_resnet", num_classes=2, **SMALL["unet"])
    model.freeze_encoder().train()
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    bns = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)  # stays in eval after .train()
    before = [m.running_mean.clone() for m in bns]
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    assert all(p.grad is None for p in model.encoder.parameters())
    model.unfreeze_encoder()
    assert all(p.requires_grad for p in model.encoder.parameters()) and all(m.training for m in bns)


def test_config_holds_every_argument_with_its_default(tmp_path):
    model = um.create_model("unet", encoder="test_resnet", num_classes=2)
    kwargs = model.model_config["kwargs"]
    assert kwargs["upsample"] == "transpose" and kwargs["decoder_channels"] is None and kwargs["in_channels"] == 3
    assert "pretrained" not in kwargs
    # an old config (arguments given only) still loads
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"architecture": "unet", "kwargs": {"encoder": "test_resnet", '
                                          '"num_classes": 2}}')
    assert um.from_pretrained(tmp_path).model_config["kwargs"]["upsample"] == "transpose"


def test_save_pretrained_of_a_model_built_from_its_class(tmp_path):
    model = um.UNet(encoder="test_resnet", num_classes=2, decoder_channels=(8, 8, 8, 8, 8)).eval()
    model.save_pretrained(tmp_path)
    again = um.from_pretrained(tmp_path).eval()
    assert again.model_config["kwargs"]["decoder_channels"] == [8, 8, 8, 8, 8]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))

    class Unregistered(um.ModelBase):
        def __init__(self, width=3):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, width, 1)

    with pytest.raises(RuntimeError, match="not a registered architecture"):
        Unregistered().save_pretrained(tmp_path / "x")


def test_model_card(tmp_path):
    model = um.create_model("unet", encoder="test_resnet", num_classes=2, **SMALL["unet"])
    model.save_pretrained(tmp_path, metrics={"val_miou": 0.8123, "epoch": 7})
    hub_card = ModelCard.load(tmp_path / "README.md")  # the Hub's metadata, then ours
    assert hub_card.data.library_name == "uresnet" and "image-segmentation" in hub_card.data.tags
    card = hub_card.text.lstrip()
    assert card.startswith("# unet on test_resnet")
    for needle in ("| output classes | 2 |", "| val_miou | 0.8123 |", "| epoch | 7 |", "from_pretrained",
                   "mean [0.5, 0.5, 0.5]", '"architecture": "unet"'):
        assert needle in card, needle


def test_corrupted_config_names_the_file(tmp_path):
    um.create_model("unet", encoder="test_resnet", **SMALL["unet"]).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"architecture": "unet",\n "kwargs": }')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        um.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["uresnet", "deresunet", "resunet_atrous"])
def test_meta_device_forward_and_backward(name):
    with torch.device("meta"):
        model = um.create_model(name, encoder="test_resnet" if name != "uresnet" else None, num_classes=2,
                                **small(name, own_encoder=name == "uresnet"))
        x = _input(name, n=2).requires_grad_(True)
    y = model(x)
    y.sum().backward()
    assert y.device.type == "meta" and y.shape == (2, 2, 37, 45) and x.grad.shape == x.shape


def test_hubconf_loads_locally():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    model = torch.hub.load(str(root), "unet", source="local", encoder="test_resnet", num_classes=2,
                           decoder_channels=(8, 8, 8, 8, 8))
    assert isinstance(model, um.UNet) and model.model_config["kwargs"]["encoder"] == "test_resnet"


def test_py_typed_and_version():
    import importlib.resources
    import tomllib
    from pathlib import Path
    for package in ("uresnet_ops", "uresnet_models"):
        assert importlib.resources.files(package).joinpath("py.typed").is_file()
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-data"]["uresnet_models"] == ["py.typed"]
    assert um.__version__ == pyproject["project"]["version"] == uresnet_ops.__version__
