"""Several runs in one program on this machine's devices: each layout against single runs.

For N runs of CIFAR ResNet-20 at batch 128 (the defaults), the real train step of
`recipe.build` on synthetic uint8 batches already on the device, compile excluded:

- "single runs": one run's step, timed; N runs one after another cost N times that;
- "unrolled": the N-run step with one copy of the step per run in the program;
- "vmap": the N-run step vectorised over the runs.

Printed per layout: images per second over all runs (wall), images per process CPU-second, and
the ratio of both to the single runs'. The layouts are measured in turn, `--repeats` times,
interleaved, and the medians shown (the CPU is shared: ratios within one run of this script are
what to compare, not the absolute figures).

    python benchmarks/runs_layouts.py [--num_runs=4] [--depth=20] [--batch=128] [--seconds=10]
"""

import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_runs", 4, "Runs in one program.")
flags.DEFINE_integer("depth", 20, "CIFAR ResNet depth (basic units up to 110).")
flags.DEFINE_integer("batch", 128, "Batch of each run.")
flags.DEFINE_float("seconds", 10.0, "Timed seconds per measurement.")
flags.DEFINE_integer("repeats", 3, "Interleaved measurements per layout.")
flags.DEFINE_list("layouts", ["single", "unrolled", "vmap"], "What to measure.")


def stepper(layout: str):
    """(run n steps, images per step, compile seconds) of one layout."""
    import jax
    import numpy as np
    from resnet_v2_jax import base_config
    from resnet_v2_jax import parallel, recipe

    runs = 1 if layout == "single" else FLAGS.num_runs
    config = base_config.cifar("cifar10", FLAGS.depth, batch_size=FLAGS.batch,
                           eval_batch_size=FLAGS.batch, num_runs=runs,
                           runs_layout="unrolled" if layout == "single" else layout)
    dp = parallel.DataParallel("shard_map", 0, jax.devices()[:1], num_runs=runs)
    setup = recipe.build(config, dp)
    rng = np.random.RandomState(0)
    shape = (runs,) if runs > 1 else ()
    batch = dp.put_batch({"image": rng.randint(0, 256, shape + (FLAGS.batch, 32, 32, 3)
                                               ).astype(np.uint8),
                          "label": rng.randint(0, 10, shape + (FLAGS.batch,)).astype(np.int32)},
                         dp.train_batch_sharding)
    holder = {"state": dp.put_state(setup.init_state(0))}
    start = time.perf_counter()
    seed = np.int32(config.seed)
    step = setup.train_step.lower(holder["state"], batch, seed).compile()
    compile_s = time.perf_counter() - start

    def run(n):
        for _ in range(n):
            holder["state"], metrics = step(holder["state"], batch, seed)
        jax.block_until_ready(metrics)
    run(1)  # warm-up
    return run, runs * FLAGS.batch, compile_s


def measure(run, images_per_step: int):
    """(images per second, images per process CPU-second) over about FLAGS.seconds."""
    steps, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < FLAGS.seconds:
        run(1)
        steps += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return steps * images_per_step / wall, steps * images_per_step / cpu


def main(argv):
    del argv
    import jax
    steppers = {layout: stepper(layout) for layout in FLAGS.layouts}
    figures = {layout: [] for layout in FLAGS.layouts}
    for _ in range(FLAGS.repeats):
        for layout, (run, images, _) in steppers.items():
            figures[layout].append(measure(run, images))
    medians = {layout: tuple(statistics.median(f[i] for f in values) for i in range(2))
               for layout, values in figures.items()}
    base = medians.get("single")
    print(f"{FLAGS.num_runs} runs of CIFAR ResNet-{FLAGS.depth}, batch {FLAGS.batch} each, on "
          f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores); medians of "
          f"{FLAGS.repeats} interleaved measurements of {FLAGS.seconds:g} s")
    print("| layout | img/s (all runs) | img per CPU-s | vs single runs (wall) | (CPU) | compile s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for layout, (rate, cpu_rate) in medians.items():
        ratios = (f"{rate / base[0]:.2f}x | {cpu_rate / base[1]:.2f}x" if base else "n/a | n/a")
        print(f"| {layout} | {rate:,.0f} | {cpu_rate:,.0f} | {ratios} | "
              f"{steppers[layout][2]:.1f} |")


if __name__ == "__main__":
    app.run(main)
