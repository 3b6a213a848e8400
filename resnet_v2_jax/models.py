"""Pre-activation ResNets and the paper's ablation units, as Flax linen modules.

He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks" (ECCV 2016). A residual
unit computes

        x_{l+1} = f(h(x_l) + F(x_l, W_l))                          (paper eq. 1-2)

and the paper's proposal is h = identity, f = identity, with BN and ReLU moved in front of
every weight layer of F ("full pre-activation", Fig. 4e). Every variant the paper studies is
one option of the same `ResidualUnit`:

* `unit` (where BN and ReLU sit, Fig. 4 / Table 2): see `UNIT_PLACEMENTS`.
* `shortcut` (what h is, Fig. 2 / Table 1): see `SHORTCUTS`.

Networks follow the authors' code: `cifar_resnet` is resnet-pre-act.lua
(KaimingHe/resnet-1k-layers), `imagenet_resnet` is fb.resnet.torch's preresnet.lua.

Usage::

        model = models.cifar_resnet(164, num_classes=10)
        variables = model.init(rng, images, train=False)
        logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])

The stem's and each stage's feature maps are sown into the "intermediates" collection::

        _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
        state["intermediates"]["stage3"]     # a 1-tuple holding the stage-3 output, NHWC
        state["intermediates"]["stem"]       # the stem's output (before the first unit)

This module imports neither TensorFlow nor tfds.
"""

import dataclasses
import functools
import json
import math
import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from resnet_v2_jax import errors

Array = jax.Array
ModuleDef = Any

# Where BN and ReLU sit in a unit (Fig. 4). Each entry lists the ops applied
#   before_conv:     in front of every weight layer of F (a pre-activation),
#   after_conv:      after every weight layer of F but the last,
#   after_last:      after the last weight layer of F,
#   after_add:       after the addition, i.e. the paper's f,
#   after_proj:      after the 1x1 projection shortcut of a shape-changing unit.
UNIT_PLACEMENTS = {
    # (a) original: conv-BN-ReLU-...-conv-BN, addition, ReLU; the projection is conv-BN
    # (fb.resnet.torch resnet.lua, shortcut type B).
    "original": dict(before_conv=(), after_conv=("bn", "relu"), after_last=("bn",),
                     after_add=("relu",), after_proj=("bn",)),
    # (b) BN after addition: conv-BN-ReLU-...-conv, addition, BN-ReLU.
    "bn_after_add": dict(before_conv=(), after_conv=("bn", "relu"), after_last=(),
                         after_add=("bn", "relu"), after_proj=()),
    # (c) ReLU before addition: conv-BN-ReLU-...-conv-BN-ReLU, addition.
    "relu_before_add": dict(before_conv=(), after_conv=("bn", "relu"), after_last=("bn", "relu"),
                            after_add=(), after_proj=()),
    # (d) ReLU-only pre-activation: ReLU-conv-BN-...-ReLU-conv-BN, addition.
    "relu_preact": dict(before_conv=("relu",), after_conv=("bn",), after_last=("bn",),
                        after_add=(), after_proj=()),
    # (e) full pre-activation (the proposal): BN-ReLU-conv-...-BN-ReLU-conv, addition.
    "full_preact": dict(before_conv=("bn", "relu"), after_conv=(), after_last=(), after_add=(),
                        after_proj=()),
}

# The shortcut h(x) of Fig. 2 / Table 1, and how it is combined with F (lambda, g as in the paper):
SHORTCUTS = (
    "identity",        # (a) x + F
    "scaling",         # (b) shortcut_scale * x + residual_scale * F
    "exclusive_gate",  # (c) (1 - g(x)) * x + g(x) * F,  g(x) = sigmoid(1x1 conv(x) + b_g)
    "shortcut_gate",   # (d) (1 - g(x)) * x + F
    "conv",            # (e) 1x1 conv(x) + F, in every unit
    "dropout",         # (f) dropout(x) + F
)

# The options only some settings use: option -> (the attribute that decides, the values that
# use it). A network with another value ignores the option (and `signature` leaves it out).
DEPENDENT_OPTIONS = {"shortcut_scale": ("shortcut", ("scaling",)),
                     "residual_scale": ("shortcut", ("scaling",)),
                     "gate_bias_init": ("shortcut", ("exclusive_gate", "shortcut_gate")),
                     "shortcut_dropout_rate": ("shortcut", ("dropout",)),
                     "bn_momentum": ("norm", ("batch",)),
                     "norm_groups": ("norm", ("group",)),
                     "conv_epsilon": ("conv", ("weight_standardized",))}

