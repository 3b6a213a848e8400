"""A run built from its config (resnet_v2_jax.recipe): optimiser, schedules, the network the
config names, the per-device steps, and the loop's evaluator over them."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_v2_jax import base_config
from resnet_v2_jax import (checkpoint, errors, inputs, parallel, preflight, recipe, train,
                           weights)


def config_with(depth=164, unit="full_preact", dataset="cifar10", **overrides):
    return base_config.cifar(dataset, depth, unit, **overrides)


def test_paper_cifar_schedule_with_constant_warmup():
    """Appendix: 0.01 for the first 400 iterations, 0.1 until 32k, 0.01 until 48k, then 0.001."""
    config = config_with(lr_boundaries_steps=(32000, 48000), warmup="constant")
    schedule = recipe.learning_rate_schedule(config, 390, 64000)
    for step, lr in [(0, 0.01), (399, 0.01), (400, 0.1), (31999, 0.1), (32000, 0.01),
                     (47999, 0.01), (48000, 0.001), (63999, 0.001)]:
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step


def test_epoch_boundaries_and_batch_scaling():
    config = config_with(batch_size=256, lr_boundaries_epochs=(81, 122))
    schedule = recipe.learning_rate_schedule(config, 195, 195 * 164)
    assert float(schedule(0)) == pytest.approx(0.2)            # 0.1 * 256 / 128
    assert float(schedule(81 * 195 - 1)) == pytest.approx(0.2)
    assert float(schedule(81 * 195)) == pytest.approx(0.02)
    assert float(schedule(122 * 195)) == pytest.approx(0.002)


def test_linear_warmup_then_cosine():
    config = config_with(lr_schedule="cosine", warmup="linear", warmup_steps=100)
    schedule = recipe.learning_rate_schedule(config, 10, 1100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(0.05)
    assert float(schedule(100)) == pytest.approx(0.1)
    assert float(schedule(600)) == pytest.approx(0.05, rel=1e-3)
    assert float(schedule(1100)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("overrides, message", [
    (dict(lr_boundaries_steps=(48000, 32000)), "positive and increasing"),
    (dict(lr_boundaries_epochs=(81, 81)), "positive and increasing"),
])
def test_bad_schedule_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        recipe.learning_rate_schedule(config_with(**overrides), 390, 64000)


def test_sgd_matches_torch_nesterov_with_coupled_weight_decay():
    """Torch optim.sgd: d = g + wd*w; v = mu*v + d; w -= lr * (d + mu*v)."""
    config = config_with(weight_decay=1e-2)
    tx = recipe.create_optimizer(config, optax.constant_schedule(0.1))
    w = {"kernel": jnp.array([1.0, -2.0])}
    opt_state = tx.init(w)
    v, expect = np.zeros(2), np.array([1.0, -2.0])
    for g in ([0.5, 0.25], [-1.0, 2.0], [0.3, 0.3]):
        updates, opt_state = tx.update({"kernel": jnp.array(g)}, opt_state, w)
        w = optax.apply_updates(w, updates)
        d = np.array(g) + 1e-2 * expect
        v = 0.9 * v + d
        expect = expect - 0.1 * (d + 0.9 * v)
        np.testing.assert_allclose(w["kernel"], expect, rtol=1e-6)


@pytest.mark.parametrize("decay_all, bn_scale_changes", [(True, True), (False, False)])
def test_weight_decay_mask(decay_all, bn_scale_changes):
    config = config_with(weight_decay_bn_and_bias=decay_all, weight_decay=0.5, nesterov=False)
    tx = recipe.create_optimizer(config, optax.constant_schedule(1.0))
    params = {"conv1": {"kernel": jnp.ones(3)}, "bn1": {"scale": jnp.ones(3), "bias": jnp.ones(3)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["conv1"]["kernel"]).max()) == pytest.approx(0.5)
    assert (float(jnp.abs(updates["bn1"]["scale"]).max()) > 0) == bn_scale_changes
    assert (float(jnp.abs(updates["bn1"]["bias"]).max()) > 0) == bn_scale_changes


def test_model_options_reach_the_network():
    config = config_with(unit="relu_before_add", shortcut="exclusive_gate", gate_bias_init=-6.0,
                         depth=110, block="basic", half_precision=True, scan_units=True)
    model = recipe.create_model(config, 100)
    assert (model.unit, model.shortcut, model.gate_bias_init) == ("relu_before_add",
                                                                 "exclusive_gate", -6.0)
    assert model.stage_sizes == (18, 18, 18) and not model.bottleneck
    assert model.dtype == jnp.bfloat16 and model.scan_units and model.num_classes == 100


@pytest.mark.parametrize("precision", ["float32", "half_precision", "float64"])
def test_fresh_stepped_and_restored_states_have_one_type(precision):
    """The initial state, the state a step returns and a restore's target (`abstract_state`)
    agree in shape, dtype and weak type: else a resumed run compiles its step again instead of
    finding it in the compilation cache (Flax's weakly typed step count did that), or a second
    step compiles again (float64 runs did, Flax making their BN statistics float32). Traced,
    not compiled."""
    config = config_with(depth=8, block="basic", batch_size=8,
                         **{precision: True} if precision != "float32" else {})
    with jax.enable_x64(precision == "float64"):
        dp = parallel.DataParallel("shard_map", 0, jax.devices()[:1])
        setup = recipe.build(config, dp)
        fresh = jax.eval_shape(setup.init_state, 0)
        stepped, _ = jax.eval_shape(setup.train_step, fresh,
                                    preflight.abstract_batches(config, dp), recipe.ABSTRACT_SEED)
    types = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.weak_type), tree)
    assert types(fresh) == types(stepped) == types(setup.abstract_state)
    stats_dtype = jnp.dtype("float64" if precision == "float64" else "float32")
    assert {x.dtype for x in jax.tree.leaves(fresh.state.batch_stats)} == {stats_dtype}


@pytest.mark.parametrize("share_batches", [False, True])
def test_every_seed_runs_one_program(share_batches):
    """Configs that differ only in their seed lower to the same train step (the seed is its
    argument), so a run of another seed takes it from the compilation cache. Lowered, not
    compiled."""
    def program(seed):
        config = config_with(depth=8, block="basic", batch_size=8, seed=seed, num_runs=2,
                             share_batches=share_batches)
        dp = parallel.DataParallel("shard_map", 0, jax.devices()[:1], num_runs=2,
                                   share_batches=share_batches)
        setup = recipe.build(config, dp)
        return setup.train_step.lower(setup.abstract_state, preflight.abstract_batches(
            config, dp), recipe.ABSTRACT_SEED).as_text()
    assert program(0) == program(3)


def test_eval_step_counts_only_masked_examples():
    """Padded entries (mask False) must not count, whatever their labels."""
    logits = jnp.array([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 1, 0, 0, 0], [5.0, 0, 0, 0, 0, 0]])

    class Network:
        @staticmethod
        def apply(variables, images, train):
            return logits

    batch = {"image": jnp.zeros((3, 2, 2, 3), jnp.uint8), "label": jnp.array([0, 2, 1]),
             "mask": jnp.array([True, True, False])}
    sums = jax.vmap(lambda b: recipe.eval_step({}, b, model=Network, axes=parallel.Axes("d", "d"),
                                               normalize=lambda x: x.astype(jnp.float32)),
                    axis_name="d")(jax.tree.map(lambda x: x[None], batch))
    assert float(sums["count"][0]) == 2
    assert float(sums["top1_wrong"][0]) == 1   # the second example: predicted 1, label 2
    assert float(sums["top5_wrong"][0]) == 0


def test_evaluator_prefetches_onto_the_devices_and_fetches_once(array_dir, monkeypatch):
    """Eval batches reach the devices two ahead of the step, from this thread (no thread of
    ours outlives an evaluation), and the sums stay on the devices until one fetch per crop
    size; the 100 examples are counted exactly (3 batches of 40, the last padded and masked)."""
    config = base_config.cifar("cifar10", 8, input_pipeline="device_resident", array_dir=array_dir,
                           eval_batch_size=40)
    dp = parallel.DataParallel("shard_map", 0)
    setup = recipe.build(config, dp)
    state = dp.put_state(setup.init_state(0))
    events, fetches = [], []
    put_batch, to_host = dp.put_batch, dp.to_host
    monkeypatch.setattr(dp, "put_batch", lambda b: events.append(
        ("put", threading.current_thread().name)) or put_batch(b))
    monkeypatch.setattr(dp, "to_host", lambda tree: fetches.append(tree) or to_host(tree))
    step = lambda *args: events.append(("step", threading.current_thread().name)) or \
        setup.eval_step(*args)
    variables = recipe.variables_of(state.state)
    threads = set(threading.enumerate())
    results = train.Evaluator(config, dp, step)(variables)
    main = threading.main_thread().name
    assert events == [("put", main)] * 3 + [("step", main)] * 3 and len(fetches) == 1
    assert set(threading.enumerate()) == threads
    assert results["32"]["num_examples"] == 100
    config.steps_per_eval = 2
    events.clear()
    assert train.Evaluator(config, dp, step)(variables)["32"]["num_examples"] == 80
    assert [e for e, _ in events].count("put") == 2  # nothing read past the limit


def test_epochs_count_the_split_actually_read(tfds_data_dir):
    """With train_split="train[:90%]" an epoch is 45,000 images, not the registry's 50,000:
    the schedule's epoch boundaries and the run length follow the split that is read."""
    config = config_with(data_dir=tfds_data_dir, train_split="train[:90%]", num_epochs=2.0,
                         eval_batch_size=400)
    dp = parallel.DataParallel("shard_map")
    setup = recipe.build(config, dp, inputs.check_data(config))
    assert setup.steps_per_epoch == 45_000 // 128
    assert setup.total_steps == 2 * (45_000 // 128)
    boundary = 81 * (45_000 // 128)
    assert float(setup.schedule(boundary - 1)) == pytest.approx(0.1)
    assert float(setup.schedule(boundary)) == pytest.approx(0.01)


def test_signature_is_the_network_as_built():
    """What a checkpoint must match is the network as built: options its shortcut ignores and
    runtime options (dtype, scan layout) do not count; every other option does."""
    def signature(**overrides):
        return weights.signature(recipe.create_model(config_with(**overrides), 10))
    assert signature() == signature(shortcut_scale=0.9, gate_bias_init=-3.0,
                                    shortcut_dropout_rate=0.1)  # identity shortcuts ignore them
    assert signature() == signature(scan_units=True, half_precision=True)
    assert signature() != signature(stride_on="3x3")
    scaling = signature(shortcut="scaling")
    assert scaling != signature(shortcut="scaling", shortcut_scale=0.9)
    assert scaling == signature(shortcut="scaling", gate_bias_init=-3.0)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A saved ResNet-20 state and the config that made it."""
    config = config_with(depth=20, block="basic", eval_batch_size=8, batch_size=8)
    dp = parallel.DataParallel("shard_map")
    setup = recipe.build(config, dp)
    workdir = tmp_path_factory.mktemp("checkpoint")
    checkpoints = checkpoint.Checkpoints(workdir, setup.model)
    checkpoints.save(1, dp.put_state(setup.init_state(0)))
    checkpoints.close()
    return workdir, config


def test_checkpoint_check_compares_the_built_network(small_checkpoint):
    workdir, config = small_checkpoint
    dp = parallel.DataParallel("shard_map")

    def restore(**overrides):
        other = config_with(depth=20, block="basic", eval_batch_size=8, batch_size=8,
                            **overrides)
        setup = recipe.build(other, dp)
        checkpoints = checkpoint.Checkpoints(workdir, setup.model, read_only=True)
        try:
            return checkpoints.restore_latest(setup.abstract_state)
        finally:
            checkpoints.close()

    state, step, meta = restore(stride_on="1x1")  # the default, spelled out
    assert step == 1 and meta["structure"] == checkpoint.tree_structure(state)
    with pytest.raises(errors.CheckpointMismatchError,
                       match="another network .stride_on: checkpoint '1x1' vs config '3x3'"):
        restore(stride_on="3x3")
    with pytest.raises(errors.CheckpointMismatchError,
                       match="bn_epsilon: checkpoint 1e-05 vs config 0.001"):
        restore(bn_epsilon=1e-3)
    with pytest.raises(errors.CheckpointMismatchError,
                       match="opt_state only in the checkpoint, e.g. opt_state/0;"):
        restore(weight_decay_bn_and_bias=False)
