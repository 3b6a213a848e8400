"""Shared base config: every other config starts from `get_config()` here.

Keys that the Flax ImageNet example also has keep its names (`dataset`, `batch_size` as the
GLOBAL batch, `learning_rate`, `momentum`, `num_epochs`, `num_train_steps`, `log_every_steps`,
`steps_per_eval`, `half_precision`, `cache`). Defaults are the paper's CIFAR recipe
(docs/paper.md, "Training recipes"): ResNet-164 with full pre-activation, batch 128, lr 0.1.
"""
import ml_collections
from ml_collections import config_dict


def get_config():
    config = ml_collections.ConfigDict()

    # Data (resnet_v2_jax.input_pipeline).
    config.dataset = "cifar10"            # any tfds image classification dataset
    config.data_dir = config_dict.placeholder(str)  # tfds data_dir, local or gs://; None: default
    config.input_pipeline = "tfds"        # "tfds" (tf.data on the host) or "device_resident"
    config.array_dir = config_dict.placeholder(str)  # device_resident: <dataset>_<split>.npz
    config.train_split = "train"         # tfds split to train on (any split expression)
    config.eval_split = "test"           # tfds split evaluated (whole, tail padded and masked)
    config.batch_size = 128               # global batch over all devices of all processes
    config.eval_batch_size = 500          # global; the last batch is padded and masked
    config.cache = True                   # cache decoded examples in host memory
    config.shuffle_buffer_size = 50_000   # tf.data shuffle buffer, in examples
    config.image_size = 32                # training crop size
    config.eval_crop_sizes = (32,)        # ImageNet: (224, 320)
    config.eval_resize_ratio = 0.875      # JPEG eval: shorter side to crop / ratio (224 <- 256)
    config.augment = "pad_crop_flip"      # CIFAR: pad_crop_flip; ImageNet: scale | scale_aspect
    config.color_augment = False          # ImageNet colour augmentation
    config.augment_on_device = True       # ImageNet: flip + colour in the train step, not on the
                                          # host (resnet_v2_jax/augment.py)
    config.antialias = False              # ImageNet: low-pass filter before a shrinking resize
    config.seed = 0                       # initialisation, data order and augmentation draws

    # Model (resnet_v2_jax.models).
    config.arch = "cifar"                 # "cifar" or "imagenet" (docs/paper.md)
    config.depth = 164                    # CIFAR: 6n+2 basic, 9n+2 bottleneck; ImageNet: 18..200
    config.block = "bottleneck"           # "bottleneck" or "basic"
    config.unit = "full_preact"           # Fig. 4: original | bn_after_add | relu_before_add |
                                          #         relu_preact | full_preact
    config.shortcut = "identity"          # Fig. 2: identity | scaling | exclusive_gate |
                                          #         shortcut_gate | conv | dropout
    config.shortcut_scale = 0.5           # "scaling" only: lambda on the shortcut
    config.residual_scale = 1.0           # "scaling" only: lambda on F
    config.gate_bias_init = 0.0           # gating only: b_g
    config.shortcut_dropout_rate = 0.5    # "dropout" only
    config.stride_on = ""                 # "1x1" | "3x3" | "" = the arch's default
    config.stem_norm = "before_pool"      # ImageNet only: "before_pool" (paper) | "after_pool" (timm)
    config.scan_units = False             # nn.scan over the identical units of a stage
    config.remat_units = False            # nn.remat each unit (memory for compute)
    config.half_precision = False         # bf16 compute; params, BN statistics, loss stay float32
    config.float64 = False                # float64 params and compute (jax_enable_x64): for exact
                                          # equivalence tests, not for training
    config.bn_momentum = 0.9              # Torch's BN momentum 0.1
    config.bn_epsilon = 1e-5              # BN epsilon (Torch's default)
    config.bn_group_size = 0              # devices per BN group: 0 = all devices, 1 = per device
    config.input_resize = 0               # resize the normalised input to this size on the device
                                          # (fine-tuning at a higher resolution); 0 = as loaded

    # Fine-tuning (resnet_v2_jax.pretrained): where a new run's weights start.
    config.init_from = ""                 # a run's workdir or step folder, or a weights file
                                          # (export .safetensors; timm .safetensors/.npz/.pth);
                                          # "" = random init. Ignored when resuming.
    config.train_backbone = True          # False: only the classifier head is updated
    config.train_bn_statistics = True     # False: BN uses and keeps its running averages

    # Optimisation (resnet_v2_jax.train).
    config.learning_rate = 0.1            # at base_batch_size; scaled linearly by batch_size
    config.base_batch_size = 128          # batch size learning_rate is given for
    config.momentum = 0.9                 # SGD momentum
    config.nesterov = True                # the released code's choice
    config.weight_decay = 1e-4            # L2 penalty added to the gradient (Torch's SGD)
    config.weight_decay_bn_and_bias = True  # authors' code decays every parameter
    config.lr_schedule = "steps"          # "steps" or "cosine"
    config.lr_boundaries_epochs = (81, 122)  # "steps": x lr_decay_factor at these epochs
    config.lr_boundaries_steps = ()       # or at these steps (takes precedence when set)
    config.lr_decay_factor = 0.1          # "steps": factor at each boundary
    config.warmup = "none"                # "none" | "constant" (paper appendix) | "linear"
    config.warmup_steps = 400             # length of the warm-up, in steps
    config.warmup_learning_rate = 0.01    # "constant" warm-up value
    config.num_epochs = 164.0             # training length in epochs of the train split
    config.num_train_steps = -1           # > 0 overrides num_epochs

    # Loop, evaluation, checkpoints, logging.
    config.parallelism = "shard_map"      # "shard_map" or "pmap"
    config.log_every_steps = 100          # training metrics to the log and TensorBoard
    config.eval_every_steps = 0           # 0 = once per epoch
    config.steps_per_eval = -1            # -1 = the whole eval split
    config.checkpoint_every_steps = 1000  # Orbax checkpoint interval (and at the end)
    config.keep_checkpoints = 3           # checkpoints kept (the newest)
    return config


