"""Several runs in one program (`config.num_runs`): run k is the single run with seed + k, on
one device and on 8, in each layout; a diverged run is frozen while the others go on; one
checkpoint holds every run and resumes exactly; results, logs, TensorBoard, plots and the
commands that read runs report them in the paper's form."""
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cli_runs import (N, ROOT, assert_one_error_line, environment, run, saved_state, snapshot,
                      stopped_at)
from resnet_v2_jax import base_config
from resnet_v2_jax import checkpoint, inputs, parallel, recipe, runs, weights

# Command-line runs and training: outside the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow

RUNS = 3


def config(array_dir, num_runs=1, seed=0, **overrides):
    return base_config.cifar("cifar10", 8, batch_size=16, eval_batch_size=16,
                         input_pipeline="device_resident", array_dir=array_dir,
                         num_runs=num_runs, seed=seed, num_train_steps=3, **overrides)


def train(config, devices, steps=3):
    """(host state, per-step losses) after `steps` steps of `config` on the first `devices`."""
    dp = parallel.DataParallel("shard_map", 0, jax.devices()[:devices], num_runs=config.num_runs)
    setup = recipe.build(config, dp)
    state = dp.put_state(setup.init_state(config.seed))
    batches = inputs.train_batches(config, dp, 0)
    losses = []
    for _ in range(steps):
        state, metrics = setup.train_step(state, next(batches), np.int32(config.seed))
        losses.append(dp.to_host(metrics)["loss"])
    return dp.to_host(state), np.array(losses)


# Each layout once and each device count once (the unrolled step is the same program on one
# device as on eight; the suite's time is CI's budget).
@pytest.mark.parametrize("layout, devices, runs", [("vmap", 1, RUNS), ("unrolled", 8, RUNS),
                                                   ("vmap", 8, 2)],
                         ids=["vmap_1dev", "unrolled_8dev_all_devices", "vmap_8dev_run_groups"])
def test_run_k_is_the_single_run_of_seed_plus_k(array_dir, layout, devices, runs):
    """3 steps of real training (augmentation, BN, dropout keys, data order). Unrolled:
    parameters bitwise equal, BN statistics to 1e-7 (XLA fuses their running-average update
    differently next to the other runs'). Vectorised: float32 rounding of batched convolutions,
    amplified over 3 steps. 3 runs on 8 devices train each over all 8; 2 runs over groups of 4
    (a "runs" mesh axis: run 1's key is its group's offset), compared with single runs on 4
    devices."""
    multi, multi_losses = train(config(array_dir, runs, runs_layout=layout), devices)
    per_run_devices = devices // math.gcd(runs, devices)
    tolerance = (dict(params=0.0, stats=1e-7, loss=0.0) if layout == "unrolled" else
                 dict(params=1e-4, stats=1e-5, loss=1e-5))
    assert (multi.diverged_at == -1).all()
    for k in range(runs):
        single, losses = train(config(array_dir, seed=k), per_run_devices)
        single, losses = jax.tree.map(lambda x: x[0], single.state), losses[:, 0]  # its one run
        np.testing.assert_allclose(multi_losses[:, k], losses, rtol=tolerance["loss"], atol=0)
        for name, tol in (("params", tolerance["params"]), ("batch_stats", tolerance["stats"])):
            ours = jax.tree.map(lambda x: x[k], getattr(multi.state, name))
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=tol), ours,
                         getattr(single, name))


def test_a_diverged_run_is_frozen_and_the_others_go_on(array_dir, tmp_path):
    """...and reading it back (evaluate, export) says so and labels its weights' step."""
    c = config(array_dir, RUNS)
    dp = parallel.DataParallel("shard_map", 0, jax.devices()[:1], num_runs=RUNS)
    setup = recipe.build(c, dp)
    state = setup.init_state(0)
    head = state.state.params["head"]["kernel"]  # run 1's logits overflow: its loss is not finite
    state = state.replace(state=state.state.replace(params={
        **state.state.params, "head": {**state.state.params["head"],
                                       "kernel": head.at[1].multiply(3e38)}}))
    before = jax.device_get(state)
    state = dp.put_state(state)
    batches = inputs.train_batches(c, dp, 0)
    for _ in range(2):
        state, metrics = setup.train_step(state, next(batches), np.int32(c.seed))
    checkpoints = checkpoint.Checkpoints(tmp_path, setup.model, num_runs=RUNS)
    checkpoints.save(2, dp.get_state(state))
    checkpoints.close()
    (tmp_path / "config.json").write_text(c.to_json_best_effort())
    state = dp.to_host(state)
    assert state.diverged_at.tolist() == [-1, 1, -1]
    read = runs.read_run(str(tmp_path), run=1)
    assert (read.step, read.weights_step, read.diverged) == (2, 0, (1,))
    assert read.divergence() == "run 1 diverged at step 1: these are its last finite weights, " \
        "of step 0"
    assert runs.read_run(str(tmp_path), run=0).divergence() == ""
    frozen = jax.tree.map(lambda x: x[1], state.state.params)
    jax.tree.map(np.testing.assert_array_equal, frozen,
                 jax.tree.map(lambda x: x[1], before.state.params))
    assert state.state.step.tolist() == [2, 0, 2]
    assert bool(recipe.all_finite(state))  # the frozen state is the finite one it had


def test_statistics_of_runs_leave_the_diverged_out():
    from resnet_v2_jax import train
    stats = train.summarize([0.30, 0.10, 0.20, 0.90], diverged=[3])
    assert stats == pytest.approx({"median": 0.2, "mean": 0.2, "std": 0.1, "best": 0.1,
                                   "runs": 3})
    assert train.summarize([0.5], diverged=[0])["median"] is None


