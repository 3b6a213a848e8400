"""CIFAR-10 ResNet-1001, full pre-activation (Table 3: 4.92% error)."""
from configs import default


def get_config():
    return default.cifar("cifar10", 1001)
