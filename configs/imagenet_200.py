"""ImageNet ResNet-200 v2, full pre-activation (Table 5: 20.7/5.3 top-1/top-5 at 320)."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.imagenet(200)
