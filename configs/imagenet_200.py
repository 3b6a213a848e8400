"""ImageNet ResNet-200 v2, full pre-activation (Table 5: 20.7/5.3 top-1/top-5 at 320)."""
from configs import default


def get_config():
    return default.imagenet(200)
