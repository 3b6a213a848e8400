"""The tfds pipeline: tf.data on the host, for CIFAR and ImageNet.

Every process reads its own disjoint, equal share of a split (`tfds.split_for_jax_process`) and
yields numpy batches of `config.batch_size // process_count` un-augmented uint8 images;
`inputs.prefetch_to_device` moves them onto the accelerators ahead of the step, where
`augment` and `datasets.normalize` run. What stays on the host is what must: reading, shuffling,
and for JPEG datasets the decode of each image's random crop window and its resize to the crop
size (which pixels exist depends on the window).

Determinism. The training stream of a process is its share in a fresh order each epoch, the
order seeded by (seed, process, epoch), epochs concatenated and cut into batches. Example i of
that stream (i = step * local_batch + row) draws its crop window with stateless ops keyed by
(seed, process, i), so parallel decoding stays reproducible and `start_step=k` rebuilds exactly
the batches an uninterrupted run sees from step k: it starts at epoch k * local_batch // n and
skips the examples before step k within that epoch, before any decoding.

Crop windows (docs/paper.md, "Training recipes"):
- "pad_crop_flip" (CIFAR): none; images go to the step as stored.
- "scale" (ImageNet): shorter side random in [256, 480], random 224 crop.
- "scale_aspect" (Table 5's best row): random-resized crop of 8-100% of the area with aspect
  ratio in [3/4, 4/3].
JPEG datasets are decoded with the fused `tf.image.decode_and_crop_jpeg`: the window is chosen
in the coordinates of the stored image, so only that window is decoded, then resized. Eval
resizes the shorter side to crop / `config.eval_resize_ratio` and takes the centre crop (also as
one fused decode of the centre window).

TensorFlow only feeds data: when a pipeline is created it hides the accelerators from
TensorFlow (`tf.config.set_visible_devices([], "GPU")`), so that TensorFlow takes no memory JAX
needs. Importing this module changes nothing else in the process.
"""

import contextlib
import functools
import io
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Iterator, Optional, Tuple

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from resnet_v2_jax import batching, datasets, errors

# fb.resnet.torch (datasets/imagenet.lua), used by the paper for ImageNet: RandomScale(256, 480).
SCALE_RANGE = (256, 480)
# Szegedy et al. (2015) random-resized crop, Table 5's "scale + aspect ratio" row.
AREA_RANGE = (0.08, 1.0)
ASPECT_RANGE = (3 / 4, 4 / 3)
# fb.resnet.torch resizes with bicubic interpolation (image.scale's default).
RESIZE_METHOD = "bicubic"
_AUTOTUNE = tf.data.AUTOTUNE


@functools.lru_cache(maxsize=None)
def hide_accelerators_from_tensorflow() -> None:
    """TensorFlow only feeds data: it must not allocate accelerator memory JAX needs. Called
    (once) when a pipeline is created, before TensorFlow initialises its devices."""
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # no such device type, or TF already initialised
            pass


# --- datasets on disk --------------------------------------------------------------------------

def _builder(config) -> tfds.core.DatasetBuilder:
    """The tfds builder of `config.dataset` in `config.data_dir`, prepared if possible.

    A dataset that needs a manual download (ImageNet) and is not prepared fails at once, before
    tfds creates any folder. Others are downloaded and prepared; if that fails, the folders the
    attempt created are removed again.
    """
    datasets.get(config.dataset)  # registered: normalisation needs its statistics
    hide_accelerators_from_tensorflow()
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
    if builder.is_prepared():
        return builder
    root = epath.Path(builder.data_dir_root)
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        manual = root / "downloads" / "manual"
        if not (manual.exists() and any(manual.iterdir())):
            raise errors.NotFoundError(
                f"{config.dataset} is not prepared in {root} and needs a manual download: put its "
                f"archives in {manual}, then run `tfds build {config.dataset} --data_dir={root}` "
                '(docs/running.md, "Preparing ImageNet"), or set config.data_dir to where it is '
                "prepared")
    unreachable = _unreachable_hosts(builder)
    if unreachable:
        raise errors.NotFoundError(
            f"{config.dataset} is not prepared in {root} and its download host "
            f"({', '.join(unreachable)}) cannot be reached; run `tfds build {config.dataset} "
            f"--data_dir={root}` on a machine with internet access and copy the folder here, or "
            "set config.data_dir to where it is prepared")
    created = [p for p in (root, root / builder.name) if not p.exists()]
    logging.warning("%s is not prepared in %s: downloading and preparing it with tfds",
                    config.dataset, root)
    try:
        # tfds prints a bold banner of sizes it does not know ("Unknown size") to stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare()
    except Exception as e:
        for folder in created:  # leave nothing behind of a failed attempt
            if folder.exists():
                folder.rmtree()
                break
        raise errors.NotFoundError(
            f"{config.dataset} is not prepared in {root} and could not be downloaded "
            f"({type(e).__name__}); run `tfds build {config.dataset} --data_dir={root}` on a "
            "machine with internet access (copy the folder here if this one is offline), or set "
            "config.data_dir to where it is prepared") from e
    return builder


