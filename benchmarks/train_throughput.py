"""Training-step throughput (images/second) of the real train step on synthetic data.

Runs `train.train_step` through `parallel.DataParallel` over every local device, on uint8
batches already on the devices, so the figure is the accelerator's, not the input pipeline's.
The defaults are the two the project reports: CIFAR ResNet-164 at batch 128 and ImageNet
ResNet-50 v2 at 224, both in bf16.

    python benchmarks/train_throughput.py                         # both, bf16
    python benchmarks/train_throughput.py --models cifar164 --dtype float32 --steps 20
"""
import argparse
import functools
import os
import sys
import time

import jax
import numpy as np

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
    dp = parallel.DataParallel(config.parallelism, config.bn_group_size)
    dp.check_batch_size(batch_size)
    info = datasets.get(config.dataset)
    model = train.create_model(config, info.num_classes, dp.axes)
    tx = train.create_optimizer(config, train.learning_rate_schedule(config, 100, 10_000))
    state = dp.put_state(train.create_train_state(jax.random.PRNGKey(0), model, tx,
                                                  config.image_size))
    step = dp.compile(functools.partial(
        train.train_step, axes=dp.axes, dataset=config.dataset,
        dtype=model.dtype, dropout_key=jax.random.PRNGKey(1)), returns_state=True)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar164", "imagenet50"],
                        choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: per model)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scan", action="store_true", help="scan_units=True")
    args = parser.parse_args()
    print(f"JAX {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"dtype {args.dtype}, {args.steps} timed steps")
    print(f"{'model':<12} {'batch':>6} {'compile s':>10} {'ms/step':>9} {'img/s':>9}")
    for name in args.models:
        batch = args.batch or DEFAULT_BATCH[name]
        compile_s, seconds, rate = measure(name, batch, args.dtype == "bfloat16", args.steps,
                                           args.scan)
        print(f"{name:<12} {batch:>6} {compile_s:>10.1f} {1000 * seconds:>9.1f} {rate:>9.0f}")


if __name__ == "__main__":
    main()
