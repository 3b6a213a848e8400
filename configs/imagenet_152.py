"""ImageNet ResNet-152 v2, full pre-activation (Table 5: 21.1/5.5 top-1/top-5 at 320)."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.imagenet(152)