def _unreachable_hosts(builder, timeout_s: float = 10.0) -> list:
    """The hosts of `builder`'s download URLs when none of them answers, else [].

    tfds retries a failed download ten times with a growing back-off (minutes on a machine
    without internet); one HEAD request per host, through the same proxy settings, says it at
    once. Any HTTP answer, an error status included, means the host is reachable."""
    hosts = {}
    for url in getattr(builder, "url_infos", None) or {}:
        hosts.setdefault(urllib.parse.urlsplit(url).netloc, url)
    for url in hosts.values():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                        timeout=timeout_s):
                return []
        except urllib.error.HTTPError:
            return []
        except (urllib.error.URLError, OSError, ValueError):
            continue
    return sorted(hosts)


def check_data(config) -> int:
    """Checks, from the dataset's metadata only (nothing is decoded), that the training and eval
    splits exist and hold uint8 RGB images of the config's size and labels of the dataset's
    classes; raises `errors.DataError` or `errors.NotFoundError` in one line otherwise. Returns the
    number of examples in `config.train_split` (over all processes)."""
    builder = _builder(config)
    _check_augment(config, builder)
    where = f"{config.dataset} in {builder.data_dir}"
    sizes = {}
    for split in (config.eval_split, config.train_split):
        try:
            sizes[split] = builder.info.splits[split].num_examples
        except (KeyError, ValueError) as e:
            raise errors.DataError(f"{where} has no split {split!r} ({e}); its splits "
                                         f"are {', '.join(builder.info.splits)}") from e
        if not sizes[split]:
            raise errors.DataError(f"{where}: split {split!r} holds no examples")
    features = builder.info.features
    missing = sorted({"image", "label"} - set(features.keys()))
    if missing:
        raise errors.DataError(f"{where} has no {' or '.join(missing)} feature; expected "
                                     "an image classification dataset with 'image' and 'label'")
    image, label = features["image"], features["label"]
    pad_crop_flip = config.augment == "pad_crop_flip"
    datasets.check_examples(where, datasets.get(config.dataset), image_dtype=image.np_dtype,
                                image_shape=image.shape, label_dtype=label.np_dtype,
                                num_label_classes=getattr(label, "num_classes", None),
                                image_size=config.image_size if pad_crop_flip else None)
    return sizes[config.train_split]


def num_examples(config, split: str) -> int:
    """Examples in a split of `config.dataset` (any tfds split string, e.g. "train[:90%]")."""
    return _builder(config).info.splits[split].num_examples


