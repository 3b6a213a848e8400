"""ImageNet ResNet-200 v2 with scale + aspect-ratio augmentation (Table 5: 20.1/4.8 at 320)."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.imagenet(200, augment="scale_aspect")
