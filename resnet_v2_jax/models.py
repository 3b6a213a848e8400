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

Each network option is declared once, as an attribute made by `option` (its default, meaning,
allowed values and role in what defines a network); what else needs the options reads that
declaration (`OPTIONS`): the checks of a network's arguments, the options a network hands its
units (those of `UnitOptions`), `weights.signature` and `weights.options`, and the meanings
`--print_config` prints. Weights files and a network's identity are `resnet_v2_jax.weights`, the
scanned and unrolled layouts `resnet_v2_jax.unit_layout`.

This module imports neither TensorFlow nor tfds.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


# What an option is to a network's identity (`Option.role`).
ROLES = ("network", "runtime", "caller")


@dataclasses.dataclass(frozen=True)
class Option:
    """What the declaration of a network option says beside its type and default (`option`).

    Attributes:
        meaning: one line, the one `--print_config` prints for `model.<name>`.
        check: (name, value) -> None, raising a one-line ValueError for a value the option
            cannot take (`one_of`, `number`); None accepts any value.
        used_when: (another option, its values) for an option that has an effect only then:
            other networks ignore it, and their `weights.signature` leaves it out.
        role: what it is to a network's identity: "network" (it defines the function the
            network computes from its weights: part of `weights.signature`), "runtime" (how the
            network runs, not what it computes: dtypes, unit layout; saved with the weights so
            that `weights.load` rebuilds the same network) or "caller" (set by whoever runs the
            network on several devices; never saved).
    """
    meaning: str
    check: Optional[Callable[[str, Any], None]] = None
    used_when: Optional[Tuple[str, Tuple]] = None
    role: str = "network"

    def __post_init__(self):
        one_of(ROLES)("role", self.role)


def option(default, meaning: str, **declaration):
    """Declares a module attribute as a network option: its default (`dataclasses.MISSING` for
    a required one), its meaning and the rest of `Option`. Options are keyword-only."""
    return dataclasses.field(default=default, kw_only=True,
                             metadata={"option": Option(meaning, **declaration)})


def one_of(choices, *, or_constructor: bool = False):
    """An `Option.check`: the value is one of `choices` (or, `or_constructor`, a callable)."""
    def check(name: str, value) -> None:
        if not (or_constructor and callable(value)) and value not in choices:
            raise errors.ConfigError(f"unknown {name} {value!r}; choose one of "
                                     f"{', '.join(map(str, choices))}")
    return check


