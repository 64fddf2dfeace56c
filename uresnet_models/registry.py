"""The model registry: ``register_model``, ``create_model``, ``list_models`` and third-party
architectures from the entry-point group ``uresnet_models.architectures``.

A plugin distribution declares, in its pyproject.toml::

    [project.entry-points."uresnet_models.architectures"]
    my_net = "my_package.models:build_my_net"   # a builder (class or function), or
    more = "my_package.models"                  # a module that calls @register_model itself

Entry points are listed by :func:`list_models` without being imported; one is loaded the
first time :func:`create_model` asks for it (a broken plugin warns, it never breaks the
library). A builder takes the keyword arguments of :func:`create_model`.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import warnings
from importlib import metadata
from typing import Callable, Iterable

from torch import nn

from .constants import DEFAULT_ENCODER

__all__ = ["register_model", "create_model", "list_models", "is_model", "model_entrypoint", "count_parameters",
           "UnknownModelError", "ENTRY_POINT_GROUP", "SMP_NAMES"]

ENTRY_POINT_GROUP = "uresnet_models.architectures"
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_PLUGINS: dict[str, metadata.EntryPoint] | None = None  # name -> entry point not loaded yet


class UnknownModelError(ValueError):
    """``create_model`` was asked for a name that is not registered."""


def register_model(fn=None, *, name: str | None = None):
    """Register a model builder (an ``nn.Module`` class or a function returning one).

    Usable as ``@register_model``, ``@register_model("name")`` or ``@register_model(name=...)``.
    The default name is a function's ``__name__``, or a class's ``__name__.lower()``.
    Registering a name again replaces it (with a warning when it is another builder)."""
    if isinstance(fn, str):
        fn, name = None, fn

    def decorate(builder):
        if not callable(builder):
            raise TypeError(f"register_model: expected a class or function, got {type(builder).__name__}")
        key = name or (builder.__name__.lower() if inspect.isclass(builder) else builder.__name__)
        if not isinstance(key, str) or not key:
            raise ValueError(f"register_model: invalid name {key!r}")
        old = _REGISTRY.get(key)
        if old is not None and old is not builder and getattr(old, "__qualname__", None) != builder.__qualname__:
            warnings.warn(f"register_model: {key!r} was already registered ({old!r}); replacing it", stacklevel=3)
        _REGISTRY[key] = builder
        return builder

    return decorate if fn is None else decorate(fn)


def _entry_points() -> list[metadata.EntryPoint]:
    """The installed entry points of :data:`ENTRY_POINT_GROUP` (tests monkeypatch this)."""
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def _plugins() -> dict[str, metadata.EntryPoint]:
    global _PLUGINS
    if _PLUGINS is None:
        try:
            eps = _entry_points()
        except Exception as error:  # noqa: BLE001 - a broken environment must not break the library
            warnings.warn(f"uresnet_models: could not read the {ENTRY_POINT_GROUP!r} entry points: {error}",
                          stacklevel=2)
            eps = []
        _PLUGINS = {ep.name: ep for ep in eps}
    return _PLUGINS


def reload_plugins() -> None:
    """Forget the entry points read so far; the next lookup reads them again."""
    global _PLUGINS
    _PLUGINS = None


def _load_plugin(name: str) -> None:
    ep = _plugins().pop(name, None)
    if ep is None:
        return
    try:
        obj = ep.load()
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"uresnet_models: the plugin architecture {name!r} ({ep.value}) failed to load: "
                      f"{type(error).__name__}: {error}", stacklevel=2)
        return
    if name not in _REGISTRY and callable(obj) and not inspect.ismodule(obj):
        register_model(obj, name=name)  # a builder: register it under the entry point's name


_BUILTINS = {"uresnet": "UResNet", "uresnet_cls": "UResNetClassifier", "deresunet": "DeResUNet",
             "resunet_atrous": "ResUNetAtrous", "resunet": "ResUNet", "unet": "UNet"}


def _builtins() -> None:
    """Make sure the built-in architectures are registered (``import uresnet_models`` does not
    import them, so that the command line's ``--help`` needs no torch); one registered again
    under the same name by the user stays the user's."""
    from . import architectures
    for name, cls in _BUILTINS.items():
        _REGISTRY.setdefault(name, getattr(architectures, cls))


def list_models(pattern: str | Iterable[str] = "*") -> list[str]:
    """Sorted names of the registered models (plugins included) matching the shell-style
    wildcard ``pattern`` (or any of several patterns), e.g. ``list_models("*resunet*")``."""
    _builtins()
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    names = set(_REGISTRY) | set(_plugins())
    return sorted(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def is_model(name: str) -> bool:
    _builtins()
    return name in _REGISTRY or name in _plugins()


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; an unknown name raises :class:`UnknownModelError`
    suggesting close matches."""
    _builtins()
    if name not in _REGISTRY:
        _load_plugin(name)
    if name not in _REGISTRY:
        names = list_models()
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Registered models: {', '.join(names)}")
    return _REGISTRY[name]


def _accepted(builder) -> tuple[set[str], bool]:
    """The keyword arguments ``builder`` accepts, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def create_model(name: str, *, encoder=DEFAULT_ENCODER, in_channels: int = 3, num_classes: int = 1,
                 aux_classes: int | None = None, pretrained: bool = False, activation=None, fused: bool = True,
                 **kwargs) -> nn.Module:
    """Build the registered model ``name``.

    ``encoder``: a timm model name that supports ``features_only=True`` (or ``None`` for the
    seed's own encoder where the architecture has one); left out or :data:`DEFAULT_ENCODER`
    (``"default"``), the architecture's default.
    ``pretrained``: load the encoder's timm weights (needs them downloaded or cached).
    ``num_classes``: output channels (logits); ``aux_classes``: add a classification head on the
    deepest feature, the model then returns ``(seg_logits, class_logits)``. ``activation``:
    ``None``, ``"sigmoid"``, ``"softmax"``, ``"logsoftmax"``, ``"tanh"`` or a callable, applied
    to the output by ``forward`` (and so by ``model.predict(x)``), as smp's head does; the
    losses take logits, so train without one (``uresnet train`` refuses it) and give it when
    loading: ``from_pretrained(path, activation="softmax")``.
    ``encoder_kwargs={...}`` (architectures with a timm encoder) go to ``timm.create_model``,
    e.g. ``dict(dynamic_img_size=True)``. Other keyword arguments go to the architecture (e.g.
    ``upsample="eucb_star"``, ``decoder_channels``); unknown ones raise a ``TypeError`` naming
    the accepted ones.

    ``fused=False``: the plain model, ``uresnet_ops.unfuse`` of the built one (every fused module
    as the plain PyTorch modules it stands for; same state-dict keys, so weights load both ways),
    the baseline to compare the fused model with; recorded as ``"fused": false`` in
    ``model_config`` (a fused model's config has no entry), so a plain checkpoint reloads plain.

    segmentation_models_pytorch's names work too, where they mean the same (:data:`SMP_NAMES`):
    ``encoder_name=`` for ``encoder``, ``classes=`` for ``num_classes``, ``encoder_weights=None``
    or ``"imagenet"`` (the timm weights) for ``pretrained=False``/``True``; ``in_channels`` and
    ``activation`` are already smp's. Giving both names of one argument is an error (the
    defaults ``num_classes=1`` and ``pretrained=False`` count as not given).

    ``model.model_config`` (saved as ``config.json``) holds every argument of the builder,
    defaults included, so a checkpoint rebuilds the same model after a default changes."""
    from .heads import Activation
    if not isinstance(fused, bool):
        raise TypeError(f"create_model({name!r}): fused must be True (the fused modules) or False (plain PyTorch), "
                        f"got {fused!r}")
    encoder, num_classes, pretrained = _from_smp_names(name, kwargs, encoder, num_classes, pretrained)
    builder = model_entrypoint(name)
    activation_module = Activation(activation)  # checked before the (possibly slow) build
    args = dict(in_channels=in_channels, num_classes=num_classes, aux_classes=aux_classes, pretrained=pretrained,
                **kwargs)
    if encoder != DEFAULT_ENCODER:  # else the builder's own default (which may be None: the seed's encoder)
        args["encoder"] = encoder
    accepted, var_kw = _accepted(builder)
    if "encoder_kwargs" in args and "encoder_kwargs" not in accepted and not var_kw:
        raise TypeError(f"create_model({name!r}): encoder_kwargs given, but {name} takes no timm encoder arguments")
    if not var_kw:
        unknown = [k for k in args if k not in accepted]
        # the common arguments may be left out by a builder as long as the caller kept their defaults
        defaults = dict(in_channels=3, num_classes=1, aux_classes=None, pretrained=False)
        bad = [k for k in unknown if k not in defaults or args[k] != defaults[k]]
        if bad:
            hints = []
            for k in bad:
                close = difflib.get_close_matches(k, sorted(accepted), n=1, cutoff=0.6)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(f"create_model({name!r}): unknown argument(s) {', '.join(hints)}; "
                            f"{name} accepts: {', '.join(sorted(accepted))}")
        for k in unknown:
            args.pop(k)
    model = builder(**args)
    if not isinstance(model, nn.Module):
        raise TypeError(f"create_model({name!r}): the builder returned {type(model).__name__}, not an nn.Module")
    if not fused:
        from uresnet_ops import unfuse
        model = unfuse(model, inplace=True)
    resolved = {**_defaults(builder), **args}
    config = {"architecture": name, "kwargs": model_kwargs(resolved)}
    config["kwargs"]["activation"] = activation
    if not fused:  # left out when fused, so configs written before this argument stay equal
        config["kwargs"]["fused"] = False
    try:
        model.model_config = config
        model.activation = activation_module
    except (AttributeError, TypeError):  # a module that forbids new attributes
        pass
    return model


# segmentation_models_pytorch's argument names -> create_model's
SMP_NAMES = {"encoder_name": "encoder", "classes": "num_classes", "encoder_weights": "pretrained"}


def _from_smp_names(name: str, kwargs: dict, encoder, num_classes, pretrained) -> tuple:
    """``(encoder, num_classes, pretrained)`` with smp's names in ``kwargs`` (removed from it)
    taken for them; both names of one argument raise a ``TypeError``."""
    ours = {"encoder": encoder != DEFAULT_ENCODER, "num_classes": num_classes != 1,
            "pretrained": pretrained is not False}
    for smp_name, our_name in SMP_NAMES.items():
        if smp_name in kwargs and ours[our_name]:
            raise TypeError(f"create_model({name!r}): {smp_name}= (segmentation_models_pytorch's name) and "
                            f"{our_name}= both given; pass one of them")
    encoder = kwargs.pop("encoder_name", encoder)
    num_classes = kwargs.pop("classes", num_classes)
    if "encoder_weights" in kwargs:
        weights = kwargs.pop("encoder_weights")
        if weights not in (None, "imagenet"):
            raise ValueError(f"create_model({name!r}): encoder_weights={weights!r}: expected None or 'imagenet' (the "
                             "timm encoder's pretrained weights); for other weights name a timm tag with "
                             "pretrained=True, e.g. encoder='resnet50.fb_ssl_yfcc100m_ft_in1k'")
        pretrained = weights == "imagenet"
    return encoder, num_classes, pretrained


def _defaults(builder) -> dict:
    """The keyword arguments of ``builder`` that have defaults, with them."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty}


def model_kwargs(arguments: dict) -> dict:
    """A builder's arguments as saved in ``config.json``: JSON values, ``pretrained`` left out
    (weights come from the checkpoint), and a :class:`TimmEncoder` instance as its name and
    ``encoder_kwargs``."""
    from .encoders import TimmEncoder
    out = {k: v for k, v in arguments.items() if k != "pretrained"}
    encoder = out.get("encoder")
    if isinstance(encoder, TimmEncoder):
        out["encoder"] = encoder.name
        out["encoder_kwargs"] = {**encoder.timm_kwargs, **(out.get("encoder_kwargs") or {})}
    return {k: _jsonable(v) for k, v in out.items()}


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def count_parameters(model_or_name, trainable_only: bool = False, **kwargs) -> int:
    """Number of parameters of a model, or of ``create_model(name, **kwargs)`` built on the
    meta device (no memory, no initialisation cost)."""
    import torch
    if isinstance(model_or_name, str):
        with torch.device("meta"):
            model_or_name = create_model(model_or_name, **kwargs)
    return sum(p.numel() for p in model_or_name.parameters() if p.requires_grad or not trainable_only)


def registered_name(builder) -> str | None:
    """The name ``builder`` (a class or function) is registered under, if any."""
    _builtins()
    return next((name for name, b in _REGISTRY.items() if b is builder), None)
