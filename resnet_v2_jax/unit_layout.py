"""The two layouts of a network's variables: unrolled (`scan_units=False`: one entry per unit,
"stage{s}_unit{u}") and scanned (`scan_units=True`: units 2..n of stage s stacked on a leading
axis under "stage{s}_repeat/unit", as `nn.scan` keeps them), and the conversion between them,
so that a checkpoint or weights file of one layout loads into the other. The layout changes
how a network runs, not what it computes (`models.ResNetV2.scan_units` is a runtime option).

Works on any tree keyed by the network's modules: parameters, BN statistics, an optimiser's
momentum shaped like them.
"""

import re

import jax
import jax.numpy as jnp

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

