"""ImageNet ResNet-200 with the original post-activation unit (Table 5: 21.8/6.0 at 320)."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.imagenet(200, "original")
