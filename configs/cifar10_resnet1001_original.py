"""CIFAR-10 ResNet-1001 with the original post-activation unit (Table 3: 7.61% error)."""
from configs import default


def get_config():
    return default.cifar("cifar10", 1001, "original")
