"""CIFAR-10 ResNet-164 with the original post-activation unit (Table 3: 5.93% error)."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.cifar("cifar10", 164, "original")
