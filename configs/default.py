"""The shared base config as a config file (--config=configs/default.py): ResNet-164 on CIFAR-10
with the paper's recipe. Every key, its meaning and the recipe builders are in
resnet_v2_jax/base_config.py, which every config imports."""
from resnet_v2_jax.base_config import get_config

__all__ = ["get_config"]
