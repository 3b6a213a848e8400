"""CIFAR-10 ResNet-1001 with the original post-activation unit (Table 3: 7.61% error)."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.cifar("cifar10", 1001, "original")
