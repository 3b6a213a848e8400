"""One declaration of a network's options (`models.OPTIONS`, `models.option`): every option that
changes what the network computes is refused, by name, when a checkpoint (resume) or a source
(`init_from`) differs in it; the runtime ones (role "runtime") are accepted or converted.
The walk covers every option, so a new one cannot be forgotten."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_runs import N, assert_one_error_line, run, saved_state, snapshot, stopped_at
from resnet_v2_jax import checkpoint, errors, models, pretrained, recipe, weights

TINY = dict(stage_sizes=(1, 2), widths=(8, 16), stem="cifar", stem_width=8, num_classes=5,
            stride_on="1x1")
# attribute -> (the base network's other options, another value of the attribute). Shortcut
# options count only for the shortcut that uses them, hence their bases.
CHANGES = {
    "stage_sizes": ({}, (2, 2)),
    "widths": ({}, (8, 32)),
    "num_classes": ({}, 7),
    "stem": ({}, "imagenet"),
    "stem_norm": ({"stem": "imagenet"}, "after_pool"),
    "stem_width": ({}, 16),
    "bottleneck": ({}, False),
    "stride_on": ({}, "3x3"),
    "unit": ({}, "original"),
    "shortcut": ({}, "conv"),
    "shortcut_scale": ({"shortcut": "scaling"}, 0.9),
    "residual_scale": ({"shortcut": "scaling"}, 0.5),
    "gate_bias_init": ({"shortcut": "exclusive_gate"}, -6.0),
    "shortcut_dropout_rate": ({"shortcut": "dropout"}, 0.2),
    "stem_pool_pad": ({"stem": "imagenet"}, "zero"),
    "norm": ({}, "layer"),
    "norm_groups": ({"norm": "group", "norm_groups": 2}, 1),
    "conv": ({}, "weight_standardized"),
    "conv_epsilon": ({"conv": "weight_standardized"}, 1e-10),
    "bn_momentum": ({}, 0.99),
    "bn_epsilon": ({}, 0.1),
}
RUNTIME = {"dtype": jnp.bfloat16, "scan_units": True, "remat_units": True}


def network(**options):
    return models.ResNetV2(**{**TINY, **options})


def init(model):
    return jax.jit(lambda rng: model.init(rng, jnp.zeros((1, 32, 32, 3)), train=False))(
        jax.random.PRNGKey(0))


def test_the_walk_covers_every_attribute():
    declared = {f.name for f in dataclasses.fields(models.ResNetV2)} - {"parent", "name"}
    assert set(models.OPTIONS) == declared  # every attribute is a declared option
    roles = {role: {n for n, o in models.OPTIONS.items() if o.role == role}
             for role in ("network", "runtime", "caller")}
    assert set().union(*roles.values()) == declared
    assert set(CHANGES) == roles["network"]
    assert set(RUNTIME) | {"param_dtype"} == roles["runtime"]
    assert roles["caller"] == {"bn_axis_name", "bn_axis_index_groups"}


@pytest.mark.parametrize("name", CHANGES)
def test_a_changed_attribute_is_refused_on_resume_and_init_from_by_name(name, tmp_path):
    base, value = CHANGES[name]
    saved, changed = network(**base), network(**{**base, name: value})
    assert [d[0] for d in weights.signature_differences(
        weights.signature(saved), weights.signature(changed))] == [name]
    # Resume: the checkpoint's meta against the network the config builds.
    abstract = jax.eval_shape(lambda: init(changed))
    checkpoints = checkpoint.Checkpoints(tmp_path, changed, read_only=True)
    meta = {"network": weights.signature(saved)}
    with pytest.raises(errors.CheckpointMismatchError,
                       match=rf"another network \({name}: checkpoint "):
        checkpoints.check_fits(1, meta, abstract)
    checkpoints.close()
    # init_from: the source's network against the new run's (a new head is what fine-tuning
    # replaces: only the number of classes may differ).
    if name == "num_classes":
        _, summary = pretrained.transfer(saved, init(saved), changed, init(changed), "src")
        assert summary.endswith("classifier head re-initialised (5 classes there, 7 here)")
    else:  # refused before any weight is read: shapes are enough
        with pytest.raises(ValueError, match=rf"^init_from src is another network \({name} "):
            pretrained.transfer(saved, jax.eval_shape(lambda: init(saved)), changed, abstract,
                                "src")


@pytest.mark.parametrize("name", RUNTIME)
def test_runtime_attributes_are_accepted_and_converted(name):
    saved = network()
    other = network(**{name: RUNTIME[name]})
    assert weights.signature(saved) == weights.signature(other)
    variables, summary = pretrained.transfer(saved, init(saved), other, init(other), "src")
    assert "classifier head kept" in summary
    images = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    np.testing.assert_allclose(other.apply(variables, images, train=False),
                               saved.apply(init(saved), images, train=False),
                               atol=0.05 if name == "dtype" else 1e-5)


def test_the_unit_layout_converts_on_restore_momentum_included(tmp_path):
    """A checkpoint of the unrolled network restores into the scanned one (and back), the
    optimiser's momentum converted with the parameters; written as a bare train state (as
    before the run count was an axis of the state), it restores as the one run."""
    from resnet_v2_jax import base_config
    from resnet_v2_jax import parallel
    config = base_config.cifar("cifar10", 20, batch_size=8, eval_batch_size=8)
    dp = parallel.DataParallel("shard_map", 0, jax.devices()[:1])
    unrolled = recipe.build(config, dp)
    state = unrolled.init_state(0).run(0)
    state = state.replace(opt_state=jax.tree.map(  # momentum that is not all zeros
        lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state.opt_state))
    checkpoints = checkpoint.Checkpoints(tmp_path, unrolled.model)
    checkpoints.save(1, jax.device_put(state, dp.replicated))
    checkpoints.close()
    config.model.scan_units = True
    scanned = recipe.build(config, dp)
    checkpoints = checkpoint.Checkpoints(tmp_path, scanned.model, read_only=True)
    restored, _, _ = checkpoints.restore_latest(scanned.abstract_state, scanned.layouts)
    checkpoints.close()
    assert jax.tree.structure(restored) == jax.tree.structure(scanned.abstract_state)
    assert restored.diverged_at.tolist() == [-1]
    restored = restored.run(0)
    expected = recipe.in_layout(jax.device_get(state), scan_units=True)
    for name in ("params", "batch_stats", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(getattr(restored, name)),
                     getattr(expected, name))
    assert "stage1_repeat" in restored.opt_state[1][0].trace
    assert "stage1_repeat" in restored.batch_stats  # full pre-activation: no BN in the stem


@pytest.mark.slow
def test_the_issues_example_a_shortcut_scale_changed_on_resume_is_refused(tmp_path, array_dir):
    """The command line: a run of constant-scaling shortcuts (lambda = 0.5) resumed with 0.9 and
    another BN epsilon ends in one line naming both, and changes nothing in the workdir."""
    workdir = str(tmp_path / "run")
    scaling = ("--config.model.shortcut=scaling", "--config.model.shortcut_scale=0.5")
    run(workdir, array_dir, *scaling, f"--config.num_train_steps={N}")
    before = snapshot(workdir)
    result = run(workdir, array_dir, "--config.model.shortcut=scaling",
                 "--config.model.shortcut_scale=0.9", "--config.model.bn_epsilon=0.1",
                 check=False)
    assert_one_error_line(result, "holds a checkpoint of another network (bn_epsilon: "
                          "checkpoint 1e-05 vs config 0.1, shortcut_scale: checkpoint 0.5 vs "
                          "config 0.9)")
    assert snapshot(workdir) == before
    print(result.stderr.strip().splitlines()[-1])  # the line the closing note quotes


@pytest.mark.slow
def test_a_bit_network_trains_and_resumes_exactly_through_the_command_line(tmp_path, array_dir):
    """GroupNorm + weight-standardised convs (no BN statistics) from `config.model`: trained
    2N steps straight; its checkpoint of step N, alone in a copy of the workdir (as a run
    stopped there leaves it), resumes to 2N equal to the straight run (another norm is refused
    on resume like any other attribute:
    test_a_changed_attribute_is_refused_on_resume_and_init_from_by_name)."""
    bit = ["--config.model.norm=group", "--config.model.norm_groups=8",
           "--config.model.conv=weight_standardized"]
    halfway, straight = str(tmp_path / "halfway"), str(tmp_path / "straight")
    run(straight, array_dir, *bit)
    stopped_at(straight, halfway, N)
    resumed = run(halfway, array_dir, *bit)
    assert f"resuming from step {N}" in resumed.stderr
    ours, theirs = saved_state(halfway)[0], saved_state(straight)[0]
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    assert not jax.tree.leaves(ours["batch_stats"])
