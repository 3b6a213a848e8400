"""What both input pipelines share, without TensorFlow: how a global batch and a split divide
over processes and devices, the exact eval pass (`EvalBatches`), the checks that data is
what training expects (`check_examples`), and moving host batches onto the devices ahead of the
step that needs them (`prefetch_to_device`, for training and evaluation alike).

`input_pipeline` (tf.data on the host) and `device_input` (arrays in accelerator memory) use
these, and so does `parallel` for the batch rule.
"""

import dataclasses
import math
import queue
import threading
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple

import jax
import numpy as np

from resnet_v2_jax import datasets

# docs/paper.md, "Training recipes": CIFAR images are zero-padded by 4 pixels on each side before
# the random 32x32 crop. Shared by the tf.data and the device-resident implementations.
CIFAR_PADDING = 4


def local_batch_size(global_batch: int, process_count: int, device_count: int,
                     name: str = "batch_size") -> int:
    """This process's share of a global batch; raises unless every device gets the same."""
    if global_batch < 1 or global_batch % device_count or global_batch % process_count:
        raise ValueError(f"global {name}={global_batch} must be a positive multiple of the "
                         f"device count {device_count} (and of the process count "
                         f"{process_count})")
    return global_batch // process_count


def resolve_process(process_index: Optional[int],
                    process_count: Optional[int]) -> Tuple[int, int]:
    """(index, count) of this process; None means JAX's (tests pass values to simulate hosts)."""
    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def process_share(num_examples: int, process_index: int, process_count: int) -> Tuple[int, int]:
    """[start, stop) of this process's share: contiguous, sizes differ by at most one, larger
    shares first (the convention of `tfds.even_splits` with drop_remainder=False)."""
    small, extra = divmod(num_examples, process_count)
    start = process_index * small + min(process_index, extra)
    return start, start + small + (process_index < extra)


@dataclasses.dataclass(frozen=True)
class EvalBatches:
    """One exact pass over an eval split, in per-process batches {"image", "label", "mask"}.

    Iterate it once per evaluation (each `iter()` starts a fresh pass). Every process yields
    `num_batches` batches, so collectives inside the eval step line up on every host; the
    tail is padded with zero images whose `mask` is False, never dropped. `num_examples` is
    the number of real examples over all processes (the mask sum).
    """
    make_iterator: Callable[[], Iterator[dict]]
    num_batches: int
    num_examples: int

    def __iter__(self):
        return self.make_iterator()

    def __len__(self):
        return self.num_batches


def eval_num_batches(num_examples: int, process_count: int, local_batch: int) -> int:
    """Batches per process: enough for the largest process share."""
    return math.ceil(math.ceil(num_examples / process_count) / local_batch)


class DataError(ValueError):
    """A dataset whose files do not hold what the config expects."""


def check_examples(where: str, info: datasets.DatasetInfo, *, image_dtype, image_shape: Sequence,
                   num_images: Optional[int] = None, labels=None, label_dtype=None,
                   num_label_classes: Optional[int] = None,
                   image_size: Optional[int] = None) -> None:
    """Raises DataError, in one line naming `where`, unless the data is what training expects.

    Images: uint8 (0-255) with 3 channels, `image_shape` = (height, width, 3) per example
    (None for sizes that vary, as with JPEGs), height = width = `image_size` when given. Labels:
    integers in [0, info.num_classes), one per image: checked on `labels` (an array) when
    given, else on `num_label_classes` (what a tfds ClassLabel feature declares). Cheap: it reads
    shapes, dtypes and labels, never decodes an image.
    """
    if num_images == 0:
        raise DataError(f"{where} holds no examples")
    image_dtype = np.dtype(image_dtype)
    if image_dtype != np.uint8:
        raise DataError(f"{where}: images are {image_dtype}, expected uint8 (0-255); write the "
                        "unnormalised pixels, e.g. np.uint8(np.round(255 * x)) for x in [0, 1]")
    if len(image_shape) != 3 or image_shape[-1] != 3:
        raise DataError(f"{where}: images have shape {tuple(image_shape)} per example, expected "
                        "(height, width, 3) RGB; convert grayscale: np.repeat(x[..., None], 3, -1)")
    if image_size and image_shape[0] is not None and tuple(image_shape[:2]) != (image_size,) * 2:
        raise DataError(f"{where}: images are {image_shape[0]}x{image_shape[1]}, but the config "
                        f"has image_size={image_size}; set --config.image_size={image_shape[0]} "
                        "(or resize the data)")
    classes = info.num_classes
    if labels is not None:
        labels = np.asarray(labels)
        label_dtype = labels.dtype
    if label_dtype is not None and not np.issubdtype(np.dtype(label_dtype), np.integer):
        raise DataError(f"{where}: labels are {np.dtype(label_dtype)}, expected integers "
                        f"in [0, {classes})")
    if labels is not None:
        if labels.ndim != 1 or (num_images is not None and len(labels) != num_images):
            raise DataError(f"{where}: {num_images} images but labels of shape {labels.shape}; "
                            "expected one label per image")
        bad = np.flatnonzero((labels < 0) | (labels >= classes))
        if bad.size:
            raise DataError(f"{where}: label {labels[bad[0]]} at index {bad[0]} is outside "
                            f"[0, {classes}) for {info.name} ({bad.size} such labels); is this "
                            "another dataset's data?")
    if num_label_classes is not None and num_label_classes != classes:
        raise DataError(f"{where}: labels have {num_label_classes} classes, but {info.name} has "
                        f"{classes}; is this another dataset's data?")


# --- host to device ----------------------------------------------------------------------------

def prefetch_to_device(iterator: Iterable, put: Callable, size: int = 2) -> Iterator:
    """Yields `put(batch)` for each batch, computed by a background thread `size` batches ahead.

    `put` turns a host batch into device arrays laid out for the data-parallel step (for
    example `DataParallel.put_batch`), so the transfer overlaps the previous step. Exceptions
    in the thread are re-raised here; closing the generator stops the thread.
    """
    done = object()
    results = queue.Queue(maxsize=size)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for batch in iterator:
                if not offer((put(batch), None)):
                    return
            offer((done, None))
        except BaseException as e:  # handed to the consumer
            offer((None, e))

    threading.Thread(target=produce, daemon=True, name="prefetch_to_device").start()
    try:
        while True:
            item, error = results.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
