"""Tests of `resnet_v2_jax.models` against the paper (docs/paper.md) and its public contract.

Units and small networks are checked against the formulas of Fig. 2 (shortcuts) and Fig. 4 (where
BN and ReLU sit) written out with lax/jnp ops on the modules' own weights, with randomised BN
parameters and statistics (eval mode). Networks are checked against the paper's parameter counts,
eq. (4)/(5), the scanned/unrolled layouts, bf16 compute, feature extraction and cross-device BN.
"""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_v2_jax import models, unit_layout, weights

EPS = 1e-5
UNITS = tuple(models.UNIT_PLACEMENTS)
PRE_ACTIVATION_UNITS = ("relu_preact", "full_preact")
EVAL_NORM = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=EPS)
relu = jax.nn.relu

# A small two-stage bottleneck network: stage 1 keeps the stem's 8 channels (identity-shaped first
# unit), stage 2 projects to 16 channels with stride 2.
TINY = dict(stage_sizes=(3, 3), widths=(8, 16), stem="cifar", stem_width=8, num_classes=5)


# ----------------------------------------------------------------------------------------------
# The paper's formulas, written out with lax/jnp ops.

def conv(x, kernel, stride=1):
    """Torch-style conv: symmetric (k-1)/2 padding, NHWC input, HWIO kernel, no bias."""
    pad = (kernel.shape[0] - 1) // 2
    return lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad)] * 2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)


def bn(x, variables, name):
    """Eval-mode BatchNorm with the running statistics of `variables[...][name]`."""
    p, s = variables["params"][name], variables["batch_stats"][name]
    return (x - s["mean"]) / jnp.sqrt(s["var"] + EPS) * p["scale"] + p["bias"]


def max_pool_3x3_s2(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                             ((0, 0), (1, 1), (1, 1), (0, 0)))


def conv_strides(bottleneck, strides, stride_on):
    """Stride of each weight layer of F: basic units stride on the first 3x3."""
    if not bottleneck:
        return (strides, 1)
    return (strides, 1, 1) if stride_on == "1x1" else (1, strides, 1)


def reference_branch(x, v, unit, strides, preactivate_input=True):
    """The residual function F of Fig. 4 (a)-(e), layer by layer; `strides` has one per layer."""
    n = len(strides)

    def c(i, y):
        return conv(y, v["params"][f"conv{i}"]["kernel"], strides[i - 1])

    def b(i, y):
        return bn(y, v, f"bn{i}")

    y = x
    if unit == "original":  # (a) conv-BN-ReLU-...-conv-BN
        for i in range(1, n):
            y = relu(b(i, c(i, y)))
        return b(n, c(n, y))
    if unit == "bn_after_add":  # (b) conv-BN-ReLU-...-conv
        for i in range(1, n):
            y = relu(b(i, c(i, y)))
        return c(n, y)
    if unit == "relu_before_add":  # (c) conv-BN-ReLU-...-conv-BN-ReLU
        for i in range(1, n + 1):
            y = relu(b(i, c(i, y)))
        return y
    if unit == "relu_preact":  # (d) ReLU-conv-BN-...-ReLU-conv-BN
        for i in range(1, n + 1):
            y = b(i, c(i, relu(y) if i > 1 or preactivate_input else y))
        return y
    assert unit == "full_preact"  # (e) BN-ReLU-conv-...-BN-ReLU-conv
    for i in range(1, n + 1):
        y = c(i, relu(b(i, y)) if i > 1 or preactivate_input else y)
    return y


def reference_unit(x, v, *, unit, shortcut, features, bottleneck, strides, stride_on="1x1",
                   preact="branch", shortcut_scale=1.0, residual_scale=1.0):
    """x_{l+1} = f(h(x_l) + F(x_l)) with h of Fig. 2 (a)-(f) and f of Fig. 4 (eval mode)."""
    p = v["params"]
    residual = reference_branch(x, v, unit, conv_strides(bottleneck, strides, stride_on),
                                preactivate_input=preact != "none")
    projects = shortcut == "conv" or strides != 1 or x.shape[-1] != features
    assert ("proj_conv" in p) == projects
    # Where the unit projects, the projection (and the gate) take the pre-activation shared with F.
    shortcut_in = x
    if projects and preact == "shared":
        if unit == "full_preact":
            shortcut_in = relu(bn(x, v, "bn1"))
        elif unit == "relu_preact":
            shortcut_in = relu(x)
    h = x
    if projects:
        h = conv(shortcut_in, p["proj_conv"]["kernel"], strides)
        if unit == "original":  # conv-BN projection of the original ResNet
            h = bn(h, v, "proj_bn")
    if shortcut in ("exclusive_gate", "shortcut_gate"):
        g = jax.nn.sigmoid(conv(shortcut_in, p["gate"]["kernel"], strides) + p["gate"]["bias"])
    if shortcut == "scaling":
        out = shortcut_scale * h + residual_scale * residual
    elif shortcut == "exclusive_gate":
        out = (1 - g) * h + g * residual
    elif shortcut == "shortcut_gate":
        out = (1 - g) * h + residual
    else:  # identity, conv, and dropout in evaluation
        out = h + residual
    if unit == "original":
        return relu(out)
    if unit == "bn_after_add":
        return relu(bn(out, v, "bn_out"))
    return out


