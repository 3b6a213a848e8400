"""Weight import from BiT checkpoints: the original BiT release and big_vision's `bit_paper`.

Two formats of the same networks (Kolesnikov et al., "Big Transfer"), both npz files of named
arrays in TensorFlow's layouts (HWIO conv kernels):

* the original release (`BiT-S-R50x1.npz`, `BiT-M-R101x3-ILSVRC2012.npz`, ...): names like
  `resnet/block1/unit01/a/standardized_conv2d/kernel`, `.../a/group_norm/gamma`,
  `.../a/proj/standardized_conv2d/kernel`, a 1x1-conv head `resnet/head/conv2d/kernel`;
* big_vision's `models/bit_paper.py` (its checkpoints and `flax.traverse_util` flattenings of
  its params): `block1/unit01/conv1/kernel`, `block1/unit01/gn1/scale` of shape (1, 1, 1, C),
  `root_block/conv_root/kernel`, `norm-pre-head/scale`, `head/kernel`, optionally under
  `params/`.

Both are `models.ResNetV2` with `BIG_VISION_OPTIONS` beside timm's stem order
(`stem_norm="after_pool"`: conv-pool, then each unit pre-activates, the first one sharing its
GroupNorm-ReLU with its projection): GroupNorm with 32 groups and eps 1e-5 (normalising over
spatial positions and each group's channels), convs weight-standardised with eps 1e-10
(`conv_epsilon`; timm's StdConv2d uses 1e-8), the stride on the 3x3 conv, and big_vision's
3x3/2 stem max-pool that pads with -inf. Widths are BiT's: a width multiplier k gives a
64k-channel stem and stages of 256k, 512k, 1024k, 2048k output channels.

        model, variables = big_vision_import.load(arrays)   # arrays: name -> np.ndarray
        logits = model.apply(variables, images_nhwc, train=False)

`pretrained.load_file` (and so `--config.init_from`) reads such npz files. A checkpoint cannot
show its number of groups: pass `norm_groups=` for a network built with other than 32.
"""

import re

import numpy as np

from resnet_v2_jax import errors, models, name_mapping

# What big_vision's bit_paper networks are in `models.ResNetV2`'s options.
BIG_VISION_OPTIONS = dict(stem="imagenet", stem_norm="after_pool", bottleneck=True,
                          stride_on="3x3", unit="full_preact", shortcut="identity", norm="group",
                          norm_groups=32, bn_epsilon=1e-5, conv="weight_standardized",
                          conv_epsilon=1e-10, stem_pool_pad="-inf")

# The original release's names -> big_vision's (after `resnet/` is stripped).
_RELEASE_NAMES = [
    (re.compile(r"root_block/standardized_conv2d(_\d+)?/kernel"), "root_block/conv_root/kernel"),
    (re.compile(r"group_norm/gamma"), "norm-pre-head/scale"),
    (re.compile(r"group_norm/beta"), "norm-pre-head/bias"),
    (re.compile(r"head/conv2d/(kernel|bias)"), r"head/\1"),
    (re.compile(r"(block\d+/unit\d+)/a/proj/standardized_conv2d(_\d+)?/kernel"),
     r"\1/conv_proj/kernel"),
]
_RELEASE_LAYERS = {"a": "1", "b": "2", "c": "3"}
_RELEASE_UNIT = re.compile(r"(block\d+/unit\d+)/([abc])/(standardized_conv2d(?:_\d+)?/kernel|"
                           r"group_norm/gamma|group_norm/beta)")
_UNIT = re.compile(r"block(\d+)/unit(\d+)/")
# Our module names -> big_vision's, for those not renamed by a pattern.
_MODULES = {"stem_conv": "root_block/conv_root", "final_bn": "norm-pre-head", "head": "head",
            "proj_conv": "conv_proj"}


def is_big_vision(arrays) -> bool:
    """Whether a dict of named arrays is a BiT checkpoint in either format."""
    return any(k.startswith("resnet/root_block/") or k.endswith("root_block/conv_root/kernel")
               for k in arrays)


