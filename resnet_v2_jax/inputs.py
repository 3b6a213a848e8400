"""What training asks of an input pipeline, and the one dispatch over the two pipelines.

Two pipelines deliver batches of un-augmented uint8 images (`augment` does the rest, in the
train step):

* "tfds" (`tfds_input`): tf.data on the host, each process reading its share of a tfds split;
  batches are put onto the devices two ahead of the step (`prefetch_to_device`).
* "device_resident" (`device_input`): the whole split held in accelerator memory, batches
  gathered there under `jit` (CIFAR).

`check_data`, `train_batches` and `eval_batches` pick the pipeline a config names; nothing else
in the project does. The contract both keep is `batching`'s: a global batch splits evenly over
processes and devices, a process reads a contiguous share of a split, and an evaluation is one
exact pass (the tail padded and masked, never dropped).
Neither this module nor `device_input` imports TensorFlow: `tfds_input` is imported only for
configs that use it.
"""

import collections
import functools
import itertools
from typing import Callable, Iterable, Iterator, Tuple

import jax
import ml_collections
import numpy as np

from resnet_v2_jax import batching, device_input, errors

PIPELINES = ("tfds", "device_resident")


def check_data(config: ml_collections.ConfigDict) -> int:
    """Checks the training and eval splits cheaply (dtype, shape, labels; nothing decoded) before
    anything is compiled or written; returns the number of training examples actually read
    (`config.train_split`, e.g. "train[:90%]"), which is what an epoch counts."""
    examples = _pipeline(config).check_data(config)
    if examples < config.batch_size:
        raise errors.DataError(
            f"{config.dataset} {config.train_split} holds {examples} training examples, fewer "
            f"than one batch of {config.batch_size}: lower batch_size or use a larger split")
    return examples


def train_batches(config: ml_collections.ConfigDict, dp, start_step: int) -> Iterator[dict]:
    """Device batches {"image": uint8, "label": int32} from step `start_step` on, laid out for
    `dp` (a `parallel.DataParallel`). With several runs that do not share batches, run k's
    batches (those of the single run with seed + k) are stacked on a leading run axis: drawn
    on the device by the device-resident pipeline, from one tf.data stream per run on the host
    (which costs the host num_runs times the work of one run)."""
    pipeline = _pipeline(config)
    if config.input_pipeline == "device_resident":
        return pipeline.create_train_iterator(config, dp.train_batch_sharding,
                                              start_step=start_step)
    if not dp.batch_per_run:
        host = pipeline.create_train_iterator(config, start_step=start_step)
    else:
        streams = [pipeline.create_train_iterator(_with_seed(config, config.seed + k),
                                                  start_step=start_step)
                   for k in range(config.num_runs)]
        host = (jax.tree.map(lambda *xs: np.stack(xs), *batches) for batches in zip(*streams))
    return prefetch_to_device(host, functools.partial(dp.put_batch,
                                                      sharding=dp.train_batch_sharding), size=2)


def _with_seed(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    config = config.copy_and_resolve_references()
    config.seed = seed
    return config


def eval_batches(config: ml_collections.ConfigDict, crop_size: int) -> batching.EvalBatches:
    """One exact pass over the eval split at `crop_size`: per-process host batches with a mask."""
    return _pipeline(config).create_eval_iterator(config, crop_size)


def reads_tfds(config: ml_collections.ConfigDict) -> bool:
    """Whether `config`'s data comes through tfds (so TensorFlow): the tfds pipeline, and the
    device-resident one when it has no `array_dir` of .npz arrays to read instead."""
    return config.get("input_pipeline") == "tfds" or config.get("array_dir") is None


def train_modules(config: ml_collections.ConfigDict) -> Tuple[str, ...]:
    """The modules of the [train] extra a training run of `config` imports: TensorBoard's
    writer (tensorboardX) always, TensorFlow and tfds where it reads tfds (`reads_tfds`)."""
    return ("tensorboardX",) + (("tensorflow", "tensorflow_datasets") if reads_tfds(config)
                                else ())


def not_installed(module: str, config: ml_collections.ConfigDict) -> str:
    """One line for a missing module of `train_modules(config)`: what this config's input
    needs and how to install it."""
    if reads_tfds(config):
        return (f"{module} is not installed: reading tfds needs tensorflow and "
                "tensorflow_datasets, and the logs tensorboardX: pip install "
                "'resnet_v2_jax[train]' (or train CIFAR from .npz arrays, which needs only "
                "tensorboardX: --config.input_pipeline=device_resident --config.array_dir=DIR)")
    return (f"{module} is not installed: training from .npz arrays needs only it, for the "
            "logs: pip install tensorboardX (or the whole [train] extra: pip install "
            "'resnet_v2_jax[train]')")


def _pipeline(config: ml_collections.ConfigDict):
    if config.input_pipeline == "device_resident":
        return device_input
    try:
        from resnet_v2_jax import tfds_input
    except ImportError as e:
        raise errors.SetupError(
            f"input_pipeline='tfds' needs TensorFlow and tensorflow-datasets ({e}): pip install "
            "'resnet_v2_jax[train]', or train CIFAR from .npz arrays with "
            "--config.input_pipeline=device_resident --config.array_dir=DIR") from e
    return tfds_input


# --- host to device ----------------------------------------------------------------------------

def prefetch_to_device(iterator: Iterable, put: Callable, size: int = 2) -> Iterator:
    """Yields `put(batch)` for each batch, `size` batches ahead of the one yielded.

    `put` turns a host batch into device arrays laid out for the data-parallel step (for
    example `DataParallel.put_batch`). JAX's transfers return before the copy is done, so
    keeping the next batches' transfers in flight overlaps them with the step: no thread is
    needed (the way of the Flax ImageNet example and big_vision), so none outlives a run.
    An error of the iterator or of `put` is raised where its batch would have been yielded.
    """
    ahead = collections.deque()
    iterator = iter(iterator)
    failed = []

    def enqueue(count: int) -> None:
        try:
            for batch in itertools.islice(iterator, 0 if failed else count):
                ahead.append(put(batch))
        except Exception as error:  # noqa: BLE001 (raised in order, below)
            failed.append(error)

    enqueue(size)
    while ahead:
        batch = ahead.popleft()
        enqueue(1)
        yield batch
    if failed:
        raise failed[0]
