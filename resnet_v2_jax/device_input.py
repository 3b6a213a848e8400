"""The device-resident pipeline, for small datasets (CIFAR): no host pipeline during training.

The whole training split is put once, as uint8, into accelerator memory, sharded over the
devices of the batch axis of the caller's `NamedSharding` (CIFAR-10 is 150 MB in all). Each
step, every device gathers its share of the batch from its own shard, in a fresh order each
epoch (per-shard permutations seeded by (seed, epoch, shard)), under `jit`: nothing crosses
from the host. The train step augments the batch (`augment`), as it does for the tfds pipeline.
Batches are global `jax.Array`s with the caller's sharding. A run resumed with `start_step=k`
gets exactly the batches of an uninterrupted run from step k (same seed and device count).

Arrays come from `<config.array_dir>/<dataset>_<split>.npz` (uint8 "image" [N, H, W, 3], int
"label" [N]; see `write_arrays` and `python -m resnet_v2_jax.write_arrays`) or, when
`config.array_dir` is None, from tfds: TensorFlow is imported only then, so a machine without
TensorFlow trains CIFAR from .npz files. The eval iterator is plain numpy with the same
contract as the tfds pipeline's (`batching.EvalBatches`).
"""

import functools
import math
import zipfile
import zlib
from typing import Iterator, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from resnet_v2_jax import batching, datasets, errors


# --- arrays ------------------------------------------------------------------------------------

def array_path(array_dir: str, dataset: str, split: str) -> epath.Path:
    """`<array_dir>/<dataset>_<split>.npz`; array_dir local or gs://."""
    return epath.Path(array_dir) / f"{dataset.split(':')[0]}_{split}.npz"


def write_arrays(array_dir: str, dataset: str, split: str, images: np.ndarray,
                 labels: np.ndarray) -> epath.Path:
    """Saves one split as `<array_dir>/<dataset>_<split>.npz`; returns the path."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise errors.DataError(f"expected uint8 images [N, H, W, C] and N labels, got "
                               f"{images.dtype} {images.shape} and {labels.shape}")
    path = array_path(array_dir, dataset, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, image=images, label=labels.astype(np.int32))
    return path


def load_arrays(config, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W, 3] and int32 labels [N] of a split, from .npz or tfds, checked
    with `datasets.check_examples` (one-line DataError naming the file and first bad index)."""
    if config.array_dir is None:
        from resnet_v2_jax import tfds_input  # TensorFlow only on this path
        return tfds_input.load_split_arrays(config, split)
    images, labels = _read_npz(config, split, with_images=True)
    return images, labels.astype(np.int32)


def check_data(config) -> int:
    """Checks the training and eval splits before anything is compiled or written: for .npz
    files the image dtype and shape (from the array header), the checksums of every member and
    every label; for tfds what `tfds_input.check_data` checks. Returns the number of training
    examples."""
    if config.array_dir is None:
        from resnet_v2_jax import tfds_input
        return tfds_input.check_data(config)
    _read_npz(config, config.eval_split, with_images=False)
    return len(_read_npz(config, config.train_split, with_images=False)[1])


def _read_npz(config, split: str, *, with_images: bool):
    """(images or None, labels) of `<array_dir>/<dataset>_<split>.npz`, checked."""
    info = datasets.get(config.dataset)  # registered: normalisation needs its statistics
    path = array_path(config.array_dir, config.dataset, split)
    if not path.exists():
        raise errors.NotFoundError(f"{path} not found: write it with `python -m "
                                   f"resnet_v2_jax.write_arrays --dataset={config.dataset} "
                                   f"--array_dir={config.array_dir}` or device_input.write_arrays")
    try:
        with path.open("rb") as f, np.load(f) as data:
            missing = sorted({"image", "label"} - set(data.files))
            if missing:
                raise errors.DataError(
                    f"{path} has no {' or '.join(missing)} array (it has {data.files}); expected "
                    "'image' (uint8 [N, H, W, 3]) and 'label' ([N]), as device_input.write_arrays "
                    "writes them")
            labels = data["label"]
            if with_images:
                images = data["image"]
                shape, dtype = images.shape, images.dtype
            else:  # the pixels' checksums are verified, the pixels are not kept
                images = None
                damaged = data.zip.testzip()
                if damaged is not None:
                    raise zipfile.BadZipFile(f"the checksum of {damaged} does not match")
                with data.zip.open("image.npy") as stream:
                    version = np.lib.format.read_magic(stream)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(stream)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        if isinstance(e, errors.DataError):
            raise
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise errors.DataError(f"{path} cannot be read ({type(e).__name__}: {first_line}); "
                                 "it is damaged or truncated: write it again") from e
    if len(shape) < 1:
        raise errors.DataError(f"{path}: 'image' is a scalar, expected uint8 [N, H, W, 3]")
    datasets.check_examples(path, info, image_dtype=dtype, image_shape=shape[1:],
                            num_images=shape[0], labels=labels, image_size=config.image_size)
    return images, labels


# --- iterators ---------------------------------------------------------------------------------

