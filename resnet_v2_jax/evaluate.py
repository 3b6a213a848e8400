"""Eval-only: top-1/top-5 error of a run's checkpoint on a whole split, without training.

    python -m resnet_v2_jax.evaluate --workdir=/tmp/cifar10_quick
    python -m resnet_v2_jax.evaluate --workdir=gs://bucket/r200 --crops=224,320 --split=validation
    python -m resnet_v2_jax.evaluate --checkpoint=/tmp/run/checkpoints/1000 --output=/tmp/e.json

The config defaults to the run's own `<workdir>/config.json` (written by every training run);
`--config=configs/....py` (with `--config.key=value` overrides) replaces it. The latest readable
checkpoint in the workdir is used unless `--checkpoint` names a step folder (`runs.read_run`
reads either). Evaluation is the training loop's own (`train.Evaluator`: the whole split, the
tail padded and masked), so it
reproduces the errors a run logged at that step. Results are printed and written as JSON to
`<workdir>/eval_results.json` or `--output`. On several processes (TPU pod slices, SLURM) every
process runs the same command with `--distributed`.
"""

if __name__ == "__main__":  # first: the imports below take seconds (see `startup`)
    from resnet_v2_jax import startup
    startup.exit_on_signals()

import time
from typing import Any, Dict, Optional, Sequence

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from resnet_v2_jax import cli, configuration, errors, parallel, recipe, rundir, runs, train

FLAGS = flags.FLAGS


def eval_config(config: ml_collections.ConfigDict, *, split: Optional[str] = None,
                crops: Optional[Sequence[int]] = None, data_dir: Optional[str] = None,
                array_dir: Optional[str] = None,
                eval_batch_size: Optional[int] = None) -> ml_collections.ConfigDict:
    """A copy of `config` that evaluates the whole `split` at `crops`, reading from `data_dir`
    (tfds) or `array_dir` (.npz arrays) of this machine (None keeps a setting)."""
    values = config.to_dict()
    values["steps_per_eval"] = -1  # exact: every example of the split
    if split:
        values["eval_split"] = split
    if crops:
        values["eval_crop_sizes"] = tuple(int(c) for c in crops)
    if data_dir:
        values["data_dir"] = data_dir
    if array_dir:
        values["array_dir"] = array_dir
    if eval_batch_size:
        values["eval_batch_size"] = eval_batch_size
    return ml_collections.ConfigDict(values)


def evaluate(path: str, config: Optional[ml_collections.ConfigDict] = None,
             run: Optional[int] = None, **overrides) -> Dict[str, Any]:
    """Evaluates the run at `path` (its workdir: the latest readable checkpoint; or a step
    folder <workdir>/checkpoints/<step>) as `config` says (default: the run's config.json),
    with `eval_config`'s `overrides` (split, crops, data_dir, array_dir, eval_batch_size). A
    workdir of several runs is evaluated run by run, with their statistics, unless `run`
    picks one.

    Returns {"step", "checkpoint", "dataset", "split", "eval": {crop: {"top1_error",
    "top5_error", "loss", "num_examples"}}, "devices", "wall_time_s"} (the eval entries of
    several runs as `train.Evaluator` gives them).
    """
    t_start = time.monotonic()
    workdir, _ = runs.split_run_path(path)
    config = eval_config(config if config is not None else configuration.read(str(workdir)),
                         **overrides)
    loaded = runs.read_run(path, config, run)
    if run is not None:  # one run of several is evaluated as a single run
        config.num_runs = 1
    dp = parallel.DataParallel(config.parallelism, num_runs=config.num_runs)
    setup = recipe.build(config, dp)  # the schedule is irrelevant: only the eval step is used
    diverged = loaded.diverged if run is None else ()
    results = train.Evaluator(config, dp, setup.eval_step)(dp.put_state(loaded.variables),
                                                           diverged)
    divergence = loaded.divergence()
    if divergence:
        logging.warning("%s", divergence)
    return {"step": loaded.weights_step, "checkpoint": loaded.checkpoint,
            "diverged": divergence or None, "dataset": config.dataset,
            "split": config.eval_split, "run": run, "num_runs": loaded.num_runs,
            "eval": results, "devices": dp.describe(setup.model.norm),
            "wall_time_s": round(time.monotonic() - t_start, 1)}


def run(argv) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    if not (FLAGS.workdir or FLAGS.checkpoint):
        cli.fail("give --workdir or --checkpoint", 2)
    path = FLAGS.checkpoint or FLAGS.workdir
    run_dir, step = runs.split_run_path(path)
    if FLAGS.checkpoint and step is None:
        raise errors.CheckpointError(f"--checkpoint={FLAGS.checkpoint} is not a step folder "
                                     "<workdir>/checkpoints/<step>")
    config = FLAGS.config if FLAGS.config is not None else configuration.read(str(run_dir))
    output = (rundir.resolve(FLAGS.output) if FLAGS.output else
              rundir.resolve(FLAGS.workdir or str(run_dir)) / "eval_results.json")
    if jax.process_index() == 0:
        rundir.check_output_file(output, "--output")
    cli.prepare_process(config)
    results = evaluate(path, config, FLAGS.run, split=FLAGS.split, crops=FLAGS.crops,
                       data_dir=FLAGS.data_dir, array_dir=FLAGS.array_dir,
                       eval_batch_size=FLAGS.eval_batch_size)
    if jax.process_index() != 0:
        return
    cli.print_results(results, results["dataset"], results["split"])
    rundir.write_json(output, results)
    print(f"wrote {output}")


def define_flags() -> None:
    """The command line's flags; defined by the command only, so importing defines none."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file; default: <workdir>/config.json of the run. Override keys "
        "with --config.key=value.")
    flags.DEFINE_string(
        "workdir", None, "The run's folder (local or gs://). With --checkpoint: only where "
        "eval_results.json goes (default: the checkpoint's run).")
    flags.DEFINE_string(
        "checkpoint", None, "A step folder, <workdir>/checkpoints/<step>; default: the latest "
        "readable checkpoint of --workdir.")
    flags.DEFINE_integer("run", None, "Of a workdir of several runs (num_runs), evaluate this "
                         "one (0-based); default: every run, with their statistics.")
    flags.DEFINE_string("split", None, "tfds split; default: the config's eval_split.")
    flags.DEFINE_list("crops", None, "Crop sizes, e.g. 224,320; default: the config's "
                      "eval_crop_sizes.")
    flags.DEFINE_string("data_dir", None, "tfds data_dir; default: the config's.")
    flags.DEFINE_string("array_dir", None, "Folder of <dataset>_<split>.npz arrays "
                        "(device-resident runs); default: the config's.")
    flags.DEFINE_integer("eval_batch_size", None, "Global eval batch (a multiple of the device "
                         "count); default: the config's.")
    flags.DEFINE_string("output", None, "JSON results; default: <workdir>/eval_results.json.")
    flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize(); default: when "
                      "the environment names several processes (TPU pods, SLURM, Open MPI).")


def main(argv):
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # the results are printed; --verbosity=0 for more
    parallel.initialize_distributed(FLAGS.distributed)
    run(argv)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
