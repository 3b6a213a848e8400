"""CIFAR-100 ResNet-164 with the original post-activation unit (Table 3: 25.16% error)."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.cifar("cifar100", 164, "original")
