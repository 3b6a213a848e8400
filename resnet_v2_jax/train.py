"""Training and evaluation: `train_and_evaluate(config, workdir)` is what the CLI runs.

The steps are written once, per device (pmap semantics), and handed to `parallel.DataParallel`,
which runs them over every device of every process. The recipe is the paper's (PAPER.md,
"Training recipes"): SGD with momentum 0.9 (Nesterov in the released code), weight decay 1e-4 on
every parameter, learning rate 0.1 per 128 (CIFAR) or 256 (ImageNet) images, x0.1 steps.
"""

import functools
import json
import signal
import time
from typing import Any, Dict, Iterator, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax.training import train_state

from resnet_v2_jax import checkpoint, datasets, models, parallel


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


class TrainState(train_state.TrainState):
    batch_stats: Any


# --- model and optimiser ---------------------------------------------------------------------

def model_options(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The `ResNetV2` options a config selects (everything but BN axes and dtype)."""
    options = dict(unit=config.unit, shortcut=config.shortcut,
                   shortcut_scale=config.shortcut_scale, residual_scale=config.residual_scale,
                   gate_bias_init=config.gate_bias_init,
                   shortcut_dropout_rate=config.shortcut_dropout_rate,
                   scan_units=config.scan_units, remat_units=config.remat_units,
                   bn_momentum=config.bn_momentum, bn_epsilon=config.bn_epsilon)
    if config.stride_on:
        options["stride_on"] = config.stride_on
    if config.arch == "cifar":
        options["block"] = config.block
    elif config.arch == "imagenet":
        options["stem_norm"] = config.stem_norm
    else:
        raise ValueError(f"unknown arch {config.arch!r}; choose one of cifar, imagenet")
    return options


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 axes: Optional[parallel.Axes] = None) -> models.ResNetV2:
    """Builds the config's network; BN statistics are reduced over `axes.bn` in training."""
    factory = models.cifar_resnet if config.arch == "cifar" else models.imagenet_resnet
    options = model_options(config)
    return factory(config.depth, num_classes,
                   dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
                   bn_axis_name=axes.bn if axes else None,
                   bn_axis_index_groups=axes.bn_groups if axes else None, **options)


def model_signature(config: ml_collections.ConfigDict, num_classes: int) -> Dict[str, Any]:
    """What a checkpoint must match to be restored (its parameter tree depends on these)."""
    keys = ("arch", "depth", "block", "unit", "shortcut", "stem_norm", "stride_on", "scan_units")
    return {"num_classes": num_classes, **{k: config[k] for k in keys}}


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
    """The base rate scaled by batch_size / base_batch_size, from optax pieces.

    "steps": x lr_decay_factor at given steps or epochs (the paper: /10 at 32k and 48k
    iterations; the released code at epochs 81 and 122). "cosine": cosine decay to 0.
    Warm-up: "constant" holds warmup_learning_rate for warmup_steps (the appendix: 0.01 for 400
    iterations), "linear" ramps from 0 (large batches). Boundaries are absolute iterations.
    """
    peak = config.learning_rate * config.batch_size / config.base_batch_size
    if config.learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {config.learning_rate}")
    if config.lr_schedule == "steps":
        boundaries = (list(config.lr_boundaries_steps) if config.lr_boundaries_steps else
                      [round(e * steps_per_epoch) for e in config.lr_boundaries_epochs])
        if any(b <= a for a, b in zip(boundaries, boundaries[1:])) or min(boundaries, default=1) <= 0:
            raise ValueError(f"learning-rate boundaries must be positive and increasing, got "
                             f"{boundaries}")
        main = lambda offset: optax.piecewise_constant_schedule(
            peak, {b - offset: config.lr_decay_factor for b in boundaries})
    elif config.lr_schedule == "cosine":
        main = lambda offset: optax.cosine_decay_schedule(peak, max(total_steps - offset, 1))
    else:
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}; choose one of steps, cosine")

    warmup = config.warmup_steps
    if config.warmup == "none" or warmup == 0:
        return main(0)
    if config.warmup == "constant":
        first = optax.constant_schedule(config.warmup_learning_rate)
    elif config.warmup == "linear":
        first = optax.linear_schedule(0.0, peak, warmup)
    else:
        raise ValueError(f"unknown warmup {config.warmup!r}; choose one of none, constant, linear")
    return optax.join_schedules([first, main(warmup)], [warmup])


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and L2 weight decay added to the gradient, as Torch's optim.sgd.

    The authors decay every parameter, BN included; `weight_decay_bn_and_bias=False` masks
    BN scales/offsets and biases out (only conv and dense kernels decay).
    """
    mask = None if config.weight_decay_bn_and_bias else functools.partial(
        jax.tree_util.tree_map_with_path, lambda path, _: path[-1].key == "kernel")
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask),
        optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))


def create_train_state(rng: jax.Array, model: models.ResNetV2, tx: optax.GradientTransformation,
                       image_size: int) -> TrainState:
    @jax.jit
    def init(rng):
        variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3)), train=False)
        return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                 batch_stats=variables["batch_stats"])
    return init(rng)


def abstract_train_state(model: models.ResNetV2, tx: optax.GradientTransformation,
                         image_size: int, sharding: jax.sharding.Sharding) -> TrainState:
    """Shapes, dtypes and `sharding` of the train state, computing nothing: a restore target."""
    shapes = jax.eval_shape(lambda rng: create_train_state(rng, model, tx, image_size),
                            jax.random.PRNGKey(0))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        shapes)


# --- per-device steps --------------------------------------------------------------------------

def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, batch: Dict[str, jax.Array], *, axes: parallel.Axes,
               dataset: str, dtype: Any, dropout_key: jax.Array):
    """One SGD step on one device's share of the batch; gradients averaged over `axes.grad`."""
    images = datasets.normalize(batch["image"], dataset, dtype)
    labels = batch["label"]
    rng = jax.random.fold_in(jax.random.fold_in(dropout_key, state.step),
                             jax.lax.axis_index(axes.grad))

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": rng})
        return cross_entropy(logits, labels).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, axes.grad)
    # BN statistics are normalised within a group; the running averages are kept identical on
    # every device by averaging them over all devices (a no-op with all-device BN).
    batch_stats = jax.lax.pmean(updates["batch_stats"], axes.grad)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {"loss": loss, "error": jnp.mean(jnp.argmax(logits, -1) != labels)}
    return state, jax.lax.pmean(metrics, axes.grad)


