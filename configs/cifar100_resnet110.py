"""CIFAR-100 ResNet-110, full pre-activation."""
from configs import default


def get_config():
    return default.cifar("cifar100", 110)
