"""CIFAR-10 ResNet-110, full pre-activation (Table 2: 6.37% error)."""
from configs import default


def get_config():
    return default.cifar("cifar10", 110)
