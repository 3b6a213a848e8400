"""CIFAR-100 ResNet-1001, full pre-activation (Table 3: 22.71% error)."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.cifar("cifar100", 1001)