def to_big_vision_names(arrays) -> dict:
    """The weights of a BiT checkpoint in either format under big_vision's flat names (no
    `params/` prefix), TensorFlow layouts kept."""
    if any(k.startswith("resnet/") for k in arrays):
        renamed = {}
        for key, value in arrays.items():
            name = key[len("resnet/"):] if key.startswith("resnet/") else key
            for pattern, replacement in _RELEASE_NAMES:
                if pattern.fullmatch(name):
                    name = pattern.sub(replacement, name)
                    break
            else:
                unit = _RELEASE_UNIT.fullmatch(name)
                if unit:
                    layer = _RELEASE_LAYERS[unit[2]]
                    leaf = {"gamma": f"gn{layer}/scale", "beta": f"gn{layer}/bias"}.get(
                        unit[3].rpartition("/")[2], f"conv{layer}/kernel")
                    name = f"{unit[1]}/{leaf}"
            renamed[name] = value
        arrays = renamed
    # A big_vision training checkpoint holds the optimiser's state beside the weights: only
    # the weights are read ("params/", or "opt/target/" in its older checkpoints).
    prefix = next((p for p in ("params/", "opt/target/") if any(k.startswith(p) for k in arrays)),
                  "")
    return {k[len(prefix):]: np.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}


def model_from_arrays(arrays, **options) -> models.ResNetV2:
    """The `models.ResNetV2` of a BiT checkpoint: units per stage, the width multiplier (from
    the stem's channels) and `num_classes` (None where it has no head) are read from it, the
    rest is `BIG_VISION_OPTIONS`; `options` are further attributes (dtype, scan_units, ...)."""
    arrays = to_big_vision_names(arrays)
    sizes = {}
    for key in arrays:
        unit = _UNIT.match(key)
        if unit:
            sizes[int(unit[1])] = max(sizes.get(int(unit[1]), 0), int(unit[2]))
    stages = sorted(sizes)
    if (not stages or stages != list(range(1, len(stages) + 1))
            or "root_block/conv_root/kernel" not in arrays):
        raise errors.WeightsError(
            "not a BiT checkpoint: need root_block/conv_root/kernel (or "
            "resnet/root_block/standardized_conv2d/kernel) and block{s}/unit{uu} "
            "arrays")
    stem_width = arrays["root_block/conv_root/kernel"].shape[-1]
    head = arrays.get("head/bias")
    return models.ResNetV2(
        stage_sizes=[sizes[s] for s in stages],
        widths=[4 * stem_width * 2 ** i for i in range(len(stages))], stem_width=stem_width,
        num_classes=None if head is None else head.shape[0],
        **{**BIG_VISION_OPTIONS, **options})


def convert(arrays, model: models.ResNetV2):
    """A BiT checkpoint's arrays (either format) as `model`'s variables {"params"}.

    `model` must have `BIG_VISION_OPTIONS` but `norm_groups` (any shape, scanned or not).
    GroupNorm scales and shifts lose big_vision's leading singleton axes; the original release's
    1x1-conv head becomes a Dense kernel.

    Raises:
        ValueError: the model is not a BiT network, or arrays are missing, unexpected or of the
            wrong shape (named).
    """
    wanted = {k: v for k, v in BIG_VISION_OPTIONS.items() if k != "norm_groups"}
    differs = {k: getattr(model, k) for k, v in wanted.items() if getattr(model, k) != v}
    if differs:
        raise errors.WeightsError("BiT checkpoints need models.ResNetV2 with "
                         f"{', '.join(f'{k}={v!r}' for k, v in wanted.items())}; the model has "
                         f"{', '.join(f'{k}={v!r}' for k, v in differs.items())}")
    return name_mapping.variables_by_name(model, to_big_vision_names(arrays),
                                          _big_vision_name, _layout, "BiT", "checkpoint")


def _layout(name: str, value: np.ndarray, shape: tuple) -> np.ndarray:
    """A BiT array in the network's layout: the release's 1x1-conv head as a Dense kernel,
    big_vision's GroupNorm scales and shifts of shape (1, 1, 1, C) as (C,)."""
    if name.startswith("head/kernel") and value.ndim == 4:
        return value[0, 0]
    if len(shape) == 1 and value.size == shape[0]:
        return value.reshape(shape)
    return value


def load(arrays, **options):
    """(model, variables) of a BiT checkpoint's arrays; see `model_from_arrays`."""
    model = model_from_arrays(arrays, **options)
    return model, convert(arrays, model)


def _big_vision_name(path) -> str:
    """big_vision's flat name of the Flax variable at `path` (collection first)."""
    _, *modules, leaf = path
    parts = []
    for name in modules:
        unit = re.fullmatch(r"stage(\d+)_unit(\d+)", name)
        if unit:
            parts.append(f"block{unit[1]}/unit{int(unit[2]):02d}")
        elif re.fullmatch(r"bn\d", name):
            parts.append("gn" + name[2:])
        else:
            parts.append(_MODULES.get(name, name))
    return "/".join(parts + [leaf])

