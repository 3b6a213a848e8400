"""The weight importers' engine: a network's variables taken from another library's arrays by
name (`variables_by_name`), each checked against the variable it becomes. `timm_import` and
`big_vision_import` give it their naming and layout rules.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from resnet_v2_jax import errors, models, unit_layout


def variables_by_name(model: models.ResNetV2, arrays, name_of: Callable[[list], str],
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
        raise errors.WeightsError(f"{source} {kind} does not fit the model: missing "
                                  f"{_some(missing)}; unexpected {_some(unexpected)}")
    return unit_layout.unrolled_to_scanned(variables) if model.scan_units else variables


def _some(keys, shown=3) -> str:
    """The first `shown` keys, and how many more, for a one-line message."""
    if not keys:
        return "none"
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
