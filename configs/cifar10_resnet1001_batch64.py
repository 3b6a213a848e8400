"""CIFAR-10 ResNet-1001 with batch 64 for 200 epochs, lr 0.1 (Table 4: 4.62% error).

The released code keeps its epoch boundaries (81, 122) for this run."""
from resnet_v2_jax import base_config


def get_config():
    return base_config.cifar("cifar10", 1001, batch_size=64, base_batch_size=64, num_epochs=200.0)
