"""uresnet_models: the seed architectures (U-ResNet, DeResUNet, ResNet50 U-Net with atrous
blocks, Residual U-Net, U-Net) built from uresnet_ops modules and any timm encoder.

    import uresnet_models
    model = uresnet_models.create_model("uresnet", encoder="resnet34", num_classes=19)
    uresnet_models.list_models("*resunet*")
    model.save_pretrained("ckpt/"); model = uresnet_models.from_pretrained("ckpt/")  # or a Hub id

The names below are imported on first use, so that importing the package (and the ``uresnet``
command's ``--help``) does not import torch.
"""
import importlib

__version__ = "0.1.0"  # the same as uresnet_ops and pyproject.toml

_EXPORTS = {
    ".registry": ["create_model", "list_models", "register_model", "is_model", "model_entrypoint",
                  "count_parameters", "UnknownModelError", "ENTRY_POINT_GROUP"],
    ".base": ["ModelBase", "SegmentationModel"],
    ".hub": ["from_pretrained", "HubMixin"],
    ".encoders": ["Encoder", "TimmEncoder", "DualEncoder", "create_encoder", "get_preprocessing"],
    ".architectures": ["UResNet", "UResNetClassifier", "DeResUNet", "ResUNetAtrous", "ResUNet", "UNet"],
    ".constants": ["DEFAULT_ENCODER"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = ("architectures", "base", "benchmark", "blocks", "checkpoint", "cli", "constants", "data", "demo",
               "distributed", "encoders", "errors", "export", "heads", "hub", "losses", "metrics", "plots", "predict",
               "registry", "train")

__all__ = [name for names in _EXPORTS.values() for name in names] + ["__version__"]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'uresnet_models' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
