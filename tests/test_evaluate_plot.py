"""Eval-only mode and training-curve plots.

The main checks use two short REAL CIFAR-10 runs (ResNet-8, 20 steps; skipped where CIFAR-10 is
not prepared as tfds, see conftest.py): evaluating the first run's checkpoint reproduces the
error that run logged, and the plot of both runs is a real PNG. The runs train in this process
(8 fake CPU devices) and are shared by the module's tests.
"""
import json
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image
from tensorboardX import SummaryWriter

from configs import cifar10_quick
from resnet_v2_jax import configuration, errors, evaluate, plot, runs, train

# Command-line runs and training: outside the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 20


def tiny_config(data_dir, unit="full_preact", **overrides):
    config = cifar10_quick.get_config()
    config.model.depth, config.model.unit = 8, unit
    # A shuffle buffer of 1,000, not the whole training set: 20 steps read 1,280 images.
    config.update({**dict(num_train_steps=STEPS, batch_size=64, warmup_steps=5,
                          log_every_steps=5, eval_every_steps=STEPS, checkpoint_every_steps=STEPS,
                          eval_batch_size=1000, shuffle_buffer_size=1000, data_dir=data_dir),
                   **overrides})
    return config


def _our_threads():
    """Python threads running code of this package (the loop's own thread excepted)."""
    return [t for t in threading.enumerate() if t is not threading.current_thread()
            and "resnet_v2_jax" in getattr(getattr(t, "_target", None), "__module__", "")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tfds_data_dir):
    """(workdir, results.json, our threads left) of a 20-step run, evaluated once, on the
    whole test set."""
    workdir = tmp_path_factory.mktemp("full_preact")
    train.train_and_evaluate(tiny_config(tfds_data_dir), str(workdir))
    return workdir, json.loads((workdir / "results.json").read_text()), _our_threads()


def test_a_finished_run_leaves_no_thread_of_ours(run):
    """A thread of ours alive at interpreter exit can abort the process (exit 134) while it
    drops device arrays: a tfds run, its prefetching and Orbax's saves included, leaves none."""
    assert run[2] == [] and not [t for t in threading.enumerate() if "prefetch" in t.name]


@pytest.fixture(scope="module")
def second_run(tmp_path_factory, tfds_data_dir):
    """The same 20 steps evaluated every 5 steps on 1,000 test images (the same network, so
    its train and eval steps come from the compilation cache)."""
    workdir = tmp_path_factory.mktemp("every_5_steps")
    train.train_and_evaluate(tiny_config(tfds_data_dir, eval_every_steps=5, steps_per_eval=1),
                             str(workdir))
    return workdir


# Library lines that read like errors and say nothing to a user (resnet_v2_jax.cli.quiet_libraries,
# cli.native_stderr_quiet): none may reach a command's output.
NOISE = ("Unable to initialize backend", "oneDNN custom operations", "absl::InitializeLog",
         "This TensorFlow binary is optimized", "No path found after", "read only",
         "read_only=True", "has no dataset_info.json", "\x1b[")


def assert_quiet(result):
    assert not [n for n in NOISE if n in result.stdout + result.stderr], result.stderr[-3000:]


def python_module(module, *args):
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return result


# --- eval-only on a real run ------------------------------------------------------------------

