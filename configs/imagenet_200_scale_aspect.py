"""ImageNet ResNet-200 v2 with scale + aspect-ratio augmentation (Table 5: 20.1/4.8 at 320)."""
from configs import default


def get_config():
    return default.imagenet(200, augment="scale_aspect")