def cifar(dataset: str, depth: int, unit: str = "full_preact", **overrides):
    """The paper's CIFAR recipe (appendix; released code): batch 128, lr 0.1, Nesterov momentum,
    weight decay 1e-4 on every parameter, x0.1 at epochs 81 and 122 (32k and 48k iterations),
    164 epochs (64k iterations). ResNet-110 and shallower use basic units, deeper bottlenecks.
    Post-activation ("original") units and ResNet-1001 get the appendix's warm-up (lr 0.01 for
    400 iterations); it is "not necessary" for the proposed unit but harmless."""
    config = get_config()
    config.dataset = dataset
    config.depth = depth
    config.block = "basic" if depth <= 110 else "bottleneck"
    config.unit = unit
    if unit != "full_preact" or depth >= 1001:
        config.warmup = "constant"
    config.scan_units = depth >= 1001  # compile time independent of depth
    _override(config, overrides)
    return config


def imagenet(depth: int, unit: str = "full_preact", **overrides):
    """fb.resnet.torch's ImageNet recipe (Table 5): batch 256, lr 0.1 per 256 images, x0.1 at
    epochs 30 and 60, 90 epochs, scale augmentation, single 224 and 320 centre crops."""
    config = get_config()
    config.dataset = "imagenet2012"
    config.arch = "imagenet"
    config.depth = depth
    config.unit = unit
    config.eval_split = "validation"
    config.batch_size = 256
    config.base_batch_size = 256
    config.eval_batch_size = 400
    config.image_size = 224
    config.eval_crop_sizes = (224, 320)
    config.augment = "scale"
    config.color_augment = True
    config.shuffle_buffer_size = 16_384
    config.cache = False
    config.lr_boundaries_epochs = (30, 60)
    config.num_epochs = 90.0
    config.checkpoint_every_steps = 2000
    config.log_every_steps = 200
    _override(config, overrides)
    return config


def _override(config, overrides):
    for key, value in overrides.items():
        if key not in config:
            raise ValueError(f"unknown config key {key!r}")
        config[key] = value
