"""CIFAR-10 ResNet-164 with the original post-activation unit (Table 3: 5.93% error)."""
from configs import default


def get_config():
    return default.cifar("cifar10", 164, "original")
