"""Saving and loading, through ``huggingface_hub``'s ``PyTorchModelHubMixin`` as
segmentation_models_pytorch does: :meth:`HubMixin.save_pretrained`,
:meth:`HubMixin.from_pretrained` (a local folder or a Hugging Face Hub model id),
``push_to_hub`` (the mixin's) and the model card.

A checkpoint is a folder (or a Hub repository) holding ``model.safetensors`` (the state dict,
buffers included), ``config.json`` (``{"architecture": the registered name, "kwargs": every
argument of its builder, "preprocessing": the input normalisation the model expects}``: the
registry rebuilds the model from it, and from_pretrained restores the preprocessing) and
``README.md`` (the model card, with the metrics given when saving).
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path

from huggingface_hub import ModelCard, PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.constants import CONFIG_NAME, SAFETENSORS_SINGLE_FILE
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from torch import nn

from .registry import create_model, model_kwargs, registered_name

__all__ = ["HubMixin", "from_pretrained", "model_card", "read_json", "load_weights", "checked_preprocessing",
           "CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME"]

WEIGHTS_NAME = SAFETENSORS_SINGLE_FILE  # "model.safetensors"
CARD_NAME = "README.md"


class HubMixin(PyTorchModelHubMixin, library_name="uresnet", pipeline_tag="image-segmentation",
               tags=["uresnet", "image-segmentation"]):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for the registered models.

    The config is the registry's (``model.model_config`` from :func:`~.registry.create_model`,
    or the constructor's arguments recorded here for a model built from its class), not the
    mixin's own record of the constructor's JSON arguments, which would silently drop an
    encoder module or a callable."""

    model_config: dict | None = None  # set by create_model
    _hub_mixin_config = {}  # not None: switches off the mixin's per-instance argument record (see above)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            init(self, *args, **kw)
            if type(self) is cls:  # the outermost __init__: the arguments that rebuild this model
                bound = inspect.signature(init).bind(self, *args, **kw)
                bound.apply_defaults()
                arguments = dict(list(bound.arguments.items())[1:])
                for name, p in inspect.signature(init).parameters.items():
                    if p.kind == p.VAR_KEYWORD:
                        arguments.update(arguments.pop(name))
                self._init_arguments = arguments

        cls.__init__ = recording_init

    def _config(self) -> dict:
        """What ``config.json`` holds."""
        config = getattr(self, "model_config", None)
        if not config:
            name = registered_name(type(self))
            arguments = getattr(self, "_init_arguments", None)
            if name is None or arguments is None:
                raise RuntimeError(f"{type(self).__name__}.save_pretrained: {type(self).__name__} is not a registered "
                                   "architecture, so it cannot be rebuilt; register it with @register_model or build "
                                   "it with uresnet_models.create_model(...)")
            config = {"architecture": name, "kwargs": model_kwargs(arguments)}
        preprocessing = getattr(self, "preprocessing", None)
        if preprocessing:  # from_pretrained restores it
            config = {**config, "preprocessing": preprocessing}
        return config

    def _config_text(self) -> str:
        try:
            return json.dumps(self._config(), indent=2, sort_keys=True) + "\n"
        except TypeError as error:
            raise TypeError(f"save_pretrained: the model's arguments are not JSON-serializable ({error}); pass names "
                            "and numbers (e.g. an encoder name with encoder_kwargs, not an encoder module; an "
                            "activation name, not a function)") from error

    def save_pretrained(self, save_directory: str | os.PathLike, *, metrics: dict | None = None,
                        model_card_kwargs: dict | None = None, **kwargs):
        """Write ``model.safetensors``, ``config.json`` and ``README.md`` (the model card:
        architecture, encoder, classes, preprocessing, ``metrics`` and how to load it) into
        ``save_directory``; :meth:`from_pretrained` reads them back. ``kwargs`` are the mixin's
        (``push_to_hub=True, repo_id=...`` also uploads the folder). Returns the folder, or the
        commit's URL when pushed."""
        self._config_text()  # a model that cannot be saved fails before anything is written
        path = Path(save_directory)
        (path / CARD_NAME).unlink(missing_ok=True)  # the mixin keeps an existing card: this one has new metrics
        card_kwargs = {**(model_card_kwargs or {}), **({"metrics": metrics} if metrics is not None else {})}
        url = super().save_pretrained(path, model_card_kwargs=card_kwargs, **kwargs)
        return path if url is None else url

    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's hook: the weights and the registry's config (the card comes after)."""
        from safetensors.torch import save_model
        text = self._config_text()
        save_model(self, str(save_directory / WEIGHTS_NAME),
                   metadata={"format": "pt", "architecture": json.loads(text)["architecture"]})
        (save_directory / CONFIG_NAME).write_text(text)

    def generate_model_card(self, metrics: dict | None = None, training: dict | None = None, **kwargs) -> ModelCard:
        """The mixin's hook: the Hub metadata (library, tags) above :func:`model_card`."""
        data = self._hub_mixin_info.model_card_data
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + model_card(self._config(), self, metrics, training))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, device=None, strict: bool = True,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        force_download: bool = False, token: str | bool | None = None,
                        local_files_only: bool = False, **overrides) -> nn.Module:
        """The model saved by :meth:`save_pretrained` in a local folder, or in a Hugging Face
        Hub repository (``"user/name"``; ``revision``, ``cache_dir``, ``force_download``,
        ``token`` and ``local_files_only`` are ``hf_hub_download``'s), in eval mode as the
        mixin returns it. Rebuilt from its config by the registry (``overrides`` replace saved
        arguments, e.g. ``activation="softmax"``; ``pretrained`` is always False, the weights
        come from the checkpoint), with its weights and buffers loaded (``strict``) onto
        ``device``. Called on a class (``UNet.from_pretrained``), the checkpoint must hold
        that class."""
        hub = dict(revision=revision, cache_dir=cache_dir, force_download=force_download, token=token,
                   local_files_only=local_files_only)
        source = str(pretrained_model_name_or_path)
        config_file = _checkpoint_file(source, CONFIG_NAME, hub)
        config = read_json(config_file)
        if not isinstance(config.get("architecture"), str) or not isinstance(config.get("kwargs", {}), dict):
            raise ValueError(f"{config_file}: expected {{'architecture': name, 'kwargs': {{...}}}} as written by "
                             "save_pretrained")
        weights_file = _checkpoint_file(source, WEIGHTS_NAME, hub)
        model = create_model(config["architecture"], **{**config.get("kwargs", {}), **overrides, "pretrained": False})
        if not isinstance(model, cls):
            raise TypeError(f"{cls.__name__}.from_pretrained: {source} holds a {config['architecture']!r} "
                            f"({type(model).__name__}); load it with uresnet_models.from_pretrained")
        if config.get("preprocessing"):
            try:
                model.preprocessing = config["preprocessing"]
            except ValueError as error:
                raise ValueError(f"{config_file}: {error}") from None
        if device is not None:
            model.to(device)
        load_weights(model, weights_file, strict=strict, device=device)
        return model.eval()