# The normalisation layers by name. BatchNorm is the paper's; GroupNorm with weight-standardised
# convs is BiT's (big_vision, timm's resnetv2_50x1_bit); LayerNorm normalises each position over
# its channels. A callable with the constructor interface of these (module attributes, `name`)
# may be given instead of a name.
NORMS = ("batch", "group", "layer")
# Convolutions by name: "plain", or "weight_standardized" (BiT: each output channel's kernel
# centred and scaled to unit variance before use, `StandardizedConv`, with `conv_epsilon` added
# to the variance). A callable with `_conv`'s interface may be given instead.
CONVS = ("plain", "weight_standardized")
# How the ImageNet stem's 3x3/2 max-pool pads: "-inf" (padding never wins: preresnet.lua, timm's
# resnetv2_50) or "zero" (zeros, which win over negative values: BiT's stem).
STEM_POOL_PADS = ("-inf", "zero")

# Where the first unit of a stage takes its pre-activation from.
PREACT_MODES = (
    "branch",  # only F is pre-activated; the shortcut takes the raw x (identity units)
    "shared",  # one pre-activation feeds F and the projection shortcut (shape-changing units)
    "none",    # no pre-activation: the input is already activated (ImageNet stage 1 after the stem)
)

he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
"""Conv init of the authors' code: N(0, sqrt(2 / (k * k * out_channels)))."""

torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
"""Torch's nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the authors keep it."""

HEAD = "head"
"""The classifier's module name: what fine-tuning replaces or trains alone."""


def runtime(default):
    """Declares a `ResNetV2` attribute that changes how the network runs (dtypes, layout, BN
    reduction axes) but not the function it computes from its weights: `signature` leaves it
    out, so checkpoints and weights files move between its values (converted where the layout
    differs, see `unrolled_to_scanned`). Every other attribute defines the network."""
    return dataclasses.field(default=default, metadata={"runtime": True})


class StandardizedConv(nn.Conv):
    """A convolution whose kernel is weight-standardised before use (BiT, after Qiao et al.,
    "Weight Standardization"): per output channel, minus its mean over (height, width, input
    channels), divided by its standard deviation (`epsilon` added to the variance). The stored
    parameter is the raw kernel."""
    epsilon: float = 1e-8

    def param(self, name, *args, **kwargs):
        value = super().param(name, *args, **kwargs)
        if name != "kernel":
            return value
        mean = jnp.mean(value, axis=(0, 1, 2), keepdims=True)
        variance = jnp.var(value, axis=(0, 1, 2), keepdims=True)
        return (value - mean) * jax.lax.rsqrt(variance + self.epsilon)


def _conv(features: int, kernel: int, strides: int = 1, use_bias: bool = False, *,
          conv_class=nn.Conv, **kwargs) -> nn.Conv:
    """Conv with Torch's symmetric padding (k-1)/2, He fan-out init and (by default) no bias."""
    pad = (kernel - 1) // 2
    return conv_class(features, (kernel, kernel), (strides, strides),
                      padding=((pad, pad), (pad, pad)), use_bias=use_bias, kernel_init=he_fan_out,
                      **kwargs)


