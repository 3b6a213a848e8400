"""CIFAR-100 ResNet-164, full pre-activation (Table 3: 24.33% error)."""
from configs import default


def get_config():
    return default.cifar("cifar100", 164)
