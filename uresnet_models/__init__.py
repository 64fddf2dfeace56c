"""uresnet_models: the seed architectures (U-ResNet, DeResUNet, ResNet50 U-Net with atrous
blocks, Residual U-Net, U-Net) built from uresnet_ops and timm encoders. The registry and the
architectures come with the model-library issue."""
