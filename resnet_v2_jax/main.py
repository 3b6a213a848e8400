"""Command line: train and evaluate a pre-activation ResNet.

    python -m resnet_v2_jax.main --config=configs/cifar10_quick.py --workdir=/tmp/run
    python -m resnet_v2_jax.main --config=configs/imagenet_200.py --workdir=gs://bucket/run \
        --config.batch_size=1024

Rerunning the same command resumes from the newest checkpoint in --workdir. On several
processes (TPU pod slices, multi-node GPU) every process runs the same command;
`jax.distributed.initialize()` finds its peers from the environment.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from resnet_v2_jax import checkpoint, parallel, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder (local or gs://) for checkpoints, logs, results.")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize(); default: when the "
                  "environment names several processes (TPU pods, SLURM, JAX_COORDINATOR_ADDRESS) "
                  "or the flags below are given.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, where no cluster "
                    "environment (TPU, SLURM, Open MPI) provides it.")
flags.DEFINE_integer("num_processes", None, "Number of processes, likewise.")
flags.DEFINE_integer("process_id", None, "This process's index, likewise.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10_quick.py; "
                                "override keys with --config.key=value.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

# Errors that mean "the input is wrong", not "the program is wrong": one line, exit code 1.
USER_ERRORS = (ValueError, FileNotFoundError, checkpoint.CheckpointError,
               train.NonFiniteLossError)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(checkpoint.quiet_orbax_info)
    parallel.initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address,
                                    FLAGS.num_processes, FLAGS.process_id)
    logging.info("JAX %s, process %d of %d, %d local / %d global devices (%s)",
                 jax.__version__, jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
    try:
        results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except USER_ERRORS as e:
        logging.log(logging.DEBUG, "%s", type(e).__name__, exc_info=True)  # --verbosity=1
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() != 0:
        return
    for crop, r in results["eval"].items():
        print(f"step {results['step']}: test accuracy {100 * (1 - r['top1_error']):.2f}% "
              f"(top-1 error {100 * r['top1_error']:.2f}%, top-5 error "
              f"{100 * r['top5_error']:.2f}%) on {r['num_examples']} {FLAGS.config.dataset} "
              f"{FLAGS.config.eval_split} images at crop {crop}")
    if results["preempted"]:
        print(f"stopped at step {results['step']} of {results['total_steps']} (preempted); "
              "rerun the same command to resume")


if __name__ == "__main__":
    app.run(main)
