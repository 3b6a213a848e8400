r"""Signal propagation through the actual networks: the paper's analysis (Sections 3-4) measured.

With identity shortcuts and identity after-addition, x_L = x_l + sum_i F(x_i) (eq. 4) and
dE/dx_l = dE/dx_L (1 + d/dx_l sum_i F) (eq. 5): the gradient reaching a shallow unit keeps the
deep unit's term. A constant scaling shortcut lambda turns the "1" into prod lambda_i (eq. 6-7),
exclusive gating into prod (1 - g(x_i)) (Sec. 3.1), and BN or ReLU after the addition put a
non-identity map in the way (Sec. 4.1). This module measures, for any config of the project:

- forward: the RMS of every unit's output x_l;
- backward: the norm of dE/dx_l at every unit's output, E the mean cross-entropy of the batch.

Both come from the network as it is built for training (`recipe.create_model`, BN in training
mode), through Flax's own mechanisms: an interceptor on `ResidualUnit.__call__` sows each unit's
output and adds a `perturb` variable to it; the gradient with respect to those zero variables is
dE/dx_l. Scanned stages (ResNet-1001) give one entry per scan iteration.

    python -m resnet_v2_jax.analyze --config=configs/cifar10_resnet164.py \
        --config=configs/ablation.py:shortcut=scaling,shortcut_scale=0.5,residual_scale=0.5 \
        --out=/tmp/analysis
    python -m resnet_v2_jax.analyze --config=configs/cifar10_resnet110.py --workdir=RUN --out=DIR

Writes DIR/analysis.json and DIR/analysis.png (unit index on x, norms relative to the last unit
on a log y axis, one line per config). Real test images of the config's dataset are used when
they can be read (tfds or `config.array_dir`), random ones otherwise, which the output says.
"""

if __name__ == "__main__":  # first: the imports below take seconds (see `startup`)
    from resnet_v2_jax import startup
    startup.exit_on_signals()

import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from etils import epath

from resnet_v2_jax import cli, datasets, device_input, errors, models, recipe, rundir, runs

_UNIT_ORDER = re.compile(r"stage(\d+)_(unit(\d+)|repeat)")


def _unit_outputs(next_fun, args, kwargs, context):
    """Interceptor: each ResidualUnit's output is sown and perturbed (named "output")."""
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, models.ResidualUnit) and context.method_name == "__call__":
        context.module.sow("intermediates", "output", out)
        out = context.module.perturb("output", out)
    return out


def _in_unit_order(tree: Dict[str, Any]) -> List[Tuple[str, jax.Array]]:
    """[(unit name, value)] in network order from a collection keyed like the model's modules:
    stage{s}_unit{u} entries one each, a scanned stage{s}_repeat entry one per iteration."""
    found = []
    for name, value in tree.items():
        match = _UNIT_ORDER.fullmatch(name)
        if not match:
            continue
        stage = int(match.group(1))
        leaf = value["unit"]["output"] if match.group(2) == "repeat" else value["output"]
        if isinstance(leaf, tuple):  # sown values come as a tuple of one
            leaf = leaf[0]
        if match.group(2) == "repeat":  # units 2.. of the stage, stacked on axis 0
            found += [((stage, 2 + i), f"stage{stage}_unit{2 + i}", leaf[i])
                      for i in range(leaf.shape[0])]
        else:
            found.append(((stage, int(match.group(3))), name, leaf))
    return [(name, value) for _, name, value in sorted(found, key=lambda f: f[0])]


def unit_signals(model: models.ResNetV2, variables: Dict[str, Any], images: jax.Array,
                 labels: jax.Array) -> Dict[str, List]:
    """{"units": names, "forward_rms": RMS of x_l, "grad_norm": ||dE/dx_l||} over the units of
    `model` on one batch, BN in training mode (batch statistics), float64 norms."""
    base = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    def perturbation_shapes():
        with nn.intercept_methods(_unit_outputs):
            return model.apply(base, images, train=True,
                               mutable=["batch_stats", "perturbations"])[1]["perturbations"]

    def loss(perturbations):
        with nn.intercept_methods(_unit_outputs):
            logits, state = model.apply({**base, "perturbations": perturbations}, images,
                                        train=True, mutable=["batch_stats", "intermediates"])
        return recipe.cross_entropy(logits, labels).mean(), state["intermediates"]

    # One compiled forward and backward pass (run op by op, a ResNet-164 took twice as long):
    # the zero perturbations are built from shapes alone.
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(perturbation_shapes))
    grads, intermediates = jax.jit(jax.grad(loss, has_aux=True))(zeros)
    outputs = _in_unit_order(intermediates)
    gradients = _in_unit_order(grads)
    assert [n for n, _ in outputs] == [n for n, _ in gradients]

    def norm(x):
        return float(np.linalg.norm(np.asarray(x, np.float64)))

    return {"units": [n for n, _ in outputs],
            "forward_rms": [norm(x) / np.sqrt(x.size) for _, x in outputs],
            "grad_norm": [norm(g) for _, g in gradients]}


