"""Input pipeline throughput: images per second, in all and per host core.

Rows: CIFAR-10 training batches from tf.data (real CIFAR-10 as tfds, the default config),
CIFAR-10 device-resident batches on this machine's JAX devices (pad-crop-flip under jit),
ImageNet training batches (scale and scale + aspect augmentation, colour augmentation on, as
in the ImageNet configs) and ImageNet eval batches (224 and 320 centre crops) from a folder of
JPEG photos (--samples, default $RESNET_V2_JAX_DATA/imagenet_samples: the figures in the README
use 125 ImageNet validation-style photos, one per class), cycled. Steady state: each row first runs
`--warmup` seconds (caches filled, functions compiled), then counts images for `--seconds`.

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
from absl import app, flags  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from configs import default  # noqa: E402
import jpeg_datasets  # noqa: E402
from resnet_v2_jax import device_input, input_pipeline  # noqa: E402


def throughput(batches, count, warmup: float, seconds: float) -> Tuple[float, float]:
    """Images per wall-clock second and per CPU second of this process (all its threads) of
    an endless iterator of batches, after `warmup` seconds."""
    start = time.perf_counter()
    while time.perf_counter() - start < warmup:
        jax.block_until_ready(next(batches))
    images, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        batch = next(batches)
        images += count(batch)
    jax.block_until_ready(batch)
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu)


def eval_passes(batches):
    """Endless batches from repeated passes over one `input_common.EvalBatches`."""
    while True:
        yield from batches


FLAGS = flags.FLAGS
flags.DEFINE_string("tfds_data_dir", os.environ.get(
    "TFDS_DATA_DIR", str(pathlib.Path.home() / "tensorflow_datasets")), "tfds data_dir, cifar10.")
flags.DEFINE_string("samples", os.path.join(os.environ.get("RESNET_V2_JAX_DATA", ""),
                                            "imagenet_samples"), "A folder of *.JPEG photos.")
flags.DEFINE_float("seconds", 10.0, "Seconds counted per row.")
flags.DEFINE_float("warmup", 8.0, "Seconds run before counting.")


def main(argv):
    del argv
    rows = []

    def measure(name, batches, batch_size, count=lambda batch: len(batch["label"])):
        rate, cpu_rate = throughput(batches, count, FLAGS.warmup, FLAGS.seconds)
        rows.append((name, batch_size, rate, cpu_rate))
        print(f"  {name}: {rate:,.0f} images/s", flush=True)

    cifar = default.get_config()
    cifar.data_dir = FLAGS.tfds_data_dir
    measure("CIFAR-10 train, tf.data", input_pipeline.create_train_iterator(cifar),
            cifar.batch_size)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    measure(f"CIFAR-10 train, device-resident ({jax.devices()[0].platform} x"
            f"{jax.device_count()})", device_input.create_train_iterator(cifar, sharding),
            cifar.batch_size)

    with tempfile.TemporaryDirectory() as data_dir:
        imagenet = default.imagenet(50)
        imagenet.dataset = jpeg_datasets.store_jpeg_dataset(
            "imagenet_samples", sorted(pathlib.Path(FLAGS.samples).glob("*.JPEG")), data_dir).name
        imagenet.data_dir = data_dir
        imagenet.batch_size = imagenet.eval_batch_size = 128
        for augment in ("scale", "scale_aspect"):
            imagenet.augment = augment
            measure(f"ImageNet train, {augment} + colour, 125 JPEGs",
                    input_pipeline.create_train_iterator(imagenet), imagenet.batch_size)
        for crop in imagenet.eval_crop_sizes:
            measure(f"ImageNet eval, {crop} centre crop, 125 JPEGs",
                    eval_passes(input_pipeline.create_eval_iterator(imagenet, crop)),
                    imagenet.eval_batch_size, count=lambda batch: int(batch["mask"].sum()))

    cores = os.cpu_count()
    print(f"\nhost cores: os.cpu_count() = {cores}, usable = {len(os.sched_getaffinity(0))}; "
          f"JAX devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
    print("per core = images/s / os.cpu_count(); per CPU-s = images per CPU second used by "
          "this process (robust to other load on the machine)")
    print(f"| {'pipeline':<48} | batch | images/s | per core | per CPU-s |")
    print(f"|{'-' * 50}|-------|----------|----------|-----------|")
    for name, batch, rate, cpu_rate in rows:
        print(f"| {name:<48} | {batch:>5} | {rate:>8,.0f} | {rate / cores:>8,.0f} | "
              f"{cpu_rate:>9,.0f} |")


if __name__ == "__main__":
    app.run(main)
