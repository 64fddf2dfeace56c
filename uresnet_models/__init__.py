"""uresnet_models: the seed architectures (U-ResNet, DeResUNet, ResNet50 U-Net with atrous
blocks, Residual U-Net, U-Net) built from uresnet_ops modules and any timm encoder.

    import uresnet_models
    model = uresnet_models.create_model("uresnet", encoder="resnet34", num_classes=19)
    uresnet_models.list_models("*resunet*")
    model.save_pretrained("ckpt/"); model = uresnet_models.from_pretrained("ckpt/")
"""
from .registry import (ENTRY_POINT_GROUP, UnknownModelError, count_parameters, create_model, is_model,
                       list_models, model_entrypoint, register_model)
from .base import ModelBase, SegmentationModel, from_pretrained  # noqa: E402
from .encoders import DualEncoder, Encoder, TimmEncoder, create_encoder  # noqa: E402
from . import architectures  # noqa: E402,F401  (registers the built-in architectures)
from .architectures import DeResUNet, ResUNet, ResUNetAtrous, UNet, UResNet, UResNetClassifier  # noqa: E402

__all__ = [
    "create_model", "list_models", "register_model", "from_pretrained", "is_model", "model_entrypoint",
    "count_parameters", "UnknownModelError", "ENTRY_POINT_GROUP",
    "ModelBase", "SegmentationModel", "Encoder", "TimmEncoder", "DualEncoder", "create_encoder",
    "UResNet", "UResNetClassifier", "DeResUNet", "ResUNetAtrous", "ResUNet", "UNet",
]
