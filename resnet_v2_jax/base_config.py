"""The shared base config: every config starts from `get_config()` here, or from the recipes
`cifar` and `imagenet` built on it. Its public path, `from resnet_v2_jax import base_config`,
is what the shipped configs import, so a config copied anywhere and edited still loads
(docs/using.md); `configs/default.py` is this config as a config file.

Keys that the Flax ImageNet example also has keep its names (`dataset`, `batch_size` as the
GLOBAL batch, `learning_rate`, `momentum`, `num_epochs`, `num_train_steps`, `log_every_steps`,
`steps_per_eval`, `half_precision`, `cache`). The network is its own section, `config.model`,
handed to `resnet_v2_jax.models.create(**config.model)`: every key of it is an argument of the
network (override one with `--config.model.depth=110`), and what it means is the network's own
declaration of it (`models.ResNetV2`, `models.FACTORY_ARGUMENTS`; `--print_config` prints it).
Defaults are the paper's CIFAR recipe (docs/paper.md, "Training recipes"): ResNet-164 with full
pre-activation, batch 128, lr 0.1.

The pieces below build the other configs: `cifar_model` / `imagenet_model` (a network),
`imagenet_data` (ImageNet's input keys), and the recipes `cifar` and `imagenet`.
"""
import ml_collections
from ml_collections import config_dict

from resnet_v2_jax import errors


def get_config():
    config = ml_collections.ConfigDict()

    # Data (resnet_v2_jax.inputs).
    config.dataset = "cifar10"            # any tfds image classification dataset
    config.data_dir = config_dict.placeholder(str)  # tfds data_dir, local or gs://; None: default
    config.input_pipeline = "tfds"        # "tfds" (tf.data on the host) or "device_resident"
    config.array_dir = config_dict.placeholder(str)  # device_resident: <dataset>_<split>.npz
    config.train_split = "train"         # tfds split to train on (any split expression)
    config.eval_split = "test"           # tfds split evaluated (whole, tail padded and masked)
    config.batch_size = 128               # global batch over all devices of all processes
    config.eval_batch_size = 512          # global (a power of two: splits over any slice);
                                          # the last batch is padded and masked
    config.cache = True                   # cache decoded examples in host memory
    config.shuffle_buffer_size = 50_000   # tf.data shuffle buffer, in examples
    config.image_size = 32                # training crop size
    config.eval_crop_sizes = (32,)        # ImageNet: (224, 320)
    config.eval_resize_ratio = 0.875      # JPEG eval: shorter side to crop / ratio (224 <- 256)
    config.augment = "pad_crop_flip"      # CIFAR: pad_crop_flip; ImageNet: scale | scale_aspect
    config.color_augment = False          # ImageNet colour augmentation (in the train step)
    config.antialias = False              # ImageNet: low-pass filter before a shrinking resize
    config.seed = 0                       # initialisation, data order and augmentation draws

    # The network (resnet_v2_jax.models.create): see cifar_model and imagenet_model below.
    config.model = cifar_model(164)

    # Several independent runs of this config in one program (resnet_v2_jax.recipe): run k has
    # seed + k. Results report each run and the median, mean and std over them.
    config.num_runs = 1                   # runs trained together; 1 = a single run
    config.runs_layout = "auto"           # how a device computes its runs: "vmap" (vectorised),
                                          # "unrolled" (one copy each) or "auto" (per platform)
    config.share_batches = False          # every run sees the same batches and augmentation

    # How the network runs (not part of what it computes).
    config.half_precision = False         # bf16 compute; params, BN statistics, loss stay float32
    config.float64 = False                # float64 params and compute (jax_enable_x64): for exact
                                          # equivalence tests, not for training
    config.bn_group_size = 0              # devices per BN group: 0 = all devices, 1 = per device
    config.input_resize = 0               # resize the normalised input to this size on the device
                                          # (fine-tuning at a higher resolution); 0 = as loaded

    # Fine-tuning (resnet_v2_jax.pretrained): where a new run's weights start.
    config.init_from = ""                 # a run's workdir or step folder, or a weights file
                                          # (export .safetensors; timm .safetensors/.npz/.pth);
                                          # "" = random init. Ignored when resuming.
    config.init_from_run = -1             # a source of several runs (num_runs): which run;
                                          # -1 = a source of one run
    config.train_backbone = True          # False: only the classifier head is updated
    config.train_bn_statistics = True     # False: BN uses and keeps its running averages

    # Optimisation (resnet_v2_jax.recipe).
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

    # Loop, evaluation, checkpoints, logging (resnet_v2_jax.train).
    config.parallelism = "shard_map"      # "shard_map" or "pmap"
    config.log_every_steps = 100          # training metrics to the log and TensorBoard
    config.eval_every_steps = 0           # 0 = once per epoch
    config.steps_per_eval = -1            # -1 = the whole eval split
    config.checkpoint_every_steps = 1000  # Orbax checkpoint interval (and at the end)
    config.keep_checkpoints = 3           # checkpoints kept (the newest)
    return config


