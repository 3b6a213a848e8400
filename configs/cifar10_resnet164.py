"""CIFAR-10 ResNet-164, full pre-activation (Tables 2-3: 5.46% error)."""
from configs import default


def get_config():
    return default.cifar("cifar10", 164)
