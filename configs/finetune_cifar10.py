"""Fine-tuning an ImageNet ResNet-50 v2 on CIFAR-10 (resnet_v2_jax.pretrained).

    python -m resnet_v2_jax.main --config=configs/finetune_cifar10.py \
        --config.init_from=/path/to/resnetv2_50.safetensors --workdir=/tmp/finetune_cifar10

`init_from` is required: timm's `resnetv2_50` weights (the Hugging Face hub's
`timm/resnetv2_50.a1h_in1k/model.safetensors`, or any state dict saved as .safetensors, .npz
or .pth), a file written by `python -m resnet_v2_jax.export`, or an ImageNet run's workdir of
this project trained with `stem_norm="after_pool"`. The backbone loads, the 1000-class head is
replaced by a fresh 10-class one. timm's stem applies its BN-ReLU after the max-pool, hence
`stem_norm="after_pool"` (set `"before_pool"` for this project's own paper-layout runs).

The recipe is the usual transfer one, not the paper's (which trains from scratch): CIFAR's
32 px images are upsampled on the device to 128 px (`input_resize`), so the network sees
objects at about the scale it learnt them; SGD with Nesterov momentum at lr 0.01 per 128 images
(a tenth of training from scratch), 100 linear warm-up steps, cosine decay over 5,000 steps
(about 13 epochs), no weight decay. `train_backbone=False` trains only the head (a linear
probe), `train_bn_statistics=False` keeps ImageNet's BN statistics.
"""
from ml_collections import config_dict

from resnet_v2_jax import base_config


def get_config():
    config = base_config.get_config()  # CIFAR-10 input as the paper trains it
    config.model = base_config.imagenet_model(50, stem_norm="after_pool")
    config.input_resize = 128
    config.init_from = config_dict.placeholder(str)  # required: see above
    config.learning_rate = 0.01
    config.weight_decay = 0.0
    config.lr_schedule = "cosine"
    config.warmup = "linear"
    config.warmup_steps = 100
    config.num_train_steps = 5000
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.log_every_steps = 50
    return config