# --- through the command line ------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, array_dir):
    """A finished run of 3 ResNet-8 runs, 2N steps, checkpoints at N and 2N."""
    workdir = str(tmp_path_factory.mktemp("three_runs"))
    result = run(workdir, array_dir, f"--config.num_runs={RUNS}",
                 f"--config.eval_every_steps={N}")
    return workdir, result


def test_results_logs_and_tensorboard_report_every_run(three_runs):
    workdir, result = three_runs
    results = json.load(open(os.path.join(workdir, "results.json")))
    crop = results["eval"]["32"]
    assert results["num_runs"] == RUNS and results["diverged"] == []
    errors = crop["runs"]["top1_error"]
    assert len(errors) == RUNS and crop["top1_error"] == np.median(errors)
    assert crop["stats"]["top1_error"]["std"] == pytest.approx(np.std(errors, ddof=1))
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"step {2 * N}: test error {100 * np.median(errors):.2f} "
                           f"({100 * np.mean(errors):.2f}±")
    assert f"median of {RUNS} runs" in line
    assert sorted(os.listdir(os.path.join(workdir, "runs"))) == [str(k) for k in range(RUNS)]
    assert "3 runs: 1 group(s) of 1 device(s), 3 run(s) per device" in result.stderr


def test_a_checkpoint_of_runs_resumes_exactly_and_refuses_another_count(three_runs, tmp_path,
                                                                        array_dir):
    """The uninterrupted run's checkpoint of step N, alone in a copy of its workdir (as a run
    stopped there leaves it), resumes to the uninterrupted run's final state, bitwise."""
    workdir, _ = three_runs
    halfway = stopped_at(workdir, str(tmp_path / "halfway"), N)
    before = snapshot(halfway)
    refused = run(halfway, array_dir, "--config.num_runs=2", check=False)
    assert_one_error_line(refused, f"holds {RUNS} run(s), this config trains 2 (num_runs): "
                          f"resume with --config.num_runs={RUNS}")
    assert snapshot(halfway) == before
    resumed = run(halfway, array_dir, f"--config.num_runs={RUNS}",
                  f"--config.eval_every_steps={N}")
    assert f"resuming from step {N}" in resumed.stderr
    ours, theirs = saved_state(halfway)[0], saved_state(workdir)[0]
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_evaluate_export_and_plot_take_a_run(three_runs, tmp_path):
    workdir, _ = three_runs
    results = json.load(open(os.path.join(workdir, "results.json")))

    def command(module, *args):
        done = subprocess.run([sys.executable, "-m", f"resnet_v2_jax.{module}", *args],
                              cwd=ROOT, env=environment(), text=True, capture_output=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done
    every = command("evaluate", f"--workdir={workdir}", f"--output={tmp_path}/all.json")
    assert f"median of {RUNS} runs" in every.stdout
    saved = json.load(open(tmp_path / "all.json"))["eval"]["32"]["runs"]["top1_error"]
    assert saved == pytest.approx(results["eval"]["32"]["runs"]["top1_error"], abs=1e-4)
    one = command("evaluate", f"--workdir={workdir}", "--run=1", f"--output={tmp_path}/1.json")
    assert json.load(open(tmp_path / "1.json"))["eval"]["32"]["top1_error"] == pytest.approx(
        saved[1], abs=1e-4)
    assert "test accuracy" in one.stdout
    refused = subprocess.run([sys.executable, "-m", "resnet_v2_jax.export",
                              f"--workdir={workdir}", f"--out={tmp_path}/w.safetensors"],
                             cwd=ROOT, env=environment(), text=True, capture_output=True,
                             timeout=300)
    assert_one_error_line(refused, f"holds {RUNS} runs: choose one with --run=k (0..{RUNS - 1})")
    command("export", f"--workdir={workdir}", "--run=2", f"--out={tmp_path}/w.safetensors")
    model, variables = weights.load(str(tmp_path / "w.safetensors"))
    state = saved_state(workdir)[0]
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"],
                                  state["params"]["head"]["kernel"][2])
    command("plot", f"--workdir={workdir}", f"--out={tmp_path}/band.png")
    from PIL import Image
    assert Image.open(tmp_path / "band.png").size[0] > 500


def test_analyze_and_init_from_take_a_run(three_runs, tmp_path, array_dir):
    from resnet_v2_jax import analyze, configuration
    workdir, _ = three_runs
    config = configuration.read(workdir)
    images = np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    labels = np.arange(4)
    with pytest.raises(ValueError, match="holds 3 runs: choose one with --run=k"):
        analyze.analyze(config, images, labels, workdir)
    result = analyze.analyze(config, images, labels, workdir, run=2)
    assert result["weights"].endswith(", run 2") and len(result["grad_norm"]) == 3
    tuned = run(str(tmp_path / "tuned"), array_dir, f"--config.init_from={workdir}",
                "--config.init_from_run=1", "--config.num_train_steps=1")
    assert f"init_from {workdir}/checkpoints/{2 * N} (run 1): copied" in tuned.stderr


def test_when_every_run_diverges_the_program_stops_in_one_line(tmp_path, array_dir):
    result = run(str(tmp_path / "run"), array_dir, "--config.num_runs=2",
                 "--config.learning_rate=1e12",
                 "--config.checkpoint_every_steps=1", check=False)
    assert_one_error_line(result, "every one of the 2 runs diverged")
