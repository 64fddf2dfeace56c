"""Names shared by the library and the command line's parser (no torch import here, so that
``uresnet --help`` stays fast)."""

FORMATS = ("synthetic", "binary", "masks", "cityscapes", "sunrgbd", "cifar10", "imagefolder", "torchvision")
# --format torchvision --dataset NAME: the torchvision.datasets classes read (uresnet_models.data)
TORCHVISION_DATASETS = ("MNIST", "FashionMNIST", "CIFAR10", "VOCSegmentation", "OxfordIIITPet", "Cityscapes")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
EXPORT_FORMATS = ("onnx", "pt2", "aoti")  # uresnet_models.export
LOSSES = ("ce", "bce_dice", "dice", "jaccard", "focal", "tversky", "lovasz")
DEFAULT_ENCODER = "default"  # encoder= value meaning "the architecture's own default encoder"
OPS = ("pixel_shuffle_bn", "shuffle_upsample", "multi_dilation_conv2d")  # the fused ops of uresnet_ops
MODES = ("eval_fwd", "train_fwd", "train_fwdbwd")  # what `uresnet bench` times of an op