def eval_step(state: TrainState, batch: Dict[str, jax.Array], *, axes: parallel.Axes,
              dataset: str, dtype: Any):
    """Sums of top-1/top-5 errors, loss and examples over the valid (mask) entries."""
    images = datasets.normalize(batch["image"], dataset, dtype)
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, images,
                            train=False)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    sums = {
        "top1_wrong": jnp.sum((top5[:, 0] != labels) * mask),
        "top5_wrong": jnp.sum(jnp.all(top5 != labels[:, None], axis=-1) * mask),
        "loss": jnp.sum(cross_entropy(logits, labels) * mask),
        "count": jnp.sum(mask),
    }
    return jax.lax.psum(sums, axes.grad)


# --- the loop ------------------------------------------------------------------------------

INPUT_PIPELINES = ("tfds", "device_resident")


def train_batches(config: ml_collections.ConfigDict, dp: parallel.DataParallel,
                  start_step: int) -> Iterator[Dict[str, jax.Array]]:
    """Device batches from step `start_step` on, laid out for `dp`'s executor.

    "tfds": tf.data on the host, prefetched onto the devices two batches ahead.
    "device_resident": the split lives in accelerator memory (shard_map executor only).
    """
    if config.input_pipeline == "device_resident":
        if dp.executor != "shard_map":
            raise ValueError("input_pipeline='device_resident' needs parallelism='shard_map'")
        from resnet_v2_jax import device_input
        return device_input.create_train_iterator(config, dp.batch_sharding,
                                                  start_step=start_step)
    from resnet_v2_jax import input_pipeline
    host = input_pipeline.create_train_iterator(config, start_step=start_step)
    return input_pipeline.prefetch_to_device(host, dp.put_batch, size=2)


