"""A run built from its config: network, learning-rate schedule, optimiser, train state and the
compiled per-device steps (`build`). Training, eval-only, fine-tuning, analysis and the
benchmarks all build through here; `train` runs what `build` returns.

The recipe is the paper's (docs/paper.md, "Training recipes"): SGD with momentum 0.9
(Nesterov in the released code), weight decay 1e-4 on every parameter, learning rate 0.1 per
128 (CIFAR) or 256 (ImageNet) images, x0.1 steps. The steps are written once, per device (pmap
semantics), and handed to `parallel.DataParallel`, which runs them over every device of every
process.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from resnet_v2_jax import augment, checkpoint, datasets, models, parallel


class TrainState(train_state.TrainState):
    batch_stats: Any


# --- network and optimiser ---------------------------------------------------------------------

def dtypes(config: ml_collections.ConfigDict) -> Tuple[Any, Any]:
    """(compute, parameter) dtypes: bfloat16/float32 with `half_precision`, float64/float64 with
    `float64` (exact equivalence tests), else float32/float32.

    float64 needs 64-bit JAX, which is process-wide: the command line turns it on for such
    configs; a program of your own calls `jax.config.update("jax_enable_x64", True)` first."""
    if config.float64:
        if not jax.config.jax_enable_x64:
            raise ValueError("float64=True needs 64-bit JAX: call jax.config.update("
                             "'jax_enable_x64', True) before building (the command line does)")
        return jnp.float64, jnp.float64
    return (jnp.bfloat16 if config.half_precision else jnp.float32), jnp.float32


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 axes: Optional[parallel.Axes] = None) -> models.ResNetV2:
    """`models.create(**config.model)` with the dtypes the config runs in; BN statistics are
    reduced over `axes.bn` in training."""
    dtype, param_dtype = dtypes(config)
    return models.create(num_classes=num_classes, dtype=dtype, param_dtype=param_dtype,
                         bn_axis_name=axes.bn if axes else None,
                         bn_axis_index_groups=axes.bn_groups if axes else None,
                         **config.model)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
    """The base rate scaled by batch_size / base_batch_size, from optax pieces.

    "steps": x lr_decay_factor at given steps or epochs (the paper: /10 at 32k and 48k
    iterations; the released code at epochs 81 and 122). "cosine": cosine decay to 0.
    Warm-up: "constant" holds warmup_learning_rate for warmup_steps (the appendix: 0.01 for 400
    iterations), "linear" ramps from 0 (large batches). Boundaries are absolute iterations.
    """
    peak = config.learning_rate * config.batch_size / config.base_batch_size
    if config.lr_schedule == "steps":
        boundaries = (list(config.lr_boundaries_steps) if config.lr_boundaries_steps else
                      [round(e * steps_per_epoch) for e in config.lr_boundaries_epochs])
        if any(b <= a for a, b in zip(boundaries, boundaries[1:])) or min(boundaries, default=1) <= 0:
            raise ValueError(f"learning-rate boundaries must be positive and increasing, got "
                             f"{boundaries}")
        main = lambda offset: optax.piecewise_constant_schedule(
            peak, {b - offset: config.lr_decay_factor for b in boundaries})
    else:  # "cosine" (configuration.validate allows no other)
        main = lambda offset: optax.cosine_decay_schedule(peak, max(total_steps - offset, 1))

    warmup = config.warmup_steps
    if config.warmup == "none" or warmup == 0:
        return main(0)
    if config.warmup == "constant":
        first = optax.constant_schedule(config.warmup_learning_rate)
    else:  # "linear"
        first = optax.linear_schedule(0.0, peak, warmup)
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
        lambda params: {name: "train" if name == models.HEAD else "frozen" for name in params})


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


def in_layout(state: TrainState, scan_units: bool) -> TrainState:
    """`state` with its parameters, BN statistics and the optimiser's parameter-shaped trees
    (momentum) in the scanned (`scan_units`) or unrolled layout of the network's units."""
    convert = models.unrolled_to_scanned if scan_units else models.scanned_to_unrolled
    return jax.tree.map(lambda x: convert({"tree": x})["tree"] if models.holds_units(x) else x,
                        state, is_leaf=models.holds_units)


def other_layouts(model: models.ResNetV2, tx: optax.GradientTransformation, image_size: int,
                  sharding: jax.sharding.Sharding) -> Sequence[checkpoint.Layout]:
    """The state of the same run with the network's units in the other layout (scanned or
    unrolled), and its conversion into this one: a checkpoint written either way resumes."""
    other = abstract_train_state(model.clone(scan_units=not model.scan_units), tx, image_size,
                                 sharding)
    to_this_layout = jax.jit(functools.partial(in_layout, scan_units=model.scan_units),
                             out_shardings=sharding)
    return [checkpoint.Layout(
        other, lambda state: to_this_layout(state).replace(apply_fn=model.apply))]


