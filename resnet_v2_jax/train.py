"""Training and evaluation: `train_and_evaluate(config, workdir)` is what the CLI runs.

The steps are written once, per device (pmap semantics), and handed to `parallel.DataParallel`,
which runs them over every device of every process. The recipe is the paper's (docs/paper.md,
"Training recipes"): SGD with momentum 0.9 (Nesterov in the released code), weight decay 1e-4 on
every parameter, learning rate 0.1 per 128 (CIFAR) or 256 (ImageNet) images, x0.1 steps.
"""

import dataclasses
import functools
import itertools
import json
import signal
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax.training import train_state

from resnet_v2_jax import (augment, checkpoint, datasets, input_common, models, parallel,
                           pretrained, rundir)


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


def dtypes(config: ml_collections.ConfigDict) -> Tuple[Any, Any]:
    """(compute, parameter) dtypes: bfloat16/float32 with `half_precision`, float64/float64 with
    `float64` (exact equivalence tests; enables jax_enable_x64), else float32/float32."""
    if config.float64:  # (older runs' config.json: rundir.KEYS_ADDED_LATER fills it in)
        jax.config.update("jax_enable_x64", True)
        return jnp.float64, jnp.float64
    return (jnp.bfloat16 if config.half_precision else jnp.float32), jnp.float32


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 axes: Optional[parallel.Axes] = None) -> models.ResNetV2:
    """Builds the config's network; BN statistics are reduced over `axes.bn` in training."""
    factory = models.cifar_resnet if config.arch == "cifar" else models.imagenet_resnet
    options = model_options(config)
    dtype, param_dtype = dtypes(config)
    return factory(config.depth, num_classes, dtype=dtype, param_dtype=param_dtype,
                   bn_axis_name=axes.bn if axes else None,
                   bn_axis_index_groups=axes.bn_groups if axes else None, **options)


