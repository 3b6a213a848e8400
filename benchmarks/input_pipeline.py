"""Input pipeline throughput: images per second and images per process CPU-second.

CIFAR-10 rows: training batches from tf.data (real CIFAR-10 as tfds, the default config) and
device-resident batches on this machine's JAX devices (gathered under jit). Neither includes
the pad-crop-flip, which the train step does.

ImageNet rows, on a folder of JPEG photos (--samples, default
$RESNET_V2_JAX_DATA/imagenet_samples: 125 ImageNet photos, one per class), all through the same
tf.data stream (`jpeg_stream`: one iterator over the photos repeated, parallel map, batches of
128, prefetch), so they differ only in the per-image work:
- "plain": the Flax ImageNet example's work, decode of a random-resized-crop window, bicubic
  resize to 224, flip, per-channel normalisation to float32 on the host; and the same stopped
  at uint8, the least any host pipeline of this augmentation can do.
- the host's part of the paper's augmentation as this project runs it (decode of the scale or
  random-resized-crop window and resize; the flip, colour and lighting run in the train step),
  and the same with antialiasing on.
- eval at 224 and 320 as configured, with antialiasing on, and the plain centre crop.
The ratio column is images per CPU-second over the group's first (plain) row. The CPU-second
figure counts every thread of this process, so other load on the machine does not inflate it.
Each measurement builds a fresh iterator, runs it `--warmup` seconds, then counts for
`--seconds`; the ImageNet rows of a group are measured `--repeats` times, interleaved, and the
medians are shown.

    python benchmarks/input_pipeline.py [--tfds_data_dir=DIR] [--samples=DIR] [--seconds=10]
"""

import os
import pathlib
import sys
import tempfile
import time
from typing import Tuple

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the JPEG-folder tfds fixture

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from resnet_v2_jax import base_config  # noqa: E402
import jpeg_datasets  # noqa: E402
from resnet_v2_jax import datasets, device_input, tfds_input  # noqa: E402


def throughput(batches, warmup: float, seconds: float) -> Tuple[float, float]:
    """Images per wall-clock second and per CPU second of this process (all its threads) of
    an endless iterator of batches, after `warmup` seconds."""
    start = time.perf_counter()
    while time.perf_counter() - start < warmup:
        jax.block_until_ready(next(batches))
    images, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        batch = next(batches)
        images += len(batch["label"])
    jax.block_until_ready(batch)
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu)


def jpeg_stream(config, preprocess, batch_size: int = 128):
    """Endless batches of `preprocess(jpeg, key)` over config's train split, repeated (one
    iterator, no restart between passes), each example with its own stateless key."""
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
    ds = builder.as_dataset(split=config.train_split,
                            decoders={"image": tfds.decode.SkipDecoding()}).cache().repeat()
    key = tf.constant([config.seed, 0], tf.int64)
    ds = ds.enumerate().map(lambda i, ex: {
        "image": preprocess(ex["image"], tf.random.experimental.stateless_fold_in(key, i)),
        "label": ex["label"]}, num_parallel_calls=tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)))


def plain_train(jpeg, key, size: int = 224, normalize: bool = True):
    """The Flax ImageNet example's training work (its `preprocess_for_train`): random-resized-
    crop window, fused decode, bicubic resize without antialiasing, random flip, then per-channel
    normalisation to float32 on the host. `normalize=False` stops at uint8 instead: the least a
    host can do for this augmentation."""
    key_window, key_flip = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    window = tfds_input.scale_aspect_window(tf.image.extract_jpeg_shape(jpeg), key_window)
    image = tf.image.resize(tf.image.decode_and_crop_jpeg(jpeg, window, channels=3),
                            [size, size], method="bicubic")
    image = tf.cond(tf.random.stateless_uniform([], key_flip) < 0.5,
                    lambda: tf.image.flip_left_right(image), lambda: image)
    return _normalized(image) if normalize else tf.saturate_cast(image + 0.5, tf.uint8)


def plain_eval(jpeg, size: int, normalize: bool = True):
    """The Flax example's eval work (`preprocess_for_eval`): the centre window of side
    size / (size + 32) of the shorter side, fused decode, bicubic resize, normalisation to
    float32 (`normalize=False`: uint8 instead)."""
    shape = tf.image.extract_jpeg_shape(jpeg)
    side = tf.cast(size / (size + 32) * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32),
                   tf.int32)
    window = tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])
    image = tf.image.resize(tf.image.decode_and_crop_jpeg(jpeg, window, channels=3),
                            [size, size], method="bicubic")
    return _normalized(image) if normalize else tf.saturate_cast(image + 0.5, tf.uint8)


def _normalized(image):
    info = datasets.get("imagenet2012")
    return (image - tf.constant(info.mean)) / tf.constant(info.std)


