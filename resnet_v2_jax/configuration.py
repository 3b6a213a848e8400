"""The config of a run: what each key may hold (`validate`), what each key means (`key_help`:
the comments of `base_config` for the top-level keys, the network's declaration for the model
section's), and the config.json files of older releases, read with the behaviour they had
(`migrate`: the one place that knows them).

A config has top-level keys (data, optimisation, loop; the Flax ImageNet example's names where
it has them) and one section, `model`, whose keys are the arguments of
`models.create(**config.model)`: the network. `validate` checks every value before anything is
compiled or written, and raises one `errors.ConfigError` naming the key, the value and what is
allowed.
"""

import inspect
import json
import math
import re
from typing import Any, Dict, Optional

import ml_collections
from etils import epath

from resnet_v2_jax import augment, base_config, datasets, errors, inputs, models, parallel

CONFIG_FILE = "config.json"
RUNS_LAYOUTS = ("auto", "vmap", "unrolled")

# --- older releases ---------------------------------------------------------------------------

# Keys that release 0.1 kept at the top level and that now make up `config.model`.
_MODEL_KEYS_OF_0_1 = ("arch", "depth", "block", "unit", "shortcut", "shortcut_scale",
                      "residual_scale", "gate_bias_init", "shortcut_dropout_rate", "stride_on",
                      "stem_norm", "bn_momentum", "bn_epsilon", "scan_units", "remat_units")
# Keys added after runs were saved, with the behaviour those runs had.
KEYS_ADDED_LATER = {"float64": False, "antialias": True, "input_resize": 0, "init_from": "",
                    "train_backbone": True, "train_bn_statistics": True, "num_runs": 1,
                    "runs_layout": "auto", "share_batches": False, "init_from_run": -1}
# Keys that no longer exist. augment_on_device: flips and colour now always run in the train
# step (the same operations and distributions as the host's, other random draws).
KEYS_REMOVED = ("augment_on_device",)


def migrate(values: Dict[str, Any]) -> Dict[str, Any]:
    """A config.json's values as today's config: the network keys of release 0.1 moved into the
    `model` section (those its network ignored dropped: `block` of ImageNet nets, `stem_norm` of
    CIFAR nets; `stride_on=""` made the architecture's default), removed keys dropped and keys
    added since set as those runs behaved."""
    values = dict(values)
    if "model" not in values:
        model = {k: values.pop(k) for k in _MODEL_KEYS_OF_0_1 if k in values}
        imagenet = model.get("arch") == "imagenet"
        model.pop("block" if imagenet else "stem_norm", None)
        if not model.get("stride_on"):
            model["stride_on"] = "3x3" if imagenet else "1x1"
        values["model"] = model
    for key in KEYS_REMOVED:
        values.pop(key, None)
    return {**KEYS_ADDED_LATER, **values}


def read(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run saved as `<workdir>/config.json`, migrated (`migrate`)."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise errors.NotFoundError(f"{path} not found: {workdir} is not a training run's folder "
                                   "(every run writes config.json); pass the run's "
                                   "--config=configs/<name>.py")
    try:
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.ConfigError(
            f"{path} is not a config a run wrote ({type(e).__name__}: {e}); restore "
            "it, or pass the run's --config=configs/<name>.py") from e
    return ml_collections.ConfigDict(migrate(values))


def flatten(config) -> Dict[str, Any]:
    """{"key": value, "model.key": value, ...} of a config (or its `to_dict()`)."""
    values = config.to_dict() if hasattr(config, "to_dict") else config
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            flat[key] = value
    return flat


# --- validation ---------------------------------------------------------------------------------

def _positive_int(value) -> bool:
    return _is_int(value) and value >= 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional_text(value) -> bool:
    return value is None or (isinstance(value, str) and bool(value.strip()))


