r"""Weights out: a run's checkpoint as one safetensors file that needs no config and no Orbax.

    python -m resnet_v2_jax.export --workdir=/tmp/cifar10_quick --out=/tmp/resnet14.safetensors
    python -m resnet_v2_jax.export --workdir=/tmp/run/checkpoints/750 --out=/tmp/r.safetensors \
        --unrolled

The file holds the parameters and BN statistics (one tensor per variable, named
"params/stage1_unit1/conv1/kernel") and, in its metadata, the network's options. Read it with

    model, variables = weights.load("/tmp/resnet14.safetensors")
    logits = model.apply(variables, images, train=False)

or start a fine-tuning run from it (`--config.init_from=/tmp/resnet14.safetensors`). The latest
readable checkpoint of --workdir is exported, or the step folder it names.
"""

if __name__ == "__main__":  # first: the imports below take seconds (see `startup`)
    from resnet_v2_jax import startup
    startup.exit_on_signals()

from typing import Optional

from absl import flags

from resnet_v2_jax import cli, configuration, errors, rundir, runs, unit_layout, weights

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined by the command only, so importing defines none."""
    flags.DEFINE_string("workdir", None, "The run's folder (local or gs://), or one of its step "
                        "folders <workdir>/checkpoints/<step>.")
    flags.DEFINE_string("out", None, "The .safetensors file to write.")
    flags.DEFINE_bool("unrolled", False, "Write a scanned network (scan_units=True) in the "
                      "unrolled layout, one entry per unit.")
    flags.DEFINE_integer("run", None, "Of a workdir of several runs (num_runs), the run to "
                         "export (0-based).")
    flags.mark_flags_as_required(["workdir", "out"])


def export(workdir: str, out: str, unrolled: bool = False, run: Optional[int] = None) -> str:
    """Writes `workdir`'s checkpoint (of run `run`, of several) to `out`; returns which
    checkpoint it was."""
    if not out.endswith(".safetensors"):
        raise errors.ConfigError(f"--out={out} must end in .safetensors")
    rundir.check_output_file(rundir.resolve(out), "--out")
    loaded = runs.one_run(runs.read_run(workdir, run=run), "--run")
    model, variables, where = loaded.model, loaded.variables, loaded.checkpoint
    if run is not None:
        divergence = loaded.divergence()
        where = f"{where}, run {run}" + (f"; {divergence}" if divergence else "")
    if unrolled and model.scan_units:
        model = model.clone(scan_units=False)
        variables = unit_layout.scanned_to_unrolled(variables)
    weights.save(out, model, variables)
    return where


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    cli.prepare_process(configuration.read(str(runs.split_run_path(FLAGS.workdir)[0])))
    where = export(FLAGS.workdir, FLAGS.out, FLAGS.unrolled, FLAGS.run)
    print(f"wrote {FLAGS.out} (the weights of {where})")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
