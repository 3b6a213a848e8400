"""A short real run: a small pre-activation ResNet on CIFAR-10, minutes on a laptop CPU.

The README's "run" command. ResNet-14 (basic full pre-activation units, 0.17M parameters)
for two epochs' worth of steps at batch 64 with a cosine schedule, evaluated on the whole
CIFAR-10 test set at steps 750 and 1500, where it also checkpoints. What it reaches, and in how
long on which machine: the table of configs in README.md.
"""
from resnet_v2_jax import base_config


def get_config():
    config = base_config.cifar("cifar10", 14)
    config.batch_size = 64
    config.base_batch_size = 64
    config.num_train_steps = 1500
    config.lr_schedule = "cosine"
    config.warmup = "linear"
    config.warmup_steps = 100
    config.log_every_steps = 50
    config.eval_every_steps = 750
    config.checkpoint_every_steps = 750
    config.eval_batch_size = 1000
    return config
