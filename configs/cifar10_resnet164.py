"""CIFAR-10 ResNet-164, full pre-activation (Tables 2-3: 5.46% error)."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.cifar("cifar10", 164)