class ResidualUnit(nn.Module):
    """One residual unit, x_{l+1} = f(h(x_l) + F(x_l)) (eq. 1-2), basic or bottleneck.

    Attributes:
        features: output channels. A bottleneck unit's inner width is features // 4.
        norm: normalisation constructor with its options (for BatchNorm `use_running_average`)
            already bound; called with `name=` only.
        conv: Conv constructor with dtype bound (see `_conv` for its interface and defaults).
        bottleneck: 1x1-3x3-1x1 layers (True) or 3x3-3x3 (False).
        strides: spatial stride of the unit.
        stride_on: "1x1" puts the stride on the first 1x1 conv (authors' CIFAR code), "3x3" on the
            3x3 conv (fb.resnet.torch, timm). Basic units always stride on their first 3x3.
        unit: a key of `UNIT_PLACEMENTS`.
        shortcut: one of `SHORTCUTS`.
        preact: one of `PREACT_MODES`.
        shortcut_scale, residual_scale: the lambdas of the "scaling" shortcut (Fig. 2b).
        gate_bias_init: b_g of the gating shortcuts (Fig. 2c-d).
        shortcut_dropout_rate: drop rate of the "dropout" shortcut (Fig. 2f).
        deterministic: disables the dropout shortcut (evaluation).
    """
    features: int
    norm: ModuleDef
    conv: ModuleDef = _conv
    bottleneck: bool = True
    strides: int = 1
    stride_on: str = "3x3"
    unit: str = "full_preact"
    shortcut: str = "identity"
    preact: str = "branch"
    shortcut_scale: float = 1.0
    residual_scale: float = 1.0
    gate_bias_init: float = 0.0
    shortcut_dropout_rate: float = 0.5
    deterministic: bool = True

    def __post_init__(self):
        _check_unit_options(self)
        _check_choice("preact", self.preact, PREACT_MODES)
        super().__post_init__()

    def _layers(self):
        """(kernel, features, strides) of each weight layer of F."""
        if not self.bottleneck:
            return [(3, self.features, self.strides), (3, self.features, 1)]
        width = self.features // 4
        s1, s3 = (self.strides, 1) if self.stride_on == "1x1" else (1, self.strides)
        return [(1, width, s1), (3, width, s3), (1, self.features, 1)]

    def _ops(self, ops: Sequence[str], x: Array, bn_name: str) -> Array:
        for op in ops:
            x = self.norm(name=bn_name)(x) if op == "bn" else nn.relu(x)
        return x

    @nn.compact
    def __call__(self, x: Array) -> Array:
        place = UNIT_PLACEMENTS[self.unit]
        layers = self._layers()
        needs_projection = (self.shortcut == "conv" or self.strides != 1 or
                            x.shape[-1] != self.features)

        # BN modules are named after the conv they serve: bn{i} normalises conv{i}'s input in the
        # pre-activation units and its output in the post-activation ones (never both).
        if self.preact == "none":
            branch_in = shortcut_in = x
        else:
            branch_in = self._ops(place["before_conv"], x, "bn1")
            # The authors share the pre-activation only where the shape changes.
            shortcut_in = branch_in if self.preact == "shared" and needs_projection else x

        y = branch_in
        for i, (kernel, features, strides) in enumerate(layers, start=1):
            if i > 1:
                y = self._ops(place["before_conv"], y, f"bn{i}")
            y = self.conv(features, kernel, strides, name=f"conv{i}")(y)
            after = place["after_last"] if i == len(layers) else place["after_conv"]
            y = self._ops(after, y, f"bn{i}")

        if needs_projection:
            shortcut = self.conv(self.features, 1, self.strides, name="proj_conv")(shortcut_in)
            shortcut = self._ops(place["after_proj"], shortcut, "proj_bn")
        else:
            shortcut = shortcut_in

        if self.shortcut == "scaling":
            out = self.shortcut_scale * shortcut + self.residual_scale * y
        elif self.shortcut in ("exclusive_gate", "shortcut_gate"):
            gate = self.conv(self.features, 1, self.strides, name="gate", use_bias=True,
                             bias_init=nn.initializers.constant(self.gate_bias_init))(shortcut_in)
            gate = nn.sigmoid(gate)
            out = (1.0 - gate) * shortcut + (gate * y if self.shortcut == "exclusive_gate" else y)
        elif self.shortcut == "dropout":
            out = nn.Dropout(self.shortcut_dropout_rate,
                             deterministic=self.deterministic)(shortcut) + y
        else:  # identity, conv
            out = shortcut + y
        return self._ops(place["after_add"], out, "bn_out")


class _ScanBody(nn.Module):
    """Adapts a unit to nn.scan's (carry, x) -> (carry, y) signature."""
    unit: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x, _):
        return self.unit(name="unit")(x), None