def create_train_iterator(config, sharding: NamedSharding, *,
                          start_step: int = 0) -> Iterator[dict]:
    """Endless global batches {"image": uint8 [B, h, w, 3], "label": int32 [B]} of stored,
    un-augmented images with `sharding`, B = config.batch_size.

    `sharding`'s spec names the batch axes (one entry), or a run axis and the batch axes (two
    entries): then every batch holds one batch per run of config.num_runs, [N, B, ...], run k
    in the order of seed + k, each the batches the single run of that seed gets on the
    devices of one run group. The split is held once per run group, sharded over the batch
    axes; it is trimmed to a multiple of the number of batch shards (at most shards - 1
    examples are left out) so that every shard holds the same number.
    """
    *run_axis, batch_axes = tuple(sharding.spec)
    run_axis = run_axis[0] if run_axis else None
    num_runs = config.num_runs if run_axis is not None else 1
    names = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)
    num_shards = math.prod(sharding.mesh.shape[name] for name in names)
    batching.local_batch_size(config.batch_size, jax.process_count(), num_shards)
    shard_batch = config.batch_size // num_shards
    images, labels = load_arrays(config, config.train_split)
    shard_size = len(images) // num_shards
    if shard_size < shard_batch:
        raise errors.DataError(f"{len(images)} training examples are too few for batches of "
                               f"{shard_batch} on each of {num_shards} shards")
    keep = shard_size * num_shards
    data_spec = P(batch_axes)
    data = jax.tree.map(lambda x: jax.make_array_from_callback(
        x.shape, NamedSharding(sharding.mesh, data_spec), lambda index: x[index]),
        {"image": images[:keep], "label": labels[:keep]})
    # Run k's order is that of the single run with seed + k.
    # The keys travel as raw uint32 data: every process builds the same array and places its
    # own devices' rows (a multi-process mesh takes no device_put of a whole array).
    perm_keys = np.stack([jax.random.key_data(jax.random.split(jax.random.key(seed))[0])
                          for seed in range(config.seed, config.seed + num_runs)])
    perm_keys = jax.make_array_from_callback(
        perm_keys.shape, NamedSharding(sharding.mesh, P(run_axis)), lambda index: perm_keys[index])
    order_spec = P(run_axis, batch_axes)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=sharding.mesh, in_specs=(P(run_axis), P()),
                       out_specs=order_spec)
    def permutations(keys, epoch):
        """Each shard's order of its own examples in `epoch`, for each run: [runs, size]."""
        shard = jax.lax.axis_index(batch_axes)
        return jax.vmap(lambda key: jax.random.permutation(
            jax.random.fold_in(jax.random.fold_in(key, epoch), shard), shard_size))(
                jax.random.wrap_key_data(keys))

    @jax.jit
    @functools.partial(jax.shard_map, mesh=sharding.mesh,
                       in_specs=(data_spec, order_spec, order_spec, P()),
                       out_specs=sharding.spec)
    def batch_at(data, order, next_order, offset):
        """Rows offset .. offset + shard_batch of this shard's stream (running into the next
        epoch's order past the end), for each run: [runs, shard_batch, ...] (no run axis for a
        single run)."""
        position = offset + jnp.arange(shard_batch)
        index = jnp.where(position < shard_size, order[:, position % shard_size],
                          next_order[:, position % shard_size])
        batch = jax.tree.map(lambda x: x[index], data)
        return batch if run_axis is not None else jax.tree.map(lambda x: x[0], batch)

    def batches():
        epoch, orders = None, None
        for step in range(start_step, 2**31 - 1):
            current, offset = divmod(step * shard_batch, shard_size)
            if current != epoch:
                follows = orders is not None and current == epoch + 1
                orders = (orders[1] if follows else permutations(perm_keys, current),
                          permutations(perm_keys, current + 1))
                epoch = current
            yield batch_at(data, *orders, offset)

    return batches()


def create_eval_iterator(config, crop_size: Optional[int] = None, *,
                         split: Optional[str] = None, process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> batching.EvalBatches:
    """One exact pass over `split` (default config.eval_split) as per-process numpy batches
    {"image", "label", "mask"} of the stored images; the same contract as
    `tfds_input.create_eval_iterator`. `crop_size`, if given, must be the stored size."""
    process_index, process_count = batching.resolve_process(process_index, process_count)
    batch = batching.local_batch_size(config.eval_batch_size, process_count,
                                          jax.device_count(), "eval_batch_size")
    images, labels = load_arrays(config, split or config.eval_split)
    if crop_size and crop_size != images.shape[1]:
        raise errors.ConfigError(
            f"the device-resident input evaluates images as stored "
            f"({images.shape[1]}x{images.shape[2]}); got crop size {crop_size}")
    start, stop = batching.process_share(len(images), process_index, process_count)
    num_batches = batching.eval_num_batches(len(images), process_count, batch)

    def batches():
        for first in range(start, start + num_batches * batch, batch):
            real = max(0, min(batch, stop - first))
            image = np.zeros((batch,) + images.shape[1:], np.uint8)
            label = np.zeros((batch,), np.int32)
            image[:real], label[:real] = images[first:first + real], labels[first:first + real]
            yield {"image": image, "label": label, "mask": np.arange(batch) < real}

    return batching.EvalBatches(batches, num_batches, len(images))
