"""uresnet_models registry: register_model, create_model, list_models, entry-point plugins,
errors, pretrained offline, parameter counts in the CLI."""
import importlib.metadata
import inspect
import sys
import types

import pytest
import torch
from torch import nn

import uresnet_models as um
from uresnet_models import registry
from uresnet_models.encoders import ResidualUNetEncoder, ResNetStagesEncoder


@pytest.fixture
def clean_registry():
    saved = dict(registry._REGISTRY)
    registry.reload_plugins()
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
    registry.reload_plugins()


class Tiny(nn.Module):
    def __init__(self, in_channels=3, num_classes=1, width=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 1)
        self.width = width

    def forward(self, x):
        return self.conv(x)


def test_register_with_and_without_name(clean_registry):
    @um.register_model
    def my_tiny(in_channels=3, num_classes=1, **kwargs):
        return Tiny(in_channels, num_classes)

    um.register_model("other_tiny")(Tiny)
    um.register_model(name="third_tiny")(Tiny)
    assert um.list_models("*tiny") == ["my_tiny", "other_tiny", "third_tiny"]
    assert isinstance(um.create_model("my_tiny"), Tiny)
    assert um.create_model("other_tiny", num_classes=4, width=7).width == 7


def test_list_models_wildcards():
    assert um.list_models("*resunet*") == ["deresunet", "resunet", "resunet_atrous"]
    assert um.list_models("u*") == ["unet", "uresnet", "uresnet_cls"]
    assert um.list_models(["unet", "deres*"]) == ["deresunet", "unet"]
    assert um.list_models("nothing*") == []


def test_unknown_name_suggests():
    with pytest.raises(um.UnknownModelError, match="Did you mean 'uresnet'") as info:
        um.create_model("uresnt")
    assert isinstance(info.value, ValueError)


def test_unknown_kwargs():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) 'upsampel' \(did you mean 'upsample'\?\)"):
        um.create_model("unet", encoder="mobilenetv3_small_100", upsampel="eucb")
    with pytest.raises(ValueError, match="upsample='nearest' is not supported"):
        um.create_model("uresnet", upsample="nearest")
    with pytest.raises(ValueError, match="unknown timm encoder 'resnet181'; did you mean"):
        um.create_model("unet", encoder="resnet181")
    with pytest.raises(ValueError, match="decoder_channels must have 5"):
        um.create_model("unet", encoder="mobilenetv3_small_100", decoder_channels=(8, 8))
    with pytest.raises(ValueError, match="needs an encoder"):
        um.create_model("unet", encoder=None)
    with pytest.raises(ValueError, match="aux_classes"):
        um.create_model("uresnet_cls", encoder=None, aux_classes=3)


def test_default_encoder_is_the_architectures_default():
    assert um.DEFAULT_ENCODER == "default"
    assert inspect.signature(um.create_model).parameters["encoder"].default == um.DEFAULT_ENCODER
    with torch.device("meta"):  # only the encoders' identity matters here
        for name, default in [("unet", "resnet34"), ("uresnet_cls", "resnet18")]:
            for model in (um.create_model(name, encoder=um.DEFAULT_ENCODER), um.create_model(name)):
                assert model.encoder.name == default and model.model_config["kwargs"]["encoder"] == default
        # an architecture whose default is its own encoder, and None meaning that own encoder as before
        for encoder in (um.DEFAULT_ENCODER, None):
            model = um.create_model("resunet", encoder=encoder)
            assert isinstance(model.encoder, ResidualUNetEncoder) and model.model_config["kwargs"]["encoder"] is None
        assert isinstance(um.create_model("uresnet_cls", encoder=None).encoder, ResNetStagesEncoder)


def test_plugin_entry_point(clean_registry, monkeypatch):
    module = types.ModuleType("fake_uresnet_plugin")
    module.build = lambda in_channels=3, num_classes=1, **kw: Tiny(in_channels, num_classes)
    monkeypatch.setitem(sys.modules, "fake_uresnet_plugin", module)
    eps = [importlib.metadata.EntryPoint(name="plugin_net", value="fake_uresnet_plugin:build",
                                         group=registry.ENTRY_POINT_GROUP),
           importlib.metadata.EntryPoint(name="broken_net", value="no_such_module_xyz:build",
                                         group=registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    registry.reload_plugins()
    assert "plugin_net" in um.list_models() and "broken_net" in um.list_models()
    model = um.create_model("plugin_net", num_classes=2)
    assert isinstance(model, Tiny) and model(torch.randn(1, 3, 5, 5)).shape == (1, 2, 5, 5)
    with pytest.warns(UserWarning, match="broken_net"), pytest.raises(um.UnknownModelError):
        um.create_model("broken_net")


def test_pretrained_offline_fails_clearly(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="could not be downloaded"):
        um.create_model("unet", encoder="mobilenetv3_small_100", pretrained=True)
    with pytest.raises(ValueError, match="no pretrained weights"):
        um.create_model("resunet", encoder=None, pretrained=True)


def test_count_parameters_and_cli(capsys):
    n = um.count_parameters("unet", encoder="resnet18")
    assert n == sum(p.numel() for p in um.create_model("unet", encoder="resnet18").parameters())
    from uresnet_models.cli import main
    assert main(["list-models", "--params", "*resunet"]) == 0
    out = capsys.readouterr().out
    assert "deresunet" in out and "resunet" in out and "M" in out


def test_smp_argument_names(monkeypatch):
    tiny = dict(decoder_channels=(8,) * 5)
    model = um.create_model("unet", encoder_name="test_resnet", encoder_weights=None, classes=3, in_channels=2,
                            activation="softmax2d", **tiny)
    kwargs = model.model_config["kwargs"]
    assert (kwargs["encoder"], kwargs["num_classes"], kwargs["in_channels"]) == ("test_resnet", 3, 2)
    probs = model.eval()(torch.randn(1, 2, 32, 32))
    assert probs.shape == (1, 3, 32, 32) and torch.allclose(probs.sum(1), torch.ones(1, 32, 32))
    seen, build_unet = {}, registry.model_entrypoint("unet")

    def spy(**kw):  # "imagenet" asks for the encoder's timm weights (not downloaded here)
        seen.update(kw)
        return build_unet(**{**kw, "pretrained": False})

    monkeypatch.setitem(registry._REGISTRY, "unet", spy)
    um.create_model("unet", encoder_name="test_resnet", encoder_weights="imagenet", **tiny)
    assert seen["pretrained"] is True and seen["encoder"] == "test_resnet"


@pytest.mark.parametrize("kwargs,match", [
    (dict(encoder="resnet18", encoder_name="resnet34"), "encoder_name= .* and encoder= both given"),
    (dict(num_classes=2, classes=3), "classes= .* and num_classes= both given"),
    (dict(pretrained=True, encoder_weights=None), "encoder_weights= .* and pretrained= both given"),
])
def test_smp_and_our_name_of_one_argument_is_refused(kwargs, match):
    with pytest.raises(TypeError, match=match):
        um.create_model("unet", **kwargs)


def test_smp_encoder_weights_other_than_imagenet_are_refused():
    with pytest.raises(ValueError, match=r"encoder_weights='ssl': expected None or 'imagenet'"):
        um.create_model("unet", encoder_name="resnet50", encoder_weights="ssl")
