"""ImageNet ResNet-200 with the original post-activation unit (Table 5: 21.8/6.0 at 320)."""
from configs import default


def get_config():
    return default.imagenet(200, "original")
