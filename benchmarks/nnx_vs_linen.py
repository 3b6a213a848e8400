"""The NNX train step (`resnet_v2_jax.nnx`, nnx.jit + nnx.Optimizer) against the linen one
(jax.jit of a functional step, optax), on the same network, batch and optimiser.

The steps compile to the same XLA computation; what differs is the Python work around each call:
nnx.jit flattens the module graph and writes the new values back on every call, and
`nnx.cached_partial` caches that traversal for a model and optimiser bound once. A small batch exposes that overhead, a larger
one shows the share it has of a real step. Repetitions alternate between the two steps and the
median is reported, with the process CPU-seconds per step beside wall time (shared machines are
noisy):

    python benchmarks/nnx_vs_linen.py                   # CIFAR ResNet-20 at batch 2 and 64
    python benchmarks/nnx_vs_linen.py --depth=110 --batches=128
"""

import statistics
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from flax import nnx

from resnet_v2_jax import nnx as resnet_nnx

flags.DEFINE_integer("depth", 20, "CIFAR ResNet depth (basic units up to 110).")
flags.DEFINE_list("batches", ["2", "64"], "Batch sizes.")
flags.DEFINE_integer("steps", 10, "Steps per repetition.")
flags.DEFINE_integer("repeats", 7, "Repetitions of each step, alternating.")
FLAGS = flags.FLAGS


def tx():
    return optax.sgd(0.1, momentum=0.9, nesterov=True)


def loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def linen_step(network):
    @jax.jit
    def step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, updates = network.apply({"params": params, "batch_stats": batch_stats},
                                            images, mutable=["batch_stats"])
            return loss(logits, labels), updates["batch_stats"]
        (value, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx().update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, value
    return step


@nnx.jit
def nnx_step(model, optimizer, images, labels):
    value, grads = nnx.value_and_grad(lambda model: loss(model(images), labels))(model)
    optimizer.update(model, grads)
    return value


def timed(run, steps):
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out = run()
    jax.block_until_ready(out)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def compare(depth, batch, steps, repeats):
    block = "basic" if depth <= 110 else "bottleneck"
    model = resnet_nnx.cifar_resnet(depth, 10, block=block, rngs=nnx.Rngs(0))
    network, variables = resnet_nnx.to_linen(model)
    optimizer = nnx.Optimizer(model, tx(), wrt=nnx.Param)
    images = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
    labels = jnp.arange(batch) % 10
    step = linen_step(network)
    state = [variables["params"], variables["batch_stats"], tx().init(variables["params"])]

    def run_linen():
        *state[:], value = step(*state, images, labels)
        return value

    cached_step = nnx.cached_partial(nnx_step, model, optimizer)
    runs = {"linen": run_linen, "nnx.jit": lambda: nnx_step(model, optimizer, images, labels),
            "cached": lambda: cached_step(images, labels)}
    times = {name: [] for name in runs}
    for name, run in runs.items():
        timed(run, 2)  # compile and warm up
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run, steps))
    return {name: tuple(statistics.median(t[i] for t in ts) for i in (0, 1))
            for name, ts in times.items()}


def main(argv):
    del argv
    print(f"CIFAR ResNet-{FLAGS.depth}, {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          "median of alternating repetitions")
    print("ms per step (process CPU-ms per step); NNX steps also as a ratio to linen")
    for batch in map(int, FLAGS.batches):
        r = compare(FLAGS.depth, batch, FLAGS.steps, FLAGS.repeats)
        wall, cpu = r["linen"]
        cells = [f"linen {1e3 * wall:.2f} ({1e3 * cpu:.2f})"]
        cells += [f"{name} {1e3 * w:.2f} ({1e3 * c:.2f}) {w / wall:.3f}x"
                  for name, (w, c) in r.items() if name != "linen"]
        print(f"batch {batch:>4}: " + "   ".join(cells))


if __name__ == "__main__":
    app.run(main)