def number(low: Optional[float] = None, high: Optional[float] = None, *, open_low: bool = False,
           open_high: bool = False):
    """An `Option.check`: the value is a finite real in [low, high] (open ends where asked;
    None bounds are unbounded)."""
    def check(name: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise errors.ConfigError(f"{name} must be a number, got {value!r}")
        if not np.isfinite(value):
            raise errors.ConfigError(f"{name} must be finite, got {value}")
        if low is not None and (value <= low if open_low else value < low):
            raise errors.ConfigError(
                f"{name} must be {'>' if open_low else '>='} {low}, got {value}")
        if high is not None and (value >= high if open_high else value > high):
            raise errors.ConfigError(
                f"{name} must be {'<' if open_high else '<='} {high}, got {value}")
    return check


def declared_options(module_class) -> Dict[str, Option]:
    """{name: its `Option`} of the options a module class declares, in declaration order."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(module_class)
            if "option" in f.metadata}


def _check_options(module: nn.Module) -> None:
    for name, declared in declared_options(type(module)).items():
        if declared.check is not None:
            declared.check(name, getattr(module, name))


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


class UnitOptions(nn.Module):
    """The options of a residual unit that a network sets alike in all its units: the
    attributes `ResidualUnit` and `ResNetV2` share (a network hands its own to every unit)."""
    bottleneck: bool = option(True, "1x1-3x3-1x1 bottleneck units (True) or 3x3-3x3 basic units")
    # Basic units always stride on their first 3x3.
    stride_on: str = option("3x3", 'conv that strides in a bottleneck: "1x1" (authors\' CIFAR '
                            'code) | "3x3" (fb.resnet.torch, timm)', check=one_of(("1x1", "3x3")))
    unit: str = option("full_preact", "Fig. 4: original | bn_after_add | relu_before_add | "
                       "relu_preact | full_preact", check=one_of(UNIT_PLACEMENTS))
    shortcut: str = option("identity", "Fig. 2: identity | scaling | exclusive_gate | "
                           "shortcut_gate | conv | dropout", check=one_of(SHORTCUTS))
    shortcut_scale: float = option(1.0, '"scaling" only: lambda on the shortcut (Fig. 2b)',
                                   check=number(), used_when=("shortcut", ("scaling",)))
    residual_scale: float = option(1.0, '"scaling" only: lambda on F (Fig. 2b)', check=number(),
                                   used_when=("shortcut", ("scaling",)))
    gate_bias_init: float = option(0.0, "gating only: b_g, the gate's initial bias (Fig. 2c-d)",
                                   check=number(),
                                   used_when=("shortcut", ("exclusive_gate", "shortcut_gate")))
    shortcut_dropout_rate: float = option(0.5, '"dropout" only: drop rate (Fig. 2f)',
                                          check=number(0.0, 1.0, open_high=True),
                                          used_when=("shortcut", ("dropout",)))

    def __post_init__(self):
        _check_options(self)
        super().__post_init__()


class ResidualUnit(UnitOptions):
    """One residual unit, x_{l+1} = f(h(x_l) + F(x_l)) (eq. 1-2), basic or bottleneck, with the
    options of `UnitOptions` (each one's meaning is its declaration).

    Attributes:
        features: output channels. A bottleneck unit's inner width is features // 4.
        norm: normalisation constructor with its options (for BatchNorm `use_running_average`)
            already bound; called with `name=` only.
        conv: Conv constructor with dtype bound (see `_conv` for its interface and defaults).
        strides: spatial stride of the unit.
        preact: one of `PREACT_MODES`.
        deterministic: disables the dropout shortcut (evaluation).
    """
    features: int
    norm: ModuleDef
    conv: ModuleDef = _conv
    strides: int = 1
    preact: str = "branch"
    deterministic: bool = True

    def __post_init__(self):
        one_of(PREACT_MODES)("preact", self.preact)
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


class ResNetV2(UnitOptions):
    """A residual network of `ResidualUnit`s in stages.

    stem -> stages (the first unit of each stage may change shape, the rest are identical)
    -> the units' own pre-activation (the paper's extra BN-ReLU after the last unit) -> global
    average pool -> linear classifier.

    Its attributes are the network's options, each declared once with its meaning (`option`):
    those of `UnitOptions`, handed to every unit, and the network's own below. Configs pass
    theirs as `create(**config.model)`; checkpoints, `init_from` and weights files compare or
    store `weights.signature` / `weights.options` of the built network.
    """
    stage_sizes: Sequence[int] = option(dataclasses.MISSING, "units per stage")
    widths: Sequence[int] = option(dataclasses.MISSING, "output channels per stage")
    num_classes: Optional[int] = option(
        1000, "classifier outputs; None: a headless backbone returning pooled features")
    stem: str = option("imagenet", '"cifar" (3x3 conv) | "imagenet" (7x7/2 conv, 3x3/2 max-pool)',
                       check=one_of(("cifar", "imagenet")))
    # "before_pool" is preresnet.lua (conv-BN-ReLU-pool, then the first unit has no
    # pre-activation); "after_pool" is timm's ResNetV2 (conv-pool, then the first unit
    # pre-activates and shares it with its projection).
    stem_norm: str = option("before_pool", 'ImageNet only: "before_pool" (paper) | "after_pool" '
                            "(timm; needs a pre-activation unit)",
                            check=one_of(("before_pool", "after_pool")))
    stem_width: int = option(64, "channels of the stem conv")
    stem_pool_pad: str = option("-inf", 'ImageNet only: the stem max-pool\'s padding, "-inf" '
                                '(paper, timm) | "zero" (BiT)', check=one_of(STEM_POOL_PADS))
    norm: Any = option("batch", '"batch" (the paper) | "group" (BiT) | "layer", or a constructor',
                       check=one_of(NORMS, or_constructor=True))
    norm_groups: int = option(32, 'norm="group" only: GroupNorm\'s groups (BiT\'s 32)',
                              used_when=("norm", ("group",)))
    conv: Any = option("plain", '"plain" | "weight_standardized" (BiT), or a constructor',
                       check=one_of(CONVS, or_constructor=True))
    conv_epsilon: float = option(1e-8, "weight_standardized only: timm's 1e-8, BiT's 1e-10",
                                 check=number(0.0, open_low=True),
                                 used_when=("conv", ("weight_standardized",)))
    bn_momentum: float = option(0.9, 'norm="batch" only: running-average momentum (Torch\'s '
                                "BN momentum 0.1)", check=number(0.0, 1.0),
                                used_when=("norm", ("batch",)))
    bn_epsilon: float = option(1e-5, "the norm layers' epsilon (Torch's BN default)",
                               check=number(0.0, open_low=True))
    # Logits are returned as float32 (as `param_dtype` when that is float64).
    dtype: Any = option(jnp.float32, "compute dtype (e.g. bfloat16); params and BN statistics "
                        "stay param_dtype", role="runtime")
    param_dtype: Any = option(jnp.float32, "dtype of parameters and BN statistics: float32, or "
                              "float64 for exact equivalence tests (needs jax_enable_x64)",
                              role="runtime")
    # None: over the batch this call sees (per device under pmap or shard_map; the whole global
    # batch under jax.jit over sharded arrays).
    bn_axis_name: Any = option(None, "mapped axis name(s) over which training averages BN batch "
                               "statistics", role="caller")
    bn_axis_index_groups: Any = option(None, "axis_index_groups of that average (pmap only)",
                                       role="caller")
    # Parameters of units 2..n of stage s are stacked under "stage{s}_repeat"
    # (`unit_layout.scanned_to_unrolled` / `unrolled_to_scanned`).
    scan_units: bool = option(False, "nn.scan over the identical units of a stage (compile time "
                              "does not grow with depth)", role="runtime")
    remat_units: bool = option(False, "nn.remat each unit (memory for compute)", role="runtime")

    def __post_init__(self):
        super().__post_init__()  # each option's own check first
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
                # Every variable collection has one slice per iteration (True: all of them),
                # whatever the collections are: the units' own, and any a caller adds.
                x, _ = nn.scan(_ScanBody, variable_axes={True: 0}, split_rngs={
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


# The options a network hands to each of its units.
UNIT_OPTIONS = tuple(declared_options(UnitOptions))
# Every option of a network, in declaration order: the one table the rest reads.
OPTIONS = declared_options(ResNetV2)


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
    one_of(CIFAR_WIDTHS)("block", block)
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
# The meanings of the arguments of `create` that are not options of `ResNetV2`: with `OPTIONS`,
# every key a config's model section can hold.
FACTORY_ARGUMENTS = {
    "arch": '"cifar" or "imagenet": the factory (docs/paper.md)',
    "depth": "CIFAR: 6n+2 basic, 9n+2 bottleneck; ImageNet: 18, 34, 50, 101, 152, 200",
    "block": 'CIFAR only: "basic" | "bottleneck" units',
}


def create(arch: str, depth: int, num_classes: Optional[int], **options) -> ResNetV2:
    """The network a config's `model` section names: `create(num_classes=10, **config.model)`.
    `arch` picks the factory (`ARCHITECTURES`), the rest are its arguments."""
    one_of(ARCHITECTURES)("arch", arch)
    try:
        return ARCHITECTURES[arch](depth, num_classes, **options)
    except TypeError as e:  # an option the factory does not take
        raise errors.ConfigError(f"{arch} networks take no such option ({e})") from e
