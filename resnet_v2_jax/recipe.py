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
from flax import struct
from flax.training import train_state

from resnet_v2_jax import augment, checkpoint, datasets, errors, models, parallel, unit_layout


class TrainState(train_state.TrainState):
    batch_stats: Any


@struct.dataclass
class Runs:
    """The train state: the runs of one config trained together (`config.num_runs`, 1 for one
    run), their train states stacked on a leading run axis, and the step at which each diverged
    (-1 while it trains). A diverged run is frozen: its state no longer changes, the others go
    on; when all have diverged, training stops."""
    state: TrainState
    diverged_at: jax.Array

    def run(self, k: int) -> TrainState:
        """Run k's train state (the run axis taken off)."""
        return jax.tree.map(lambda x: x[k], self.state)


# --- network and optimiser ---------------------------------------------------------------------

def dtypes(config: ml_collections.ConfigDict) -> Tuple[Any, Any]:
    """(compute, parameter) dtypes: bfloat16/float32 with `half_precision`, float64/float64 with
    `float64` (exact equivalence tests), else float32/float32.

    float64 needs 64-bit JAX, which is process-wide: the command line turns it on for such
    configs; a program of your own calls `jax.config.update("jax_enable_x64", True)` first."""
    if config.float64:
        if not jax.config.jax_enable_x64:
            raise errors.SetupError(
                "float64=True needs 64-bit JAX: call jax.config.update("
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
            raise errors.ConfigError(
                f"learning-rate boundaries must be positive and increasing, got "
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
    """A fresh train state, typed as the state its steps and a restore return, so that the
    first step compiles the program every later step and every resumed run uses: the step
    count an int32 (Flax's 0 is weakly typed: a resumed run compiled the step again, missing
    the compilation cache), the BN statistics in the parameters' dtype (Flax makes them
    float32: a float64 run's first step turned them to float64 and compiled again)."""
    @jax.jit
    def init(rng):
        variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3)), train=False)
        batch_stats = jax.tree.map(lambda x: x.astype(model.param_dtype),
                                   variables.get("batch_stats", {}))
        return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                 batch_stats=batch_stats).replace(step=jnp.zeros((), jnp.int32))
    return init(rng)


def runs_initializer(model: models.ResNetV2, tx: optax.GradientTransformation, image_size: int,
                     num_runs: int = 1) -> Callable[[int], Runs]:
    """seed -> `num_runs` fresh train states, run k's network initialised from PRNGKey(seed + k).
    One jitted function: a run's abstract state (`abstract_train_state`) and its initial state
    share one trace of the network's initialisation."""
    states = jax.jit(jax.vmap(lambda rng: create_train_state(rng, model, tx, image_size)))

    def init_runs(seed: int) -> Runs:
        keys = jnp.stack([jax.random.PRNGKey(seed + k) for k in range(num_runs)])
        return Runs(states(keys), jnp.full((num_runs,), -1, jnp.int32))
    return init_runs


def abstract_train_state(init_runs: Callable[[int], Runs],
                         sharding: jax.sharding.Sharding) -> Runs:
    """Shapes, dtypes and `sharding` of the `Runs` state `init_runs` (a `runs_initializer`)
    makes, computing nothing: a restore target."""
    shapes = jax.eval_shape(lambda: init_runs(0))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        shapes)


def in_layout(state: TrainState, scan_units: bool) -> TrainState:
    """`state` with its parameters, BN statistics and the optimiser's parameter-shaped trees
    (momentum) in the scanned (`scan_units`) or unrolled layout of the network's units."""
    convert = unit_layout.unrolled_to_scanned if scan_units else unit_layout.scanned_to_unrolled
    return jax.tree.map(
        lambda x: convert({"tree": x})["tree"] if unit_layout.holds_units(x) else x,
        state, is_leaf=unit_layout.holds_units)


