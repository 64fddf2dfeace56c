"""torch.hub entry points: ``torch.hub.load("path/to/uresnet", "unet", source="local", encoder="resnet18",
num_classes=2)`` (or ``"owner/uresnet"`` from GitHub). Each registered architecture is an entry
point taking :func:`uresnet_models.create_model`'s keyword arguments; ``pretrained=True`` loads
the encoder's timm weights (there are no released weights for the whole models)."""
import uresnet_models

dependencies = ["torch", "timm"]


def _entry(name: str):
    def entry(**kwargs):
        return uresnet_models.create_model(name, **kwargs)
    entry.__name__ = name
    entry.__doc__ = f"uresnet_models.create_model({name!r}, **kwargs)"
    return entry


for _name in uresnet_models.list_models():
    globals()[_name] = _entry(_name)
