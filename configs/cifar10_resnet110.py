"""CIFAR-10 ResNet-110, full pre-activation (Table 2: 6.37% error)."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.cifar("cifar10", 110)
