"""One file per registered architecture; importing this package registers them."""
from .deresunet import DeResUNet
from .resunet import ResUNet
from .resunet_atrous import ResUNetAtrous
from .unet import UNet
from .uresnet import UResNet, UResNetClassifier

__all__ = ["UResNet", "UResNetClassifier", "DeResUNet", "ResUNetAtrous", "ResUNet", "UNet"]
