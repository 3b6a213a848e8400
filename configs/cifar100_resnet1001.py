"""CIFAR-100 ResNet-1001, full pre-activation (Table 3: 22.71% error)."""
from configs import default


def get_config():
    return default.cifar("cifar100", 1001)
