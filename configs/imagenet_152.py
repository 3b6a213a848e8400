"""ImageNet ResNet-152 v2, full pre-activation (Table 5: 21.1/5.5 top-1/top-5 at 320)."""
from configs import default


def get_config():
    return default.imagenet(152)