def other_layouts(model: models.ResNetV2, tx: optax.GradientTransformation, image_size: int,
                  sharding: jax.sharding.Sharding,
                  num_runs: int = 1) -> Sequence[checkpoint.Layout]:
    """The states a checkpoint of the same run may hold in another layout, each with its
    conversion into this run's: the network's units in the other layout (scanned or unrolled),
    and the train state of one run without the run axis (checkpoints written before the run
    count was an axis of the state; the meta check admits these for one run only). A
    checkpoint written any of these ways resumes."""
    def as_runs(state: TrainState) -> Runs:
        return Runs(jax.tree.map(lambda x: x[None], state), jnp.full((1,), -1, jnp.int32))

    def converter(scan_units: bool, with_run_axis: bool) -> Callable[[Any], Runs]:
        convert = functools.partial(in_layout, scan_units=model.scan_units)

        @functools.partial(jax.jit, out_shardings=sharding)
        def to_this_layout(saved):
            runs = saved if with_run_axis else as_runs(saved)
            if scan_units != model.scan_units:
                runs = runs.replace(state=jax.vmap(convert)(runs.state))
            return runs

        def restore(saved) -> Runs:
            runs = to_this_layout(saved)
            return runs.replace(state=runs.state.replace(apply_fn=model.apply, tx=tx))
        return restore

    layouts = []  # the other unit layout with the run axis first
    for scan_units in (not model.scan_units, model.scan_units):
        stacked = abstract_train_state(runs_initializer(
            model.clone(scan_units=scan_units), tx, image_size, num_runs), sharding)
        single = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape[1:], x.dtype, sharding=_replicated(sharding)), stacked.state)
        if scan_units != model.scan_units:
            layouts.append(checkpoint.Layout(stacked, converter(scan_units, True)))
        layouts.append(checkpoint.Layout(single, converter(scan_units, False)))
    return layouts


def _replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """`sharding`'s devices holding whole copies (for a state without the run axis)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


def variables_of(state: TrainState) -> Dict[str, Any]:
    """The network's variables {"params", "batch_stats"} held by a train state: of one run
    (`Runs.run(k)`), or of every run stacked on the run axis (`Runs.state`)."""
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


def train_step(state: TrainState, batch: Dict[str, jax.Array], seed_key: jax.Array, *,
               axes: parallel.Axes, normalize: Callable, augment_images: Callable,
               train_bn_statistics: bool = True, augment_key: Optional[jax.Array] = None):
    """One SGD step on one device's share of the batch; gradients averaged over `axes.grad`.

    The uint8 images are augmented here (`augment_images(images, keys)`, see `augment`), each
    example keyed by (seed, step, its index in the global batch), so any device count and any
    resume draw the same (`augment_key` replaces the seed's key there: runs that share their
    batches share their augmentation too); then `normalize` makes the network's input
    (`model_input`). Without `train_bn_statistics` (fine-tuning) BN normalises with its running
    averages and leaves them as they are (the network runs with train=False, so a dropout
    shortcut is off too)."""
    device = parallel.axis_index(axes.grad)
    local = batch["image"].shape[0]
    augment_key = seed_key if augment_key is None else augment_key
    keys = augment.example_keys(jax.random.fold_in(augment_key, AUGMENT_STREAM), state.step,
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
    batch_stats = (parallel.pmean(updates.get("batch_stats", {}), axes.bn_stats)
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


# --- the runs of one program -------------------------------------------------------------------

def runs_layout(layout: str, platform: str, local_runs: int) -> str:
    """The layout in which a device computes its `local_runs` runs: "vmap" (one vectorised
    program, larger kernels: the bet for accelerators, whose small kernels are launch-bound) or
    "unrolled" (one copy of the step per run in the same program). "auto" picks "unrolled" on
    CPUs, where XLA runs vectorised convolutions as slow grouped ones (docs/benchmarks.md),
    "vmap" elsewhere. A device holding one run computes the plain step ("unrolled" over one)."""
    if local_runs == 1:
        return "unrolled"
    if layout != "auto":
        return layout
    return "unrolled" if platform == "cpu" else "vmap"


def over_runs(step: Callable, layout: str, in_axes: Sequence[Optional[int]]) -> Callable:
    """`step` over a leading run axis of the arguments whose `in_axes` entry is 0 (the others
    are shared by every run): vectorised (`jax.vmap`) or unrolled (one call per run, stacked)."""
    if layout == "vmap":
        return jax.vmap(step, in_axes=tuple(in_axes))

    def unrolled(*args):
        count = next(jax.tree.leaves(a)[0].shape[0] for a, axis in zip(args, in_axes)
                     if axis == 0)
        outputs = [step(*[jax.tree.map(lambda x, k=k: x[k], a) if axis == 0 else a
                          for a, axis in zip(args, in_axes)]) for k in range(count)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)
    return unrolled


def _finite_per_run(tree) -> jax.Array:
    """[runs] whether every floating leaf of a run-stacked tree is finite, run by run."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
                              for x in leaves]), axis=0)


