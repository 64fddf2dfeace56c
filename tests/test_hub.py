"""Saving and loading through huggingface_hub's PyTorchModelHubMixin (uresnet_models/hub.py):
local folders, a Hub id served from the local cache, push_to_hub, the card. Offline throughout."""
import json

import pytest
import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin

import uresnet_models as um

TINY = dict(encoder="test_resnet", num_classes=2, decoder_channels=(8, 8, 8, 8, 8))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: a download attempt fails at once (huggingface_hub reads the constant per call)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _trained(model):
    model.train()(torch.randn(2, 3, 32, 32))  # move the BatchNorm statistics: buffers must travel too
    return model.eval()


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_models_are_pytorch_hub_mixins_and_the_base_class_is_only_the_model():
    model = um.create_model("unet", **TINY)
    assert isinstance(model, PyTorchModelHubMixin) and callable(model.push_to_hub)
    assert "save_pretrained" not in vars(um.ModelBase) and "from_pretrained" not in vars(um.ModelBase)


def test_folder_round_trip_in_eval_mode_and_through_the_class(tmp_path):
    model = _trained(um.create_model("unet", **TINY))
    assert model.save_pretrained(tmp_path / "ckpt") == tmp_path / "ckpt"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for loaded in (um.from_pretrained(tmp_path / "ckpt"), um.UNet.from_pretrained(str(tmp_path / "ckpt"))):
        assert type(loaded) is um.UNet and not loaded.training and _same(loaded, model)
    with pytest.raises(TypeError, match=r"DeResUNet.from_pretrained: .* holds a 'unet' \(UNet\)"):
        um.DeResUNet.from_pretrained(tmp_path / "ckpt")


def test_a_folder_written_before_the_mixin_still_loads(tmp_path):
    """The files of the earlier save_pretrained, byte for byte: config.json without Hub metadata,
    a card without a YAML header."""
    model = _trained(um.create_model("unet", **TINY))
    from safetensors.torch import save_model
    save_model(model, str(tmp_path / "model.safetensors"), metadata={"format": "pt", "architecture": "unet"})
    (tmp_path / "config.json").write_text(json.dumps(model.model_config, indent=2, sort_keys=True) + "\n")
    (tmp_path / "README.md").write_text("# unet on test_resnet\n\nA `uresnet_models` checkpoint.\n")
    assert _same(um.from_pretrained(tmp_path), model)


def test_a_hub_id_loads_from_the_cache_offline(tmp_path):
    """A Hub repository as huggingface_hub caches it (models--user--name/snapshots/<commit>/...)."""
    model = _trained(um.create_model("unet", **TINY))
    repo = tmp_path / "cache" / "models--someone--tiny-unet"
    commit = "0" * 40
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = um.from_pretrained("someone/tiny-unet", cache_dir=tmp_path / "cache", activation="softmax")
    assert _same(loaded, model) and loaded.model_config["kwargs"]["activation"] == "softmax"
    with pytest.raises(FileNotFoundError, match="'someone/other' is not a local folder.*Hugging Face Hub"):
        um.from_pretrained("someone/other", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="'no/such/folder' is not a local folder"):
        um.from_pretrained("no/such/folder")


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded.update({p.name: p.read_bytes() for p in folder_path.iterdir()}, repo_id=repo_id)
        return "https://huggingface.co/someone/tiny-unet/commit/1"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("Repo", (), {"repo_id": repo_id}))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = um.create_model("unet", **TINY)
    url = model.push_to_hub("someone/tiny-unet", model_card_kwargs={"metrics": {"val_miou": 0.5}})
    assert url.endswith("/commit/1") and uploaded["repo_id"] == "someone/tiny-unet"
    assert json.loads(uploaded["config.json"])["architecture"] == "unet"
    assert b"| val_miou | 0.5000 |" in uploaded["README.md"] and uploaded["model.safetensors"]


def test_saving_again_rewrites_the_card_with_the_new_metrics(tmp_path):
    model = um.create_model("unet", **TINY)
    model.save_pretrained(tmp_path, metrics={"val_miou": 0.25})
    model.save_pretrained(tmp_path, metrics={"val_miou": 0.75}, model_card_kwargs={"training": {"epoch": 3}})
    card = ModelCard.load(tmp_path / "README.md")
    assert "| val_miou | 0.7500 |" in card.text and "0.2500" not in card.text and "| epoch | 3 |" in card.text


def test_a_model_that_cannot_be_saved_leaves_the_folder_alone(tmp_path):
    model = um.create_model("unet", **TINY)
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model.model_config = {"architecture": "unet", "kwargs": {"encoder": object()}}
    with pytest.raises(TypeError, match="not JSON-serializable"):
        model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_damaged_checkpoints_name_the_file(tmp_path):
    um.create_model("unet", **TINY).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('["unet"]')
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, got list"):
        um.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"kwargs": {}}')
    with pytest.raises(ValueError, match=r"config\.json: expected \{'architecture'"):
        um.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text('{"architecture": "unet", "kwargs": {}}')
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors not found"):
        um.from_pretrained(tmp_path)


def test_no_import_cycle():
    import subprocess
    import sys
    # save/load (hub) needs the registry, not the models: each module imports alone, in either order
    loaded = "print([m for m in sys.modules if m.startswith('uresnet_models.arch') or m == 'uresnet_models.base'])"
    for code in (f"import sys, uresnet_models.hub; {loaded}", "import uresnet_models.base; print([])"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout == "[]\n", done.stderr[-2000:]
