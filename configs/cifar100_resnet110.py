"""CIFAR-100 ResNet-110, full pre-activation."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.cifar("cifar100", 110)