def reference_network(x, v, net):
    """A `ResNetV2` in eval mode, composed from `reference_unit`s."""
    p = v["params"]
    preactivates = net.unit in PRE_ACTIVATION_UNITS
    if net.stem == "cifar":
        y = conv(x, p["stem_conv"]["kernel"])
        if not preactivates:
            y = relu(bn(y, v, "stem_bn"))
        first_preact = "shared"
    else:
        y = conv(x, p["stem_conv"]["kernel"], 2)
        if net.stem_norm == "before_pool":
            y = relu(bn(y, v, "stem_bn"))
        y = max_pool_3x3_s2(y)
        first_preact = "shared" if net.stem_norm == "after_pool" else "none"
    for s, (size, width) in enumerate(zip(net.stage_sizes, net.widths), start=1):
        for u in range(1, size + 1):
            preact = (first_preact if s == 1 else "shared") if u == 1 else "branch"
            y = reference_unit(y, unit_variables(v, f"stage{s}_unit{u}"), unit=net.unit,
                               shortcut=net.shortcut, features=width, bottleneck=net.bottleneck,
                               strides=2 if s > 1 and u == 1 else 1, stride_on=net.stride_on,
                               preact=preact)
    # The extra activation after the last unit: what a next unit's branch would apply.
    if net.unit == "full_preact":
        y = relu(bn(y, v, "final_bn"))
    elif net.unit == "relu_preact":
        y = relu(y)
    return y.mean(axis=(1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]


# ----------------------------------------------------------------------------------------------
# Helpers.

def randomized(variables, seed=0):
    """Random BN scale/bias, running mean/var and biases, so BN and gates are no-ops nowhere."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def draw(path, leaf, key):
        name = path[-1].key
        if name == "scale":
            return jax.random.uniform(key, leaf.shape, minval=0.5, maxval=1.5)
        if name in ("bias", "mean"):
            return 0.3 * jax.random.normal(key, leaf.shape)
        if name == "var":
            return jax.random.uniform(key, leaf.shape, minval=0.5, maxval=2.0)
        return leaf

    return treedef.unflatten([draw(path, leaf, key) for (path, leaf), key in zip(leaves, keys)])


def zero_last_convs(variables, num_layers):
    """Zeroes the last weight layer of every residual branch, so every F is 0."""
    def zero(path, leaf):
        names = [getattr(entry, "key", None) for entry in path]
        return jnp.zeros_like(leaf) if f"conv{num_layers}" in names else leaf
    return jax.tree_util.tree_map_with_path(zero, variables)


def unit_variables(variables, name):
    return {col: tree[name] for col, tree in variables.items() if name in tree}


def images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


@functools.cache
def init_shapes(factory, depth, **options):
    """Shapes of the variables of `factory(depth, **options)`, without computing anything."""
    model = factory(depth, **options)
    x = jnp.zeros((1, 32, 32, 3) if factory is models.cifar_resnet else (1, 224, 224, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def count(tree, exclude_bn=False):
    """Number of scalars in `tree`; optionally without the leaves of BN modules."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if exclude_bn and any("bn" in str(getattr(entry, "key", "")) for entry in path):
            continue
        total += int(np.prod(leaf.shape))
    return total


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------------------------
# Architecture: parameter counts and option validation.

@pytest.mark.parametrize("factory, depth, expected", [
    (models.cifar_resnet, 164, 1_703_258),
    (models.cifar_resnet, 1001, 10_327_706),
    (models.imagenet_resnet, 50, 25_549_352),
    (models.imagenet_resnet, 101, 44_541_480),
    (models.imagenet_resnet, 152, 60_185_128),
    (models.imagenet_resnet, 200, 64_666_152),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_parameter_count_matches_paper(factory, depth, expected):
    assert count(init_shapes(factory, depth)["params"]) == expected


@pytest.mark.parametrize("depth, expected", [(164, 1_679_034), (1001, 10_178_490)])
def test_cifar_parameter_count_without_bn_matches_paper(depth, expected):
    assert count(init_shapes(models.cifar_resnet, depth)["params"], exclude_bn=True) == expected


def test_scanned_and_unrolled_layouts_have_the_same_parameters():
    unrolled, scanned = (init_shapes(models.cifar_resnet, 164, scan_units=scan)
                         for scan in (False, True))
    assert "stage2_repeat" in scanned["params"] and "stage2_unit2" not in scanned["params"]
    converted = jax.eval_shape(unit_layout.unrolled_to_scanned, unrolled)
    assert jax.tree.map(lambda a: a.shape, converted) == jax.tree.map(lambda a: a.shape, scanned)


BAD_OPTIONS = {
    "cifar_bottleneck_depth": (lambda: models.cifar_resnet(165), r"9n\+2"),
    "cifar_basic_depth": (lambda: models.cifar_resnet(111, block="basic"), r"6n\+2"),
    "cifar_too_shallow": (lambda: models.cifar_resnet(2), r"9n\+2"),
    "block": (lambda: models.cifar_resnet(20, block="wide"), "unknown block 'wide'"),
    "unit": (lambda: models.cifar_resnet(164, unit="post_act"), "unknown unit 'post_act'"),
    "shortcut": (lambda: models.cifar_resnet(164, shortcut="gate"), "unknown shortcut 'gate'"),
    "stride_on": (lambda: models.cifar_resnet(164, stride_on="5x5"), "unknown stride_on"),
    "imagenet_depth": (lambda: models.imagenet_resnet(77), "depth must be one of"),
    "stem": (lambda: models.ResNetV2(stage_sizes=(1,), widths=(8,), stem="tiny"),
             "unknown stem 'tiny'"),
    "stem_norm": (lambda: models.imagenet_resnet(50, stem_norm="after_stage"), "unknown stem_norm"),
    "after_pool_original": (lambda: models.imagenet_resnet(50, stem_norm="after_pool",
                                                           unit="original"),
                            "needs a pre-activation unit"),
    "after_pool_bn_after_add": (lambda: models.imagenet_resnet(50, stem_norm="after_pool",
                                                               unit="bn_after_add"),
                                "needs a pre-activation unit"),
    "stage_widths_mismatch": (lambda: models.ResNetV2(stage_sizes=(1, 1), widths=(8,)),
                              "same length"),
    "empty_stage": (lambda: models.ResNetV2(stage_sizes=(1, 0), widths=(8, 16)),
                    "at least one unit"),
    "bottleneck_width": (lambda: models.ResNetV2(stage_sizes=(1,), widths=(6,)), "divide by 4"),
    "unit_shortcut": (lambda: models.ResidualUnit(8, EVAL_NORM, shortcut="gating"),
                      "unknown shortcut 'gating'"),
    "unit_unit": (lambda: models.ResidualUnit(8, EVAL_NORM, unit="preact"),
                  "unknown unit 'preact'"),
    "unit_preact": (lambda: models.ResidualUnit(8, EVAL_NORM, preact="both"),
                    "unknown preact 'both'"),
    "dropout_rate": (lambda: models.cifar_resnet(20, block="basic", shortcut_dropout_rate=2.0),
                     r"shortcut_dropout_rate must be < 1.0, got 2.0"),
    "nan_scale": (lambda: models.cifar_resnet(20, block="basic", shortcut_scale=float("nan")),
                  "shortcut_scale must be finite, got nan"),
    "bn_epsilon": (lambda: models.cifar_resnet(20, block="basic", bn_epsilon=0.0),
                   "bn_epsilon must be > 0.0"),
    "bn_momentum": (lambda: models.cifar_resnet(20, block="basic", bn_momentum=1.5),
                    "bn_momentum must be <= 1.0"),
    "cifar_stem_norm": (lambda: models.cifar_resnet(20, block="basic", stem_norm="after_pool"),
                        "stem_norm and stem_pool_pad apply to the imagenet stem only"),
    "stem_pool_pad": (lambda: models.imagenet_resnet(18, stem_pool_pad="one"),
                      "unknown stem_pool_pad 'one'"),
    "norm": (lambda: models.cifar_resnet(20, block="basic", norm="instance"),
             "unknown norm 'instance'; choose one of batch, group, layer"),
    "conv": (lambda: models.cifar_resnet(20, block="basic", conv="ws"), "unknown conv 'ws'"),
    "norm_groups": (lambda: models.cifar_resnet(20, block="basic", norm="group"),
                    r"norm_groups=32 must divide every normalised channel count \(16, 32, 64\): "
                    r"one of \[1, 2, 4, 8, 16\]$"),
    "num_classes": (lambda: models.cifar_resnet(20, 0, block="basic"), "num_classes must be"),
    "arch": (lambda: models.create("tiny", 20, 10), "unknown arch 'tiny'"),
    "arch_option": (lambda: models.create("imagenet", 50, 10, block="basic"),
                    "imagenet networks take no such option"),
}


@pytest.mark.parametrize("build, message", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options_raise_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_init_follows_authors_code():
    """He fan-out N(0, 2/(k*k*out)) convs without bias, BN 1/0, Torch's Linear init."""
    model = models.ResNetV2(stage_sizes=(1,), widths=(256,), stem="cifar", stem_width=64,
                            num_classes=10)
    init = jax.jit(model.init, static_argnames="train")
    params = init(jax.random.key(0), images((1, 8, 8, 3)), train=False)["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in leaves:
        module, name = path[-2].key, path[-1].key
        if "conv" in module:
            assert name == "kernel", f"{module} has a {name}"
            k, _, _, out = leaf.shape
            if leaf.size >= 4096:
                np.testing.assert_allclose(leaf.std(), np.sqrt(2 / (k * k * out)), rtol=0.05)
        elif "bn" in module:
            np.testing.assert_array_equal(leaf, 1.0 if name == "scale" else 0.0)
    head = params["head"]
    bound = 1 / np.sqrt(256)
    assert float(jnp.abs(head["kernel"]).max()) <= bound < 1.1 * float(jnp.abs(head["kernel"]).max())
    np.testing.assert_array_equal(head["bias"], 0.0)


# ----------------------------------------------------------------------------------------------
# Single units against Fig. 2 / Fig. 4.

SHAPES = {  # name: (output features, stride, preact mode the network gives such a unit)
    "identity_shaped": (8, 1, "branch"),
    "projection": (16, 2, "shared"),
}


def init_unit(module, x, seed=0):
    return randomized(module.init(jax.random.key(seed), x), seed + 1)


@pytest.mark.parametrize("shape", tuple(SHAPES))
@pytest.mark.parametrize("bottleneck", (False, True), ids=("basic", "bottleneck"))
@pytest.mark.parametrize("shortcut", models.SHORTCUTS)
@pytest.mark.parametrize("unit", UNITS)
def test_unit_matches_paper_formula(unit, shortcut, bottleneck, shape):
    features, strides, preact = SHAPES[shape]
    options = dict(unit=unit, shortcut=shortcut, bottleneck=bottleneck, strides=strides,
                   stride_on="1x1", preact=preact, shortcut_scale=0.5, residual_scale=0.7)
    module = models.ResidualUnit(features, EVAL_NORM, gate_bias_init=-2.0, **options)
    x = images((2, 8, 8, 8))
    v = init_unit(module, x)
    out = module.apply(v, x)
    assert out.shape == (2, 8 // strides, 8 // strides, features)
    expected = reference_unit(x, v, features=features, **options)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unit", PRE_ACTIVATION_UNITS)
def test_unit_without_preactivation_matches_formula(unit):
    """preact="none": ImageNet's first unit after the BN-ReLU stem activates nothing itself."""
    options = dict(unit=unit, shortcut="identity", features=16, bottleneck=True, strides=1,
                   stride_on="3x3")
    module = models.ResidualUnit(norm=EVAL_NORM, preact="none", **options)
    x = images((2, 8, 8, 8))
    v = init_unit(module, x)
    assert ("bn1" in v["params"]) == (unit == "relu_preact")  # relu_preact: BN after conv1
    np.testing.assert_allclose(module.apply(v, x), reference_unit(x, v, preact="none", **options),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bottleneck", (False, True), ids=("basic", "bottleneck"))
def test_projection_takes_shared_preactivation_identity_shortcut_takes_raw_x(bottleneck):
    num_layers = 3 if bottleneck else 2
    x = images((2, 8, 8, 8))
    projecting = models.ResidualUnit(16, EVAL_NORM, bottleneck=bottleneck, strides=2,
                                     preact="shared")
    v = zero_last_convs(init_unit(projecting, x), num_layers)
    kernel = v["params"]["proj_conv"]["kernel"]
    out = projecting.apply(v, x)
    np.testing.assert_allclose(out, conv(relu(bn(x, v, "bn1")), kernel, 2), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, conv(x, kernel, 2), atol=1e-2)
    # An identity-shaped unit never shares: its shortcut is the raw x, whatever preact says.
    for preact in ("branch", "shared"):
        identity = models.ResidualUnit(8, EVAL_NORM, bottleneck=bottleneck, preact=preact)
        v = zero_last_convs(init_unit(identity, x), num_layers)
        np.testing.assert_array_equal(identity.apply(v, x), x)


@pytest.mark.parametrize("stride_on", ("1x1", "3x3"))
def test_stride_placement_in_bottleneck(stride_on):
    module = models.ResidualUnit(16, EVAL_NORM, strides=2, stride_on=stride_on, preact="shared")
    x = images((2, 8, 8, 8))
    v = init_unit(module, x)
    out, state = module.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    conv1_size = 4 if stride_on == "1x1" else 8
    assert inter["conv1"]["__call__"][0].shape == (2, conv1_size, conv1_size, 4)
    assert inter["conv2"]["__call__"][0].shape == (2, 4, 4, 4)
    assert inter["proj_conv"]["__call__"][0].shape == (2, 4, 4, 16)
    assert v["params"]["conv1"]["kernel"].shape == (1, 1, 8, 4)
    assert v["params"]["conv2"]["kernel"].shape == (3, 3, 4, 4)
    expected = reference_unit(x, v, unit="full_preact", shortcut="identity", features=16,
                              bottleneck=True, strides=2, stride_on=stride_on, preact="shared")
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_basic_unit_strides_on_its_first_3x3_whatever_stride_on_says():
    module = models.ResidualUnit(16, EVAL_NORM, bottleneck=False, strides=2, stride_on="3x3",
                                 preact="shared")
    x = images((2, 8, 8, 8))
    v = init_unit(module, x)
    _, state = module.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    assert state["intermediates"]["conv1"]["__call__"][0].shape == (2, 4, 4, 16)


@pytest.mark.parametrize("shortcut", ("exclusive_gate", "shortcut_gate"))
def test_gate_bias_is_initialised_to_b_g(shortcut):
    module = models.ResidualUnit(8, EVAL_NORM, unit="original", shortcut=shortcut,
                                 gate_bias_init=-6.0)
    params = module.init(jax.random.key(0), images((2, 8, 8, 8)))["params"]
    np.testing.assert_array_equal(params["gate"]["bias"], np.full(8, -6.0, np.float32))
    assert params["gate"]["kernel"].shape == (1, 1, 8, 8)


def test_dropout_shortcut_drops_half_and_scales_by_two():
    module = models.ResidualUnit(8, EVAL_NORM, shortcut="dropout", bottleneck=False,
                                 deterministic=False)
    x = images((2, 8, 8, 8))
    v = zero_last_convs(module.init(jax.random.key(0), x), 2)
    out = module.apply(v, x, rngs={"dropout": jax.random.key(1)})  # F = 0: out = dropout(x)
    dropped = np.asarray(out) == 0
    np.testing.assert_allclose(np.where(dropped, 0.0, out), np.where(dropped, 0.0, 2 * x),
                               rtol=1e-6)
    assert 0.42 < dropped.mean() < 0.58  # 1024 draws: 5 sigma
    np.testing.assert_array_equal(module.clone(deterministic=True).apply(v, x), x)


@pytest.mark.parametrize("scan_units", [False, True], ids=["unrolled", "scanned"])
def test_network_dropout_shortcut_is_random_in_training_only(scan_units):
    model = models.ResNetV2(**TINY, shortcut="dropout", scan_units=scan_units)
    x = images((4, 8, 8, 3))
    v = model.init(jax.random.key(0), x, train=False)
    train = [model.apply(v, x, train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.key(seed)})[0] for seed in (1, 2)]
    assert not np.allclose(train[0], train[1])
    np.testing.assert_array_equal(model.apply(v, x, train=False), model.apply(v, x, train=False))


# ----------------------------------------------------------------------------------------------
# Whole networks against the composition of the formulas.

@pytest.mark.parametrize("stem, stem_norm, unit", [("cifar", "before_pool", u) for u in UNITS] + [
    ("imagenet", "before_pool", "full_preact"),
    ("imagenet", "before_pool", "original"),
    ("imagenet", "after_pool", "full_preact"),
])
def test_network_matches_composed_formulas(stem, stem_norm, unit):
    net = models.ResNetV2(stage_sizes=(2, 2), widths=(8, 16), stem=stem, stem_norm=stem_norm,
                          stem_width=4, unit=unit, num_classes=3)
    size = 8 if stem == "cifar" else 16  # the ImageNet stem downsamples by 4
    x = images((2, size, size, 3))
    v = randomized(net.init(jax.random.key(0), x, train=False), 1)
    assert ("stem_bn" in v["params"]) == (stem_norm == "before_pool" if stem == "imagenet"
                                          else unit not in PRE_ACTIVATION_UNITS)
    np.testing.assert_allclose(net.apply(v, x, train=False), reference_network(x, v, net),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Eq. (4) and (5): identity mappings propagate the signal unchanged.

EQ4_NET = models.ResNetV2(stage_sizes=(2, 4), widths=(8, 16), stem="cifar", stem_width=8,
                          bottleneck=False, num_classes=3)


def eq4_variables(zero_branches):
    v = randomized(EQ4_NET.init(jax.random.key(0), images((2, 8, 8, 3)), train=False), 1)
    return zero_last_convs(v, 2) if zero_branches else v


def identity_units(v, stage, units):
    """x_l -> x_L through identity units `units` of `stage`, applied directly (eval mode)."""
    module = models.ResidualUnit(EQ4_NET.widths[stage - 1], EVAL_NORM, bottleneck=False)

    def forward(x):
        for u in units:
            x = module.apply(unit_variables(v, f"stage{stage}_unit{u}"), x)
        return x

    return forward


def test_eq4_zero_branches_leave_signal_unchanged_across_identity_units():
    v = eq4_variables(zero_branches=True)
    x = images((2, 8, 8, 3))
    _, state = EQ4_NET.apply(v, x, train=False, capture_intermediates=True,
                             mutable=["intermediates"])
    inter = state["intermediates"]
    for stage, size in enumerate(EQ4_NET.stage_sizes, start=1):
        x_l = inter[f"stage{stage}_unit1"]["__call__"][0]
        assert float(jnp.abs(x_l).max()) > 0.1
        for u in range(2, size + 1):
            np.testing.assert_array_equal(inter[f"stage{stage}_unit{u}"]["__call__"][0], x_l)
        np.testing.assert_array_equal(inter[f"stage{stage}"][0], x_l)


def test_eq5_jacobian_is_identity_when_branches_are_zero():
    forward = identity_units(eq4_variables(zero_branches=True), 2, range(2, 5))
    x = images((1, 4, 4, 16))
    jac = jax.jacfwd(forward)(x).reshape(x.size, x.size)
    np.testing.assert_array_equal(jac, np.eye(x.size))


def test_eq5_jacobian_is_identity_plus_the_branch_terms():
    """dx_L/dx_l = I + d(sum_i F(x_i))/dx_l, with each F written out as Fig. 4e."""
    v = eq4_variables(zero_branches=False)
    units = range(2, 5)
    forward = identity_units(v, 2, units)

    def branch_sum(x):  # sum_{i=l}^{L-1} F(x_i), x_{i+1} = x_i + F(x_i)   (eq. 4)
        total = jnp.zeros_like(x)
        for u in units:
            f = reference_branch(x, unit_variables(v, f"stage2_unit{u}"), "full_preact", (1, 1))
            total, x = total + f, x + f
        return total

    x = images((1, 4, 4, 16))
    np.testing.assert_allclose(forward(x), x + branch_sum(x), rtol=1e-5, atol=1e-5)
    jac = jax.jacfwd(forward)(x).reshape(x.size, x.size)
    branch_jac = jax.jacfwd(branch_sum)(x).reshape(x.size, x.size)
    assert np.abs(jac - np.eye(x.size)).max() > 0.1
    np.testing.assert_allclose(jac - np.eye(x.size), branch_jac, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Scanned and unrolled layouts, rematerialisation.

@functools.cache
def tiny_setup():
    """TINY (unrolled), its randomised variables and a batch of 4 images with labels."""
    model = models.ResNetV2(**TINY)
    x = images((4, 8, 8, 3))
    labels = jnp.arange(4) % TINY["num_classes"]
    return model, randomized(model.init(jax.random.key(0), x, train=False), 1), x, labels


def layout(variables, scan_units):
    return unit_layout.unrolled_to_scanned(variables) if scan_units else variables


def unrolled(tree, collection):
    return unit_layout.scanned_to_unrolled({collection: tree})[collection]


@functools.cache
def tiny_eval(scan_units):
    """Eval-mode logits of TINY in the given layout."""
    model, v, x, _ = tiny_setup()
    return jax.jit(model.clone(scan_units=scan_units).apply, static_argnames="train")(
        layout(v, scan_units), x, train=False)


@functools.cache
def tiny_train_step(scan_units, remat_units):
    """(loss, logits, updated batch_stats, grads) of a training step of TINY.

    Computed in the given layout and returned in the unrolled one.
    """
    model, v, x, labels = tiny_setup()
    model = model.clone(scan_units=scan_units, remat_units=remat_units)

    def loss_fn(params, batch_stats):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"])
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
        return loss, (logits, updates["batch_stats"])

    v = layout(v, scan_units)
    (loss, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        v["params"], v["batch_stats"])
    return loss, logits, unrolled(stats, "batch_stats"), unrolled(grads, "params")


def test_scanned_unrolled_conversion_round_trips_exactly():
    _, v, _, _ = tiny_setup()
    scanned = unit_layout.unrolled_to_scanned(v)
    assert scanned["params"]["stage1_repeat"]["unit"]["conv1"]["kernel"].shape == (2, 1, 1, 8, 2)
    assert_trees_equal(unit_layout.scanned_to_unrolled(scanned), v)
    assert_trees_equal(unit_layout.unrolled_to_scanned(unit_layout.scanned_to_unrolled(scanned)), scanned)


def test_scanned_network_matches_unrolled_in_eval_mode():
    np.testing.assert_allclose(tiny_eval(True), tiny_eval(False), rtol=1e-5, atol=1e-5)


def test_scanned_network_matches_unrolled_in_training():
    """Same loss, logits, updated batch_stats and gradients (float32, tolerance 1e-5)."""
    scanned, plain = tiny_train_step(True, False), tiny_train_step(False, False)
    assert_trees_close(scanned, plain)
    grads = plain[3]
    assert float(jnp.abs(grads["stage2_unit3"]["conv1"]["kernel"]).max()) > 0


@pytest.mark.parametrize("scan_units", (False, True), ids=("unrolled", "scanned"))
def test_remat_gives_identical_outputs_and_gradients(scan_units):
    """Forward results are bitwise equal; gradients up to XLA's fusion rounding (~1e-8 abs)."""
    *remat_outputs, remat_grads = tiny_train_step(scan_units, True)
    *outputs, grads = tiny_train_step(scan_units, False)
    assert_trees_equal(remat_outputs, outputs)
    assert_trees_close(remat_grads, grads, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Reuse options: bf16, headless backbone, feature maps, the train flag, BN statistics.

def test_bf16_compute_keeps_float32_params_stats_and_logits():
    """bf16 logits are within 2% of the float32 logits' range (measured: ~0.3%)."""
    model, v, x, _ = tiny_setup()
    bf16 = model.clone(dtype=jnp.bfloat16)
    v16 = bf16.init(jax.random.key(0), x, train=False)
    assert {leaf.dtype for leaf in jax.tree.leaves(v16)} == {jnp.dtype(jnp.float32)}
    for train in (False, True):
        got, updates = bf16.apply(v, x, train=train, mutable=["batch_stats"])
        expected = model.apply(v, x, train=train, mutable=["batch_stats"])[0]
        assert got.dtype == jnp.float32
        assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
        scale = float(expected.max() - expected.min())
        assert float(jnp.abs(got - expected).max()) < 0.02 * scale


def test_headless_backbone_returns_pooled_features():
    model = models.ResNetV2(**{**TINY, "num_classes": None})
    x = images((4, 8, 8, 3))
    v = model.init(jax.random.key(0), x, train=False)
    assert "head" not in v["params"]
    features = model.apply(v, x, train=False)
    assert features.shape == (4, 16) and features.dtype == jnp.float32


@pytest.mark.parametrize("build, size, expected", [
    (lambda **kw: models.cifar_resnet(20, block="basic", **kw), 32,
     [(32, 16), (16, 32), (8, 64)]),
    (lambda **kw: models.cifar_resnet(29, **kw), 32, [(32, 64), (16, 128), (8, 256)]),
    (lambda **kw: models.imagenet_resnet(50, **kw), 224,
     [(56, 256), (28, 512), (14, 1024), (7, 2048)]),
], ids=("cifar20", "cifar29", "imagenet50"))
@pytest.mark.parametrize("scan_units", (False, True), ids=("unrolled", "scanned"))
def test_per_stage_feature_maps_have_expected_shapes(build, size, expected, scan_units):
    model = build(scan_units=scan_units)
    x = jnp.zeros((2, size, size, 3))

    def features(x):
        v = model.init(jax.random.key(0), x, train=False)
        return model.apply(v, x, train=False, mutable=["intermediates"])[1]["intermediates"]

    inter = jax.eval_shape(features, x)
    assert sorted(inter) == [f"stage{s}" for s in range(1, len(expected) + 1)] + ["stem"]
    for s, (hw, channels) in enumerate(expected, start=1):
        assert inter[f"stage{s}"][0].shape == (2, hw, hw, channels)


def test_a_scanned_stage_carries_any_collection_a_caller_adds_one_slice_per_unit():
    """The network names no tool's collection: one a caller adds (here sown by an interceptor,
    as `analyze` does) comes back from a scanned stage stacked, one slice per unit."""
    model = models.cifar_resnet(20, block="basic", scan_units=True)
    x = jnp.zeros((2, 32, 32, 3))

    def probe(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, models.ResidualUnit) and context.method_name == "__call__":
            context.module.sow("probe", "output", out)
        return out

    def probed():
        variables = model.init(jax.random.key(0), x, train=False)
        with nn.intercept_methods(probe):
            return model.apply(variables, x, train=False, mutable=["probe"])[1]["probe"]

    outputs = jax.eval_shape(probed)
    assert outputs["stage1_unit1"]["output"][0].shape == (2, 32, 32, 16)
    assert outputs["stage2_repeat"]["unit"]["output"][0].shape == (2, 2, 16, 16, 32)


def test_a_network_hands_each_unit_option_to_every_unit():
    """The unit options are declared once (`models.UnitOptions`) and reach every unit,
    scanned ones included."""
    options = dict(bottleneck=False, stride_on="1x1", unit="original", shortcut="scaling",
                   shortcut_scale=0.3, residual_scale=0.7, gate_bias_init=-1.0,
                   shortcut_dropout_rate=0.2)
    assert set(options) == set(models.UNIT_OPTIONS)
    model = models.ResNetV2(stage_sizes=(1, 3), widths=(8, 16), stem="cifar", stem_width=8,
                            num_classes=3, scan_units=True, **options)
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, models.ResidualUnit):
            seen.append({name: getattr(context.module, name) for name in options})
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                                          train=False))
    assert seen and all(unit == options for unit in seen)


def test_train_defaults_to_training_mode():
    """No `train` means training mode (the Flax examples' convention), and without a mutable
    "batch_stats" such a call fails loudly rather than silently using running averages."""
    model = models.ResNetV2(**TINY)
    x = images((4, 8, 8, 3))
    v = model.init(jax.random.key(0), x)
    default, _ = model.apply(v, x, mutable=["batch_stats"])
    explicit, _ = model.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(default, explicit)
    assert np.abs(default - model.apply(v, x, train=False)).max() > 1e-3
    with pytest.raises(Exception, match="batch_stats"):
        model.apply(v, x)


def test_batch_stats_update_in_train_mode_only_with_momentum():
    model = models.ResNetV2(**TINY, bn_momentum=0.8)
    x = images((4, 8, 8, 3))
    v = model.init(jax.random.key(0), x, train=False)
    _, frozen = model.apply(v, x, train=False, mutable=["batch_stats"])
    assert_trees_equal(frozen, {"batch_stats": v["batch_stats"]})
    _, updated = model.apply(v, x, train=True, mutable=["batch_stats"])
    # The first BN normalises the stem conv's output: running = 0.8 running + 0.2 batch statistic
    # (Flax keeps the biased batch variance).
    stem = conv(x, v["params"]["stem_conv"]["kernel"])
    stats = updated["batch_stats"]["stage1_unit1"]["bn1"]
    np.testing.assert_allclose(stats["mean"], 0.2 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.8 + 0.2 * stem.var((0, 1, 2)), rtol=1e-4)


def test_the_networks_and_their_layouts_import_nothing_of_the_package_above_them():
    """docs/design.md: `models` and `unit_layout` import nothing of the package but its error
    types (`errors`, which imports nothing), `weights` and `name_mapping` only those."""
    import ast
    import pathlib
    package = pathlib.Path(models.__file__).parent

    def imported(module):
        tree = ast.parse((package / f"{module}.py").read_text())
        return {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "resnet_v2_jax" for alias in node.names}

    assert imported("errors") == imported("unit_layout") == set()
    assert imported("models") == {"errors"}
    assert imported("weights") == {"errors", "models"}
    assert imported("name_mapping") == {"errors", "models", "unit_layout"}


def test_import_pulls_in_neither_tensorflow_nor_tfds():
    code = ("import sys, resnet_v2_jax.models; "
            "print(sorted({m.split('.')[0] for m in sys.modules} "
            "& {'tensorflow', 'tensorflow_datasets'}))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=root, check=True)
    assert result.stdout.strip() == "[]"


def test_bn_axis_name_averages_statistics_across_vmapped_shards():
    """vmap over 2 shards of 4 with bn_axis_name equals one call on the batch of 8."""
    model = models.ResNetV2(**TINY)
    x = images((8, 8, 8, 3))
    v = randomized(model.init(jax.random.key(0), x, train=False), 1)
    full, full_stats = model.apply(v, x, train=True, mutable=["batch_stats"])

    def sharded(model):
        step = functools.partial(model.apply, v, train=True, mutable=["batch_stats"])
        return jax.vmap(step, axis_name="shards")(x.reshape(2, 4, 8, 8, 3))

    out, stats = sharded(model.clone(bn_axis_name="shards"))
    np.testing.assert_allclose(out.reshape(full.shape), full, rtol=1e-4, atol=1e-5)
    for shard in range(2):
        assert_trees_close(jax.tree.map(lambda a: a[shard], stats), full_stats, rtol=1e-4)
    # Without the axis name each shard normalises with its own statistics.
    _, local_stats = sharded(model)
    assert not np.allclose(local_stats["batch_stats"]["stage1_unit1"]["bn1"]["mean"][0],
                           full_stats["batch_stats"]["stage1_unit1"]["bn1"]["mean"])


@pytest.mark.skipif(jax.local_device_count() < 4, reason="needs 4 (fake) devices: "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=4")
def test_bn_axis_index_groups_average_within_groups_under_pmap():
    model = models.ResNetV2(**TINY, bn_axis_name="devices", bn_axis_index_groups=[[0, 1], [2, 3]])
    x = images((8, 8, 8, 3))
    v = model.init(jax.random.key(0), x, train=False)
    step = functools.partial(model.apply, v, train=True, mutable=["batch_stats"])
    _, stats = jax.pmap(step, axis_name="devices", devices=jax.local_devices()[:4])(
        x.reshape(4, 2, 8, 8, 3))
    plain = models.ResNetV2(**TINY)
    for group, half in enumerate((x[:4], x[4:])):
        _, expected = plain.apply(v, half, train=True, mutable=["batch_stats"])
        for device in (2 * group, 2 * group + 1):
            assert_trees_close(jax.tree.map(lambda a: a[device], stats), expected, rtol=1e-4)


def test_flax_example_calling_convention_under_pmap_and_jit():
    """A loop written as the Flax ImageNet example's: `init` and the training `apply` pass no
    `train`, eval passes train=False with nothing mutable; BN synced over the pmap axis given
    as `bn_axis_name`. One SGD step changes the parameters and the BN statistics."""
    import optax
    images = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (8, 32, 32, 3)), jnp.float32)
    labels = jnp.arange(8) % 10
    tx = optax.sgd(0.1, momentum=0.9)

    def steps(model):
        def train_step(variables, opt_state, images, labels, axis):
            def loss_fn(params):
                logits, new = model.apply({**variables, "params": params}, images,
                                          mutable=["batch_stats"])
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                return loss, new["batch_stats"]
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
            if axis:
                grads = lax.pmean(grads, axis)
            updates, opt_state = tx.update(grads, opt_state, variables["params"])
            return {"params": optax.apply_updates(variables["params"], updates),
                    "batch_stats": stats}, opt_state, loss

        def eval_step(variables, images):
            return model.apply(variables, images, train=False, mutable=False)
        return train_step, eval_step

    for axis in ("batch", None):  # pmap over one device with BN synced, and plain jit
        model = models.cifar_resnet(8, 10, block="basic", bn_axis_name=axis)
        variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
        opt_state = tx.init(variables["params"])
        train_step, eval_step = steps(model)
        if axis:
            replicate = lambda tree: jax.tree.map(lambda x: x[None], tree)
            new, _, loss = jax.pmap(functools.partial(train_step, axis=axis), axis_name=axis)(
                replicate(variables), replicate(opt_state), images[None], labels[None])
            new = jax.tree.map(lambda x: x[0], new)
            logits = jax.pmap(eval_step, axis_name=axis)(replicate(new), images[None])[0]
        else:
            new, _, loss = jax.jit(functools.partial(train_step, axis=None))(
                variables, opt_state, images, labels)
            logits = jax.jit(eval_step)(new, images)
        assert logits.shape == (8, 10) and bool(jnp.isfinite(logits).all())
        for collection in ("params", "batch_stats"):
            moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                 variables[collection], new[collection])
            assert max(jax.tree.leaves(moved)) > 0, collection


# ----------------------------------------------------------------------------------------------
# Pluggable normalisation, convolution and stem (BiT: GroupNorm, weight-standardised convs and a
# zero-padded stem pool).

BIT = dict(norm="group", conv="weight_standardized", stem_norm="after_pool", stem_pool_pad="zero")


def test_bit_network_has_the_batchnorm_networks_parameters_and_no_statistics():
    """GroupNorm has BN's scale and bias per channel and no running statistics: ResNet-50x1 of
    BiT has exactly the parameters of the BN ResNet-50 with the same stem (25,549,352 with 1000
    classes, timm's resnetv2_50x1_bit)."""
    def variables(**options):
        model = models.imagenet_resnet(50, 1000, **options)
        return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                                 train=False))
    bit, bn = variables(**BIT), variables(stem_norm="after_pool")
    count = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
    assert count(bit["params"]) == count(bn["params"]) == 25_549_352
    assert set(bit) == {"params"} and count(bn["batch_stats"]) > 0


def test_weight_standardised_conv_standardises_each_output_channel():
    x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    layer = models.StandardizedConv(4, (3, 3), use_bias=False)
    params = layer.init(jax.random.key(0), x)
    kernel = params["params"]["kernel"]
    standard = (kernel - kernel.mean((0, 1, 2))) / jnp.sqrt(kernel.var((0, 1, 2)) + 1e-8)
    expected = nn.Conv(4, (3, 3), use_bias=False).apply({"params": {"kernel": standard}}, x)
    np.testing.assert_allclose(layer.apply(params, x), expected, atol=1e-5)
    # What standardisation buys: a kernel's scale and offset per output channel do not matter.
    shifted = {"params": {"kernel": 3.0 * kernel + jnp.arange(4.0)}}
    np.testing.assert_allclose(layer.apply(shifted, x), expected, atol=1e-4)


def test_the_networks_conv_epsilon_reaches_its_standardised_convs():
    x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    model = models.ResNetV2(**{**TINY, "conv": "weight_standardized"})
    variables = model.init(jax.random.key(0), x, train=False)
    default = model.apply(variables, x, train=False)
    assert np.abs(model.clone(conv_epsilon=10.0).apply(variables, x, train=False)
                  - default).max() > 1e-2


def test_zero_padding_of_the_stem_pool_matters_only_without_a_relu_before_it():
    """A zero border never beats a ReLU's outputs (>= 0), so with the paper's conv-BN-ReLU stem
    the two paddings agree; BiT's stem pools the raw conv output, where they differ."""
    x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 32, 32, 3)), jnp.float32)

    def logits(**options):
        model = models.imagenet_resnet(18, 5, **options)
        variables = model.init(jax.random.key(0), x, train=False)
        return model.apply(variables, x, train=False)
    np.testing.assert_array_equal(logits(stem_pool_pad="zero"), logits(stem_pool_pad="-inf"))
    assert not np.allclose(logits(stem_norm="after_pool", stem_pool_pad="zero"),
                           logits(stem_norm="after_pool", stem_pool_pad="-inf"))