def model_signature(config: ml_collections.ConfigDict, num_classes: int) -> Dict[str, Any]:
    """What a checkpoint's parameters mean beyond their shapes, which `checkpoint` compares
    separately: the network as built (settings the network ignores, such as `block` on
    ImageNet, or `stride_on` left at its default, do not count)."""
    model = create_model(config, num_classes)
    signature = {"num_classes": num_classes, "arch": config.arch, "depth": config.depth,
                 "bottleneck": model.bottleneck, "unit": model.unit, "shortcut": model.shortcut,
                 "stride_on": model.stride_on}
    if model.stem == "imagenet":
        signature["stem_norm"] = model.stem_norm
    return signature


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
    BN scales/offsets and biases out (only conv and dense kernels decay). With
    `train_backbone=False` (fine-tuning) only the classifier head is updated.
    """
    mask = None if config.weight_decay_bn_and_bias else functools.partial(
        jax.tree_util.tree_map_with_path, lambda path, _: path[-1].key == "kernel")
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask),
        optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
    if config.train_backbone:
        return tx
    return optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda params: {name: "train" if name == pretrained.HEAD else "frozen" for name in params})


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

def model_input(images: jax.Array, *, mean, std, dtype, size: int = 0) -> jax.Array:
    """uint8 images -> the network's input: `datasets.normalize`, then, with `size`, a bilinear
    resize to size x size (fine-tuning at a higher resolution than the data's, e.g. CIFAR's
    32 px to 128 for an ImageNet network)."""
    x = datasets.normalize(images, mean, std, dtype=dtype)
    if size:
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")
    return x


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, batch: Dict[str, jax.Array], *, axes: parallel.Axes,
               normalize: Callable, dropout_key: jax.Array, augment_key: Optional[jax.Array] = None,
               color_augment: bool = False, train_bn_statistics: bool = True):
    """One SGD step on one device's share of the batch; gradients averaged over `axes.grad`.
    `normalize` turns the uint8 images into the model's input (`model_input`). With
    `augment_key` the images are first flipped and (`color_augment`) colour-augmented here
    (`augment.augment_batch`), each example keyed by its index in the global batch. Without
    `train_bn_statistics` (fine-tuning) BN normalises with its running averages and leaves them
    as they are (the network runs with train=False, so a dropout shortcut is off too)."""
    images = batch["image"]
    device = parallel.axis_index(axes.grad)
    if augment_key is not None:
        local = images.shape[0]
        keys = augment.example_keys(augment_key, state.step, device * local, local)
        images = augment.augment_batch(images, keys, color_augment)
    images = normalize(images)
    labels = batch["label"]
    rng = jax.random.fold_in(jax.random.fold_in(dropout_key, state.step), device)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images,
            train=train_bn_statistics, mutable=["batch_stats"], rngs={"dropout": rng})
        return cross_entropy(logits, labels).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = parallel.pmean(grads, axes.grad)
    # BN statistics are normalised within a group; with several groups the running averages
    # are kept identical on every device by averaging them over all devices.
    batch_stats = (parallel.pmean(updates["batch_stats"], axes.bn_stats)
                   if train_bn_statistics else state.batch_stats)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {"loss": loss, "error": jnp.mean(jnp.argmax(logits, -1) != labels)}
    return state, parallel.pmean(metrics, axes.grad)


def eval_step(state: TrainState, batch: Dict[str, jax.Array], *, axes: parallel.Axes,
              normalize: Callable):
    """Sums of top-1/top-5 errors, loss and examples over the valid (mask) entries."""
    images = normalize(batch["image"])
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
    return parallel.psum(sums, axes.grad)


# --- data ------------------------------------------------------------------------------------

INPUT_PIPELINES = ("tfds", "device_resident")


def check_data(config: ml_collections.ConfigDict) -> int:
    """Checks the training and eval splits cheaply (dtype, shape, labels; nothing decoded) before
    anything is compiled or written; returns the number of training examples actually read
    (`config.train_split`, e.g. "train[:90%]"), which is what an epoch counts."""
    if config.input_pipeline == "device_resident":
        from resnet_v2_jax import device_input
        return device_input.check_data(config)
    try:
        from resnet_v2_jax import input_pipeline
    except ImportError as e:
        raise ValueError(
            f"input_pipeline='tfds' needs TensorFlow and tensorflow-datasets ({e}): pip install "
            "'.[offline]' tensorflow-cpu tensorflow-datasets, or train CIFAR from .npz arrays "
            "with --config.input_pipeline=device_resident --config.array_dir=DIR") from e
    return input_pipeline.check_data(config)


def train_batches(config: ml_collections.ConfigDict, dp: parallel.DataParallel,
                  start_step: int) -> Iterator[Dict[str, jax.Array]]:
    """Device batches from step `start_step` on, laid out for `dp`'s executor.

    "tfds": tf.data on the host, prefetched onto the devices two batches ahead.
    "device_resident": the split lives in accelerator memory (shard_map executor only).
    """
    if config.input_pipeline == "device_resident":
        from resnet_v2_jax import device_input
        return device_input.create_train_iterator(config, dp.batch_sharding,
                                                  start_step=start_step)
    from resnet_v2_jax import input_pipeline
    host = input_pipeline.create_train_iterator(config, start_step=start_step)
    return input_common.prefetch_to_device(host, dp.put_batch, size=2)


def eval_batches(config: ml_collections.ConfigDict, crop_size: int) -> input_common.EvalBatches:
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
    if config.input_pipeline == "device_resident" and config.parallelism == "pmap":
        raise ValueError("input_pipeline='device_resident' needs parallelism='shard_map'")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[key] < 1:
            raise ValueError(f"{key} must be at least 1, got {config[key]}")
    if config.eval_every_steps < 0:
        raise ValueError(f"eval_every_steps must be 0 (once per epoch) or positive, got "
                         f"{config.eval_every_steps}")
    if config.steps_per_eval == 0 or config.steps_per_eval < -1:
        raise ValueError(f"steps_per_eval must be -1 (the whole eval split) or positive, got "
                         f"{config.steps_per_eval}")
    if not config.eval_crop_sizes:
        raise ValueError("eval_crop_sizes is empty; give at least one crop size")
    if config.float64 and config.half_precision:
        raise ValueError("float64 and half_precision exclude each other; set one of them")
    if config.input_resize < 0:
        raise ValueError(f"input_resize must be 0 (none) or a size in pixels, got "
                         f"{config.input_resize}")
    if config.init_from is None:
        raise ValueError("this config fine-tunes: set --config.init_from= to a run's workdir, a "
                         "checkpoint step folder or a weights file (.safetensors, .npz, .pth)")
    if not (config.train_backbone or config.init_from):
        raise ValueError("train_backbone=False trains only the classifier head: set "
                         "--config.init_from= to the weights of the backbone")


# --- the one build recipe ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a config builds before data flows: used by training, eval-only, tests and
    benchmarks alike (`build`)."""
    model: models.ResNetV2
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    steps_per_epoch: int
    total_steps: int
    image_size: int
    abstract_state: TrainState        # shapes, dtypes, replicated sharding: a restore target
    train_step: Callable              # (state, batch) -> (state, metrics), over all devices
    eval_step: Callable               # (state, batch) -> summed eval metrics, over all devices

    def init_state(self, rng: jax.Array) -> TrainState:
        """A freshly initialised state (on the default device; `DataParallel.put_state` it)."""
        return create_train_state(rng, self.model, self.tx, self.image_size)


