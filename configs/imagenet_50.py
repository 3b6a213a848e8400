"""ImageNet ResNet-50 v2, full pre-activation (fb.resnet.torch recipe)."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.imagenet(50)
