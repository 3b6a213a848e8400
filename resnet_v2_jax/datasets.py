"""Dataset registry and on-device normalisation; imports neither TensorFlow nor tfds.

Both input paths (`input_pipeline`, tf.data on the host; `device_input`, arrays resident on the
accelerators) read the facts they need from here, and so do the model and training code: the
number of classes, split names and sizes, the per-channel statistics and default image sizes.
Images always travel to the accelerators as uint8; `normalize` turns them into floats inside
the jitted step, on the device.

Any tfds image classification dataset with `image` and `label` features can be used once it
is registered here (`register(DatasetInfo(...))`); CIFAR-10, CIFAR-100 and ImageNet are built in.
"""

import dataclasses
import math
from typing import Callable, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# PAPER.md, "Training recipes": CIFAR images are zero-padded by 4 pixels on each side before
# the random 32x32 crop. Shared by the tf.data and the device-resident implementations.
CIFAR_PADDING = 4


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the project needs to know about one tfds dataset.

    `mean` and `std` are per RGB channel on the 0-255 scale. `augment` names the training
    augmentation family that suits the images: "pad_crop_flip" for small fixed-size images
    (CIFAR), "scale" / "scale_aspect" for JPEG photos (ImageNet); it is the default for
    `config.augment` and decides how eval images are prepared (as stored, or resized and
    centre-cropped).
    """
    name: str
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    image_size: int                      # training crop
    eval_crop_sizes: Tuple[int, ...]
    augment: str
    train_split: str = "train"
    eval_split: str = "test"
    num_train_examples: Optional[int] = None
    num_eval_examples: Optional[int] = None


_IMAGENET_MEAN = tuple(255 * m for m in (0.485, 0.456, 0.406))
_IMAGENET_STD = tuple(255 * s for s in (0.229, 0.224, 0.225))

_REGISTRY = {}


def register(info: DatasetInfo) -> DatasetInfo:
    """Adds (or replaces) a dataset; its `name` is the tfds name without version."""
    _REGISTRY[info.name] = info
    return info


# PAPER.md "Training recipes": CIFAR-10 statistics as in the authors' code (fb.resnet.torch
# datasets/cifar10.lua); CIFAR-100 uses its own, from fb.resnet.torch datasets/cifar100.lua.
register(DatasetInfo("cifar10", 10, (125.3, 123.0, 113.9), (63.0, 62.1, 66.7),
                     image_size=32, eval_crop_sizes=(32,), augment="pad_crop_flip",
                     num_train_examples=50_000, num_eval_examples=10_000))
register(DatasetInfo("cifar100", 100, (129.3, 124.1, 112.4), (68.2, 65.4, 70.4),
                     image_size=32, eval_crop_sizes=(32,), augment="pad_crop_flip",
                     num_train_examples=50_000, num_eval_examples=10_000))
# Table 5 tests a single 224 or 320 crop; training uses 224 crops with scale augmentation.
register(DatasetInfo("imagenet2012", 1000, _IMAGENET_MEAN, _IMAGENET_STD,
                     image_size=224, eval_crop_sizes=(224, 320), augment="scale",
                     eval_split="validation",
                     num_train_examples=1_281_167, num_eval_examples=50_000))


def get(dataset: str) -> DatasetInfo:
    """Returns the registry entry for a tfds name such as "cifar10" or "cifar10:3.0.2"."""
    name = dataset.split(":")[0]
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown dataset {dataset!r}: supported are {', '.join(sorted(_REGISTRY))}; add "
            "another tfds image classification dataset with resnet_v2_jax.datasets.register("
            "DatasetInfo(name, num_classes, mean, std, image_size, eval_crop_sizes, augment))")
    return _REGISTRY[name]


class DataError(ValueError):
    """A dataset whose files do not hold what the config expects."""


def check_examples(where: str, info: DatasetInfo, *, image_dtype, image_shape: Sequence,
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
                        "unnormalised pixels, e.g. np.uint8(np.round(255 * images)) for [0, 1] floats")
    if len(image_shape) != 3 or image_shape[-1] != 3:
        raise DataError(f"{where}: images have shape {tuple(image_shape)} per example, expected "
                        "(height, width, 3) RGB; convert grayscale with np.repeat(x[..., None], 3, -1)")
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


def normalize(images, dataset: str, dtype=jnp.float32):
    """Per-channel (x - mean) / std of uint8 images [..., 3], computed in float32 on device.

    PAPER.md "Training recipes": per-channel mean/std normalisation is the only test-time
    preprocessing on CIFAR. Call it inside the jitted step, so that images cross the
    host-to-device link as uint8 (a quarter of the bytes of float32).
    """
    info = get(dataset)
    mean = jnp.asarray(info.mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(info.std, jnp.float32)
    return ((jnp.asarray(images, jnp.float32) - mean) * inv_std).astype(dtype)


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