def compare(rows, repeats: int):
    """Measures `rows` [(name, make_batches)] `repeats` times each, in rotating order, each time
    on a fresh iterator (closed afterwards, so no idle pipeline runs beside the measured one);
    returns [(name, median images/s, median images per CPU-s, that over the first row's)]."""
    figures = {name: [] for name, _ in rows}
    for r in range(repeats):
        for name, make_batches in rows[r % len(rows):] + rows[:r % len(rows)]:
            batches = make_batches()
            figures[name].append(throughput(batches, FLAGS.warmup, FLAGS.seconds))
            del batches
            print(f"  {name}: {figures[name][-1][0]:,.0f} images/s, "
                  f"{figures[name][-1][1]:,.0f} per CPU-s", flush=True)
    medians = {name: np.median(np.array(f), axis=0) for name, f in figures.items()}
    baseline = medians[rows[0][0]][1]
    return [(name, *medians[name], medians[name][1] / baseline) for name, _ in rows]


FLAGS = flags.FLAGS
flags.DEFINE_string("tfds_data_dir", os.environ.get(
    "TFDS_DATA_DIR", str(pathlib.Path.home() / "tensorflow_datasets")), "tfds data_dir, cifar10.")
flags.DEFINE_string("samples", os.path.join(os.environ.get("RESNET_V2_JAX_DATA", ""),
                                            "imagenet_samples"), "A folder of *.JPEG photos.")
flags.DEFINE_float("seconds", 6.0, "Seconds counted per measurement.")
flags.DEFINE_float("warmup", 4.0, "Seconds run before counting.")
flags.DEFINE_integer("repeats", 3, "Measurements per ImageNet row, interleaved; medians shown.")
flags.DEFINE_bool("cifar", True, "Include the CIFAR-10 rows (needs cifar10 in --tfds_data_dir).")


def main(argv):
    del argv
    photos = sorted(pathlib.Path(FLAGS.samples).glob("*.JPEG"))
    if not photos:
        raise app.UsageError(f"no *.JPEG photos in --samples={FLAGS.samples}: point it at a "
                             "folder of JPEG photos (or set RESNET_V2_JAX_DATA to a folder "
                             "holding imagenet_samples/)")
    table = []
    if FLAGS.cifar:
        cifar = base_config.get_config()
        cifar.data_dir = FLAGS.tfds_data_dir
        sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
        table += compare([
            ("CIFAR-10 train, tf.data", lambda: tfds_input.create_train_iterator(cifar)),
            (f"CIFAR-10 train, device-resident ({jax.devices()[0].platform} x"
             f"{jax.device_count()})", lambda: device_input.create_train_iterator(cifar, sharding)),
        ], 1)

    with tempfile.TemporaryDirectory() as data_dir:
        imagenet = base_config.imagenet(50)
        imagenet.dataset = jpeg_datasets.store_jpeg_dataset(
            "imagenet_samples", photos, data_dir).name
        imagenet.data_dir = data_dir
        builder = tfds.builder(imagenet.dataset, data_dir=data_dir)

        def variant(**overrides):
            config = imagenet.copy_and_resolve_references()
            config.update(overrides)
            return config

        def train_rows():
            yield ("ImageNet train, plain: RRC + flip + normalise (Flax example)",
                   lambda: jpeg_stream(imagenet, plain_train))
            yield ("ImageNet train, plain, uint8 out (no normalisation)",
                   lambda: jpeg_stream(imagenet, lambda jpeg, key: plain_train(
                       jpeg, key, normalize=False)))
            for name, config in (
                    ("scale window (flip, colour in the train step)", variant()),
                    ("the same, antialias=True", variant(antialias=True)),
                    ("RRC window (flip, colour in the train step)",
                     variant(augment="scale_aspect"))):
                yield (f"ImageNet train, {name}", lambda c=config: jpeg_stream(
                    c, lambda jpeg, key: tfds_input.random_crop(jpeg, key, c)))

        def eval_rows(crop):
            yield (f"ImageNet eval {crop}, plain centre crop + normalise (Flax example)",
                   lambda: jpeg_stream(imagenet, lambda jpeg, key: plain_eval(jpeg, crop)))
            yield (f"ImageNet eval {crop}, plain, uint8 out",
                   lambda: jpeg_stream(imagenet, lambda jpeg, key: plain_eval(
                       jpeg, crop, normalize=False)))
            for name, config in (("as configured", imagenet),
                                 ("antialias=True", variant(antialias=True))):
                preprocess = tfds_input.eval_preprocess(config, builder, crop)
                yield (f"ImageNet eval {crop}, {name}", lambda c=config, p=preprocess: jpeg_stream(
                    c, lambda jpeg, key: p(jpeg)))

        table += compare(list(train_rows()), FLAGS.repeats)
        for crop in imagenet.eval_crop_sizes:
            table += compare(list(eval_rows(crop)), FLAGS.repeats)

    print(f"\nhost cores: os.cpu_count() = {os.cpu_count()}, usable = "
          f"{len(os.sched_getaffinity(0))}; JAX devices: {jax.device_count()} x "
          f"{jax.devices()[0].device_kind}; ImageNet rows: medians of {FLAGS.repeats} interleaved "
          f"measurements of {FLAGS.seconds:g} s")
    print(f"| {'pipeline':<62} | images/s | per CPU-s | vs first of group |")
    print(f"|{'-' * 64}|----------|-----------|-------------------|")
    for name, rate, cpu_rate, ratio in table:
        print(f"| {name:<62} | {rate:>8,.0f} | {cpu_rate:>9,.0f} | {ratio:>16.2f}x |")


if __name__ == "__main__":
    app.run(main)