def analysis_batch(config: ml_collections.ConfigDict, size: int,
                   seed: int = 0) -> Tuple[np.ndarray, np.ndarray, str]:
    """(uint8 images, labels, where they came from): the first `size` test images of the
    config's dataset if they can be read, else random images and labels."""
    try:
        images, labels = device_input.load_arrays(config, config.eval_split)
        if images.shape[1] == config.image_size:
            return (images[:size], labels[:size].astype(np.int32),
                    f"the first {size} images of {config.dataset} {config.eval_split}")
    except (ImportError, OSError, ValueError):
        pass
    rng = np.random.RandomState(seed)
    classes = datasets.get(config.dataset).num_classes
    shape = (size, config.image_size, config.image_size, 3)
    return (rng.randint(0, 256, shape).astype(np.uint8),
            rng.randint(0, classes, size).astype(np.int32),
            f"RANDOM images (no {config.dataset} data found): shapes only, not the paper's data")


def analyze(config: ml_collections.ConfigDict, images: np.ndarray, labels: np.ndarray,
            workdir: Optional[str] = None, seed: int = 0,
            run: Optional[int] = None) -> Dict[str, Any]:
    """`unit_signals` of the config's network at initialisation (`seed`) or at the latest
    checkpoint of `workdir` (`runs.read_run`; run `run` of several), on one device, in
    float32."""
    config = config.copy_and_resolve_references()
    config.half_precision, config.model.remat_units = False, False
    info = datasets.get(config.dataset)
    if workdir:
        loaded = runs.one_run(runs.read_run(workdir, config, run), "--run")
        model, variables = loaded.model, loaded.variables
        where = f"checkpoint of step {loaded.step} in {workdir}"
        if run is not None:
            where += f", run {run}"
    else:
        model = recipe.create_model(config, info.num_classes)
        shape = (1, config.image_size, config.image_size, 3)
        variables = jax.jit(lambda rng: model.init(rng, jnp.zeros(shape), train=False))(
            jax.random.PRNGKey(seed))
        where = f"initialisation (seed {seed})"
    signals = unit_signals(model, variables, datasets.normalize(images, info.mean, info.std),
                           jnp.asarray(labels))
    return {"depth": config.model.depth, "unit": config.model.unit,
            "shortcut": config.model.shortcut, "weights": where, **signals}


def relative_to_last(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values) / values[-1]


def plot(results: Sequence[Dict[str, Any]], path: str) -> None:
    """Two panels in the paper's style: ||dE/dx_l|| and RMS(x_l) relative to the last unit."""
    from matplotlib.figure import Figure  # the [train] extra; no pyplot: files only
    figure = Figure(figsize=(11, 4.2))
    for axis, key, title in zip(figure.subplots(1, 2), ("grad_norm", "forward_rms"),
                                ("backward: ||dE/dx_l|| / ||dE/dx_L||",
                                 "forward: RMS(x_l) / RMS(x_L)")):
        for result in results:
            values = relative_to_last(result[key])
            axis.plot(np.arange(1, len(values) + 1), values, label=result["label"])
        axis.set_yscale("log")
        axis.set_xlabel("unit l")
        axis.set_title(title)
        axis.grid(True, which="major", alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# --- command line --------------------------------------------------------------------------

def load_config(spec: str) -> ml_collections.ConfigDict:
    """A config from "path/to/file.py" or "path/to/file.py:arg" (get_config(arg)), as
    --config takes it in training."""
    path, _, arg = spec.partition(":")  # cli.parse_flags has checked that the file exists
    module = cli.import_config_file(path)
    return module.get_config(arg) if arg else module.get_config()


FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_multi_string("config", None, "Config file, optionally file.py:arg; repeat to "
                              "compare networks.", required=True)
    flags.DEFINE_string("workdir", None, "Analyse this run's latest checkpoint (one --config).")
    flags.DEFINE_string("out", None, "Folder for analysis.json and analysis.png.", required=True)
    flags.DEFINE_integer("batch", 64, "Images in the batch.")
    flags.DEFINE_integer("seed", 0, "Initialisation seed (without --workdir).")
    flags.DEFINE_integer("run", None, "With --workdir of several runs (num_runs): the run "
                         "analysed (0-based).")


def main(argv) -> None:
    del argv
    if FLAGS.workdir and len(FLAGS.config) != 1:
        raise errors.ConfigError("--workdir analyses one run: give exactly one --config")
    results = []
    for spec in FLAGS.config:
        config = load_config(spec)
        cli.prepare_process(config)
        images, labels, source = analysis_batch(config, FLAGS.batch, FLAGS.seed)
        result = analyze(config, images, labels, FLAGS.workdir, FLAGS.seed, FLAGS.run)
        result.update(config=spec, label=os.path.basename(spec), images=source)
        grads = result["grad_norm"]
        print(f"{spec}: {len(grads)} units, "
              f"||dE/dx_1|| / ||dE/dx_L|| = {grads[0] / grads[-1]:.3g}, "
              f"RMS(x_1) / RMS(x_L) = {result['forward_rms'][0] / result['forward_rms'][-1]:.3g}"
              f" ({result['weights']}; {source})")
        results.append(result)
    os.makedirs(FLAGS.out, exist_ok=True)
    rundir.write_json(epath.Path(FLAGS.out) / "analysis.json", {"results": results})
    plot(results, os.path.join(FLAGS.out, "analysis.png"))
    print(f"wrote {os.path.join(FLAGS.out, 'analysis.json')} and analysis.png")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
