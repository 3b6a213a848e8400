"""Every config in configs/ builds its model and its training step on tiny data; one config of
each kind of network (block, unit, dataset family, fine-tuning) also compiles and runs it."""
import glob
import importlib
import os

import jax
import numpy as np
import pytest

from configs import ablation
from resnet_v2_jax import configuration, datasets, parallel, recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith("__"))
ABLATIONS = ["", "shortcut=exclusive_gate,gate_bias_init=-6", "shortcut=dropout",
             "unit=relu_preact,depth=164", "shortcut=scaling,shortcut_scale=0.5,residual_scale=0.5"]


# Fine-tuning's train step (the ImageNet stem, timm's stem layout, the on-device resize, Nesterov
# momentum) compiles and trains one step, at the smallest ImageNet depth, 18 (its own depth, 50,
# is traced like the other configs: its scanned bottleneck step takes 50 CPU-seconds to
# compile here, 18's 20). CIFAR's basic units train in every command-line test (cifar10_quick
# at depth 8, tests/cli_runs.py), its full pre-activation bottlenecks, scanned, in the
# accelerator benchmark's smoke run (tests/test_benchmarks.py, cifar1001_b128 at depth 20);
# the original bottleneck's gradient is computed in tests/test_analyze.py and its formula
# checked in tests/test_models.py. The other configs differ from these only in depth (the
# units run scanned: the same program), stem layout, unit, number of classes, schedule or host
# augmentation, and are traced (every shape and dtype of the step checked) without compiling:
# an XLA:CPU compile of these networks takes 20-50 CPU-seconds.
TRAINED = {"finetune_cifar10": 18}  # config: the depth at which it trains
# The ablations are traced: their units are checked against the paper's formulas in
# tests/test_models.py, the dropout shortcut's draws in training, unrolled and scanned, too.


def setup_and_batch(config):
    """The config's training setup on one device, and 2 random 32x32 images.

    The units run scanned, so compile time does not grow with depth: the scanned network is
    the same function (tests/test_models.py checks scanned against unrolled).
    """
    config.model.scan_units = True
    config.image_size = 32  # parameter shapes do not depend on it; initialisation is cheaper
    dp = parallel.DataParallel(config.parallelism, 0, jax.devices()[:1])
    setup = recipe.build(config, dp)
    rng = np.random.RandomState(0)
    batch = {"image": rng.randint(0, 256, (2, 32, 32, 3)).astype(np.uint8),
             "label": rng.randint(0, datasets.get(config.dataset).num_classes,
                                  (2,)).astype(np.int32)}
    return setup, dp, batch


def one_step(config):
    """Builds the config's model and takes one step on 2 random 32x32 images, one device."""
    setup, dp, batch = setup_and_batch(config)
    state = setup.init_state(0)
    state, metrics = setup.train_step(dp.put_state(state), dp.put_batch(batch), np.int32(0))
    return setup.model, dp.to_host(state), dp.to_host(metrics)


def traced_step(config):
    """Builds the config's model and traces its step on abstract values: every shape and dtype
    of it, nothing compiled."""
    setup, dp, batch = setup_and_batch(config)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=dp.batch_sharding)
             for k, v in batch.items()}
    state, metrics = jax.eval_shape(setup.train_step, setup.abstract_state, batch,
                                    recipe.ABSTRACT_SEED)
    assert metrics["loss"].shape == (1,) and state.state.step.shape == (1,)  # one run
    return setup.model


def check_step(config, trains):
    """The config's network, its step trained once (`trains`) or traced, its depth checked."""
    if trains:
        model, state, metrics = one_step(config)
        assert np.isfinite(metrics["loss"]) and int(state.run(0).step) == 1
    else:
        model = traced_step(config)
    assert 2 + sum(model.stage_sizes) * (3 if model.bottleneck else 2) == config.model.depth
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", [c for c in CONFIGS if c != "ablation"])
def test_config_builds_its_train_step_and_a_kind_of_each_trains(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    if config.init_from is None:  # fine-tuning configs name their source on the command line
        config.init_from = ""
    configuration.validate(config)
    model = check_step(config, trains=False)
    if name in TRAINED:
        config.model.depth = TRAINED[name]
        check_step(config, trains=True)
    assert model.unit == config.model.unit and model.num_classes == datasets.get(
        config.dataset).num_classes


def test_the_trained_configs_exist():
    assert set(TRAINED) < set(CONFIGS)  # no stale names


@pytest.mark.parametrize("arg", ABLATIONS)
def test_ablation_config_builds_its_train_step(arg):
    config = ablation.get_config(arg)
    model = check_step(config, trains=False)
    for key, value in {**ablation.DEFAULTS, **ablation.parse(arg)}.items():
        assert (config[key] if key in config else config.model[key]) == value
    assert model.shortcut == config.model.shortcut and model.unit == config.model.unit


def test_ablation_defaults_are_table_1s_baseline():
    config = ablation.get_config("")
    model = config.model
    assert (model.depth, model.block, model.unit, model.shortcut) == (
        110, "basic", "original", "identity")
    assert config.warmup == "constant"  # the appendix's warm-up for original units


@pytest.mark.parametrize("arg, message", [("unit", "not key=value"),
                                          ("units=original", "unknown config key 'units'")])
def test_ablation_bad_parameters(arg, message):
    with pytest.raises(ValueError, match=message):
        ablation.get_config(arg)
