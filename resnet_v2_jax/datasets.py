"""Datasets: the registry, on-device normalisation, and the checks that data is what training
expects (`check_examples`, `DataError`); imports neither TensorFlow nor tfds.

What the project needs to know about a dataset that its files do not say: the number of
classes, the full training split's size and the per-channel statistics. Everything else (splits,
crop sizes, augmentation) is a config key. Images always travel to the accelerators as uint8;
`normalize` turns them into floats inside the jitted step, on the device.

Any tfds image classification dataset with `image` and `label` features can be used once it
is registered here (`register(DatasetInfo(...))`); CIFAR-10, CIFAR-100 and ImageNet are built in.
"""

import dataclasses
from typing import Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from resnet_v2_jax import errors


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the project needs to know about one tfds dataset.

    `mean` and `std` are per RGB channel on the 0-255 scale. `num_train_examples` is the full
    "train" split's size: what an epoch counts where the data is not at hand (eval-only,
    benchmarks); training counts the split it actually reads.
    """
    name: str
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    num_train_examples: int


_IMAGENET_MEAN = tuple(255 * m for m in (0.485, 0.456, 0.406))
_IMAGENET_STD = tuple(255 * s for s in (0.229, 0.224, 0.225))

_REGISTRY = {}


def register(info: DatasetInfo) -> DatasetInfo:
    """Adds (or replaces) a dataset; its `name` is the tfds name without version."""
    _REGISTRY[info.name] = info
    return info


# docs/paper.md, "Training recipes": CIFAR-10 statistics as in the authors' code (fb.resnet.torch
# datasets/cifar10.lua); CIFAR-100 uses its own, from fb.resnet.torch datasets/cifar100.lua.
register(DatasetInfo("cifar10", 10, (125.3, 123.0, 113.9), (63.0, 62.1, 66.7), 50_000))
register(DatasetInfo("cifar100", 100, (129.3, 124.1, 112.4), (68.2, 65.4, 70.4), 50_000))
register(DatasetInfo("imagenet2012", 1000, _IMAGENET_MEAN, _IMAGENET_STD, 1_281_167))


def get(dataset: str) -> DatasetInfo:
    """Returns the registry entry for a tfds name such as "cifar10" or "cifar10:3.0.2"."""
    name = dataset.split(":")[0]
    if name not in _REGISTRY:
        raise errors.ConfigError(
            f"unknown dataset {dataset!r}: supported are {', '.join(sorted(_REGISTRY))}; add "
            "another tfds image classification dataset with resnet_v2_jax.datasets.register("
            "DatasetInfo(name, num_classes, mean, std, num_train_examples))")
    return _REGISTRY[name]


def normalize(images, mean: Sequence[float], std: Sequence[float], dtype=jnp.float32):
    """Per-channel (x - mean) / std of uint8 images [..., 3], computed in float32 on device.

    docs/paper.md, "Training recipes": per-channel mean/std normalisation is the only test-time
    preprocessing on CIFAR. Call it inside the jitted step, so that images cross the
    host-to-device link as uint8 (a quarter of the bytes of float32); `mean` and `std` (a
    `DatasetInfo`'s, on the 0-255 scale) are constants of the step.
    """
    mean = jnp.asarray(mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(std, jnp.float32)
    return ((jnp.asarray(images, jnp.float32) - mean) * inv_std).astype(dtype)


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
        raise errors.DataError(f"{where} holds no examples")
    image_dtype = np.dtype(image_dtype)
    if image_dtype != np.uint8:
        raise errors.DataError(
            f"{where}: images are {image_dtype}, expected uint8 (0-255); write the "
            "unnormalised pixels, e.g. np.uint8(np.round(255 * x)) for x in [0, 1]")
    if len(image_shape) == 3 and image_shape[0] == 3 and image_shape[-1] != 3:
        raise errors.DataError(
            f"{where}: images have shape {tuple(image_shape)} per example, channels "
            "first; expected (height, width, 3): np.transpose(x, (0, 2, 3, 1))")
    if len(image_shape) != 3 or image_shape[-1] != 3:
        raise errors.DataError(
            f"{where}: images have shape {tuple(image_shape)} per example, expected "
            "(height, width, 3) RGB; convert grayscale: np.repeat(x[..., None], 3, -1)")
    if image_size and image_shape[0] is not None and tuple(image_shape[:2]) != (image_size,) * 2:
        raise errors.DataError(
            f"{where}: images are {image_shape[0]}x{image_shape[1]}, but the config "
            f"has image_size={image_size}; set --config.image_size={image_shape[0]} "
            "(or resize the data)")
    classes = info.num_classes
    if labels is not None:
        labels = np.asarray(labels)
        label_dtype = labels.dtype
    if label_dtype is not None and not np.issubdtype(np.dtype(label_dtype), np.integer):
        raise errors.DataError(f"{where}: labels are {np.dtype(label_dtype)}, expected integers "
                               f"in [0, {classes})")
    if labels is not None:
        if labels.ndim != 1 or (num_images is not None and len(labels) != num_images):
            raise errors.DataError(
                f"{where}: {num_images} images but labels of shape {labels.shape}; "
                "expected one label per image")
        bad = np.flatnonzero((labels < 0) | (labels >= classes))
        if bad.size:
            raise errors.DataError(
                f"{where}: label {labels[bad[0]]} at index {bad[0]} is outside "
                f"[0, {classes}) for {info.name} ({bad.size} such labels); is this "
                            "another dataset's data?")
    if num_label_classes is not None and num_label_classes != classes:
        raise errors.DataError(
            f"{where}: labels have {num_label_classes} classes, but {info.name} has "
            f"{classes}; is this another dataset's data?")
