"""Base classes: save/load (safetensors + JSON config) and the segmentation model contract
(logits at the input's resolution for any H, W; optional auxiliary classification head), with
the U-Net builder and forward the U-Net-style architectures share."""
from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path

import torch
from torch import nn

from .blocks import UNetDecoder, check_upsample, crop_to, decoder_levels, fit_widths, pad_to_multiple
from .heads import ClassificationHead, SegmentationHead

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"


class ModelBase(nn.Module):
    """What every registered model has: ``model_config`` (the architecture name and every
    argument it was built with, defaults included), :meth:`save_pretrained`, :meth:`predict`,
    :meth:`freeze_encoder` / :meth:`unfreeze_encoder` and :attr:`preprocessing`.

    A model built by :func:`uresnet_models.create_model` gets its config from it; one built
    from its class (``UNet(...)``) records the constructor's arguments, so both can be saved."""

    model_config: dict | None = None
    _encoder_frozen: bool = False
    _preprocessing: dict | None = None

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
        config = getattr(self, "model_config", None)
        if config:
            return config
        from .registry import model_kwargs, registered_name
        name = registered_name(type(self))
        arguments = getattr(self, "_init_arguments", None)
        if name is None or arguments is None:
            raise RuntimeError(f"{type(self).__name__}.save_pretrained: {type(self).__name__} is not a registered "
                               "architecture, so it cannot be rebuilt; register it with @register_model or build it "
                               "with uresnet_models.create_model(...)")
        return {"architecture": name, "kwargs": model_kwargs(arguments)}

    def save_pretrained(self, path: str | os.PathLike, metrics: dict | None = None) -> Path:
        """Write ``path/model.safetensors`` (the state dict, buffers included),
        ``path/config.json`` (how to rebuild the model) and ``path/README.md`` (a model card:
        architecture, encoder, classes, preprocessing, ``metrics`` and how to load it);
        :func:`uresnet_models.from_pretrained` reads them back. ``config.json`` also records the
        model's ``preprocessing`` (mean/std; from_pretrained restores it). Returns the folder."""
        from safetensors.torch import save_model
        config = self._config()
        if self.preprocessing:
            config = {**config, "preprocessing": self.preprocessing}
        try:
            text = json.dumps(config, indent=2, sort_keys=True)
        except TypeError as error:
            raise TypeError(f"save_pretrained: the model's arguments are not JSON-serializable ({error}); pass names "
                            "and numbers (e.g. an encoder name with encoder_kwargs, not an encoder module; an "
                            "activation name, not a function)") from error
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_model(self, str(path / WEIGHTS_NAME), metadata={"format": "pt", "architecture": config["architecture"]})
        (path / CONFIG_NAME).write_text(text + "\n")
        (path / CARD_NAME).write_text(model_card(config, self, metrics))
        return path

    @property
    def preprocessing(self) -> dict | None:
        """The input normalisation the model expects, ``{"mean", "std", "input_range"}``: images
        scaled to ``input_range`` (0..1), then ``(x - mean) / std`` on the first ``len(mean)``
        channels (a depth channel after them as it is). What was set (``uresnet train`` sets the
        normalisation it trained with; ``save_pretrained`` keeps it), else the encoder's weights'
        (timm's ``pretrained_cfg``), else None. Set None to fall back to the encoder's."""
        if self._preprocessing is not None:
            return self._preprocessing
        encoder = getattr(self, "encoder", None)
        return getattr(encoder, "preprocessing", None)

    @preprocessing.setter
    def preprocessing(self, value: dict | None) -> None:
        self._preprocessing = None if value is None else checked_preprocessing(value)

    def activate(self, out):
        """``out`` with the model's ``activation`` (``create_model(..., activation=)``, as smp's
        head) applied to the main output; auxiliary class logits stay logits. Every ``forward``
        ends with it."""
        act = getattr(self, "activation", None)
        if act is None:
            return out
        return (act(out[0]), *out[1:]) if isinstance(out, tuple) else act(out)

    @torch.no_grad()
    def predict(self, x: torch.Tensor):
        """``forward`` in eval mode without gradients (the activation, if any, included); the
        training mode is restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            return self(x)
        finally:
            self.train(was_training)

    def freeze_encoder(self) -> "ModelBase":
        """Stop training the encoder: its parameters get ``requires_grad=False`` and its
        normalisation layers stay in eval mode (running statistics frozen) even after
        ``.train()``. Returns the model."""
        encoder = self._encoder_module()
        for p in encoder.parameters():
            p.requires_grad_(False)
        self._encoder_frozen = True
        encoder.eval()
        return self

    def unfreeze_encoder(self) -> "ModelBase":
        """Undo :meth:`freeze_encoder`. Returns the model."""
        encoder = self._encoder_module()
        for p in encoder.parameters():
            p.requires_grad_(True)
        self._encoder_frozen = False
        encoder.train(self.training)
        return self

    def _encoder_module(self) -> nn.Module:
        encoder = getattr(self, "encoder", None)
        if not isinstance(encoder, nn.Module):
            raise RuntimeError(f"{type(self).__name__} has no encoder to freeze")
        return encoder

    def train(self, mode: bool = True):
        super().train(mode)
        if self._encoder_frozen:
            self.encoder.eval()
        return self


def model_card(config: dict, model: nn.Module | None = None, metrics: dict | None = None,
               training: dict | None = None) -> str:
    """The README.md that :meth:`ModelBase.save_pretrained` writes next to the weights."""
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
              "model = uresnet_models.from_pretrained(\"path/to/this/folder\").eval()"]
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


def from_pretrained(path: str | os.PathLike, *, device=None, strict: bool = True, **overrides) -> nn.Module:
    """The model saved by :meth:`ModelBase.save_pretrained` in ``path``: rebuilt from its
    config (``overrides`` replace saved arguments; ``pretrained`` is always False, the weights
    come from the file), with its weights and buffers loaded."""
    from .registry import create_model
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"from_pretrained: {f} not found (expected a folder written by save_pretrained)")
    config = read_json(config_file)
    kwargs = {**config.get("kwargs", {}), **overrides, "pretrained": False}
    model = create_model(config["architecture"], **kwargs)
    if config.get("preprocessing"):
        try:
            model.preprocessing = config["preprocessing"]
        except ValueError as error:
            raise ValueError(f"{config_file}: {error}") from None
    if device is not None:
        model.to(device)
    load_weights(model, weights_file, strict=strict, device=device)
    return model


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


class SegmentationModel(ModelBase):
    """A segmentation model: ``forward(x)`` returns logits (N, num_classes, H, W) at the
    input's resolution for any H and W, or ``(seg_logits, class_logits)`` with ``aux_classes``.

    Any size works because the input is zero-padded at the bottom/right to a multiple of the
    encoder's total stride (``output_stride``, 32 for timm encoders) and the logits are cropped
    back. Every x2 step of the decoder is then exact, so the fused upsampling ops (PixelShuffle,
    EUCB, transposed convs) need no resizing, and the valid region is computed as for an
    input that size; interpolating decoder features to odd skip sizes would instead blur every
    level.

    A U-Net-style architecture passes its ``encoder`` here, sets ``self.bridge`` if it has a
    block on the deepest feature, and calls :meth:`build_unet`; the default
    :meth:`forward_padded` then runs encoder -> bridge -> decoder -> head. Others (U-ResNet's
    two paths) override :meth:`forward_padded`."""

    output_stride: int = 1

    def __init__(self, num_classes: int, aux_classes: int | None = None, aux_channels: int | None = None,
                 encoder: nn.Module | None = None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if aux_classes is not None and (not isinstance(aux_classes, int) or aux_classes < 1):
            raise ValueError(f"aux_classes must be None or a positive int, got {aux_classes!r}")
        self.num_classes, self.aux_classes = num_classes, aux_classes
        if aux_channels is None and encoder is not None:
            aux_channels = encoder.channels[-1]  # the aux head classifies the deepest feature
        self.aux_head = ClassificationHead(aux_channels, aux_classes) if aux_classes else None
        if encoder is not None:
            self.encoder = encoder
            self.output_stride = encoder.output_stride

    def decoder_widths(self, decoder_channels, default) -> tuple:
        """``decoder_channels`` checked against ``self.encoder``'s decoder levels, or for
        ``None`` the architecture's ``default`` fitted to them (:func:`~.blocks.fit_widths`)."""
        return fit_widths(decoder_channels, len(decoder_levels(self.encoder.reductions)), default)

    def build_unet(self, widths, upsample: str, block, **decoder_kwargs) -> None:
        """The half every U-Net-style architecture shares, after ``self.encoder`` (and the
        architecture's ``self.bridge``, if any) are set: ``self.decoder``, a
        :class:`~.blocks.UNetDecoder` of ``block``s with ``widths`` (deepest first) and
        ``upsample``; ``self.head``, the 1x1 head. ``decoder_kwargs`` go to the decoder."""
        check_upsample(upsample)
        if not hasattr(self, "bridge"):
            self.bridge = nn.Identity()  # a plain U-Net: the deepest feature goes straight to the decoder
        self.decoder = UNetDecoder(self.encoder.channels, self.encoder.reductions, widths, upsample, block,
                                   **decoder_kwargs)
        self.head = SegmentationHead(self.decoder.out_channels, self.num_classes)

    def forward_padded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, deepest_feature)`` of an input whose H, W are multiples of ``output_stride``;
        by default the parts :meth:`build_unet` made (``x`` is the decoder's full-resolution
        skip where it takes one)."""
        features = self.encoder(x)
        deepest = features[-1]
        return self.head(self.decoder(self.bridge(deepest), features, x)), deepest

    def forward(self, x: torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected an (N, C, H, W) input, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, self.output_stride)
        logits, deepest = self.forward_padded(padded)
        logits = crop_to(logits, h, w)  # always (nothing to cut at a multiple): no branch on the size
        if self.aux_head is not None:
            return self.activate((logits, self.aux_head(deepest)))
        return self.activate(logits)