def load_split_arrays(config, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """A whole split as numpy (uint8 images [N, H, W, 3], int32 labels [N]), in stored order."""
    ds = _builder(config).as_dataset(split=split, batch_size=-1)
    data = tfds.as_numpy(ds)
    return data["image"], data["label"].astype(np.int32)


def _check_augment(config, builder):
    augment = config.augment
    encoding = builder.info.features["image"].encoding_format
    if augment != "pad_crop_flip" and encoding != "jpeg":
        raise errors.ConfigError(f"augment={augment!r} decodes JPEGs, but {config.dataset} stores "
                                 f"{encoding or 'png'} images; use augment='pad_crop_flip'")


def _read(builder, split, config, *, shuffle_files: bool) -> tf.data.Dataset:
    """{"image", "label"} examples of one split, JPEGs left encoded, optionally cached."""
    decoders = None
    if config.augment != "pad_crop_flip":
        decoders = {"image": tfds.decode.SkipDecoding()}
    read_config = tfds.ReadConfig(shuffle_seed=config.seed, shuffle_reshuffle_each_iteration=False,
                                  try_autocache=False)
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, decoders=decoders,
                            read_config=read_config)
    ds = ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)},
                num_parallel_calls=_AUTOTUNE)
    return ds.cache() if config.cache else ds


# --- ImageNet: crop windows and fused decode --------------------------------------------

def scale_window(shape, key, crop_size: int):
    """[y, x, h, w] in the stored image equivalent to: resize the shorter side to a random
    S in SCALE_RANGE, then take a random `crop_size` square (fb.resnet.torch RandomScale +
    RandomCrop, the paper's "scale augmentation")."""
    key_s, key_y, key_x = tf.unstack(tf.random.experimental.stateless_split(key, 3))
    height, width = shape[0], shape[1]
    shorter = tf.minimum(height, width)
    scale = tf.random.stateless_uniform([], key_s, SCALE_RANGE[0], SCALE_RANGE[1] + 1, tf.int32)
    side = tf.cast(tf.round(crop_size * tf.cast(shorter, tf.float32) / tf.cast(scale, tf.float32)),
                   tf.int32)
    side = tf.clip_by_value(side, 1, shorter)
    y = tf.random.stateless_uniform([], key_y, 0, height - side + 1, tf.int32)
    x = tf.random.stateless_uniform([], key_x, 0, width - side + 1, tf.int32)
    return tf.stack([y, x, side, side])


