"""Training-step throughput (images/second) of the real train step on synthetic data.

Runs the train step `train.build` compiles over every device (`parallel.DataParallel`), on uint8
batches already on the devices, so the figure is the accelerator's, not the input pipeline's.
The defaults are the two the project reports: CIFAR ResNet-164 at batch 128 and ImageNet
ResNet-50 v2 at 224, both in bf16.

    python benchmarks/train_throughput.py                         # both, bf16
    python benchmarks/train_throughput.py --models=cifar164 --dtype=float32 --steps=20
"""
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # noqa: E402
from resnet_v2_jax import datasets, parallel, train  # noqa: E402

MODELS = {
    "cifar164": lambda: default.cifar("cifar10", 164),
    "cifar1001": lambda: default.cifar("cifar10", 1001),
    "imagenet50": lambda: default.imagenet(50),
    "imagenet200": lambda: default.imagenet(200),
}
DEFAULT_BATCH = {"cifar164": 128, "cifar1001": 64, "imagenet50": 128, "imagenet200": 64}


def measure(name: str, batch_size: int, half: bool, steps: int, scan: bool):
    config = MODELS[name]()
    config.batch_size = batch_size
    config.half_precision = half
    config.scan_units = scan
    config.eval_batch_size = batch_size
    dp = parallel.DataParallel(config.parallelism, config.bn_group_size)
    setup = train.build(config, dp)
    state = dp.put_state(setup.init_state(jax.random.PRNGKey(0)))
    step = setup.train_step
    info = datasets.get(config.dataset)
    rng = np.random.RandomState(0)
    size = config.image_size
    batch = dp.put_batch({
        "image": rng.randint(0, 256, (batch_size, size, size, 3)).astype(np.uint8),
        "label": rng.randint(0, info.num_classes, (batch_size,)).astype(np.int32)})
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(2):  # warm-up
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    return compile_s, seconds, batch_size / seconds


FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["cifar164", "imagenet50"], f"Networks, from {', '.join(MODELS)}.")
flags.DEFINE_integer("batch", 0, "Global batch (0: per model).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
flags.DEFINE_integer("steps", 50, "Timed steps.")
flags.DEFINE_bool("scan", False, "scan_units=True.")


def main(argv):
    del argv
    print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"dtype {FLAGS.dtype}, {FLAGS.steps} timed steps")
    print(f"{'model':<12} {'batch':>6} {'compile s':>10} {'ms/step':>9} {'img/s':>9}")
    for name in FLAGS.models:
        batch = FLAGS.batch or DEFAULT_BATCH[name]
        compile_s, seconds, rate = measure(name, batch, FLAGS.dtype == "bfloat16", FLAGS.steps,
                                           FLAGS.scan)
        print(f"{name:<12} {batch:>6} {compile_s:>10.1f} {1000 * seconds:>9.1f} {rate:>9.0f}")


if __name__ == "__main__":
    app.run(main)
