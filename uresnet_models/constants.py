"""Names shared by the data code and the command line's parser (no torch import here, so that
``uresnet --help`` stays fast)."""

FORMATS = ("synthetic", "binary", "cityscapes", "sunrgbd", "cifar10", "imagefolder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
EXPORT_FORMATS = ("onnx", "pt2", "aoti")  # uresnet_models.export
LOSSES = ("ce", "bce_dice", "dice", "jaccard", "focal", "tversky", "lovasz")
DEFAULT_ENCODER = "default"  # encoder: the architecture's own default
