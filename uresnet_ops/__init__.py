"""uresnet_ops: fused PixelShuffle+BatchNorm, channel-shuffle upsampling (EUCB) and
multi-dilation atrous convolution, as torch ops with autograd and several backends.

    import uresnet_ops
    y = uresnet_ops.pixel_shuffle_bn(x, 2, weight, bias, running_mean, running_var)
    with uresnet_ops.use_backend("reference"):
        ...
"""
from . import _library  # noqa: F401  (loads the compiled kernels first)
from .backends import available_backends, get_backend, register_backend, set_backend, use_backend
from .multi_dilation_conv2d import multi_dilation_conv2d
from .pixel_shuffle_bn import pixel_shuffle_bn
from .shuffle_upsample import shuffle_upsample
from . import triton as _triton  # noqa: F401  (registers the Triton backends where importable)
from . import nn, plain, reference
from .fuse import fuse, unfuse
from . import export
from .backends import set_backend_from_environment

set_backend_from_environment()  # URESNET_BACKEND, once every backend is registered

__version__ = "0.1.0"
__all__ = [
    "pixel_shuffle_bn", "shuffle_upsample", "multi_dilation_conv2d",
    "available_backends", "get_backend", "register_backend", "set_backend", "use_backend",
    "nn", "plain", "reference", "fuse", "unfuse", "export",
]
