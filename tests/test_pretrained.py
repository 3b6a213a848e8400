"""Weights in and out: export to a file and `weights.load` it back, and fine-tuning starts
(`--config.init_from`) from runs, exported files and timm state dicts."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_runs import ROOT, environment, run
from resnet_v2_jax import (checkpoint, export, parallel, pretrained, recipe, timm_import,
                           unit_layout, weights)
from tests.test_timm_import import BIT_FIXTURE, _fixture
from tests.test_recipe import config_with

IMAGES = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)


def small_run(workdir, seed=1, **overrides):
    """A run folder holding a freshly initialised CIFAR ResNet-8 (seed 1) at step 1; (its
    config, its one run's state)."""
    config = config_with(**{"depth": 8, "block": "basic", "batch_size": 8, "eval_batch_size": 8,
                            "seed": seed, **overrides})
    setup = recipe.build(config, parallel.DataParallel("shard_map"))
    checkpoints = checkpoint.Checkpoints(workdir, setup.model)
    state = setup.init_state(seed)
    checkpoints.save(1, state)
    checkpoints.close()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    return config, state.run(0)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("source")
    config, state = small_run(workdir, scan_units=True)
    return workdir, config, state


def fresh(**overrides):
    """(model, variables) of a new run's start (seed 0), before init_from."""
    config = config_with(**{"depth": 8, "block": "basic", "batch_size": 8, "eval_batch_size": 8,
                            **overrides})
    setup = recipe.build(config, parallel.DataParallel("shard_map"))
    return setup.model, recipe.variables_of(setup.init_state(0).run(0))


def assert_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_export_round_trip_needs_no_config(source, tmp_path):
    workdir, _, state = source
    path = str(tmp_path / "w.safetensors")
    assert export.export(str(workdir), path).endswith(os.path.join("checkpoints", "1"))
    model, variables = weights.load(path)
    assert model.scan_units and model.num_classes == 10
    assert_equal(variables, jax.tree.map(np.asarray, recipe.variables_of(state)))
    logits = model.apply(variables, IMAGES, train=False)
    # The unrolled layout of the same checkpoint is the same function.
    export.export(str(workdir / "checkpoints" / "1"), path, unrolled=True)
    unrolled, unrolled_variables = weights.load(path)
    assert not unrolled.scan_units and "stage1_unit1" in unrolled_variables["params"]
    np.testing.assert_allclose(unrolled.apply(unrolled_variables, IMAGES, train=False), logits,
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not a resnet_v2_jax weights file"):
        from safetensors.numpy import save_file
        save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
        weights.load(str(tmp_path / "other.safetensors"))


@pytest.mark.parametrize("classes, head", [(100, "re-initialised"), (10, "kept")])
def test_init_from_a_run_copies_exactly_the_backbone(source, classes, head):
    workdir, _, saved = source
    model, own_start = fresh(dataset="cifar100" if classes == 100 else "cifar10")
    started = pretrained.initialize_from(str(workdir / "checkpoints" / "1"), own_start, model)
    for collection in ("params", "batch_stats"):
        new, theirs, own = (v[collection] for v in (started, recipe.variables_of(saved),
                                                    own_start))
        # The source is scanned, the new run unrolled: compare in the new run's layout.
        theirs = unit_layout.scanned_to_unrolled({collection: theirs})[collection]
        for name in new:
            expected = own[name] if name == "head" and head == "re-initialised" else theirs[name]
            assert_equal(new[name], expected)
    assert started["params"]["head"]["kernel"].shape == (64, classes)
    if head == "kept":
        assert_equal(started["params"]["head"], saved.params["head"])


def test_init_from_another_network_is_refused_in_one_line(source):
    workdir, _, _ = source
    model, variables = fresh(depth=14)
    with pytest.raises(ValueError, match=r"^init_from .*checkpoints/1 is another network "
                       r"\(stage_sizes \[1, 1, 1\] there vs \[2, 2, 2\] here\); set the"):
        pretrained.initialize_from(str(workdir), variables, model)
    with pytest.raises(ValueError, match="neither a run's workdir"):
        pretrained.initialize_from(str(workdir / "checkpoints"), variables, model)


def test_load_file_names_load_source_for_a_run_folder(source):
    workdir, _, _ = source
    with pytest.raises(ValueError, match=r"is a folder, not a weights file: read a run with "
                       r"pretrained.load_source \(or start from it with --config.init_from\)$"):
        pretrained.load_file(str(workdir))
    assert pretrained.load_source(str(workdir)).where.endswith("checkpoints/1")


def test_init_from_non_finite_weights_is_refused_naming_the_tensor(source, tmp_path):
    """From an exported file and from a timm state dict, before anything could be trained."""
    workdir, _, state = source
    model, variables = fresh()
    bad = jax.tree.map(np.array, recipe.variables_of(state))
    bad["params"]["stage2_unit1"]["conv1"]["kernel"][0, 0, 0, 0] = np.nan
    exported = tmp_path / "nan.safetensors"
    weights.save(exported, model, bad)
    with pytest.raises(ValueError, match=r"^init_from .*nan.safetensors: params/stage2_unit1/"
                       r"conv1/kernel holds 1 NaN or Inf value\(s\) of \d+; these weights "
                       r"cannot start a run: give another checkpoint or file$"):
        pretrained.initialize_from(str(exported), variables, model)
    state_dict = dict(_fixture()["state_dict"])
    name = next(k for k in state_dict if k.endswith("running_var"))
    state_dict[name] = np.full_like(state_dict[name], np.inf)
    np.savez(tmp_path / "inf.npz", **state_dict)
    with pytest.raises(ValueError, match=r"inf.npz: batch_stats/.*/var holds \d+ NaN or Inf"):
        pretrained.load_source(str(tmp_path / "inf.npz"))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_init_from_timm_state_dicts(tmp_path, suffix):
    state_dict = _fixture()["state_dict"]
    path = str(tmp_path / f"timm{suffix}")
    if suffix == ".npz":
        np.savez(path, **state_dict)
    else:
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
    timm_model, timm_variables = timm_import.load(state_dict)
    target = timm_model.clone(num_classes=7)
    own = jax.jit(lambda rng: target.init(rng, IMAGES[:1], train=False))(jax.random.key(0))
    source_model, source_variables = pretrained.load_file(path)
    variables, summary = pretrained.transfer(source_model, source_variables, target, own, path)
    assert summary.endswith(f"classifier head re-initialised ({timm_model.num_classes} classes "
                            "there, 7 here)")
    params = dict(variables["params"])
    assert_equal(params.pop("head"), own["params"]["head"])
    assert_equal(params, {k: v for k, v in timm_variables["params"].items() if k != "head"})
    assert_equal(variables["batch_stats"], timm_variables["batch_stats"])
    with pytest.raises(ValueError, match=r"another network \(stem_norm 'after_pool' there vs "
                       r"'before_pool' here\)"):
        pretrained.transfer(source_model, source_variables,
                            target.clone(stem_norm="before_pool"), own, path)


def test_frozen_backbone_and_bn_statistics_change_only_the_head():
    config = config_with(depth=8, block="basic", batch_size=8, eval_batch_size=8,
                         train_backbone=False, train_bn_statistics=False, input_resize=48)
    dp = parallel.DataParallel("shard_map", 0, jax.devices()[:1])
    setup = recipe.build(config, dp)
    state = jax.tree.map(np.array, setup.init_state(0))  # the step donates
    rng = np.random.RandomState(0)
    batch = {"image": rng.randint(0, 256, (8, 32, 32, 3)).astype(np.uint8),
             "label": rng.randint(0, 10, (8,)).astype(np.int32)}
    new, _ = setup.train_step(dp.put_state(state), dp.put_batch(batch), np.int32(0))
    new, state = dp.to_host(new).run(0), state.run(0)
    assert_equal(new.batch_stats, state.batch_stats)
    params = dict(new.params)
    assert not np.allclose(params.pop("head")["kernel"], state.params["head"]["kernel"])
    assert_equal(params, {k: v for k, v in state.params.items() if k != "head"})


@pytest.mark.slow
def test_fine_tuning_run_through_the_cli_its_resume_and_export(source, tmp_path, array_dir):
    """The command line starts from the source's backbone and logs what it copied; a rerun
    resumes from its own checkpoint (init_from is not read again: here it no longer exists);
    `python -m resnet_v2_jax.export` writes the run's weights for `weights.load`."""
    workdir = str(tmp_path / "finetune")
    result = run(workdir, array_dir, f"--config.init_from={source[0]}",
                 "--config.num_train_steps=1")
    assert "classifier head kept" in result.stderr
    gone = str(tmp_path / "deleted_run")
    again = run(workdir, array_dir, f"--config.init_from={gone}",
                "--config.num_train_steps=1")
    assert "nothing to train" in again.stderr
    out = str(tmp_path / "finetuned.safetensors")
    exported = subprocess.run([sys.executable, "-m", "resnet_v2_jax.export", f"--workdir={workdir}",
                               f"--out={out}"], env=environment(), capture_output=True, text=True,
                              cwd=ROOT, timeout=300, preexec_fn=lambda: os.umask(0o027))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert exported.stdout.strip() == f"wrote {out} (the weights of {workdir}/checkpoints/1)"
    model, variables = weights.load(out)
    assert model.stage_sizes == (1, 1, 1) and int(variables["params"]["head"]["kernel"].size)
    model, variables = fresh()
    with pytest.raises(FileNotFoundError, match=f"^init_from {gone} does not exist: give a run"):
        pretrained.initialize_from(gone, variables, model)


def test_init_from_bit_weights_copies_the_backbone_without_statistics():
    """A BiT state dict (GroupNorm, no statistics) starts a BiT network of other classes: the
    backbone copied, the head new, nothing but params; a BN network is refused by name."""
    data = np.load(BIT_FIXTURE)
    state_dict = {k.split("/", 1)[1]: data[k] for k in data.files if "/" in k}
    source, source_variables = timm_import.load(state_dict, norm_groups=int(data["num_groups"]))
    target = source.clone(num_classes=7)
    own = jax.jit(lambda rng: target.init(rng, IMAGES[:1], train=False))(jax.random.key(0))
    variables, summary = pretrained.transfer(source, source_variables, target, own, "bit")
    assert summary.endswith("classifier head re-initialised (5 classes there, 7 here)")
    assert set(variables) == {"params"}
    params = dict(variables["params"])
    assert_equal(params.pop("head"), own["params"]["head"])
    assert_equal(params, {k: v for k, v in source_variables["params"].items() if k != "head"})
    with pytest.raises(ValueError, match=r"another network \(.*norm 'group' there vs 'batch' "
                                         r"here"):
        pretrained.transfer(source, source_variables, target.clone(norm="batch"), own, "bit")