_BOOLEAN = (lambda v: isinstance(v, bool), "True or False")
# key -> (test, what is allowed). Keys whose test needs other keys are checked in `validate`.
RULES = {
    "dataset": (lambda v: isinstance(v, str), "a registered dataset name"),
    "data_dir": (_optional_text, "None or a folder"),
    "input_pipeline": (lambda v: v in inputs.PIPELINES, f"one of {', '.join(inputs.PIPELINES)}"),
    "array_dir": (_optional_text, "None or a folder"),
    "train_split": (lambda v: _optional_text(v) and v is not None, "a tfds split"),
    "eval_split": (lambda v: _optional_text(v) and v is not None, "a tfds split"),
    "batch_size": (_positive_int, "a positive integer"),
    "eval_batch_size": (_positive_int, "a positive integer"),
    "cache": _BOOLEAN,
    "shuffle_buffer_size": (_positive_int, "a positive integer"),
    "image_size": (_positive_int, "a positive integer"),
    "eval_crop_sizes": (lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                        and all(_positive_int(c) for c in v), "positive integers, at least one"),
    "eval_resize_ratio": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "augment": (lambda v: v in augment.AUGMENTATIONS, f"one of {', '.join(augment.AUGMENTATIONS)}"),
    "color_augment": _BOOLEAN,
    "antialias": _BOOLEAN,
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**31, "an integer in [0, 2^31)"),
    "num_runs": (_positive_int, "a positive integer"),
    "runs_layout": (lambda v: v in RUNS_LAYOUTS, f"one of {', '.join(RUNS_LAYOUTS)}"),
    "share_batches": _BOOLEAN,
    "half_precision": _BOOLEAN,
    "float64": _BOOLEAN,
    "bn_group_size": (lambda v: _is_int(v) and v >= 0, "0 (all devices) or a positive integer"),
    "input_resize": (lambda v: _is_int(v) and v >= 0, "0 (none) or a size in pixels"),
    "init_from": (lambda v: v is None or isinstance(v, str),
                  "a path, or empty for random initialisation"),
    "init_from_run": (lambda v: _is_int(v) and v >= -1, "-1 (a source of one run) or a run"),
    "train_backbone": _BOOLEAN,
    "train_bn_statistics": _BOOLEAN,
    "learning_rate": (lambda v: _number(v) and v > 0, "a positive finite number"),
    "base_batch_size": (_positive_int, "a positive integer"),
    "momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "nesterov": _BOOLEAN,
    "weight_decay": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "weight_decay_bn_and_bias": _BOOLEAN,
    "lr_schedule": (lambda v: v in ("steps", "cosine"), "one of steps, cosine"),
    "lr_boundaries_epochs": (lambda v: isinstance(v, (tuple, list))
                             and all(_number(b) and b > 0 for b in v)
                             and all(a < b for a, b in zip(v, v[1:])),
                             "positive increasing epochs"),
    "lr_boundaries_steps": (lambda v: isinstance(v, (tuple, list))
                            and all(_positive_int(b) for b in v)
                            and all(a < b for a, b in zip(v, v[1:])),
                            "positive increasing steps (or empty)"),
    "lr_decay_factor": (lambda v: _number(v) and v > 0, "a positive finite number"),
    "warmup": (lambda v: v in ("none", "constant", "linear"), "one of none, constant, linear"),
    "warmup_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "warmup_learning_rate": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "num_epochs": (lambda v: _number(v) and v >= 0, "a finite number of epochs >= 0"),
    "num_train_steps": (lambda v: _is_int(v) and (v == -1 or v >= 1),
                        "-1 (use num_epochs) or a positive integer"),
    "parallelism": (lambda v: v in parallel.EXECUTORS, f"one of {', '.join(parallel.EXECUTORS)}"),
    "log_every_steps": (_positive_int, "a positive integer"),
    "eval_every_steps": (lambda v: _is_int(v) and v >= 0, "0 (once per epoch) or positive"),
    "steps_per_eval": (lambda v: _is_int(v) and (v == -1 or v >= 1),
                       "-1 (the whole eval split) or positive"),
    "checkpoint_every_steps": (_positive_int, "a positive integer"),
    "keep_checkpoints": (_positive_int, "a positive integer"),
}


