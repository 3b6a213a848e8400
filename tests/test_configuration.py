"""Every config value is checked before anything is written (`configuration.validate`): a table
of values that cannot work, for every key of the base config and of its model section, each
refused in one line that names the key; the run leaves no workdir behind."""
import math

import pytest

from resnet_v2_jax import base_config
from resnet_v2_jax import configuration, models, train

NAN, INF = float("nan"), math.inf
# key -> values that must be refused (wrong where they are wrong: nan, inf, negative, zero,
# another type). Keys of the model section are refused by the network itself.
BAD = {
    "dataset": ["mnist", 3],
    "data_dir": ["", "  "],
    "input_pipeline": ["grain", None],
    "array_dir": [""],
    "train_split": ["", None],
    "eval_split": ["", None],
    "batch_size": [0, -8, 1.5, "64", True],
    "eval_batch_size": [0, -1, 2.0],
    "cache": ["yes", 1],
    "shuffle_buffer_size": [0, -1],
    "image_size": [0, -32, 32.0],
    "eval_crop_sizes": [(), (0,), (32, -1), 32],
    "eval_resize_ratio": [0.0, 1.5, NAN, -0.5],
    "augment": ["cutout", None],
    "color_augment": ["no"],
    "antialias": [0],
    "seed": [-1, 2**31, 1.0, NAN],
    "num_runs": [0, -1, 2.0],
    "runs_layout": ["scan", None],
    "share_batches": ["no"],
    "half_precision": ["True"],
    "float64": [1],
    "bn_group_size": [-1, 0.5],
    "input_resize": [-1, 1.5],
    "init_from": [3],
    "init_from_run": [-2, 0.5],
    "train_backbone": ["False"],
    "train_bn_statistics": [None],
    "learning_rate": [NAN, INF, 0.0, -0.1, "0.1"],
    "base_batch_size": [0, -128, 128.0],
    "momentum": [NAN, INF, -0.1, 1.0, 1.5],
    "nesterov": ["yes"],
    "weight_decay": [NAN, INF, -1e-4],
    "weight_decay_bn_and_bias": [None],
    "lr_schedule": ["exponential"],
    "lr_boundaries_epochs": [(81, 81), (122, 81), (-1,), (NAN,), (INF,)],
    "lr_boundaries_steps": [(0,), (48000, 32000), (1.5,)],
    "lr_decay_factor": [0.0, -0.1, NAN, INF],
    "warmup": ["gradual", None],
    "warmup_steps": [-5, 1.5],
    "warmup_learning_rate": [NAN, INF, -0.01],
    "num_epochs": [NAN, INF, -1.0],
    "num_train_steps": [0, -2, 1.5],
    "parallelism": ["threads"],
    "log_every_steps": [0, -1],
    "eval_every_steps": [-1, 2.5],
    "steps_per_eval": [0, -2],
    "checkpoint_every_steps": [0, -1],
    "keep_checkpoints": [0, -3],
    "model.arch": ["resnet"],
    "model.depth": [100, 0, -20, 20.5, NAN],
    "model.block": ["wide"],
    "model.stride_on": ["5x5"],
    "model.unit": ["preact"],
    "model.shortcut": ["gated"],
    "model.shortcut_scale": [NAN, INF, "0.5"],
    "model.residual_scale": [NAN, -INF],
    "model.gate_bias_init": [NAN, INF],
    "model.shortcut_dropout_rate": [-0.1, 1.0, 2.0, NAN],
    "model.norm": ["instance", None],
    "model.norm_groups": [0, 3, 32, 2.5],
    "model.conv": ["ws"],
    "model.conv_epsilon": [0.0, -1e-8, NAN, INF],
    "model.bn_momentum": [-0.1, 1.5, NAN],
    "model.bn_epsilon": [0.0, -1e-5, NAN, INF],
}
# Keys whose only values are True/False or a path, where the ConfigDict's own type checks and
# the data checks stand: listed so that the table covers every key.
NOT_IN_TABLE = {"model.scan_units", "model.remat_units"}
# Values valid alone that a bad value of one key needs (a model key refused only for its
# shortcut: the scales for "scaling", the gate for gating, the dropout rate for "dropout"; the
# groups for GroupNorm).
CONTEXT = {"model.shortcut_scale": {"model.shortcut": "scaling"},
           "model.residual_scale": {"model.shortcut": "scaling"},
           "model.gate_bias_init": {"model.shortcut": "exclusive_gate"},
           "model.shortcut_dropout_rate": {"model.shortcut": "dropout"},
           "model.norm_groups": {"model.norm": "group", "model.norm_groups": 16},
           "num_epochs": {"num_train_steps": -1}}


def with_values(**values):
    """The base config (unlocked: a config file may set any type) with `values` set, dotted
    keys in the model section."""
    config = base_config.get_config()
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        target = config.model if section == "model" else config
        with target.ignore_type():
            target[name] = value
    return config


def test_the_table_covers_every_key():
    keys = set(configuration.flatten(base_config.get_config()))
    assert set(BAD) | NOT_IN_TABLE == keys


CASES = [(key, value) for key, values in BAD.items() for value in values]


@pytest.mark.parametrize("key, value", CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_a_value_that_cannot_work_is_refused_in_one_line_naming_the_key(key, value):
    config = with_values(**{**CONTEXT.get(key, {}), key: value})
    with pytest.raises(ValueError) as error:
        configuration.validate(config)
    message = str(error.value)
    assert "\n" not in message and key.split(".")[-1] in message, message


def test_the_base_config_and_its_contexts_are_valid():
    configuration.validate(base_config.get_config())
    for values in CONTEXT.values():
        configuration.validate(with_values(**values))


@pytest.mark.parametrize("key, value", [("learning_rate", NAN), ("image_size", 0),
                                        ("model.shortcut_dropout_rate", 2.0),
                                        ("warmup_steps", -5), ("num_epochs", NAN)])
def test_a_run_with_such_a_value_writes_nothing(tmp_path, key, value):
    config = with_values(**{**CONTEXT.get(key, {}), key: value})
    with pytest.raises(ValueError, match=key.split(".")[-1]):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_every_key_has_one_meaning_the_model_section_s_from_the_network_s_declaration():
    """--print_config's meanings: the top-level keys' from the base config's comments (aligned
    continuation lines included), the model section's from `models` itself, never a copy."""
    meanings = configuration.key_help()
    keys = list(configuration.flatten(base_config.get_config()))
    assert [k for k in keys if not meanings.get(k)] == []
    assert meanings["eval_batch_size"] == ("global (a power of two: splits over any slice); the "
                                           "last batch is padded and masked")
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(
        meanings[k] == models.FACTORY_ARGUMENTS.get(k[6:]) or
        meanings[k] == models.OPTIONS[k[6:]].meaning for k in model_keys)
    assert meanings["model.unit"] == ("Fig. 4: original | bn_after_add | relu_before_add | "
                                      "relu_preact | full_preact")