class ResNetV2(nn.Module):
    """A residual network of `ResidualUnit`s in stages.

    stem -> stages (the first unit of each stage may change shape, the rest are identical)
    -> the units' own pre-activation (the paper's extra BN-ReLU after the last unit) -> global
    average pool -> linear classifier.

    The attributes are the one declaration of a network's options: configs pass theirs as
    `create(**config.model)`, and checkpoints, `init_from` and weights files compare or store
    `signature` / `options` of the built network. Those marked `runtime(...)` change how it runs,
    not what it computes.

    Attributes:
        stage_sizes: units per stage.
        widths: output channels per stage.
        num_classes: classifier outputs; None gives a headless backbone returning pooled features.
        stem: "cifar" (3x3 conv, 16 channels) or "imagenet" (7x7/2 conv 64, BN, ReLU, 3x3/2 max-pool).
        stem_norm: ImageNet only. "before_pool" is preresnet.lua (conv-BN-ReLU-pool, then the first
            unit has no pre-activation). "after_pool" is timm's ResNetV2 (conv-pool, then the first
            unit pre-activates and shares it with its projection); needs a pre-activation unit.
        stem_width: channels of the stem conv.
        stem_pool_pad: ImageNet only: how the stem's max-pool pads, one of `STEM_POOL_PADS`.
        bottleneck, stride_on, unit, shortcut, shortcut_scale, residual_scale, gate_bias_init,
            shortcut_dropout_rate: passed to every `ResidualUnit` (`UNIT_OPTIONS`).
        norm: the normalisation layer, one of `NORMS` or a constructor (see `NORMS`).
        norm_groups: GroupNorm's number of groups (norm="group"; BiT's 32).
        conv: the convolution, one of `CONVS` or a constructor (see `CONVS`).
        conv_epsilon: weight standardisation's epsilon (conv="weight_standardized"): timm's
            `StdConv2d` uses 1e-8, the original BiT and big_vision 1e-10.
        bn_momentum: BatchNorm running-average momentum (Torch's 0.1 is 0.9 here).
        bn_epsilon: the normalisation layers' epsilon.
        dtype: compute dtype (e.g. jnp.bfloat16); params and BN statistics stay `param_dtype`,
            logits are returned as float32 (as `param_dtype` when that is float64).
        param_dtype: dtype of parameters and BN statistics: float32, or float64 for exact
            equivalence tests (needs jax_enable_x64, which the caller turns on).
        bn_axis_name: mapped axis name (or tuple of names) over which BN batch statistics are
            averaged in training; None = over the batch this call sees (per device under pmap or
            shard_map; the whole global batch under jax.jit over sharded arrays).
        bn_axis_index_groups: axis_index_groups for that reduction (pmap only).
        scan_units: run the identical units of each stage with nn.scan, so compile time does not
            grow with depth. Parameters of units 2..n of stage s are stacked under "stage{s}_repeat";
            see `scanned_to_unrolled` / `unrolled_to_scanned`.
        remat_units: rematerialise each unit in the backward pass (nn.remat).
    """
    stage_sizes: Sequence[int]
    widths: Sequence[int]
    num_classes: Optional[int] = 1000
    stem: str = "imagenet"
    stem_norm: str = "before_pool"
    stem_width: int = 64
    stem_pool_pad: str = "-inf"
    bottleneck: bool = True
    stride_on: str = "3x3"
    unit: str = "full_preact"
    shortcut: str = "identity"
    shortcut_scale: float = 1.0
    residual_scale: float = 1.0
    gate_bias_init: float = 0.0
    shortcut_dropout_rate: float = 0.5
    norm: Any = "batch"
    norm_groups: int = 32
    conv: Any = "plain"
    conv_epsilon: float = 1e-8
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = runtime(jnp.float32)
    param_dtype: Any = runtime(jnp.float32)
    bn_axis_name: Any = runtime(None)
    bn_axis_index_groups: Any = runtime(None)
    scan_units: bool = runtime(False)
    remat_units: bool = runtime(False)

    def __post_init__(self):
        _check_unit_options(self)
        _check_choice("stem", self.stem, ("cifar", "imagenet"))
        _check_choice("stem_norm", self.stem_norm, ("before_pool", "after_pool"))
        _check_choice("stem_pool_pad", self.stem_pool_pad, STEM_POOL_PADS)
        if not callable(self.norm):
            _check_choice("norm", self.norm, NORMS)
        if not callable(self.conv):
            _check_choice("conv", self.conv, CONVS)
        if self.norm == "group":
            inner = [w // 4 for w in self.widths] if self.bottleneck else []
            channels = sorted({self.stem_width, *self.widths, *inner})
            if (not isinstance(self.norm_groups, (int, np.integer)) or self.norm_groups < 1
                    or any(c % self.norm_groups for c in channels)):
                common = math.gcd(*channels)
                fits = [g for g in range(1, common + 1) if common % g == 0]
                raise errors.ConfigError(
                    f"norm_groups={self.norm_groups} must divide every normalised "
                    f"channel count {tuple(channels)}: one of {fits}")
        if len(self.stage_sizes) != len(self.widths) or min(self.stage_sizes, default=0) < 1:
            raise errors.ConfigError(
                f"stage_sizes {tuple(self.stage_sizes)} and widths {tuple(self.widths)} "
                "must have the same length and at least one unit per stage")
        if self.bottleneck and any(w % 4 for w in self.widths):
            raise errors.ConfigError(
                f"bottleneck widths must divide by 4, got {tuple(self.widths)}")
        if min(self.widths) < 1 or self.stem_width < 1:
            raise errors.ConfigError(
                f"widths {tuple(self.widths)} and stem_width {self.stem_width} must "
                "be positive")
        if self.num_classes is not None and self.num_classes < 1:
            raise errors.ConfigError(
                f"num_classes must be positive (or None), got {self.num_classes}")
        if self.stem == "cifar" and (self.stem_norm, self.stem_pool_pad) != ("before_pool",
                                                                               "-inf"):
            raise errors.ConfigError(
                "stem_norm and stem_pool_pad apply to the imagenet stem only; the "
                "cifar stem has no pool")
        if self.stem_norm == "after_pool" and not UNIT_PLACEMENTS[self.unit]["before_conv"]:
            raise errors.ConfigError(
                f"stem_norm='after_pool' needs a pre-activation unit, not {self.unit!r}")
        _check_number("bn_momentum", self.bn_momentum, 0.0, 1.0)
        _check_number("bn_epsilon", self.bn_epsilon, 0.0, None, open_low=True)
        _check_number("conv_epsilon", self.conv_epsilon, 0.0, None, open_low=True)
        super().__post_init__()

    def _norm(self, train: bool) -> Callable[..., nn.Module]:
        """The normalisation constructor the units call with `name=` only."""
        common = dict(epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype)
        if callable(self.norm):
            return self.norm
        if self.norm == "group":
            return functools.partial(nn.GroupNorm, num_groups=self.norm_groups, **common)
        if self.norm == "layer":
            return functools.partial(nn.LayerNorm, **common)
        return functools.partial(nn.BatchNorm, use_running_average=not train,
                                 momentum=self.bn_momentum, axis_name=self.bn_axis_name,
                                 axis_index_groups=self.bn_axis_index_groups, **common)

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        """Logits (or pooled features) of images x [B, H, W, 3]. `train` selects batch statistics
        (updating "batch_stats" when it is mutable) over the running averages, and enables the
        dropout shortcut. It defaults to True, the Flax examples' convention: init and training
        pass nothing, evaluation passes train=False."""
        conv = functools.partial(
            self.conv if callable(self.conv) else _conv, dtype=self.dtype,
            param_dtype=self.param_dtype,
            **({"conv_class": functools.partial(StandardizedConv, epsilon=self.conv_epsilon)}
               if self.conv == "weight_standardized" else {}))
        norm = self._norm(train)
        unit_class = (nn.remat(ResidualUnit, prevent_cse=not self.scan_units)
                      if self.remat_units else ResidualUnit)
        unit = functools.partial(unit_class, norm=norm, conv=conv, deterministic=not train,
                                 **{name: getattr(self, name) for name in UNIT_OPTIONS})
        preactivates = bool(UNIT_PLACEMENTS[self.unit]["before_conv"])

        x = jnp.asarray(x, self.dtype)
        if self.stem == "cifar":
            x = conv(self.stem_width, 3, name="stem_conv")(x)
            # Pre-activation units take conv1's output directly: the first unit's BN-ReLU is "right
            # after conv1 and before splitting into two paths". Post-activation units expect an
            # activated input, as in the original ResNet.
            if not preactivates:
                x = nn.relu(norm(name="stem_bn")(x))
            first_preact = "shared"
        else:
            x = conv(self.stem_width, 7, 2, name="stem_conv")(x)
            if self.stem_norm == "before_pool":
                x = nn.relu(norm(name="stem_bn")(x))
            if self.stem_pool_pad == "zero":
                x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            x = nn.max_pool(x, (3, 3), (2, 2),
                            padding=((1, 1), (1, 1)) if self.stem_pool_pad == "-inf" else "VALID")
            first_preact = "shared" if self.stem_norm == "after_pool" else "none"
        self.sow("intermediates", "stem", x)

        for s, (size, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
            x = unit(features=width, strides=1 if s == 1 else 2,
                     preact=first_preact if s == 1 else "shared", name=f"stage{s}_unit1")(x)
            identical = functools.partial(unit, features=width, preact="branch")
            if self.scan_units and size > 1:
                # One slice per iteration also for what analysis tools add (resnet_v2_jax.analyze:
                # sown unit outputs, perturbations); absent collections cost nothing.
                x, _ = nn.scan(_ScanBody, variable_axes={
                    "params": 0,
                    "batch_stats": 0,
                    "intermediates": 0,
                    "perturbations": 0,
                }, split_rngs={
                    "params": True,
                    "dropout": True
                }, length=size - 1)(identical, name=f"stage{s}_repeat")(x, None)
            else:
                for u in range(2, size + 1):
                    x = identical(name=f"stage{s}_unit{u}")(x)
            self.sow("intermediates", f"stage{s}", x)

        # The extra activation after the last unit (docs/paper.md, "CIFAR networks": an extra
        # BN-ReLU before the global pool): the last unit's output gets what a following unit's
        # branch would apply to it.
        for op in UNIT_PLACEMENTS[self.unit]["before_conv"]:
            x = norm(name="final_bn")(x) if op == "bn" else nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        out_dtype = jnp.promote_types(jnp.float32, self.param_dtype)
        if self.num_classes is None:
            return x.astype(out_dtype)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=torch_linear_init, name=HEAD)(x)
        return x.astype(out_dtype)


# The attributes a network hands to each of its units: those the two declare alike.
UNIT_OPTIONS = tuple(f.name for f in dataclasses.fields(ResidualUnit)
                     if f.name in {g.name for g in dataclasses.fields(ResNetV2)}
                     and f.name not in ("parent", "name", "norm", "conv"))  # built by ResNetV2


def _check_choice(name: str, value, choices):
    if value not in choices:
        raise errors.ConfigError(
            f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")


def _check_number(name: str, value, low: Optional[float] = None, high: Optional[float] = None,
                  *, open_low: bool = False, open_high: bool = False):
    """Raises a one-line ValueError unless `value` is a finite real in [low, high] (open ends
    where asked); None bounds are unbounded."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise errors.ConfigError(f"{name} must be a number, got {value!r}")
    if not np.isfinite(value):
        raise errors.ConfigError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if open_low else value < low):
        raise errors.ConfigError(f"{name} must be {'>' if open_low else '>='} {low}, got {value}")
    if high is not None and (value >= high if open_high else value > high):
        raise errors.ConfigError(f"{name} must be {'<' if open_high else '<='} {high}, got {value}")


def _check_unit_options(module):
    """The checks a unit's options need, shared by `ResidualUnit` and `ResNetV2`."""
    _check_choice("unit", module.unit, UNIT_PLACEMENTS)
    _check_choice("shortcut", module.shortcut, SHORTCUTS)
    _check_choice("stride_on", module.stride_on, ("1x1", "3x3"))
    for name in ("shortcut_scale", "residual_scale", "gate_bias_init"):
        _check_number(name, getattr(module, name))
    _check_number("shortcut_dropout_rate", module.shortcut_dropout_rate, 0.0, 1.0,
                  open_high=True)


CIFAR_WIDTHS = {"bottleneck": (64, 128, 256), "basic": (16, 32, 64)}
IMAGENET_STAGES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3)
}