def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> nn.Module:
    """Any checkpoint written by ``save_pretrained`` (a local folder or a Hub model id), whatever
    its architecture: :meth:`HubMixin.from_pretrained`, whose keyword arguments it takes."""
    return HubMixin.from_pretrained(pretrained_model_name_or_path, **kwargs)


def _checkpoint_file(source: str, filename: str, hub_kwargs: dict) -> Path:
    """``source/filename`` for a local folder, else the file downloaded (or cached) from the Hub."""
    if os.path.isdir(source):
        path = Path(source) / filename
        if not path.is_file():
            raise FileNotFoundError(f"from_pretrained: {path} not found (expected a folder written by save_pretrained)")
        return path
    try:
        return Path(hf_hub_download(source, filename, **hub_kwargs))
    except (HFValidationError, EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise FileNotFoundError(f"from_pretrained: {source!r} is not a local folder, and its {filename} could not be "
                                f"had from the Hugging Face Hub under that id ({type(error).__name__}: {reason})") \
            from None


def load_weights(model: nn.Module, path: Path, *, strict: bool = True, device=None) -> None:
    """``model.safetensors`` into ``model``; a truncated or corrupted file raises a ``ValueError``
    naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    try:
        load_model(model, str(path), strict=strict, device=str(device) if device is not None else "cpu")
    except SafetensorError as error:
        raise ValueError(f"{path} is damaged ({error}); the checkpoint must be written again or restored") from None


def checked_preprocessing(value: dict) -> dict:
    """``{"mean", "std"[, "input_range"]}`` as lists of floats (JSON-ready), or a ``ValueError``
    saying what is wrong."""
    try:
        mean, std = [float(v) for v in value["mean"]], [float(v) for v in value["std"]]
        low, high = (float(v) for v in value.get("input_range", (0, 1)))
    except (TypeError, KeyError, ValueError, AttributeError) as error:
        raise ValueError(f"preprocessing must be {{'mean': [...], 'std': [...], 'input_range': (0, 1)}} of numbers, "
                         f"got {value!r} ({type(error).__name__}: {error})") from None
    if (low, high) != (0, 1):
        raise ValueError(f"preprocessing: input_range {(low, high)} is not supported (images scaled to (0, 1))")
    if not mean or len(mean) != len(std) or min(std) <= 0:
        raise ValueError(f"preprocessing: mean and std need one value per channel, std positive; got mean {mean}, "
                         f"std {std}")
    return {"mean": mean, "std": std, "input_range": [low, high]}


def read_json(path: Path) -> dict:
    """A JSON file; a corrupted one raises a ``ValueError`` naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the checkpoint is damaged: write it again or "
                         "restore it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def model_card(config: dict, model: nn.Module | None = None, metrics: dict | None = None,
               training: dict | None = None) -> str:
    """The body of the README.md that :meth:`HubMixin.save_pretrained` writes next to the weights."""
    kwargs = config.get("kwargs", {})
    lines = [f"# {config['architecture']}" + (f" on {kwargs['encoder']}" if kwargs.get("encoder") else ""), "",
             "A `uresnet_models` checkpoint.", "", "| | |", "|---|---|",
             f"| architecture | `{config['architecture']}` |",
             "| encoder | " + (f"`{kwargs['encoder']}`" if kwargs.get("encoder") else "the architecture's own")
             + (f" ({kwargs['encoder_kwargs']})" if kwargs.get("encoder_kwargs") else "") + " |",
             f"| input channels | {kwargs.get('in_channels', '?')} |",
             f"| output classes | {kwargs.get('num_classes', '?')} |"]
    if kwargs.get("aux_classes"):
        lines.append(f"| auxiliary classes | {kwargs['aux_classes']} |")
    if kwargs.get("activation"):
        lines.append(f"| activation (applied by forward) | `{kwargs['activation']}` |")
    pre = getattr(model, "preprocessing", None) or config.get("preprocessing")
    if model is not None:
        lines.append(f"| parameters | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M |")
        if pre:
            lines.append(f"| preprocessing | images in [0, 1], mean {list(pre['mean'])}, std {list(pre['std'])} |")
    for key, value in (training or {}).items():
        lines.append(f"| {key} | {value} |")
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += ["", "## Loading", "", "```python", "import uresnet_models",
              "model = uresnet_models.from_pretrained(\"path/to/this/folder\")  # or its Hub id, \"user/name\""]
    if pre:
        lines += ["# the input as in training: RGB scaled to [0, 1], normalised with model.preprocessing",
                  "import torch", "from torchvision.io import decode_image", "from torchvision.transforms import v2",
                  "pre = model.preprocessing  # " + json.dumps({k: pre[k] for k in ("mean", "std")}),
                  "normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre[\"mean\"], "
                  "pre[\"std\"])])",
                  "logits = model(normalize(decode_image(\"image.png\", mode=\"RGB\"))[None])"]
    lines += ["```", "", "Full configuration (`config.json`):", "", "```json",
              json.dumps(config, indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(lines)
