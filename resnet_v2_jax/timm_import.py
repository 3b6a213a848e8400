"""Weight import from timm's pre-activation ResNetV2: the BatchNorm ones (`resnetv2_50`,
`resnetv2_101`) and BiT's (`resnetv2_50x1_bit` and kin).

timm's ResNetV2 with `PreActBottleneck` (or `PreActBasic`) units, `BatchNormAct2d` and plain
convolutions is the paper's full pre-activation network except for the stem. The paper
(preresnet.lua) runs conv-BN-ReLU-maxpool and the first unit has no pre-activation of its own;
timm runs conv-maxpool, and the first unit's BN-ReLU pre-activation, shared with its projection
shortcut, does the normalisation after the pool. `models.ResNetV2(stem_norm="after_pool")` is
timm's order, so timm weights load into

        model = models.imagenet_resnet(50, stem_norm="after_pool")
        variables = timm_import.convert_state_dict(state_dict, model)
        logits = model.apply(variables, images_nhwc, train=False)

or, with the network's shape read from the state dict, `model, variables = load(state_dict)`.
`state_dict` maps timm's names to arrays: numpy arrays, or CPU torch tensors (anything
`np.asarray` takes), so this module needs neither torch nor timm:

        state_dict = {k: v.numpy() for k, v in timm_model.state_dict().items()}

What matches timm: symmetric Torch padding (timm's `create_conv2d` pads (k-1)/2 for these
convs, its 3x3/2 max-pool pads 1 with -inf), BN eps 1e-5, and BN momentum 0.1 in Torch's
convention, which is `bn_momentum=0.9` here. Training differs in one detail: Torch updates
`running_var` with the unbiased batch variance, Flax with the biased one; the batch statistics
used for normalisation are the same.

BiT's networks (`resnetv2_50x1_bit`, `..._101x3_bit`, ...) are the same layout with GroupNorm
(32 groups, eps 1e-5), weight-standardised convs (`StdConv2d`, eps 1e-8, as `StandardizedConv`)
and the "fixed" stem, which pads with zeros before its max-pool: `BIT_OPTIONS` of
`models.ResNetV2`. `load` recognises them by their norm layers, which keep no running
statistics; a state dict cannot show the number of groups, so pass `norm_groups=` for a BiT
network built with other than 32.

Not supported, and refused where the state dict shows it: deep stems (`resnetv2_50d`),
post-activation `Bottleneck` units (`preact=False`). A state dict cannot show timm's
`stem_type` "same" pooling, `avg_down`, `output_stride` < 32, or StdConv2d combined with
BatchNorm; those must be left at timm's defaults, as in `resnetv2_50` / `resnetv2_101` (and
the basic-unit `resnetv2_18` / `resnetv2_34`, which match as well) and the BiT family.
"""

import re

import numpy as np

from resnet_v2_jax import errors, models, name_mapping

# Flax module name -> timm module name, for the names that are not renamed by a pattern.
_MODULES = {"stem_conv": "stem.conv", "final_bn": "norm", "head": "head.fc",
            "proj_conv": "downsample.conv"}
# Flax variable name -> timm parameter or buffer name.
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
           "var": "running_var"}
_UNIT = re.compile(r"stage(\d+)_unit(\d+)")
# What timm's BiT networks are in `models.ResNetV2`'s options (beside stem_norm="after_pool").
BIT_OPTIONS = dict(norm="group", norm_groups=32, conv="weight_standardized", stem_pool_pad="zero")
_BLOCK = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.")


def convert_state_dict(state_dict, model: models.ResNetV2):
    """Converts a timm ResNetV2 state dict to `model`'s variables {"params", "batch_stats"}
    (no "batch_stats" for BiT).

    `model` must be a `models.ResNetV2` in timm's configuration: ImageNet stem with
    `stem_norm="after_pool"`, full pre-activation units, identity shortcuts, stride on the 3x3,
    norm eps 1e-5; BatchNorm, plain convs and the -inf-padded pool, or for a BiT state dict
    `BIT_OPTIONS`. Conv kernels go from OIHW to HWIO, the head's 1x1 conv (or Linear) from
    (out, in) to (in, out). `num_batches_tracked` buffers are dropped. Works for scanned
    (`scan_units=True`) models too.

    Raises:
        ValueError: the model is not in timm's configuration, the state dict is not a
            pre-activation ResNetV2, or keys are missing, unexpected or of the wrong shape.
    """
    state_dict = {k: np.asarray(v) for k, v in state_dict.items()
                  if not k.endswith("num_batches_tracked")}
    _check_supported(state_dict)
    _check_model(model, _is_bit(state_dict))
    channels = state_dict["stem.conv.weight"].shape[1] if "stem.conv.weight" in state_dict else 3
    return name_mapping.variables_by_name(model, state_dict, _timm_key, _layout, "timm",
                                          "state dict", channels)


def _layout(key: str, value: np.ndarray, shape: tuple) -> np.ndarray:
    """A timm array in Flax's layout: conv kernels OIHW -> HWIO, the head (out, in) -> (in, out)
    (its 1x1 conv's trailing axes dropped)."""
    if len(shape) == 4:
        return value.transpose(2, 3, 1, 0)
    if len(shape) == 2:
        return value.reshape(value.shape[0], -1).T
    return value


