"""Table 2's unit placements (and Table 1's constant scaling) at the size of a 2-core CPU.

ResNet-20 on CIFAR-10, 700 steps at batch 128 (under 2 epochs), the same schedule for every
unit (cosine from lr 0.1 after 100 linear warm-up steps), evaluated on the whole test set every
175 steps. About 8 minutes per run on a 2-core CPU, about 19 for three in one program;
docs/reproduction.md has four rows of three runs each, their curves and what they show:

    python -m resnet_v2_jax.main --config=configs/cifar10_cpu_ablation.py:unit=original \
        --config.num_runs=3 --workdir=/tmp/cpu_ablation/original

Any key of configs/ablation.py may be given the same way (e.g. `:depth=32`, or
`:unit=original,shortcut=scaling,shortcut_scale=0.5,residual_scale=0.5`).
"""
from configs import ablation


def get_config(arg: str = ""):
    config = ablation.get_config("depth=20,unit=full_preact," + (arg or ""))
    config.num_train_steps = 700
    config.lr_schedule = "cosine"
    config.warmup = "linear"  # one schedule for all units, so only the unit differs
    config.warmup_steps = 100
    config.log_every_steps = 25
    config.eval_every_steps = 175
    config.checkpoint_every_steps = 350
    config.eval_batch_size = 1000
    return config