def validate(config: ml_collections.ConfigDict) -> models.ResNetV2:
    """Raises one `errors.ConfigError`, naming the key, the value and what is allowed, unless
    every key of `config` holds a value training can use; returns the network the config
    describes (built, so every `model` key is checked by the network itself). Nothing is read or
    written."""
    unknown = sorted(set(config) - set(RULES) - {"model"})
    if unknown:
        raise errors.ConfigError(
            f"unknown config key {unknown[0]!r} (see resnet_v2_jax/base_config.py)")
    for key, (test, allowed) in RULES.items():
        if key not in config:
            raise errors.ConfigError(f"the config has no {key!r}; start configs from "
                                     "resnet_v2_jax.base_config.get_config()")
        if not test(config[key]):
            raise errors.ConfigError(
                f"config {key}={config[key]!r} is not allowed: expected {allowed}")
    info = datasets.get(config.dataset)
    if config.input_pipeline == "device_resident" and config.parallelism == "pmap":
        raise errors.ConfigError("input_pipeline='device_resident' needs parallelism='shard_map'")
    if config.num_runs > 1 and config.parallelism == "pmap":
        raise errors.ConfigError(f"num_runs={config.num_runs} needs parallelism='shard_map'")
    if config.seed + config.num_runs > 2**31:
        raise errors.ConfigError(f"seeds {config.seed}..{config.seed + config.num_runs - 1} of the "
                                 f"{config.num_runs} runs exceed 2^31 - 1: lower seed")
    if config.float64 and config.half_precision:
        raise errors.ConfigError("float64 and half_precision exclude each other; set one of them")
    if config.num_train_steps == -1 and not config.num_epochs > 0:
        raise errors.ConfigError(f"config num_epochs={config.num_epochs!r} trains nothing: set "
                                 "num_epochs > 0 or num_train_steps > 0")
    if config.init_from is None:
        raise errors.ConfigError(
            "this config fine-tunes: set --config.init_from= to a run's workdir, a "
            "checkpoint step folder or a weights file (.safetensors, .npz, .pth)")
    if not (config.train_backbone or config.init_from):
        raise errors.ConfigError("train_backbone=False trains only the classifier head: set "
                                 "--config.init_from= to the weights of the backbone")
    if "model" not in config or not isinstance(config.model, ml_collections.ConfigDict):
        raise errors.ConfigError("the config has no model section; start configs from "
                                 "resnet_v2_jax.base_config.get_config()")
    try:
        return models.create(num_classes=info.num_classes, **config.model)
    except (ValueError, TypeError) as e:
        raise errors.ConfigError(f"config model: {e}") from e


# --- what the keys mean ---------------------------------------------------------------------------

def key_help() -> Dict[str, str]:
    """{"key" or "model.key": its one-line meaning}: the top-level keys in the order of
    `base_config.get_config`, then the model section's, whose meanings are the network's own
    declaration (`models.FACTORY_ARGUMENTS`, then each option's `models.Option.meaning`)."""
    model = {**models.FACTORY_ARGUMENTS,
             **{name: declared.meaning for name, declared in models.OPTIONS.items()}}
    return {**_top_level_help(), **{f"model.{k}": v for k, v in model.items()}}


def _top_level_help() -> Dict[str, str]:
    """{"key": meaning} from the comments at the end of `base_config.get_config`'s
    `config.<key> = ...` lines (and the comment lines aligned under them). {} where its source
    is not installed."""
    try:
        source = inspect.getsource(base_config.get_config)
    except OSError:
        return {}
    meanings: Dict[str, str] = {}
    key: Optional[str] = None
    for line in source.splitlines():
        assignment = re.match(r"\s*config\.(\w+)\s*=[^#]*(?:#\s*(.*))?$", line)
        continued = re.match(r"\s{30,}#\s*(.*)$", line)
        if assignment and assignment[1] != "model":
            key = assignment[1]
            meanings[key] = (assignment[2] or "").strip()
        elif continued and key:
            meanings[key] = f"{meanings[key]} {continued[1].strip()}".strip()
        else:
            key = None
    return meanings
