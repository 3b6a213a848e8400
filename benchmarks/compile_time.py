"""Trace and compile time of a training step, and XLA's temp-memory estimate, per network layout.

The step is jax.jit(jax.value_and_grad(cross-entropy loss)) in training mode, with the batch
statistics as a mutable collection, as a training loop runs it. For each network and layout
(scanned or unrolled units, with or without nn.remat) this prints the seconds `jit(...).lower(...)`
takes (Python tracing to StableHLO), the seconds `.compile()` takes (XLA), and
`compiled.memory_analysis().temp_size_in_bytes`, XLA's estimate of the step's scratch memory
(activations kept for the backward pass included). Nothing is executed: variables and inputs are
abstract (jax.ShapeDtypeStruct).

    python benchmarks/compile_time.py                      # everything (the unrolled 1001 is slow)
    python benchmarks/compile_time.py --models=cifar1001 --scan=scanned
"""

import math
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from resnet_v2_jax import models

NETWORKS = {  # name: (constructor taking ResNetV2 options, image size, classes)
    "cifar164": (lambda **options: models.cifar_resnet(164, 10, **options), 32, 10),
    "cifar1001": (lambda **options: models.cifar_resnet(1001, 10, **options), 32, 10),
    "imagenet200": (lambda **options: models.imagenet_resnet(200, 1000, **options), 224, 1000),
}
SCAN = {"both": (True, False), "scanned": (True,), "unrolled": (False,)}  # the unrolled ones are slow
REMAT = {"both": (False, True), "off": (False,), "on": (True,)}
COLUMNS = ("model", "scan", "remat", "batch", "trace s", "compile s", "temp MiB")
ROW = "{:<12} {:>5} {:>5} {:>5} {:>8} {:>9} {:>9}"


def train_step(model):
    """value_and_grad of the mean cross-entropy, in training mode (batch statistics updated)."""
    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                      train=True, mutable=["batch_stats"])
        log_probs = jax.nn.log_softmax(logits)
        loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))
        return loss, updates["batch_stats"]
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def measure(network, scan_units, remat_units, batch):
    """(trace seconds, compile seconds, temp MiB) of one network's training step."""
    build, size, _ = NETWORKS[network]
    model = build(scan_units=scan_units, remat_units=remat_units)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(images.shape), train=False))
    start = time.perf_counter()
    lowered = train_step(model).lower(variables["params"], variables["batch_stats"], images, labels)
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    memory = compiled.memory_analysis()
    temp = memory.temp_size_in_bytes / 2**20 if memory is not None else math.nan
    return traced - start, done - traced, temp


FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(NETWORKS), f"Networks, from {', '.join(NETWORKS)}.")
flags.DEFINE_integer("batch", 64, "CIFAR batch size.")
flags.DEFINE_integer("imagenet_batch", 8, "ImageNet batch size (224x224).")
flags.DEFINE_enum("scan", "both", list(SCAN), "scan_units setting(s) to measure.")
flags.DEFINE_enum("remat", "both", list(REMAT), "remat_units setting(s) to measure.")


def main(argv):
    del argv
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{jax.device_count()} device(s)")
    print(ROW.format(*COLUMNS), flush=True)
    for network in FLAGS.models:
        batch = FLAGS.imagenet_batch if network.startswith("imagenet") else FLAGS.batch
        for scan_units in SCAN[FLAGS.scan]:
            for remat_units in REMAT[FLAGS.remat]:
                trace_s, compile_s, temp_mib = measure(network, scan_units, remat_units, batch)
                print(ROW.format(network, "yes" if scan_units else "no",
                                 "yes" if remat_units else "no", batch, f"{trace_s:.1f}",
                                 f"{compile_s:.1f}", f"{temp_mib:.0f}"), flush=True)


if __name__ == "__main__":
    app.run(main)