def model_from_state_dict(state_dict, **options) -> models.ResNetV2:
    """The `models.ResNetV2` of a timm ResNetV2 state dict: stage sizes, widths, stem width,
    basic or bottleneck units, and `num_classes` (None where the dict has no head) are read
    from it; a BiT state dict gives `BIT_OPTIONS`. `options` are further `ResNetV2` attributes
    (e.g. dtype, scan_units, or norm_groups for a BiT network with other than 32 groups).
    """
    state_dict = dict(state_dict)
    _check_supported(state_dict)
    sizes = {}
    for key in state_dict:
        m = _BLOCK.match(key)
        if m:
            sizes[int(m[1])] = max(sizes.get(int(m[1]), 0), int(m[2]) + 1)
    stages = sorted(sizes)
    if not stages or stages != list(range(len(stages))) or "stem.conv.weight" not in state_dict:
        raise errors.WeightsError(
            "not a timm ResNetV2 state dict with the 7x7 stem: need stem.conv.weight "
            "and stages.{i}.blocks.{j}.* keys")
    bottleneck = "stages.0.blocks.0.conv3.weight" in state_dict
    last = "conv3" if bottleneck else "conv2"
    widths = [np.shape(state_dict[f"stages.{s}.blocks.0.{last}.weight"])[0] for s in stages]
    head = state_dict.get("head.fc.bias")
    return models.ResNetV2(
        stage_sizes=[sizes[s] for s in stages], widths=widths,
        num_classes=None if head is None else np.shape(head)[0], stem="imagenet",
        stem_norm="after_pool", stem_width=np.shape(state_dict["stem.conv.weight"])[0],
        bottleneck=bottleneck, **{**(BIT_OPTIONS if _is_bit(state_dict) else {}), **options})


def load(state_dict, **options):
    """(model, variables) for a timm ResNetV2 state dict; see `model_from_state_dict`."""
    model = model_from_state_dict(state_dict, **options)
    return model, convert_state_dict(state_dict, model)


def _timm_key(path) -> str:
    """timm's state-dict name of the Flax variable at `path` (collection first)."""
    _, *modules, leaf = path
    parts = []
    for name in modules:
        unit = _UNIT.fullmatch(name)
        if unit:
            parts.append(f"stages.{int(unit[1]) - 1}.blocks.{int(unit[2]) - 1}")
        elif re.fullmatch(r"bn\d", name):
            parts.append("norm" + name[2:])
        else:
            parts.append(_MODULES.get(name, name))
    return ".".join(parts + [_LEAVES.get(leaf, leaf)])


def _is_bit(state_dict) -> bool:
    """BiT's GroupNorm layers have a weight and no running statistics."""
    return any(re.search(r"(^|\.)norm\d*\.weight$", k)
               and k.replace(".weight", ".running_mean") not in state_dict for k in state_dict)


def _check_model(model, bit: bool):
    """Refuses models whose layout, norm, conv or eps differs from the timm ResNetV2 of the
    state dict (BiT or not)."""
    fits = (isinstance(model, models.ResNetV2) and model.stem == "imagenet"
            and model.stem_norm == "after_pool" and model.unit == "full_preact"
            and model.shortcut == "identity" and model.stride_on == "3x3"
            and model.bn_epsilon == 1e-5)
    if not fits:
        raise errors.WeightsError(
            "timm's ResNetV2 needs models.ResNetV2(stem='imagenet', "
            "stem_norm='after_pool', unit='full_preact', shortcut='identity', "
            "stride_on='3x3', bn_epsilon=1e-5), e.g. "
            "models.imagenet_resnet(50, stem_norm='after_pool')")
    wanted = ({k: v for k, v in BIT_OPTIONS.items() if k != "norm_groups"} if bit else
              dict(norm="batch", conv="plain", stem_pool_pad="-inf"))
    differs = {k: getattr(model, k) for k, v in wanted.items() if getattr(model, k) != v}
    if differs:
        kind = "a BiT network (GroupNorm, StdConv2d)" if bit else "a BatchNorm network"
        raise errors.WeightsError(f"the timm state dict is {kind}: the model needs "
                                  f"{', '.join(f'{k}={v!r}' for k, v in wanted.items())}, it has "
                                  f"{', '.join(f'{k}={v!r}' for k, v in differs.items())}")


def _check_supported(state_dict):
    """Refuses the timm ResNetV2s that this mapping does not fit, by what their keys show."""
    if "stem.conv1.weight" in state_dict:
        raise errors.WeightsError(
            "timm state dict has a deep 3x3 stem (resnetv2_50d, resnetv2_50t, ...), "
            "which is not supported; only the 7x7 stem (stem_type='') is")
    if "stem.norm.weight" in state_dict:
        raise errors.WeightsError(
            "timm state dict has a BN after the stem conv: a post-activation ResNetV2 "
            "(preact=False), which is not supported; only pre-activation ones are")
    norms = [k for k in state_dict if re.search(r"(^|\.)norm\d*\.weight$", k)]
    with_statistics = [k for k in norms if k.replace(".weight", ".running_mean") in state_dict]
    if 0 < len(with_statistics) < len(norms):
        raise errors.WeightsError(
            "timm state dict mixes norm layers with running statistics "
            "(BatchNorm) and without (GroupNorm): not a ResNetV2 this supports")