@pytest.mark.parametrize("norm", ["group", "layer", functools.partial(nn.GroupNorm, num_groups=2)],
                         ids=["group", "layer", "constructor"])
def test_other_norms_run_scanned_rematerialised_and_on_nnx(norm):
    from flax import nnx

    from resnet_v2_jax import nnx as resnet_nnx
    model = models.ResNetV2(**{**TINY, "norm": norm, "norm_groups": 2,
                               "conv": "weight_standardized"})
    x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    assert set(variables) == {"params"}
    expected = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(model.apply(variables, x, train=True), expected)  # no BN
    scanned = model.clone(scan_units=True, remat_units=True)
    np.testing.assert_allclose(scanned.apply(unit_layout.unrolled_to_scanned(variables), x),
                               expected, atol=1e-5)
    twin = resnet_nnx.from_linen(model, variables, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(twin(x), expected)
    assert weights.signature(model)["norm"] == (
        norm if isinstance(norm, str) else f"callable {norm!r}")


def test_save_refuses_what_load_cannot_rebuild_and_round_trips_the_rest(tmp_path):
    x = jnp.ones((1, 16, 16, 3))
    bit = models.ResNetV2(**{**TINY, "norm": "group", "norm_groups": 2,
                             "conv": "weight_standardized"})
    variables = bit.init(jax.random.key(0), x, train=False)
    umask = os.umask(0o022)
    try:
        weights.save(tmp_path / "bit.safetensors", bit, variables)
    finally:
        os.umask(umask)
    assert (tmp_path / "bit.safetensors").stat().st_mode & 0o777 == 0o644  # follows the umask
    loaded, same = weights.load(tmp_path / "bit.safetensors")
    assert weights.signature(loaded) == weights.signature(bit)
    np.testing.assert_array_equal(loaded.apply(same, x, train=False),
                                  bit.apply(variables, x, train=False))
    with pytest.raises(ValueError, match=r"^weights.save writes ResNetV2 networks \(whose options "
                       r"load\(\) rebuilds\), not Dense$"):
        weights.save(tmp_path / "dense.safetensors", nn.Dense(3), {})
    custom = bit.clone(norm=functools.partial(nn.GroupNorm, num_groups=2))
    with pytest.raises(ValueError, match="the network's norm is a constructor, which load"):
        weights.save(tmp_path / "custom.safetensors", custom, variables)
    assert not (tmp_path / "custom.safetensors").exists()


@pytest.mark.parametrize("factory, option", [(lambda **o: models.imagenet_resnet(18, **o), "stem"),
                                             (lambda **o: models.cifar_resnet(20, **o), "widths")])
def test_factories_pass_options_through_or_refuse_the_ones_they_set(factory, option):
    assert factory(unit="original", shortcut="conv").unit == "original"
    with pytest.raises(ValueError, match=rf"sets {option} from the depth \(the paper's "
                       rf"architecture\); for another, build ResNetV2\({option}=...\) directly"):
        factory(**{option: "deep" if option == "stem" else (8, 16, 32)})
