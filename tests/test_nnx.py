"""resnet_v2_jax.nnx: the networks as NNX modules, equal to the linen ones on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from resnet_v2_jax import models
from resnet_v2_jax import nnx as resnet_nnx
from resnet_v2_jax import timm_import
from tests.test_timm_import import _fixture

IMAGES = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (8, 32, 32, 3)), jnp.float32)
LABELS = jnp.arange(8) % 10


def count(tree):
    return sum(np.size(x) for x in jax.tree.leaves(tree))


@nnx.jit
def train_step(model, optimizer, images, labels):
    loss_fn = lambda model: optax.softmax_cross_entropy_with_integer_labels(
        model(images), labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@pytest.mark.parametrize("build, depth, params", [
    (resnet_nnx.cifar_resnet, 164, 1_703_258),
    (resnet_nnx.imagenet_resnet, 200, 64_666_152),
])
def test_parameter_counts_are_the_linen_ones(build, depth, params):
    model = nnx.eval_shape(lambda: build(depth, rngs=nnx.Rngs(0)))
    assert count(nnx.state(model, nnx.Param)) == params


def test_training_step_changes_params_and_batch_statistics():
    model = resnet_nnx.cifar_resnet(8, 10, block="basic", rngs=nnx.Rngs(0))
    _, before = resnet_nnx.to_linen(model)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    losses = [float(train_step(model, optimizer, IMAGES, LABELS)) for _ in range(2)]
    _, after = resnet_nnx.to_linen(model)
    for collection in ("params", "batch_stats"):
        moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                             before[collection], after[collection])
        assert min(jax.tree.leaves(moved)) > 0, collection  # every tensor moved
    assert losses[1] < losses[0]
    # The module graph does not change in a step, so NNX's cached traversal works too.
    cached = nnx.cached_partial(train_step, model, optimizer)
    assert np.isfinite(float(cached(IMAGES, LABELS)))


@pytest.mark.parametrize("train", [False, True])
def test_same_logits_and_statistics_as_linen_on_the_same_weights(train):
    model = resnet_nnx.cifar_resnet(8, 10, block="basic", rngs=nnx.Rngs(0))
    network, variables = resnet_nnx.to_linen(model)
    model.train() if train else model.eval()
    logits = model(IMAGES)
    expected, updates = network.apply(variables, IMAGES, train=train, mutable=["batch_stats"])
    np.testing.assert_array_equal(logits, expected)
    _, now = resnet_nnx.to_linen(model)
    stats = updates["batch_stats"] if train else variables["batch_stats"]
    jax.tree.map(np.testing.assert_array_equal, now["batch_stats"], stats)


def test_timm_weights_load_into_nnx_and_back():
    """Weights of another source (here timm's, via the converter) load into the NNX form
    exactly, and `to_linen` gives them back unchanged."""
    network, variables = timm_import.load(_fixture()["state_dict"])
    model = resnet_nnx.from_linen(network, variables)
    model.eval()
    images = jnp.asarray(np.random.RandomState(1).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    np.testing.assert_array_equal(model(images), network.apply(variables, images, train=False))
    _, back = resnet_nnx.to_linen(model)
    jax.tree.map(np.testing.assert_array_equal, back, variables)


def test_variables_of_another_network_are_refused_in_one_line():
    _, variables = resnet_nnx.to_linen(
        resnet_nnx.cifar_resnet(8, 10, block="basic", rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"^these params do not fit the network: missing "
                       r"\['stage1_unit2/bn1/bias'.*\n?$"):
        resnet_nnx.from_linen(models.cifar_resnet(14, 10, block="basic"), variables)
    with pytest.raises(ValueError, match=r"head/kernel is \(64, 10\), the network has \(64, 100\)"):
        resnet_nnx.from_linen(models.cifar_resnet(8, 100, block="basic"), variables)


def test_nnx_view_sets_the_modes_as_the_flax_docs_do():
    """`nnx.view(model, use_running_average=..., deterministic=...)` (the current NNX idiom)
    gives a model sharing the weights: the evaluation view leaves the BN statistics alone, the
    training view updates them in place, in the shared variables."""
    model = resnet_nnx.cifar_resnet(8, 10, block="basic", rngs=nnx.Rngs(0))
    network, variables = resnet_nnx.to_linen(model)
    evaluation = nnx.view(model, use_running_average=True, deterministic=True)
    np.testing.assert_array_equal(evaluation(IMAGES),
                                  network.apply(variables, IMAGES, train=False))
    jax.tree.map(np.testing.assert_array_equal, resnet_nnx.to_linen(model)[1], variables)
    training = nnx.view(model, use_running_average=False, deterministic=False)
    _, updates = network.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
    training(IMAGES)
    jax.tree.map(np.testing.assert_array_equal, resnet_nnx.to_linen(model)[1]["batch_stats"],
                 updates["batch_stats"])
    info = nnx.view_info(model)       # what Flax reads from set_view's Args
    assert all(f"  {name}: " in info for name in ("use_running_average", "deterministic",
                                                  "intermediates"))
    dropout = resnet_nnx.cifar_resnet(8, 10, block="basic", shortcut="dropout",
                                      rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="the dropout shortcut runs in BN's mode"):
        nnx.view(dropout, use_running_average=True, deterministic=False)(IMAGES)


def test_intermediates_are_sown_as_nnx_intermediates_equal_to_linens():
    model = resnet_nnx.cifar_resnet(8, 10, block="basic", rngs=nnx.Rngs(0))
    network, variables = resnet_nnx.to_linen(model)
    probe = nnx.view(model, use_running_average=True, deterministic=True, intermediates=True)
    probe(IMAGES)
    sown = nnx.pop(probe, nnx.Intermediate)
    _, linen = network.apply(variables, IMAGES, train=False, mutable=["intermediates"])
    assert set(sown) == set(linen["intermediates"]) == {"stem", "stage1", "stage2", "stage3"}
    for name, (value,) in linen["intermediates"].items():
        np.testing.assert_array_equal(sown[name].get_value()[0], value)
    model.eval()
    model(IMAGES)
    assert not nnx.state(model, nnx.Intermediate)  # off unless asked for


def test_a_headless_trunk_takes_a_classifiers_variables_with_drop_head():
    network, variables = resnet_nnx.to_linen(
        resnet_nnx.cifar_resnet(8, 10, block="basic", rngs=nnx.Rngs(0)))
    trunk = models.cifar_resnet(8, None, block="basic")
    with pytest.raises(ValueError, match="pass drop_head=True"):
        resnet_nnx.from_linen(trunk, variables)
    model = resnet_nnx.from_linen(trunk, variables, drop_head=True)
    model.eval()
    np.testing.assert_array_equal(model(IMAGES), trunk.apply(variables, IMAGES, train=False))
    assert models.HEAD not in resnet_nnx.to_linen(model)[1]["params"]
