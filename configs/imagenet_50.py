"""ImageNet ResNet-50 v2, full pre-activation (fb.resnet.torch recipe)."""
from configs import default


def get_config():
    return default.imagenet(50)
