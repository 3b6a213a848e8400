"""CIFAR-100 ResNet-1001 with the original post-activation unit (Table 3: 27.82% error)."""
from configs import default


def get_config():
    return default.cifar("cifar100", 1001, "original")
