r"""Command line: train and evaluate a pre-activation ResNet.

    python -m resnet_v2_jax.main --config=configs/cifar10_quick.py --workdir=/tmp/run
    python -m resnet_v2_jax.main --config=configs/imagenet_200.py --workdir=gs://bucket/run \
        --config.batch_size=1024

    python -m resnet_v2_jax.main --config=configs/cifar10_quick.py --print_config

--print_config lists every config key with its value and meaning (after --config.key=value
overrides) and exits; any key can be overridden that way. Rerunning the same command resumes
from the newest checkpoint in --workdir; rerunning a finished run reports its results and
changes nothing. A run stopped by SIGTERM (preemption) saves a checkpoint and exits with code
143, by Ctrl-C with 130: neither is a finished run (exit code 0 is). On several processes (TPU
pod slices, multi-node GPU) every process runs the same command; `jax.distributed.initialize()`
finds its peers from the environment. User errors end in one line (see `resnet_v2_jax.cli`).
"""

if __name__ == "__main__":  # first: the imports below take seconds (see `startup`)
    from resnet_v2_jax import startup
    startup.exit_on_signals()

import jax
from absl import flags, logging
from ml_collections import config_flags

from resnet_v2_jax import cli, parallel, train

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined by the command only, so importing defines none."""
    flags.DEFINE_string("workdir", None, "Folder (local, ~ or gs://) for checkpoints, logs, "
                        "results; relative paths are made absolute at start. Required to train.")
    flags.DEFINE_bool("print_config", False, "Print every config key with its value and "
                      "meaning, then exit without training.")
    flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize(); default: when "
                      "the environment names several processes (TPU pods, SLURM, "
                      "JAX_COORDINATOR_ADDRESS) or the flags below are given.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, where no cluster "
                        "environment (TPU, SLURM, Open MPI) provides it.")
    flags.DEFINE_integer("num_processes", None, "Number of processes, likewise.")
    flags.DEFINE_integer("process_id", None, "This process's index, likewise.")
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. "
                                    "configs/cifar10_quick.py; override keys with "
                                    "--config.key=value (--config.model.key=value for the "
                                    "network).", lock_config=True)
    flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    if FLAGS.print_config:
        cli.print_config(FLAGS.config)
        return
    if not FLAGS.workdir:
        cli.fail("--workdir is required to train (--print_config lists the config's keys)", 2)
    cli.check_train_extra(FLAGS.config)
    cli.prepare_process(FLAGS.config)
    parallel.initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address,
                                    FLAGS.num_processes, FLAGS.process_id)
    logging.info("JAX %s, process %d of %d, %d local / %d global devices (%s)",
                 jax.__version__, jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
        cli.print_results(results, FLAGS.config.dataset, FLAGS.config.eval_split)
    if results.get("stop_signal") == "SIGINT":
        cli.fail(f"interrupted (Ctrl-C) at step {results['step']} of {results['total_steps']}: "
                 "its checkpoint is written; rerun the same command to resume", 130)
    if results["preempted"]:
        # 143 (128 + SIGTERM), not 0: a scheduler reads 0 as a finished job.
        cli.fail(f"preempted (SIGTERM) at step {results['step']} of {results['total_steps']}: "
                 "its checkpoint is written; rerun the same command to resume", 143)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
