"""CIFAR-10 ResNet-1001, full pre-activation (Table 3: 4.92% error)."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.cifar("cifar10", 1001)