def cifar_resnet(depth: int, num_classes: Optional[int] = 10, *, block: str = "bottleneck",
                 stride_on: str = "1x1", **options) -> ResNetV2:
    """The CIFAR networks of resnet-pre-act.lua: 3 stages, 16-channel 3x3 stem.

    Bottleneck units need depth = 9n+2 (ResNet-164: n=18, ResNet-1001: n=111), basic units
    depth = 6n+2 (ResNet-110: n=18). The stride sits on the first 1x1 conv as in the authors'
    code; `stride_on="3x3"` moves it. `options` are further `ResNetV2` attributes.
    """
    _check_choice("block", block, CIFAR_WIDTHS)
    _refuse_set_by_factory("cifar_resnet", options)
    layers = 3 if block == "bottleneck" else 2
    if (not isinstance(depth, (int, np.integer)) or isinstance(depth, bool)
            or depth < 3 * layers + 2 or (depth - 2) % (3 * layers)):
        raise errors.ConfigError(f"CIFAR {block} ResNet depth must be {3 * layers}n+2 (e.g. "
                                 f"{'164, 1001' if layers == 3 else '20, 56, 110'}), got {depth}")
    n = (depth - 2) // (3 * layers)
    return ResNetV2(stage_sizes=(n, ) * 3, widths=CIFAR_WIDTHS[block], num_classes=num_classes,
                    stem="cifar", stem_width=16, bottleneck=block == "bottleneck",
                    stride_on=stride_on, **options)


