"""The ablations of Tables 1 and 2 on CIFAR-10, one config with parameters.

    --config=configs/ablation.py                                      # ResNet-110, original unit
    --config=configs/ablation.py:unit=relu_before_add,depth=164       # Table 2, a column entry
    --config=configs/ablation.py:shortcut=exclusive_gate,gate_bias_init=-6   # Table 1: 8.70%
    --config=configs/ablation.py:shortcut=scaling,shortcut_scale=0.5,residual_scale=0.5

Table 1 varies the shortcut of ORIGINAL (post-activation) units of ResNet-110; Table 2 varies
the unit (original, bn_after_add, relu_before_add, relu_preact, full_preact) of ResNet-110 and
ResNet-164 with identity shortcuts. Any key of the base config or of its model section may be
set this way; values are parsed as numbers where they look like numbers.
"""
from resnet_v2_jax import base_config

DEFAULTS = {"dataset": "cifar10", "depth": 110, "unit": "original"}


def parse(arg: str) -> dict:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'}."""
    values = {}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"ablation parameter {item!r} is not key=value")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        values[key.strip()] = value
    return values


def get_config(arg: str = ""):
    values = {**DEFAULTS, **parse(arg)}
    dataset, depth, unit = values.pop("dataset"), values.pop("depth"), values.pop("unit")
    return base_config.cifar(dataset, depth, unit, **values)
