"""A network's identity and its weights files.

What a `models.ResNetV2` is comes from the declaration of its options (`models.OPTIONS`):
`options` are those that rebuild it, `signature` those that define the function it computes
from its weights (checkpoints and `init_from` compare it). `save` writes variables as one
safetensors file with `options` in its metadata, and `load` rebuilds the network from it alone,
without a config or Orbax. timm's and Hugging Face's tools read the file too.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from resnet_v2_jax import errors, models

FILE_FORMAT = "resnet_v2_jax/1"


def _json_value(name: str, value):
    if name in ("dtype", "param_dtype"):
        return jnp.dtype(value).name
    if callable(value):  # a user's norm or conv constructor: named, but not rebuildable
        return f"callable {getattr(value, '__qualname__', None) or repr(value)}"
    return list(value) if isinstance(value, (tuple, list)) else value


def options(model: models.ResNetV2) -> dict:
    """The options that rebuild `model` (`ResNetV2(**options)`), as JSON values: `signature`
    plus the runtime ones that travel with weights (dtypes, scan/remat layout); the caller's
    (BN reduction axes) are left out."""
    return {name: _json_value(name, getattr(model, name))
            for name, declared in models.OPTIONS.items() if declared.role != "caller"}


def signature(model: models.ResNetV2) -> dict:
    """What the network computes from its weights: every option of role "network", as JSON
    values, but those its settings ignore (`Option.used_when`). Two networks with equal
    signatures are the same function of the same weights (converted between unit layouts and
    dtypes)."""
    return {name: _json_value(name, getattr(model, name))
            for name, declared in models.OPTIONS.items()
            if declared.role == "network" and _used(model, declared)}


def _used(model: models.ResNetV2, declared: models.Option) -> bool:
    if declared.used_when is None:
        return True
    decider, values = declared.used_when
    return getattr(model, decider) in values


def signature_differences(saved: dict, current: dict) -> list:
    """[(option, saved value, current value)] where two signatures differ. An option one of
    them lacks (written before the option existed) counts as its default."""
    defaults = {f.name: _json_value(f.name, f.default) for f in dataclasses.fields(models.ResNetV2)
                if f.name in models.OPTIONS and f.default is not dataclasses.MISSING}
    saved, current = {**defaults, **saved}, {**defaults, **current}
    return [(k, saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)]


def save(path: str, model: models.ResNetV2, variables) -> None:
    """Writes `variables` ({"params", "batch_stats"}; no "batch_stats" without BatchNorm) as a
    safetensors file, one tensor per variable named "params/stage1_unit1/conv1/kernel", with
    `options(model)` in its metadata: `load(path)` rebuilds the network."""
    from safetensors.numpy import save as serialize
    if not isinstance(model, models.ResNetV2):
        raise ValueError(f"weights.save writes ResNetV2 networks (whose options load() "
                         f"rebuilds), not {type(model).__name__}")
    for name in ("norm", "conv"):
        if callable(getattr(model, name)):
            raise ValueError(f"the network's {name} is a constructor, which load() cannot "
                             f"rebuild from a file; save networks whose {name} is one of "
                             f"{models.NORMS if name == 'norm' else models.CONVS}")
    tensors = {name: np.asarray(value)
               for name, value in traverse_util.flatten_dict(variables, sep="/").items()}
    # Written as ordinary bytes: the file follows the umask (safetensors' own writer makes it
    # private), and any path etils reads (gs:// too) works.
    epath.Path(path).write_bytes(serialize(tensors, metadata={
        "format": FILE_FORMAT, "options": json.dumps(options(model))}))


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
            f"{path} is not a resnet_v2_jax weights file (its metadata has no format "
            f"{FILE_FORMAT!r}); write one with python -m resnet_v2_jax.export")
    values = {**json.loads(metadata["options"]), **overrides}
    for key, value in values.items():
        if key in ("dtype", "param_dtype") and isinstance(value, str):
            values[key] = jnp.dtype(value)
        elif isinstance(value, list):
            values[key] = tuple(value)
    variables = traverse_util.unflatten_dict(
        {name: jnp.asarray(value) for name, value in tensors.items()}, sep="/")
    return models.ResNetV2(**values), variables
