"""CIFAR-100 ResNet-164, full pre-activation (Table 3: 24.33% error)."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.cifar("cifar100", 164)