def _unit_options(model, unit: str):
    model.unit = unit
    model.shortcut = "identity"
    model.shortcut_scale = 0.5
    model.residual_scale = 1.0
    model.gate_bias_init = 0.0
    model.shortcut_dropout_rate = 0.5
    model.norm = "batch"
    model.norm_groups = 32
    model.conv = "plain"
    model.conv_epsilon = 1e-8
    model.bn_momentum = 0.9
    model.bn_epsilon = 1e-5


def cifar_model(depth: int, unit: str = "full_preact", **options):
    """The `model` section of a CIFAR network of resnet-pre-act.lua, as docs/paper.md describes
    them ("CIFAR networks"): basic units up to ResNet-110, bottlenecks above (ResNet-164,
    ResNet-1001, whose units run scanned so that compile time does not grow with depth)."""
    model = ml_collections.ConfigDict()
    model.arch = "cifar"
    model.depth = depth
    model.block = "basic" if depth <= 110 else "bottleneck"
    model.stride_on = "1x1"
    _unit_options(model, unit)
    model.scan_units = depth >= 1001
    model.remat_units = False
    return _override(model, options)


def imagenet_model(depth: int, unit: str = "full_preact", **options):
    """The `model` section of an ImageNet network of fb.resnet.torch's preresnet.lua, as
    docs/paper.md describes them ("ImageNet networks"); depth sets the block."""
    model = ml_collections.ConfigDict()
    model.arch = "imagenet"
    model.depth = depth
    model.stem_norm = "before_pool"
    model.stem_pool_pad = "-inf"
    model.stride_on = "3x3"
    _unit_options(model, unit)
    model.scan_units = False
    model.remat_units = False
    return _override(model, options)


def imagenet_data(config):
    """ImageNet's input keys (Table 5): scale augmentation and colour in training, single centre
    crops at 224 and 320 in evaluation; JPEGs are read from storage, not cached."""
    config.dataset = "imagenet2012"
    config.eval_split = "validation"
    config.image_size = 224
    config.eval_crop_sizes = (224, 320)
    config.eval_batch_size = 512
    config.augment = "scale"
    config.color_augment = True
    config.shuffle_buffer_size = 16_384
    config.cache = False
    return config


def cifar(dataset: str, depth: int, unit: str = "full_preact", **overrides):
    """The paper's CIFAR recipe (appendix; released code): batch 128, lr 0.1, Nesterov momentum,
    weight decay 1e-4 on every parameter, x0.1 at epochs 81 and 122 (32k and 48k iterations),
    164 epochs (64k iterations). Post-activation ("original") units and ResNet-1001 get the
    appendix's warm-up (lr 0.01 for 400 iterations); it is "not necessary" for the proposed unit
    but harmless. `overrides` name keys of the config or of its model section."""
    config = get_config()
    config.dataset = dataset
    config.model = cifar_model(depth, unit)
    if unit != "full_preact" or depth >= 1001:
        config.warmup = "constant"
    return _override(config, overrides)


def imagenet(depth: int, unit: str = "full_preact", **overrides):
    """fb.resnet.torch's ImageNet recipe (Table 5): batch 256, lr 0.1 per 256 images, x0.1 at
    epochs 30 and 60, 90 epochs, scale augmentation, single 224 and 320 centre crops."""
    config = imagenet_data(get_config())
    config.model = imagenet_model(depth, unit)
    config.batch_size = 256
    config.base_batch_size = 256
    config.lr_boundaries_epochs = (30, 60)
    config.num_epochs = 90.0
    config.checkpoint_every_steps = 2000
    config.log_every_steps = 200
    return _override(config, overrides)


def _override(config, overrides):
    """Sets each key of `overrides` in `config`, or in its model section where it is a network
    option; a key that is neither raises."""
    for key, value in overrides.items():
        if key in config:
            config[key] = value
        elif "model" in config and key in config.model:
            config.model[key] = value
        else:
            raise errors.ConfigError(f"unknown config key {key!r}")
    return config
