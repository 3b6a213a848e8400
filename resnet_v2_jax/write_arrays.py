r"""Command line: write tfds splits as the .npz arrays of the device-resident pipeline
(`config.array_dir`), e.g. for a machine without TensorFlow:

    python -m resnet_v2_jax.write_arrays --dataset=cifar10 --array_dir=/data/arrays
"""

if __name__ == "__main__":  # first: the imports below take seconds (see `startup`)
    from resnet_v2_jax import startup
    startup.exit_on_signals()

import ml_collections
from absl import flags

from resnet_v2_jax import cli, device_input

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined by the command only, so importing defines none."""
    flags.DEFINE_string("dataset", "cifar10", "tfds dataset name.")
    flags.DEFINE_string("data_dir", None, "tfds data_dir; default: tfds's.")
    flags.DEFINE_string("array_dir", None, "Folder for <dataset>_<split>.npz (config.array_dir).")
    flags.DEFINE_list("splits", ["train", "test"], "tfds splits to write.")
    flags.mark_flag_as_required("array_dir")


def main(argv) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    from resnet_v2_jax import tfds_input  # TensorFlow (cli.run names the extra if missing)
    config = ml_collections.ConfigDict({"dataset": FLAGS.dataset, "data_dir": FLAGS.data_dir})
    for split in FLAGS.splits:
        print(device_input.write_arrays(FLAGS.array_dir, FLAGS.dataset, split,
                                        *tfds_input.load_split_arrays(config, split)))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