def build(config: ml_collections.ConfigDict, dp: parallel.DataParallel,
          num_train_examples: Optional[int] = None) -> Setup:
    """Model -> schedule -> optimiser -> abstract state -> compiled steps, for `dp`.

    `num_train_examples` is what one epoch counts (default: the registry's full split); epoch
    based settings (num_epochs, lr_boundaries_epochs, eval_every_steps=0) follow it.
    """
    info = datasets.get(config.dataset)
    dp.check_batch_size(config.batch_size)
    dp.check_batch_size(config.eval_batch_size, "eval_batch_size")
    examples = num_train_examples or info.num_train_examples
    steps_per_epoch = max(examples // config.batch_size, 1)
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else int(config.num_epochs * steps_per_epoch))
    if total_steps <= 0:
        raise ValueError("set num_train_steps > 0 or num_epochs > 0")
    model = create_model(config, info.num_classes, dp.axes)
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = create_optimizer(config, schedule)
    normalize = functools.partial(model_input, mean=info.mean, std=info.std, dtype=model.dtype,
                                  size=config.input_resize)
    seed = jax.random.PRNGKey(config.seed)
    on_device = config.augment != "pad_crop_flip" and config.augment_on_device
    train = dp.compile(functools.partial(
        train_step, axes=dp.axes, normalize=normalize, dropout_key=jax.random.fold_in(seed, 1),
        augment_key=jax.random.fold_in(seed, 2) if on_device else None,
        color_augment=config.color_augment, train_bn_statistics=config.train_bn_statistics),
        returns_state=True)
    evaluate = dp.compile(functools.partial(eval_step, axes=dp.axes, normalize=normalize),
                          returns_state=False)
    return Setup(model=model, schedule=schedule, tx=tx, steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps, image_size=config.image_size,
                 abstract_state=abstract_train_state(model, tx, config.image_size, dp.replicated),
                 train_step=train, eval_step=evaluate)


# --- the loop's parts ----------------------------------------------------------------------------