def imagenet_resnet(depth: int, num_classes: Optional[int] = 1000, **options) -> ResNetV2:
    """The ImageNet networks of fb.resnet.torch's preresnet.lua, depth 18/34/50/101/152/200.

    18 and 34 use basic units (widths 64..512), the others bottlenecks (widths 256..2048) with
    the stride on the 3x3 conv. `options` are further `ResNetV2` attributes.
    """
    if depth not in IMAGENET_STAGES:
        raise errors.ConfigError(
            f"ImageNet ResNet depth must be one of {sorted(IMAGENET_STAGES)}, got {depth}")
    _refuse_set_by_factory("imagenet_resnet", options)
    bottleneck = depth >= 50
    widths = (256, 512, 1024, 2048) if bottleneck else (64, 128, 256, 512)
    return ResNetV2(stage_sizes=IMAGENET_STAGES[depth], widths=widths, num_classes=num_classes,
                    stem="imagenet", stem_width=64, bottleneck=bottleneck, **options)


# What a factory sets from the depth and the paper's architecture; any other attribute of
# ResNetV2 passes through its `options`.
SET_BY_FACTORIES = ("stage_sizes", "widths", "stem", "stem_width", "bottleneck")


def _refuse_set_by_factory(factory: str, options) -> None:
    fixed = [name for name in SET_BY_FACTORIES if name in options]
    if fixed:
        raise errors.ConfigError(
            f"{factory} sets {', '.join(fixed)} from the depth (the paper's "
            f"architecture); for another, build ResNetV2({fixed[0]}=...) directly")


