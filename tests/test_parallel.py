"""The data-parallel executors against a single device (8 fake CPU devices, see conftest)."""
import chex
import jax
import numpy as np
import pytest

from resnet_v2_jax import base_config
from resnet_v2_jax import parallel, recipe


def tiny_config(**overrides):
    return base_config.cifar("cifar10", 8,  # basic units, one per stage
                         **{"batch_size": 16, "eval_batch_size": 16, **overrides})


def batch(n=16, seed=0):
    rng = np.random.RandomState(seed)
    return {"image": rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8),
            "label": rng.randint(0, 10, (n,)).astype(np.int32)}


def run_steps(config, dp, steps=2):
    """`steps` training steps on fixed batches; returns (host state of the run, per-step
    metrics)."""
    setup = recipe.build(config, dp)
    state = setup.init_state(0)
    step = setup.train_step
    state = dp.put_state(state)
    metrics = []
    for i in range(steps):
        state, m = step(state, dp.put_batch(batch(seed=i)), np.int32(config.seed))
        metrics.append(dp.to_host(m))
    return dp.to_host(state).run(0), metrics


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def single_device_run():
    config = tiny_config()
    return run_steps(config, parallel.DataParallel("shard_map", 0, jax.devices()[:1]))


@pytest.fixture(scope="module")
def eight_device_run():
    return run_steps(tiny_config(), parallel.DataParallel("shard_map", 0))


def test_eight_devices_equal_one_device_with_all_device_bn(single_device_run, eight_device_run):
    assert jax.device_count() == 8
    state, metrics = eight_device_run
    ref_state, ref_metrics = single_device_run
    assert_trees_close(state.params, ref_state.params)
    assert_trees_close(state.batch_stats, ref_state.batch_stats)
    assert_trees_close(metrics, ref_metrics)
    assert int(state.step) == 2


def test_augmentation_on_device_is_the_same_on_eight_devices_as_on_one(eight_device_run):
    """Flips and colour in the train step are keyed by each example's index in the global
    batch, not by device: 8 devices give the single device's result (and differ from no
    augmentation, so the test can fail)."""
    config = tiny_config(augment="scale", color_augment=True)
    state, metrics = run_steps(config, parallel.DataParallel("shard_map", 0))
    ref_state, ref_metrics = run_steps(config, parallel.DataParallel("shard_map", 0,
                                                                     jax.devices()[:1]))
    assert_trees_close(state.params, ref_state.params)
    assert_trees_close(metrics, ref_metrics)
    plain_state, _ = eight_device_run
    diff = jax.tree.map(lambda x, y: np.max(np.abs(x - y)), state.params, plain_state.params)
    assert max(jax.tree.leaves(diff)) > 1e-4


@pytest.mark.parametrize("bn_group_size", [0, 2, 1])
def test_shard_map_and_pmap_agree(bn_group_size):
    config = tiny_config(bn_group_size=bn_group_size)
    a, ma = run_steps(config, parallel.DataParallel("shard_map", bn_group_size))
    b, mb = run_steps(config, parallel.DataParallel("pmap", bn_group_size))
    assert_trees_close(a.params, b.params)
    assert_trees_close(a.batch_stats, b.batch_stats)
    assert_trees_close(ma, mb)


def test_bn_groups_change_the_result(single_device_run):
    """Per-device BN (the authors' multi-GPU setting) normalises over 2 images, not 16."""
    state, _ = run_steps(tiny_config(), parallel.DataParallel("shard_map", 1))
    ref_state, _ = single_device_run
    diff = jax.tree.map(lambda x, y: np.max(np.abs(x - y)), state.params, ref_state.params)
    assert max(jax.tree.leaves(diff)) > 1e-4


def all_reduces(config, dp):
    """The all-reduce ops in the compiled train step's HLO."""
    setup = recipe.build(config, dp)
    state = dp.put_state(setup.init_state(0))
    hlo = setup.train_step.lower(state, dp.put_batch(batch()), np.int32(0)).compile().as_text()
    return hlo.count(" all-reduce(") + hlo.count(" all-reduce-start(")


@pytest.mark.parametrize("executor", parallel.EXECUTORS)
def test_no_collective_that_does_nothing(executor):
    """One device: no all-reduce at all. Per-device BN (the paper's setting): none per BN layer,
    unlike all-device BN, only the few for gradients, running BN averages and metrics (XLA may
    combine those)."""
    one = parallel.DataParallel(executor, 0, jax.devices()[:1])
    assert all_reduces(tiny_config(), one) == 0
    per_device = all_reduces(tiny_config(bn_group_size=1), parallel.DataParallel(executor, 1))
    all_device = all_reduces(tiny_config(), parallel.DataParallel(executor, 0))
    num_bn_layers = 3 * 2 + 1  # ResNet-8: three basic units of two BN layers, and the last BN
    assert 0 < per_device <= 3 < num_bn_layers < all_device


def test_mesh_layout_for_bn_groups():
    dp = parallel.DataParallel("shard_map", 2)
    assert dict(dp.mesh.shape) == {"runs": 1, "data": 4, "bn": 2}
    assert dp.axes.bn == "bn" and dp.axes.grad == ("data", "bn") and dp.axes.bn_stats is not None
    assert parallel.DataParallel("shard_map", 0).axes.bn_stats is None  # one group: identical
    assert parallel.DataParallel("shard_map", 1).axes.bn is None
    pm = parallel.DataParallel("pmap", 2)
    assert pm.axes.bn_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_state_round_trips_between_executors():
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    for executor in parallel.EXECUTORS:
        dp = parallel.DataParallel(executor)
        placed = dp.put_state(state)
        np.testing.assert_array_equal(dp.to_host(placed)["w"], state["w"])
        global_state = dp.get_state(placed)
        assert global_state["w"].sharding.is_fully_replicated
        assert global_state["w"].shape == (2, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(executor="threads"), "unknown parallelism"),
    (dict(bn_group_size=3), "bn_group_size=3 must divide the 8 devices of a run"),
])
def test_bad_parallel_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        parallel.DataParallel(**kwargs)


def test_batch_not_divisible_by_devices():
    with pytest.raises(ValueError, match="multiple of the device count 8"):
        parallel.DataParallel().check_batch_size(100)


def test_the_description_names_the_normalisation_in_use():
    dp = parallel.DataParallel("shard_map", 2)
    assert dp.describe().endswith("BN groups of 2 device(s)")
    assert dp.describe("group").endswith(
        "group norm (per example, no statistics across devices)")