def scale_aspect_window(shape, key):
    """[y, x, h, w] of a random-resized crop: AREA_RANGE of the image, aspect in ASPECT_RANGE
    (whole image when 10 attempts fail)."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=key, min_object_covered=0.0,
        aspect_ratio_range=ASPECT_RANGE, area_range=AREA_RANGE, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def center_window(shape, crop_size: int, resize_ratio: float):
    """[y, x, h, w] equivalent to: resize the shorter side to round(crop_size / resize_ratio),
    then take the centre `crop_size` square."""
    height, width = shape[0], shape[1]
    shorter = tf.cast(tf.minimum(height, width), tf.float32)
    resized = round(crop_size / resize_ratio)
    side = tf.cast(tf.round(crop_size * shorter / resized), tf.int32)
    return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def decode_window(jpeg, window, size: int, antialias: bool):
    """Decodes only `window` of a JPEG (grayscale and CMYK come out RGB), resized to `size`^2
    (low-pass filtered first when shrinking if `antialias`), as float32 on the 0-255 scale."""
    crop = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    return tf.image.resize(crop, [size, size], method=RESIZE_METHOD, antialias=antialias)


def _to_uint8(image):
    """Rounds a float image on the 0-255 scale to uint8 (half up), clipping: two ops instead of
    round, clip and cast (a tenth of the host's time per ImageNet image)."""
    return tf.saturate_cast(image + 0.5, tf.uint8)


def random_crop(jpeg, key, config):
    """ImageNet training example: random window, fused decode, resize to the crop size (the flip
    and colour come later, in the train step: `augment`)."""
    shape = tf.image.extract_jpeg_shape(jpeg)
    if config.augment == "scale":
        window = scale_window(shape, key, config.image_size)
    else:
        window = scale_aspect_window(shape, key)
    return _to_uint8(decode_window(jpeg, window, config.image_size, config.antialias))


def eval_preprocess(config, builder, crop_size: int) -> Callable:
    """(encoded or stored image) -> the uint8 eval image at `crop_size`."""
    if config.augment == "pad_crop_flip":
        stored = builder.info.features["image"].shape[0]
        if crop_size != stored:
            raise errors.ConfigError(f"augment='pad_crop_flip' evaluates images as stored "
                                     f"({stored}x{stored}); got crop size {crop_size}")
        return lambda image: image
    return lambda jpeg: _to_uint8(decode_window(
        jpeg, center_window(tf.image.extract_jpeg_shape(jpeg), crop_size,
                            config.eval_resize_ratio), crop_size, config.antialias))


# --- iterators ---------------------------------------------------------------------------------

def create_train_iterator(config, *, start_step: int = 0, process_index: Optional[int] = None,
                          process_count: Optional[int] = None) -> Iterator[dict]:
    """Endless per-process training batches {"image": uint8 [b, s, s, 3], "label": int32 [b]},
    b = config.batch_size // process_count, s = config.image_size, from step `start_step` on.

    `process_index`/`process_count` default to JAX's; tests pass them to simulate hosts.
    """
    process_index, process_count = batching.resolve_process(process_index, process_count)
    batch = batching.local_batch_size(config.batch_size, process_count, jax.device_count())
    builder = _builder(config)
    _check_augment(config, builder)
    split = tfds.split_for_jax_process(config.train_split, process_index=process_index,
                                       process_count=process_count)
    size = builder.info.splits[split].num_examples
    examples = _read(builder, split, config, shuffle_files=True)
    buffer = min(config.shuffle_buffer_size, size)
    process_key = tf.constant([config.seed, process_index], tf.int64)
    shuffle_key = tf.random.experimental.stateless_fold_in(process_key, 0)
    window_key = tf.random.experimental.stateless_fold_in(process_key, 1)

    def epoch(index):
        seed = tf.random.stateless_uniform(
            [], tf.random.experimental.stateless_fold_in(shuffle_key, index),
            minval=None, maxval=None, dtype=tf.int64)
        return examples.shuffle(buffer, seed=seed).enumerate(start=index * size)

    def crop(position, example):
        if config.augment == "pad_crop_flip":  # as stored: the step pads, crops and flips
            return example
        key = tf.random.experimental.stateless_fold_in(window_key, position)
        return {"image": random_crop(example["image"], key, config),
                "label": example["label"]}

    first_epoch, skip = divmod(start_step * batch, size)
    ds = tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(skip)
    ds = ds.map(crop, num_parallel_calls=_AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=True).prefetch(_AUTOTUNE)
    return iter(tfds.as_numpy(ds))


def create_eval_iterator(config, crop_size: Optional[int] = None, *, split: Optional[str] = None,
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None) -> batching.EvalBatches:
    """One exact pass over `split` (default config.eval_split) at `crop_size` (default the
    first of config.eval_crop_sizes), in per-process batches {"image": uint8, "label": int32,
    "mask": bool} of config.eval_batch_size // process_count; see `batching.EvalBatches`."""
    process_index, process_count = batching.resolve_process(process_index, process_count)
    batch = batching.local_batch_size(config.eval_batch_size, process_count,
                                    jax.device_count(), "eval_batch_size")
    crop_size = crop_size or config.eval_crop_sizes[0]
    split = split or config.eval_split
    builder = _builder(config)
    _check_augment(config, builder)
    local_split = tfds.split_for_jax_process(split, process_index=process_index,
                                             process_count=process_count)
    total = builder.info.splits[split].num_examples
    num_batches = batching.eval_num_batches(total, process_count, batch)
    preprocess = eval_preprocess(config, builder, crop_size)
    ds = _read(builder, local_split, config, shuffle_files=False).map(
        lambda ex: {"image": preprocess(ex["image"]), "label": ex["label"], "mask": True},
        num_parallel_calls=_AUTOTUNE)
    padding = tf.data.Dataset.from_tensors(
        tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec))
    num_padding = num_batches * batch - builder.info.splits[local_split].num_examples
    ds = ds.concatenate(padding.repeat(num_padding)).batch(batch).prefetch(_AUTOTUNE)
    return batching.EvalBatches(lambda: iter(tfds.as_numpy(ds)), num_batches, total)