def test_eval_only_reproduces_the_logged_error(run):
    """The CLI, with the run's own config.json, on the latest checkpoint and whole test set."""
    workdir, logged, _ = run
    result = python_module("resnet_v2_jax.evaluate", f"--workdir={workdir}", "--verbosity=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_quiet(result)
    saved = json.loads((workdir / "eval_results.json").read_text())
    assert saved["step"] == logged["step"] == STEPS
    assert saved["checkpoint"] == str(workdir / "checkpoints" / str(STEPS))
    (crop, ours), = saved["eval"].items()
    theirs = logged["eval"][crop]
    assert ours["num_examples"] == theirs["num_examples"] == 10_000
    # Same weights, same images, same device count: equal up to float summation order.
    assert ours["top1_error"] == pytest.approx(theirs["top1_error"], abs=1e-4)
    assert ours["top5_error"] == pytest.approx(theirs["top5_error"], abs=1e-4)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    assert f"top-1 error {100 * ours['top1_error']:.2f}%" in result.stdout


def test_eval_only_on_another_split_leaves_the_run_alone(run):
    """Latest and given checkpoint; a save in flight and a damaged newer step stay untouched."""
    workdir, _, _ = run
    in_flight = workdir / "checkpoints" / f"{2 * STEPS}.orbax-checkpoint-tmp-1"
    damaged = workdir / "checkpoints" / str(3 * STEPS)
    in_flight.mkdir()
    damaged.mkdir()
    try:
        for path in (workdir, workdir / "checkpoints" / str(STEPS)):
            results = evaluate.evaluate(str(path), split="test[:1000]")
            assert results["step"] == STEPS and results["split"] == "test[:1000]"
            assert results["eval"]["32"]["num_examples"] == 1000
        assert in_flight.is_dir() and damaged.is_dir()
        assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == sorted(
            [str(STEPS), in_flight.name, damaged.name])
    finally:
        in_flight.rmdir()
        damaged.rmdir()


def test_eval_only_refuses_another_models_checkpoint(run):
    workdir, _, _ = run
    config = configuration.read(str(workdir))
    config.model.depth = 20
    another = r"another network .stage_sizes: checkpoint \[1, 1, 1\] vs config \[3, 3, 3\]"
    for path in (workdir, workdir / "checkpoints" / str(STEPS)):
        with pytest.raises(errors.CheckpointError, match=another):
            evaluate.evaluate(str(path), config)


def test_eval_only_errors_for_missing_checkpoints(run, tmp_path):
    workdir, _, _ = run
    with pytest.raises(FileNotFoundError, match="checkpoints/7 does not exist"):
        evaluate.evaluate(str(workdir / "checkpoints" / "7"))
    with pytest.raises(ValueError, match="is neither a run's workdir"):
        evaluate.evaluate(str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # nothing created on the way
    result = python_module("resnet_v2_jax.evaluate", f"--workdir={tmp_path / 'gone'}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'gone'} does not exist: give a run's workdir or one of its step "
        "folders <workdir>/checkpoints/<step>")


# --- plots of real runs -----------------------------------------------------------------------

def test_plot_reads_the_logged_curves(run):
    workdir, logged, _ = run
    curves = plot.load_run(str(workdir), "run")
    np.testing.assert_array_equal(curves.train[0], [5, 10, 15, 20])
    np.testing.assert_array_equal(curves.test[0], [STEPS])
    assert curves.test[1][-1] == pytest.approx(logged["eval"]["32"]["top1_error"])
    assert curves.train[1][-1] == pytest.approx(logged["train"]["loss"][0])  # its one run


def test_plot_of_two_runs_is_a_png(run, second_run, tmp_path):
    out = tmp_path / "curves.png"
    result = python_module("resnet_v2_jax.plot", f"--workdir={run[0]}", "--workdir",
                           second_run, "--labels=evaluated at the end,every 5 steps",
                           f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_quiet(result)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        width, height = image.size
    assert 800 <= width <= 2000 and 400 <= height <= 1200


# --- no data needed ---------------------------------------------------------------------------

def test_eval_config_overrides_and_makes_eval_exact():
    config = cifar10_quick.get_config()
    config.steps_per_eval = 3
    out = evaluate.eval_config(config, split="train", crops=["32"], data_dir="/d",
                               eval_batch_size=200)
    assert (out.eval_split, out.eval_crop_sizes, out.data_dir, out.eval_batch_size,
            out.steps_per_eval) == ("train", (32,), "/d", 200, -1)
    assert evaluate.eval_config(config).eval_crop_sizes == config.eval_crop_sizes
    assert config.steps_per_eval == 3  # the original is left alone


def test_runs_are_named_by_workdir_or_step_folder(tmp_path):
    (tmp_path / "run" / "checkpoints" / "20").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").mkdir()
    assert runs.split_run_path(str(tmp_path / "run")) == (tmp_path / "run", None)
    assert runs.split_run_path(str(tmp_path / "run" / "checkpoints" / "20")) == (
        tmp_path / "run", 20)
    for path, error in ((tmp_path / "run" / "checkpoints" / "latest", ValueError),
                        (tmp_path / "run" / "checkpoints" / "30", FileNotFoundError)):
        with pytest.raises(error):
            runs.split_run_path(str(path))


def test_plot_keeps_the_latest_value_of_a_resumed_run(tmp_path):
    """A run resumed from step 10 logs steps 11.. again; the later file wins."""
    for part, (first, values) in enumerate(((1, [2.0] * 15), (11, [1.0] * 10))):
        # Event file names hold the time in seconds: the suffix keeps the two apart and ordered.
        writer = SummaryWriter(str(tmp_path), filename_suffix=f".{part}")
        for step, value in enumerate(values, start=first):
            writer.add_scalar("train/loss", value, step)
        writer.add_scalar("eval/top1_error_224", 0.5, first + 9)
        writer.add_scalar("eval/top1_error_320", 0.4, first + 9)
        writer.close()
    curves = plot.load_run(str(tmp_path), "resumed")
    np.testing.assert_array_equal(curves.train[0], np.arange(1, 21))
    np.testing.assert_array_equal(curves.train[1], [2.0] * 10 + [1.0] * 10)
    np.testing.assert_array_equal(curves.test[0], [10, 20])  # the smallest crop, 224
    assert plot.load_run(str(tmp_path), "r", crop=320).test[1][0] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="crops logged: \\[224, 320\\]"):
        plot.load_run(str(tmp_path), "r", train="error", crop=999)
