"""CIFAR-100 ResNet-164 with the original post-activation unit (Table 3: 25.16% error)."""
from configs import default


def get_config():
    return default.cifar("cifar100", 164, "original")