ARCHITECTURES = {"cifar": cifar_resnet, "imagenet": imagenet_resnet}


def create(arch: str, depth: int, num_classes: Optional[int], **options) -> ResNetV2:
    """The network a config's `model` section names: `create(num_classes=10, **config.model)`.
    `arch` picks the factory (`ARCHITECTURES`), the rest are its arguments."""
    _check_choice("arch", arch, ARCHITECTURES)
    try:
        return ARCHITECTURES[arch](depth, num_classes, **options)
    except TypeError as e:  # an option the factory does not take
        raise errors.ConfigError(f"{arch} networks take no such option ({e})") from e


_UNROLLED = re.compile(r"stage(\d+)_unit(\d+)$")
_SCANNED = re.compile(r"stage(\d+)_repeat$")


def holds_units(tree) -> bool:
    """Whether `tree` is a dict keyed by the network's modules (params, BN statistics, or an
    optimiser's tree shaped like them): one with unit entries, unrolled or scanned."""
    return isinstance(tree, dict) and any(
        isinstance(k, str) and (_UNROLLED.match(k) or _SCANNED.match(k)) for k in tree)


def unrolled_to_scanned(variables):
    """Converts variables of a `scan_units=False` network to the `scan_units=True` layout.

    `variables` maps collection names to trees, as `model.init` returns them ({"params": ...,
    "batch_stats": ...}). Units 2..n of stage s are stacked on a new leading axis under
    "stage{s}_repeat/unit", so a checkpoint trained one way loads the other way.
    """
    return {col: _to_scanned(tree) for col, tree in variables.items()}


def scanned_to_unrolled(variables):
    """The inverse of `unrolled_to_scanned`."""
    return {col: _to_unrolled(tree) for col, tree in variables.items()}


def _to_scanned(tree):
    out, repeated = {}, {}
    for name, value in tree.items():
        m = _UNROLLED.match(name)
        if m and int(m.group(2)) > 1:
            repeated.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
        else:
            out[name] = value
    for stage, units in repeated.items():
        ordered = [units[u] for u in sorted(units)]
        out[f"stage{stage}_repeat"] = {"unit": jax.tree.map(lambda *a: jnp.stack(a), *ordered)}
    return out


def _to_unrolled(tree):
    out = {}
    for name, value in tree.items():
        m = _SCANNED.match(name)
        if not m:
            out[name] = value
            continue
        stacked = value["unit"]
        for i in range(jax.tree.leaves(stacked)[0].shape[0]):
            out[f"stage{m.group(1)}_unit{i + 2}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return out



def variables_by_name(model: "ResNetV2", arrays, name_of: Callable[[list], str],
                      layout: Callable[[str, np.ndarray, tuple], np.ndarray], source: str,
                      kind: str, channels: int = 3):
    """`model`'s variables taken from another library's named arrays (the weight importers').

    Every variable of the unrolled network is `arrays[name_of(path)]`, `path` its keys from the
    collection on, as float32 put into the variable's shape by `layout(name, value, shape)`;
    returned scanned where `model.scan_units`. `source` and `kind` name the arrays in messages
    ("timm", "state dict"). `channels`: the input channels of the network to build.

    Raises:
        ValueError (one line): arrays are missing or left over, or one does not fit its variable.
    """
    expected = jax.eval_shape(lambda: model.clone(scan_units=False).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, channels)), train=False))
    missing, used = [], set()

    def take(path, spec):
        keys = [p.key for p in path]
        name = name_of(keys)
        if name not in arrays:
            missing.append(name)
            return None
        used.add(name)
        given = np.asarray(arrays[name])
        misfit = errors.WeightsError(
            f"{source} {name} of shape {given.shape} ({given.dtype}) does not fit the model's "
            f"{'/'.join(keys)}: expected {spec.shape} numbers")
        if not (np.issubdtype(given.dtype, np.number) or given.dtype == np.bool_) \
                or given.size != np.prod(spec.shape, dtype=np.int64):
            raise misfit
        try:
            value = layout(name, given.astype(np.float32), spec.shape)
        except ValueError as error:   # a layout (transpose, reshape) that the array cannot take
            raise misfit from error
        if value.shape != spec.shape:
            raise misfit
        return jnp.asarray(value)

    variables = jax.tree_util.tree_map_with_path(take, expected)
    unexpected = sorted(set(arrays) - used)
    if missing or unexpected:
        raise errors.WeightsError(
            f"{source} {kind} does not fit the model: missing {_some(missing)}; "
            f"unexpected {_some(unexpected)}")
    return unrolled_to_scanned(variables) if model.scan_units else variables


