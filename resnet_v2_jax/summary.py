r"""A network's size, stage by stage: output shape, parameters and FLOPs per image.

    python -m resnet_v2_jax.summary --config=configs/cifar10_resnet164.py
    python -m resnet_v2_jax.summary --config=configs/imagenet_200.py --config.image_size=320

Rows are the stem, each stage (its units) and the head (the last BN-ReLU, pooling and the
classifier), then the totals. FLOPs are XLA's count for one image in evaluation, two per
multiply-add (the papers of the time count multiply-adds: half of it). They come from the
compiled forward pass cut after each part (XLA drops the rest), so nothing is executed; a
stage's figure is the difference of two cuts, counted on copies of the network with one and
two units per stage (`summarize` says why that is exact). Parameters are counted from the variables'
shapes, BN scales and offsets included (docs/paper.md, "CIFAR networks", has the paper's
counts with and without them).
"""

if __name__ == "__main__":  # first: the imports below take seconds (see `startup`)
    from resnet_v2_jax import startup
    startup.exit_on_signals()

from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from resnet_v2_jax import cli, configuration, datasets, models, recipe

FLAGS = flags.FLAGS


def flops(function, *args) -> float:
    """XLA's FLOP count of the compiled `function(*args)`."""
    cost = jax.jit(function).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one entry per computation
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def _part(name: str) -> str:
    """The row a top-level variable belongs to: stem, stage<s> or head."""
    if name.startswith("stem"):
        return "stem"
    if name.startswith("stage"):
        return name.split("_")[0]
    return "head"


def part_flops(model: models.ResNetV2, image_size: int) -> List[float]:
    """XLA's FLOPs of [stem, stage1, ..., head] for one image, from forward passes cut after
    each part (XLA drops what the cut leaves unused)."""
    images = jnp.zeros((1, image_size, image_size, 3), model.dtype)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))

    def cut(part):
        def forward(variables, images):
            logits, state = model.apply(variables, images, train=False,
                                        mutable=["intermediates"])
            return state["intermediates"][part] if part else logits
        return flops(forward, variables, images)

    cuts = [cut(part) for part in _parts(model)] + [cut(None)]
    return [cuts[0]] + [b - a for a, b in zip(cuts, cuts[1:])]


def _parts(model: models.ResNetV2) -> List[str]:
    return ["stem"] + [f"stage{s}" for s in range(1, len(model.stage_sizes) + 1)]


def summarize(model: models.ResNetV2, image_size: int) -> List[Dict]:
    """One row per part ({"part", "output", "params", "flops"}), then a "total" row.

    The units after the first of a stage are identical, so a stage of n units costs
    unit1 + (n - 1) * unit2: FLOPs are counted on unrolled copies of the network with one and
    two units per stage. That is exact, cheap to compile at any depth, and right for scanned
    networks too (XLA's cost analysis counts a loop's body once, not once per iteration).
    """
    images = jnp.zeros((1, image_size, image_size, 3), model.dtype)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    params: Dict[str, int] = {}
    for name, tree in variables["params"].items():
        params[_part(name)] = params.get(_part(name), 0) + sum(
            int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    logits, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]), variables, images)

    plain = dict(scan_units=False, remat_units=False)
    one = part_flops(model.clone(stage_sizes=(1,) * len(model.stage_sizes), **plain), image_size)
    two = part_flops(model.clone(stage_sizes=tuple(min(n, 2) for n in model.stage_sizes),
                                 **plain), image_size)
    units = [1] + list(model.stage_sizes) + [1]  # stem, stages, head
    rows = []
    for i, part in enumerate(_parts(model) + ["head"]):
        shape = logits.shape if part == "head" else state["intermediates"][part][0].shape
        cost = one[i] + (units[i] - 1) * (two[i] - one[i])
        rows.append({"part": part, "output": tuple(shape[1:]), "params": params.get(part, 0),
                     "flops": cost})
    rows.append({"part": "total", "output": tuple(logits.shape[1:]),
                 "params": sum(params.values()), "flops": sum(r["flops"] for r in rows)})
    return rows


def format_rows(rows: List[Dict]) -> str:
    lines = [f"{'part':<8} {'output':>16} {'params':>12} {'GFLOPs':>9}"]
    for row in rows:
        shape = "x".join(map(str, row["output"]))
        lines.append(f"{row['part']:<8} {shape:>16} {row['params']:>12,} "
                     f"{row['flops'] / 1e9:>9.3f}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    config = FLAGS.config
    cli.prepare_process(config)
    configuration.validate(config)
    model = recipe.create_model(config, datasets.get(config.dataset).num_classes)
    size = config.input_resize or config.image_size
    rows = summarize(model, size)
    depth = 2 + sum(model.stage_sizes) * (3 if model.bottleneck else 2)
    print(f"{config.model.arch} ResNet-{depth} ({model.unit} units, {model.shortcut} shortcuts), "
          f"{model.num_classes} classes, {size}x{size} input, per image:")
    print(format_rows(rows))
    print(f"{rows[-1]['flops'] / 2e9:.3f} G multiply-adds per image")


def define_flags() -> None:
    """The command line's flags; defined by the command only, so importing defines none."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. "
                                    "configs/cifar10_resnet164.py; --config.key=value overrides.",
                                    lock_config=True)
    flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
    define_flags()
    cli.run(main)