def is_time(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (log, eval, checkpoint) runs after `step`: every `every`
    steps and after the last one."""
    return step == last or (every > 0 and step % every == 0)


class _StopSignals:
    """SIGTERM (a preemption notice) and SIGINT (Ctrl-C): finish the step, save, stop.

    A second Ctrl-C stops at once (KeyboardInterrupt). On several processes JAX's own notifier
    (installed by jax.distributed) receives SIGTERM and the sync point answers the same on every
    process; a Python handler would replace it. Ctrl-C reaches one process only, which cannot
    stop alone without leaving the others waiting in a collective, so it keeps its default
    there (use SIGTERM, e.g. `launch/tpu_vm.sh stop`, to stop a multi-host run cleanly).
    """

    def __init__(self, checkpoints: checkpoint.Checkpoints):
        self.checkpoints = checkpoints
        self.received: Optional[str] = None
        signals = [signal.SIGINT, signal.SIGTERM] if jax.process_count() == 1 else []
        self.previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        logging.warning("%s received: finishing the step, saving a checkpoint and stopping%s",
                        name, " (Ctrl-C again stops at once)" if signum == signal.SIGINT else "")
        self.received = name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def reached(self, step: int) -> Optional[str]:
        """The signal to stop for after `step`, or None."""
        if self.received is None and jax.process_count() > 1 and \
                self.checkpoints.reached_preemption(step):
            self.received = "preemption"
        return self.received

    def close(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class _MetricsWriter:
    """TensorBoard event files (tensorboardX: standard event files without TensorFlow, local or
    gs://), written by process 0 only."""

    def __init__(self, workdir: epath.Path):
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


class _StepMetrics:
    """Per-step training metrics kept on the devices until fetched (no host sync per step)."""

    def __init__(self, dp: parallel.DataParallel):
        self.dp = dp
        self.pending: List[Tuple[int, Dict[str, jax.Array]]] = []

    def add(self, step: int, metrics: Dict[str, jax.Array]) -> None:
        self.pending.append((step, metrics))

    def fetch(self) -> Tuple[Dict[str, float], Optional[Tuple[int, float]]]:
        """(means of the pending steps' metrics, (step, loss) of the first non-finite loss)."""
        values = [(step, self.dp.to_host(m)) for step, m in self.pending]
        self.pending = []
        bad = next(((step, float(m["loss"])) for step, m in values
                    if not np.isfinite(m["loss"])), None)
        means = {k: float(np.mean([m[k] for _, m in values])) for k in values[0][1]} \
            if values else {}
        return means, bad


class Evaluator:
    """Top-1/top-5 error over a whole eval split at each crop size (pad and mask)."""

    def __init__(self, config: ml_collections.ConfigDict, dp: parallel.DataParallel,
                 eval_step: Callable):
        self.config, self.dp, self.step = config, dp, eval_step
        # Built once; every evaluation iterates them afresh (no reloading of the split).
        self.batches = {crop: eval_batches(config, crop) for crop in config.eval_crop_sizes}

    def __call__(self, state: TrainState) -> Dict[str, Dict[str, float]]:
        """Batches are put onto the devices two ahead of the step (as in training) and the sums
        stay on the devices until the pass is over: one fetch per crop size."""
        results = {}
        limit = None if self.config.steps_per_eval < 0 else self.config.steps_per_eval
        for crop, batches in self.batches.items():
            totals = None
            device_batches = input_common.prefetch_to_device(
                itertools.islice(batches, limit), self.dp.put_batch, size=2)
            for batch in device_batches:
                sums = self.step(state, batch)
                totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            totals = self.dp.to_host(totals)
            count = float(totals["count"])
            results[str(crop)] = {"top1_error": float(totals["top1_wrong"]) / count,
                                  "top5_error": float(totals["top5_wrong"]) / count,
                                  "loss": float(totals["loss"]) / count,
                                  "num_examples": int(count)}
        return results


def _log_eval(writer: _MetricsWriter, step: int, results: Dict[str, Dict[str, float]]) -> None:
    for crop, r in results.items():
        logging.info("eval at step %d, crop %s: top-1 error %.2f%%, top-5 error %.2f%% on %d "
                     "examples", step, crop, 100 * r["top1_error"], 100 * r["top5_error"],
                     r["num_examples"])
        writer.scalars(step, {f"eval/top1_error_{crop}": r["top1_error"],
                              f"eval/top5_error_{crop}": r["top5_error"],
                              f"eval/loss_{crop}": r["loss"]})


def _diverged(checkpoints: checkpoint.Checkpoints, what: str, step: int) -> NonFiniteLossError:
    checkpoints.wait()
    return NonFiniteLossError(
        f"training diverged at step {step}: {what}; the last checkpoint (step "
        f"{checkpoints.latest_step()}) is intact: lower learning_rate or use warmup='constant'")


def _config_changes(workdir: epath.Path, config: ml_collections.ConfigDict, limit: int = 4) -> str:
    """The settings in which `config` differs from the run's saved config.json, as a clause."""
    path = workdir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    current = json.loads(config.to_json_best_effort())
    keys = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if not keys:
        return ""
    shown = ", ".join(f"{k}={saved.get(k)!r} there vs {current.get(k)!r} now" for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"; the run's config.json differs in {shown}{more}"


def _restore(checkpoints: checkpoint.Checkpoints, setup: Setup, workdir: epath.Path,
             config: ml_collections.ConfigDict):
    try:
        return checkpoints.restore_latest(setup.abstract_state)
    except checkpoint.CheckpointMismatchError as e:
        raise checkpoint.CheckpointMismatchError(f"{e}{_config_changes(workdir, config)}") from e


def restore_variables(path: str) -> Tuple[models.ResNetV2, Dict[str, Any], str]:
    """(network, variables {"params", "batch_stats"}, which checkpoint) of another run: `path` is
    its workdir (the latest readable checkpoint) or a step folder <workdir>/checkpoints/<step>.
    The run's own config.json says what it trained; nothing of it is changed."""
    workdir, step = rundir.split_run_path(path)
    config = rundir.read_config(str(workdir))
    num_classes = datasets.get(config.dataset).num_classes
    model = create_model(config, num_classes)
    tx = create_optimizer(config, optax.constant_schedule(0.0))  # only the state's structure
    abstract = abstract_train_state(model, tx, config.image_size,
                                    jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    checkpoints = checkpoint.Checkpoints(workdir, model_signature(config, num_classes),
                                         read_only=True)
    try:
        state, step = checkpoints.read(abstract, step)
    finally:
        checkpoints.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return model, variables, str(workdir / "checkpoints" / str(step))


def initialize_from(source: str, state: TrainState, model: models.ResNetV2) -> TrainState:
    """`state` (freshly initialised) with the backbone of `source`: a run's workdir or step
    folder, or a weights file (`pretrained.load_file`). See `pretrained.transfer`."""
    path = rundir.resolve(source)
    if not path.exists():
        raise FileNotFoundError(f"init_from {path} does not exist: give a run's workdir, a step "
                                "folder <workdir>/checkpoints/<step> or a weights file")
    if path.is_dir():
        source_model, variables, where = restore_variables(source)
    else:
        (source_model, variables), where = pretrained.load_file(str(path)), str(path)
    variables, summary = pretrained.transfer(
        source_model, variables, model,
        {"params": state.params, "batch_stats": state.batch_stats}, where)
    logging.info("%s", summary)
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


def _finished_run(workdir: epath.Path, step: int, total_steps: int, meta: dict, state,
                  evaluator: Evaluator, dp: parallel.DataParallel) -> Dict[str, Any]:
    """A rerun of a run that has nothing left to train: keeps its results.json."""
    found = (f"{workdir} already holds the final checkpoint (step {step} of {total_steps})"
             if step == total_steps else
             f"the run in {workdir} is at step {step}, past this config's {total_steps} steps "
             "(use a new --workdir for a shorter run)")
    path = workdir / "results.json"
    try:
        results = json.loads(path.read_text())
        if results.get("step") == step:
            logging.warning("nothing to train: %s; its results.json is kept as it is", found)
            return results
    except (OSError, ValueError):
        pass
    logging.warning("nothing to train: %s; results.json is missing or stale, so the checkpoint "
                    "is evaluated and results.json written", found)
    results = {"step": step, "total_steps": total_steps, "preempted": False,
               "train": meta.get("train", {}), "eval": evaluator(dp.put_state(state)),
               "wall_time_s": None, "steps_this_run": 0, "devices": dp.describe()}
    if jax.process_index() == 0:
        rundir.write_json(path, results)
    return results


# --- training ------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Trains (resuming from `workdir` if it holds a checkpoint), evaluates, returns results.

    Writes into `workdir`: config.json, run.lock (while running), checkpoints/ (Orbax),
    TensorBoard event files and results.json. Raises ValueError (DataError, WorkdirError,
    CheckpointError) or NonFiniteLossError with one-line messages for bad configs, data,
    workdirs or checkpoints; before anything is written when it can be known at start.
    """
    t_start = time.time()
    workdir = rundir.resolve(workdir)
    check_config(config)
    dp = parallel.DataParallel(config.parallelism, config.bn_group_size)
    num_train_examples = check_data(config)
    setup = build(config, dp, num_train_examples)
    evaluator = Evaluator(config, dp, setup.eval_step)
    total_steps, steps_per_epoch = setup.total_steps, setup.steps_per_epoch
    logging.info("devices: %s", dp.describe())
    logging.info("batch: %d global, %d per process, %d per device; %d steps (%.1f epochs of %d "
                 "examples)", config.batch_size, config.batch_size // jax.process_count(),
                 dp.check_batch_size(config.batch_size), total_steps,
                 total_steps / steps_per_epoch, num_train_examples)

    rundir.make(workdir)
    with rundir.RunLock(workdir):
        checkpoints = checkpoint.Checkpoints(
            workdir, model_signature(config, setup.model.num_classes), config.keep_checkpoints)
        try:
            state, start_step, meta = _restore(checkpoints, setup, workdir, config)
            if start_step >= total_steps:
                return _finished_run(workdir, start_step, total_steps, meta, state, evaluator, dp)
            if state is None:
                state = setup.init_state(jax.random.PRNGKey(config.seed))
                if config.init_from:  # a resumed run continues from its own checkpoint
                    state = initialize_from(config.init_from, state, setup.model)
            else:
                logging.info("resuming from step %d", start_step)
            if jax.process_index() == 0:
                (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
            results = _train(config, setup, dp, dp.put_state(state), start_step, workdir,
                             checkpoints, evaluator, meta.get("train", {}))
        finally:
            checkpoints.close()
        results.update(wall_time_s=round(time.time() - t_start, 1), devices=dp.describe())
        if jax.process_index() == 0:
            rundir.write_json(workdir / "results.json", results)
    return results


def _train(config: ml_collections.ConfigDict, setup: Setup, dp: parallel.DataParallel,
           state: TrainState, start_step: int, workdir: epath.Path,
           checkpoints: checkpoint.Checkpoints, evaluator: Evaluator,
           train_metrics: Dict[str, float]) -> Dict[str, Any]:
    """The loop from `start_step`: step, then log, checkpoint and evaluate when it is time.
    At the last step the checkpoint is written before evaluation, so nothing that can fail
    afterwards costs the trained state."""
    total_steps = setup.total_steps
    eval_every = config.eval_every_steps or setup.steps_per_epoch
    batches = train_batches(config, dp, start_step)
    writer = _MetricsWriter(workdir)
    stop_signals = _StopSignals(checkpoints)
    metrics = _StepMetrics(dp)
    eval_results: Dict[str, Dict[str, float]] = {}
    t_log, steps_since_log, step, stopped = time.time(), 0, start_step, None
    try:
        while step < total_steps and stopped is None:
            state, step_metrics = setup.train_step(state, next(batches))
            step += 1
            steps_since_log += 1
            metrics.add(step, step_metrics)
            if step == start_step + 1:  # keep compilation out of the throughput and ETA
                jax.block_until_ready(step_metrics)
                t_log, steps_since_log = time.time(), 0
            stopped = stop_signals.reached(step)
            saving = stopped is not None or is_time(step, config.checkpoint_every_steps,
                                                    total_steps)
            if saving or is_time(step, config.log_every_steps, total_steps) or \
                    is_time(step, eval_every, total_steps):
                means, bad = metrics.fetch()
                if bad:
                    raise _diverged(checkpoints, f"loss is {bad[1]}", bad[0])
                if means:
                    train_metrics = means
            if stopped is not None or is_time(step, config.log_every_steps, total_steps):
                now = time.time()
                _log_train(writer, step, total_steps, train_metrics,
                           float(setup.schedule(step - 1)), config.batch_size,
                           (now - t_log) / steps_since_log if steps_since_log else None)
                t_log, steps_since_log = now, 0
            if saving:  # never checkpoint a diverged state
                if not bool(dp.to_host(all_finite(state))):
                    raise _diverged(checkpoints, "the state is not finite", step)
                checkpoints.save(step, dp.get_state(state), {"train": train_metrics})
            if is_time(step, eval_every, total_steps):
                eval_results = evaluator(state)
                _log_eval(writer, step, eval_results)
                t_log = time.time()  # keep eval time out of the training throughput
    finally:
        writer.close()
        stop_signals.close()
    if stopped is not None and step < total_steps:
        logging.warning("%s (%s): checkpoint of step %d written; rerun the same command to "
                        "resume", "interrupted" if stopped == "SIGINT" else "preempted", stopped,
                        step)
    return {"step": step, "total_steps": total_steps, "preempted": step < total_steps,
            "stop_signal": stopped if step < total_steps else None,
            "train": train_metrics, "eval": eval_results,
            "steps_this_run": step - start_step}


def _log_train(writer: _MetricsWriter, step: int, total_steps: int, metrics: Dict[str, float],
               lr: float, batch_size: int, seconds_per_step: Optional[float]) -> None:
    scalars = {"train/loss": metrics["loss"], "train/error": metrics["error"],
               "train/learning_rate": lr}
    speed = ""
    if seconds_per_step:  # not right after compilation
        scalars["train/images_per_second"] = batch_size / seconds_per_step
        speed = (f"  {batch_size / seconds_per_step:.0f} img/s  ETA "
                 f"{_hms((total_steps - step) * seconds_per_step)}")
    logging.info("step %d/%d  loss %.4f  error %.2f%%  lr %.4g%s", step, total_steps,
                 metrics["loss"], 100 * metrics["error"], lr, speed)
    writer.scalars(step, scalars)


@jax.jit
def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