def _some(keys, shown=3) -> str:
    """The first `shown` keys, and how many more, for a one-line message."""
    if not keys:
        return "none"
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


# --- what defines a network, and weights files ----------------------------------------------------

FILE_FORMAT = "resnet_v2_jax/1"
# Never part of the weights: set by whoever runs the network on several devices.
_CALLER_OPTIONS = ("parent", "name", "bn_axis_name", "bn_axis_index_groups")


def _json_value(name: str, value):
    if name in ("dtype", "param_dtype"):
        return jnp.dtype(value).name
    if callable(value):  # a user's norm or conv constructor: named, but not rebuildable
        return f"callable {getattr(value, '__qualname__', None) or repr(value)}"
    return list(value) if isinstance(value, (tuple, list)) else value


def options(model: ResNetV2) -> dict:
    """The attributes that rebuild `model` (`ResNetV2(**options)`), as JSON values: `signature`
    plus the runtime options that travel with weights (dtypes, scan/remat layout)."""
    return {f.name: _json_value(f.name, getattr(model, f.name))
            for f in dataclasses.fields(model) if f.name not in _CALLER_OPTIONS}


def signature(model: ResNetV2) -> dict:
    """What the network computes from its weights: every attribute not declared `runtime`, as
    JSON values, but the options its settings ignore (`DEPENDENT_OPTIONS`). Two
    networks with equal signatures are the same function of the same weights (converted
    between scan layouts and dtypes)."""
    return {f.name: _json_value(f.name, getattr(model, f.name))
            for f in dataclasses.fields(model)
            if f.name not in _CALLER_OPTIONS and not f.metadata.get("runtime")
            and _used(model, f.name)}


def _used(model: ResNetV2, name: str) -> bool:
    decider, values = DEPENDENT_OPTIONS.get(name, (None, None))
    return decider is None or getattr(model, decider) in values


def signature_differences(saved: dict, current: dict) -> list:
    """[(attribute, saved value, current value)] where two signatures differ. An attribute one
    of them lacks (written before the attribute existed) counts as its default."""
    defaults = {f.name: _json_value(f.name, f.default) for f in dataclasses.fields(ResNetV2)
                if f.default is not dataclasses.MISSING}
    saved, current = {**defaults, **saved}, {**defaults, **current}
    return [(k, saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)]


def save(path: str, model: ResNetV2, variables) -> None:
    """Writes `variables` ({"params", "batch_stats"}; no "batch_stats" without BatchNorm) as a
    safetensors file, one tensor per
    variable named "params/stage1_unit1/conv1/kernel", with `options(model)` in its metadata:
    `load(path)` rebuilds the network without a config or Orbax. timm's and Hugging Face's
    tools read the file too."""
    from safetensors.numpy import save
    if not isinstance(model, ResNetV2):
        raise ValueError(f"models.save writes ResNetV2 networks (whose options load() rebuilds), "
                         f"not {type(model).__name__}")
    for name in ("norm", "conv"):
        if callable(getattr(model, name)):
            raise ValueError(f"the network's {name} is a constructor, which load() cannot "
                             f"rebuild from a file; save networks whose {name} is one of "
                             f"{NORMS if name == 'norm' else CONVS}")
    tensors = {name: np.asarray(value)
               for name, value in traverse_util.flatten_dict(variables, sep="/").items()}
    # Written as ordinary bytes: the file follows the umask (safetensors' own writer makes it
    # private), and any path etils reads (gs:// too) works.
    epath.Path(path).write_bytes(save(tensors, metadata={"format": FILE_FORMAT,
                                                         "options": json.dumps(options(model))}))


def load(path: str, **overrides):
    """(model, variables) from a file written by `save` (or `python -m resnet_v2_jax.export`),
    ready for `model.apply(variables, images, train=False)`. `overrides` replace options, e.g.
    `dtype=jnp.bfloat16` or `bn_axis_name="batch"` for training on several devices."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise errors.WeightsError(f"{path} is not a readable safetensors file ({e})") from e
    if metadata.get("format") != FILE_FORMAT:
        raise errors.WeightsError(
            f"{path} is not a resnet_v2_jax weights file (its metadata has no "
            f"format {FILE_FORMAT!r}); write one with python -m resnet_v2_jax.export")
    values = {**json.loads(metadata["options"]), **overrides}
    for key, value in values.items():
        if key in ("dtype", "param_dtype") and isinstance(value, str):
            values[key] = jnp.dtype(value)
        elif isinstance(value, list):
            values[key] = tuple(value)
    variables = traverse_util.unflatten_dict(
        {name: jnp.asarray(value) for name, value in tensors.items()}, sep="/")
    return ResNetV2(**values), variables