def runs_train_step(runs: Runs, batch: Dict[str, jax.Array], seed: jax.Array, *,
                    step: Callable, layout: str, runs_axis: Optional[str], shared_batch: bool,
                    shared_augmentation: bool):
    """The per-device train step of a device's runs: `step` (a `train_step`) for each, run k
    keyed by PRNGKey(seed + k), as the single run of that seed is (with
    `shared_augmentation`, runs that share their batches, every run augments them with the
    seed's key). The seed is an argument, not a constant: every seed runs one program. A run
    whose loss or new state is not finite keeps its state and is marked diverged at this
    step."""
    local = runs.diverged_at.shape[0]
    first = parallel.axis_index(runs_axis) * local
    keys = jax.vmap(lambda k: jax.random.PRNGKey(seed + first + k))(jnp.arange(local))
    augment_key = jax.random.PRNGKey(seed) if shared_augmentation else None
    new, metrics = over_runs(functools.partial(step, augment_key=augment_key), layout,
                             (0, None if shared_batch else 0, 0))(runs.state, batch, keys)
    alive = runs.diverged_at < 0
    finite = jnp.isfinite(metrics["loss"]) & _finite_per_run(new)
    keep = alive & finite
    state = jax.tree.map(
        lambda n, o: jnp.where(keep.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, runs.state)
    diverged_at = jnp.where(alive & ~finite, runs.state.step + 1, runs.diverged_at)
    return Runs(state, diverged_at), metrics


def runs_eval_step(variables: Dict[str, Any], batch: Dict[str, jax.Array], *, step: Callable,
                   layout: str):
    """The per-device eval step of a device's runs, on the batch they share."""
    return over_runs(step, layout, (0, None))(variables, batch)


# --- the one build recipe ----------------------------------------------------------------------

# The train step's seed argument, an int32 scalar (`np.int32(config.seed)`), as an abstract
# value: what compiling without running it (`preflight`) passes.
ABSTRACT_SEED = jax.ShapeDtypeStruct((), jnp.int32)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a config builds before data flows: used by training, eval-only, tests and
    benchmarks alike (`build`). The state is a `Runs` of `num_runs` (1 for one run)."""
    model: models.ResNetV2
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    steps_per_epoch: int
    total_steps: int
    image_size: int
    num_runs: int
    abstract_state: Any               # shapes, dtypes and shardings of the state: a restore target
    train_step: Callable              # (state, batch, seed) -> (state, metrics), all devices
    eval_step: Callable               # (variables, batch) -> summed eval metrics, all devices
    # seed -> a freshly initialised state, run k's network from PRNGKey(seed + k), on the
    # default device (`DataParallel.put_state` it): the `runs_initializer` of abstract_state.
    init_state: Callable[[int], Runs]

    def layouts(self) -> Sequence[checkpoint.Layout]:
        """The state in the network's other unit layout, and its conversion (`other_layouts`):
        what a checkpoint of the same run written either way is restored as."""
        sharding = jax.tree.leaves(self.abstract_state)[0].sharding
        return other_layouts(self.model, self.tx, self.image_size, sharding, self.num_runs)


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
        raise errors.ConfigError("set num_train_steps > 0 or num_epochs > 0")
    model = create_model(config, info.num_classes, dp.axes)
    schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = create_optimizer(config, schedule)
    normalize = functools.partial(model_input, mean=info.mean, std=info.std, dtype=model.dtype,
                                  size=config.input_resize)
    augment_images = augment.for_training(config.augment, config.image_size,
                                          config.color_augment)
    layout = runs_layout(config.runs_layout, dp.devices[0].platform, dp.local_runs)
    one_run_train_step = functools.partial(
        train_step, axes=dp.axes, normalize=normalize, augment_images=augment_images,
        train_bn_statistics=config.train_bn_statistics)

    def per_device_train_step(runs, batch, seed):
        # Runs that share their batches share their augmentation too (the seed's key).
        return runs_train_step(runs, batch, seed, step=one_run_train_step, layout=layout,
                               runs_axis=dp.runs_axis, shared_batch=not dp.batch_per_run,
                               shared_augmentation=config.share_batches)

    def per_device_eval_step(variables, batch):
        return runs_eval_step(variables, batch, layout=layout, step=functools.partial(
            eval_step, model=model, axes=dp.axes, normalize=normalize))

    init_runs = runs_initializer(model, tx, config.image_size, config.num_runs)
    abstract = abstract_train_state(init_runs, dp.state_sharding)
    return Setup(model=model, schedule=schedule, tx=tx, steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps, image_size=config.image_size,
                 num_runs=config.num_runs, abstract_state=abstract,
                 train_step=dp.compile(per_device_train_step, returns_state=True,
                                       batch_spec=dp.train_batch_spec, shared_args=1),
                 eval_step=dp.compile(per_device_eval_step, returns_state=False),
                 init_state=init_runs)


@jax.jit
def all_finite(runs: Runs) -> jax.Array:
    """Whether every leaf of every run that has not diverged is finite (one boolean on the
    device)."""
    return jnp.all(_finite_per_run(runs.state) | (runs.diverged_at >= 0))