def eval_batches(config: ml_collections.ConfigDict, crop_size: int) -> datasets.EvalBatches:
    """One exact pass over the eval split: host batches with a validity mask."""
    if config.input_pipeline == "device_resident":
        from resnet_v2_jax import device_input
        return device_input.create_eval_iterator(config)
    from resnet_v2_jax import input_pipeline
    return input_pipeline.create_eval_iterator(config, crop_size)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, with one line, on settings that would otherwise fail late or deep."""
    datasets.get(config.dataset)
    if config.input_pipeline not in INPUT_PIPELINES:
        raise ValueError(f"unknown input_pipeline {config.input_pipeline!r}; choose one of "
                         f"{', '.join(INPUT_PIPELINES)}")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[key] < 1:
            raise ValueError(f"{key} must be at least 1, got {config[key]}")
    if not config.eval_crop_sizes:
        raise ValueError("eval_crop_sizes is empty; give at least one crop size")


class _Preemption:
    """SIGTERM (a single host's preemption notice) or JAX's multi-host preemption sync point.

    On several processes JAX's own notifier (installed by jax.distributed) receives SIGTERM and
    the sync point answers the same on every process; a Python handler would replace it.
    """

    def __init__(self, checkpoints: checkpoint.Checkpoints):
        self.checkpoints = checkpoints
        self.sigterm = False
        self.previous = None
        if jax.process_count() == 1:
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.sigterm = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.checkpoints.reached_preemption(step)
        return self.sigterm

    def close(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


class _MetricsWriter:
    """TensorBoard event files (tensorboardX: standard event files without TensorFlow, local or
    gs://), written by process 0 only."""

    def __init__(self, workdir: str):
        self.writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(logdir=str(workdir), flush_secs=30)

    def scalars(self, step: int, values: Dict[str, float]):
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self):
        if self.writer:
            self.writer.flush()
            self.writer.close()


class Evaluator:
    """Top-1/top-5 error over a whole eval split at each crop size (pad and mask)."""

    def __init__(self, config: ml_collections.ConfigDict, dp: parallel.DataParallel):
        self.config, self.dp = config, dp
        self.step = dp.compile(functools.partial(
            eval_step, axes=dp.axes, dataset=config.dataset,
            dtype=jnp.bfloat16 if config.half_precision else jnp.float32), returns_state=False)
        # Built once; every evaluation iterates them afresh (no reloading of the split).
        self.batches = {crop: eval_batches(config, crop) for crop in config.eval_crop_sizes}

    def __call__(self, state: TrainState) -> Dict[str, Dict[str, float]]:
        results = {}
        for crop, batches in self.batches.items():
            totals = None
            for i, batch in enumerate(batches):
                if 0 <= self.config.steps_per_eval <= i:
                    break
                sums = self.step(state, self.dp.put_batch(batch))
                totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            totals = self.dp.to_host(totals)
            count = float(totals["count"])
            results[str(crop)] = {"top1_error": float(totals["top1_wrong"]) / count,
                                  "top5_error": float(totals["top5_wrong"]) / count,
                                  "loss": float(totals["loss"]) / count,
                                  "num_examples": int(count)}
        return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Trains (resuming from `workdir` if it holds a checkpoint), evaluates, returns results.

    Writes into `workdir`: config.json, checkpoints/ (Orbax), TensorBoard event files and
    results.json. Raises ValueError / CheckpointError / NonFiniteLossError with one-line
    messages for bad configs, data or checkpoints.
    """
    t_start = time.time()
    check_config(config)
    workdir = epath.Path(workdir)
    info = datasets.get(config.dataset)
    dp = parallel.DataParallel(config.parallelism, config.bn_group_size)
    per_device = dp.check_batch_size(config.batch_size)
    dp.check_batch_size(config.eval_batch_size, "eval_batch_size")
    steps_per_epoch = max(info.num_train_examples // config.batch_size, 1)
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else int(config.num_epochs * steps_per_epoch))
    if total_steps <= 0:
        raise ValueError("set num_train_steps > 0 or num_epochs > 0")
    logging.info("devices: %s", dp.describe())
    logging.info("batch: %d global, %d per process, %d per device; %d steps (%.1f epochs)",
                 config.batch_size, config.batch_size // jax.process_count(), per_device,
                 total_steps, total_steps / steps_per_epoch)

    model = create_model(config, info.num_classes, dp.axes)
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = create_optimizer(config, schedule)
    rng = jax.random.PRNGKey(config.seed)
    checkpoints = checkpoint.Checkpoints(workdir, model_signature(config, info.num_classes),
                                         config.keep_checkpoints)
    state, start_step = checkpoints.restore_latest(
        abstract_train_state(model, tx, config.image_size, dp.replicated))
    if state is None:
        state = create_train_state(rng, model, tx, config.image_size)
    else:
        logging.info("resuming from step %d", start_step)
    state = dp.put_state(state)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    p_train = dp.compile(functools.partial(
        train_step, axes=dp.axes, dataset=config.dataset, dtype=dtype,
        dropout_key=jax.random.fold_in(rng, 1)), returns_state=True)
    evaluate = Evaluator(config, dp)
    eval_every = config.eval_every_steps or steps_per_epoch
    writer = _MetricsWriter(workdir)
    preemption = _Preemption(checkpoints)
    batches = train_batches(config, dp, start_step)

    pending: List[Dict[str, jax.Array]] = []
    train_metrics: Dict[str, float] = {}
    eval_results: Dict[str, Dict[str, float]] = {}
    t_log, steps_since_log, steps_run = time.time(), 0, 0
    step = start_step

    def diverged(what: str, at_step: int) -> str:
        checkpoints.wait()
        return (f"training diverged at step {at_step}: {what}; the last checkpoint (step "
                f"{checkpoints.latest_step()}) is intact: lower learning_rate or use "
                "warmup='constant'")

    def flush_metrics():
        """Fetches the steps' metrics; stops the run at the first non-finite loss."""
        nonlocal pending
        values = [dp.to_host(m) for m in pending]
        first = step - len(values) + 1
        for i, m in enumerate(values):
            if not np.isfinite(m["loss"]):
                raise NonFiniteLossError(diverged(f"loss is {m['loss']}", first + i))
        pending = []
        return values

    try:
        while step < total_steps:
            state, metrics = p_train(state, next(batches))
            step += 1
            steps_run += 1
            steps_since_log += 1
            pending.append(metrics)
            if steps_run == 1:  # keep compilation out of the throughput and ETA
                jax.block_until_ready(metrics)
                t_log, steps_since_log = time.time(), 0
            preempted = preemption.reached(step)
            if step % config.log_every_steps == 0 or step == total_steps or preempted:
                values = flush_metrics()
                now = time.time()
                train_metrics = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
                lr = float(schedule(step - 1))
                scalars = {"train/loss": train_metrics["loss"],
                           "train/error": train_metrics["error"], "train/learning_rate": lr}
                speed = ""
                if steps_since_log:  # not right after compilation
                    seconds_per_step = (now - t_log) / steps_since_log
                    scalars["train/images_per_second"] = config.batch_size / seconds_per_step
                    speed = (f"  {config.batch_size / seconds_per_step:.0f} img/s  ETA "
                             f"{_hms((total_steps - step) * seconds_per_step)}")
                logging.info("step %d/%d  loss %.4f  error %.2f%%  lr %.4g%s", step, total_steps,
                             train_metrics["loss"], 100 * train_metrics["error"], lr, speed)
                writer.scalars(step, scalars)
                t_log, steps_since_log = time.time(), 0
            if step % eval_every == 0 or step == total_steps:
                flush_metrics()
                eval_results = evaluate(state)
                for crop, r in eval_results.items():
                    logging.info("eval at step %d, crop %s: top-1 error %.2f%%, top-5 error "
                                 "%.2f%% on %d examples", step, crop, 100 * r["top1_error"],
                                 100 * r["top5_error"], r["num_examples"])
                    writer.scalars(step, {f"eval/top1_error_{crop}": r["top1_error"],
                                          f"eval/top5_error_{crop}": r["top5_error"],
                                          f"eval/loss_{crop}": r["loss"]})
                t_log = time.time()  # keep eval time out of the training throughput
            if step % config.checkpoint_every_steps == 0 or step == total_steps or preempted:
                flush_metrics()  # never checkpoint a diverged state
                if not bool(dp.to_host(all_finite(state))):
                    raise NonFiniteLossError(diverged("the state is not finite", step))
                checkpoints.save(step, dp.get_state(state))
            if preempted:
                logging.warning("preempted: checkpoint of step %d written; rerun the same "
                                "command to resume", step)
                break
        if not eval_results and step == total_steps:  # a finished run, rerun: report it again
            eval_results = evaluate(state)
    finally:
        checkpoints.close()
        writer.close()
        preemption.close()

    results = {"step": step, "total_steps": total_steps, "preempted": step < total_steps,
               "train": train_metrics, "eval": eval_results,
               "wall_time_s": round(time.time() - t_start, 1), "steps_this_run": steps_run,
               "devices": dp.describe()}
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    return results


@jax.jit
def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