def variables_of(state: TrainState) -> Dict[str, Any]:
    """The network's variables {"params", "batch_stats"} held by a train state."""
    return {"params": state.params, "batch_stats": state.batch_stats}


# --- per-device steps ----------------------------------------------------------------------------

def model_input(images: jax.Array, *, mean, std, dtype, size: int = 0) -> jax.Array:
    """Images on the 0-255 scale -> the network's input: `datasets.normalize`, then, with
    `size`, a bilinear resize to size x size (fine-tuning at a higher resolution than the data's,
    e.g. CIFAR's 32 px to 128 for an ImageNet network)."""
    x = datasets.normalize(images, mean, std, dtype=dtype)
    if size:
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "bilinear")
    return x


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, batch: Dict[str, jax.Array], *, axes: parallel.Axes,
               normalize: Callable, augment_images: Callable, seed_key: jax.Array,
               train_bn_statistics: bool = True):
    """One SGD step on one device's share of the batch; gradients averaged over `axes.grad`.

    The uint8 images are augmented here (`augment_images(images, keys)`, see `augment`), each
    example keyed by (seed, step, its index in the global batch), so any device count and any
    resume draw the same; then `normalize` makes the network's input (`model_input`). Without
    `train_bn_statistics` (fine-tuning) BN normalises with its running averages and leaves them
    as they are (the network runs with train=False, so a dropout shortcut is off too)."""
    device = parallel.axis_index(axes.grad)
    local = batch["image"].shape[0]
    keys = augment.example_keys(jax.random.fold_in(seed_key, AUGMENT_STREAM), state.step,
                                device * local, local)
    images = normalize(augment_images(batch["image"], keys))
    labels = batch["label"]
    rng = jax.random.fold_in(jax.random.fold_in(seed_key, DROPOUT_STREAM), state.step)
    rng = jax.random.fold_in(rng, device)

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


# The seed's streams: the initial weights come from PRNGKey(seed) itself, dropout and
# augmentation from these foldings of it.
DROPOUT_STREAM, AUGMENT_STREAM = 1, 2


def eval_step(variables: Dict[str, Any], batch: Dict[str, jax.Array], *, model: models.ResNetV2,
              axes: parallel.Axes, normalize: Callable):
    """Sums of top-1/top-5 errors, loss and examples over the valid (mask) entries."""
    images = normalize(batch["image"])
    logits = model.apply(variables, images, train=False)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    sums = {
        "top1_wrong": jnp.sum((top5[:, 0] != labels) * mask),
        "top5_wrong": jnp.sum(jnp.all(top5 != labels[:, None], axis=-1) * mask),
        "loss": jnp.sum(cross_entropy(logits, labels) * mask),
        "count": jnp.sum(mask),
    }
    return parallel.psum(sums, axes.grad)


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
    eval_step: Callable               # (variables, batch) -> summed eval metrics, all devices

    def init_state(self, rng: jax.Array) -> TrainState:
        """A freshly initialised state (on the default device; `DataParallel.put_state` it)."""
        return create_train_state(rng, self.model, self.tx, self.image_size)

    def layouts(self) -> Sequence[checkpoint.Layout]:
        """The state in the network's other unit layout, and its conversion (`other_layouts`):
        what a checkpoint of the same run written either way is restored as."""
        sharding = jax.tree.leaves(self.abstract_state)[0].sharding
        return other_layouts(self.model, self.tx, self.image_size, sharding)


def build(config: ml_collections.ConfigDict, dp: parallel.DataParallel,
          num_train_examples: Optional[int] = None) -> Setup:
    """Network -> schedule -> optimiser -> abstract state -> compiled steps, for `dp`.

    `num_train_examples` is what one epoch counts (default: the registry's full split); epoch
    based settings (num_epochs, lr_boundaries_epochs, eval_every_steps=0) follow it. The config
    is expected to have passed `configuration.validate`.
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
    train = dp.compile(functools.partial(
        train_step, axes=dp.axes, normalize=normalize,
        augment_images=augment.for_training(config.augment, config.image_size,
                                            config.color_augment),
        seed_key=jax.random.PRNGKey(config.seed),
        train_bn_statistics=config.train_bn_statistics), returns_state=True)
    evaluate = dp.compile(functools.partial(eval_step, model=model, axes=dp.axes,
                                            normalize=normalize), returns_state=False)
    return Setup(model=model, schedule=schedule, tx=tx, steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps, image_size=config.image_size,
                 abstract_state=abstract_train_state(model, tx, config.image_size, dp.replicated),
                 train_step=train, eval_step=evaluate)


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every leaf of `tree` is finite (one boolean on the device)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
