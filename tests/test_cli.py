"""End to end through the CLI: preemption, resume, restore across device counts, two processes,
and the bad-input table. Each run is a real `python -m resnet_v2_jax.main` subprocess on a small
array dataset (device-resident input, so no TensorFlow start-up cost)."""
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging

from cli_runs import (CONFIG, N, ROOT, assert_one_error_line, assert_only_our_info_lines,
                      assert_same_params, command, environment, kill, quick_config, run,
                      saved_state, snapshot, start, stopped_at, wait_for_checkpoint)
from resnet_v2_jax import cli, configuration, errors, train

# Command-line runs and training: outside the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, array_dir):
    """A 2N-step run on one device, the reference for the resume tests."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    run(workdir, array_dir)
    return workdir


def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_identical(tmp_path, array_dir,
                                                                    uninterrupted):
    workdir = str(tmp_path)
    process = start(workdir, array_dir)
    wait_for_checkpoint(workdir, N, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(os.path.join(workdir, "results.json")), "finished before the kill"
    resumed = run(workdir, array_dir)
    assert f"resuming from step {N}" in resumed.stderr
    assert_only_our_info_lines(resumed)  # a restore and a save, without Orbax's log
    state, step = saved_state(workdir)
    reference, ref_step = saved_state(uninterrupted)
    assert step == ref_step == 2 * N
    assert_same_params(state, reference)  # bitwise: XLA on CPU is deterministic


def test_sigterm_saves_exits_143_and_resumes(tmp_path, array_dir, uninterrupted):
    """A preempted run is not a finished one: exit code 143, which schedulers read as such."""
    workdir = str(tmp_path)
    process = start(workdir, array_dir)
    wait_for_checkpoint(workdir, N, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert N <= results["step"] <= 2 * N
    stopped_at = results["step"]
    if stopped_at < 2 * N:
        assert process.returncode == 143, stderr[-3000:]
        assert results["preempted"]
        assert_one_error_line(subprocess.CompletedProcess(process.args, 143, "", stderr),
                              f"preempted (SIGTERM) at step {stopped_at} of {2 * N}: its "
                              "checkpoint is written; rerun the same command to resume",
                              returncode=143)
        assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped_at)))
    else:
        assert process.returncode == 0, stderr[-3000:]
    resumed = run(workdir, array_dir)
    if stopped_at < 2 * N:
        assert f"resuming from step {stopped_at}" in resumed.stderr
    assert json.load(open(os.path.join(workdir, "results.json")))["step"] == 2 * N
    assert_same_params(saved_state(workdir)[0], saved_state(uninterrupted)[0])


def test_ctrl_c_saves_exits_130_with_one_line_and_resumes(tmp_path, array_dir, uninterrupted):
    workdir = str(tmp_path)
    process = start(workdir, array_dir)
    wait_for_checkpoint(workdir, N, process)
    _, stderr = kill(process, signal.SIGINT)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    if process.returncode == 0:  # the run finished before the signal arrived
        pytest.skip("the run finished before Ctrl-C")
    assert_one_error_line(result, "interrupted (Ctrl-C) at step", returncode=130)
    stopped_at = int(re.search(r"at step (\d+) of", stderr).group(1))
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped_at)))
    assert json.load(open(os.path.join(workdir, "results.json")))["stop_signal"] == "SIGINT"
    resumed = run(workdir, array_dir)
    assert f"resuming from step {stopped_at}" in resumed.stderr
    assert_same_params(saved_state(workdir)[0], saved_state(uninterrupted)[0])


def test_second_ctrl_c_stops_at_once_and_the_run_still_resumes(tmp_path, array_dir):
    workdir = str(tmp_path)
    process = start(workdir, array_dir, "--config.num_train_steps=1000")
    wait_for_checkpoint(workdir, N, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    _, stderr = kill(process, signal.SIGINT)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    assert_one_error_line(result, "interrupted", returncode=130)
    saved = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    resumed = run(workdir, array_dir, f"--config.num_train_steps={saved + 1}")
    assert f"resuming from step {saved}" in resumed.stderr


@pytest.mark.parametrize("sig, delay", [(signal.SIGINT, 0.3), (signal.SIGINT, 1.5),
                                        (signal.SIGTERM, 0.8)], ids=["int_0.3s", "int_1.5s",
                                                                    "term_0.8s"])
def test_a_signal_during_start_up_or_compilation_ends_cleanly(tmp_path, array_dir, sig, delay):
    """Ctrl-C or SIGTERM while the run restores, initialises or compiles (after the `batch:`
    line): one line, exit 130 or 143 (0 for SIGTERM once a step was saved), no crash, no
    traceback, the lock gone; the run then trains from where it is."""
    workdir = str(tmp_path / "run")
    process = start(workdir, array_dir)
    lines = []
    while not any("batch:" in line for line in lines):
        line = process.stderr.readline()
        assert line, "".join(lines)[-3000:]
        lines.append(line)
    time.sleep(delay)
    process.send_signal(sig)
    _, rest = process.communicate(timeout=300)
    stderr = "".join(lines) + rest
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    code = 130 if sig == signal.SIGINT else 143
    if "preempted (SIGTERM) at step" in stderr:  # SIGTERM after the first step: saved
        assert_one_error_line(result, "preempted (SIGTERM) at step", returncode=143)
    elif "nothing was trained" in stderr:
        assert_one_error_line(result, f"interrupted ({signal.Signals(sig).name}) before",
                              returncode=code)
    else:
        assert_one_error_line(result, "interrupted (Ctrl-C) at step", returncode=code)
    assert not os.path.exists(os.path.join(workdir, "run.lock"))
    checkpoints = os.path.join(workdir, "checkpoints")  # made by the first save, not before
    assert not os.path.exists(checkpoints) or os.listdir(checkpoints), "an empty checkpoints/"
    resumed = run(workdir, array_dir)
    assert json.load(open(os.path.join(workdir, "results.json")))["step"] == 2 * N
    assert "Traceback" not in resumed.stderr


def copy_of(workdir, tmp_path):
    """A copy of a finished run, for a test to spoil."""
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    return copy


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path, array_dir,
                                                                uninterrupted):
    workdir = copy_of(uninterrupted, tmp_path)
    arrays = os.path.join(workdir, "checkpoints", str(2 * N), "state", "ocdbt.process_0", "d")
    data_files = [os.path.join(arrays, f) for f in os.listdir(arrays)
                  if os.path.getsize(os.path.join(arrays, f)) > 10_000]  # the arrays' data
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    resumed = run(workdir, array_dir, f"--config.num_train_steps={3 * N}")
    # Which checkpoint, which array and what is wrong (not Orbax's quote of a method's repr).
    assert re.search(rf"checkpoint at step {2 * N} in {re.escape(workdir)}/checkpoints is "
                     r"unreadable "
                     r"\(ValueError: OUT_OF_RANGE: Error reading \"[\w.]+/[\d.]+\" in OCDBT "
                     r"database at local file .*: Requested byte range \[\d+, \d+\) is not valid "
                     r"for value of size \d+\); trying an older one", resumed.stderr), \
        resumed.stderr[-3000:]
    assert "bound method" not in resumed.stderr, resumed.stderr[-3000:]
    assert f"resuming from step {N}" in resumed.stderr
    assert "Traceback" not in resumed.stderr and "Event loop is closed" not in resumed.stderr
    assert json.load(open(os.path.join(workdir, "results.json")))["step"] == 3 * N


THREADS_AFTER_MAIN = r"""
import sys, threading
from absl import flags
from resnet_v2_jax import main
main.define_flags()
flags.FLAGS(["main", *sys.argv[1:]])
main.main(["main"])
ours = [t.name for t in threading.enumerate() if t is not threading.current_thread() and
        "resnet_v2_jax" in getattr(getattr(t, "_target", None), "__module__", "")]
print("threads of ours after main:", ours)
"""


def test_main_returns_with_no_thread_of_ours_alive(tmp_path, array_dir):
    """A thread of this package alive while the interpreter finalises once aborted finished runs
    (exit 134): none is left when `main` returns (the prefetcher has none; see also
    test_input_pipeline's half-read prefetcher)."""
    arguments = command(str(tmp_path), array_dir)[3:]
    result = subprocess.run([sys.executable, "-c", THREADS_AFTER_MAIN, *arguments], cwd=ROOT,
                            env=environment(), text=True, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "threads of ours after main: []"


def test_twenty_short_runs_in_a_row_all_exit_0(tmp_path, array_dir):
    """The README's quick run aborted at exit (134, "Fatal Python error: Aborted") in 2 of 12
    short runs while a prefetching thread dropped device arrays: 20 runs of 2 steps, two at a
    time, each in a new workdir, exit 0 every time."""
    failed = []
    for pair in range(10):
        processes = [start(str(tmp_path / f"run{2 * pair + k}"), array_dir,
                           "--config.num_train_steps=2",
                           "--config.checkpoint_every_steps=2") for k in range(2)]
        for process in processes:
            _, stderr = process.communicate(timeout=300)
            if process.returncode != 0:
                failed.append((process.returncode, stderr[-1500:]))
    assert failed == []


@pytest.mark.parametrize("first, second", [(8, 1), (1, 8)])
def test_restore_onto_another_device_count(tmp_path, array_dir, uninterrupted, first, second):
    workdir = str(tmp_path / "run")
    if first == 1:  # the module's one-device run, as it was after its checkpoint N
        stopped_at(uninterrupted, workdir, N)
    else:
        run(workdir, array_dir, f"--config.num_train_steps={N}", devices=first)
    saved, _ = saved_state(workdir, N)
    resumed = run(workdir, array_dir, devices=second)
    assert f"resuming from step {N}" in resumed.stderr
    assert f"over {second} devices" in resumed.stderr
    final, step = saved_state(workdir)
    assert step == 2 * N
    # The resumed run started from exactly the saved state: its first step changed it.
    flat_saved = dict(ocp.tree.to_flat_dict(saved["params"]))
    flat_final = dict(ocp.tree.to_flat_dict(final["params"]))
    assert all(flat_saved[k].shape == flat_final[k].shape for k in flat_saved)
    assert any(np.any(flat_saved[k] != flat_final[k]) for k in flat_saved)


def two_process_runs(tmp_path, arrays, *overrides, steps):
    """(one process x 8 devices, two processes x 4 devices): (workdir, stderr) of each."""
    one = str(tmp_path / "one")
    one_run = run(one, arrays, f"--config.num_train_steps={steps}", *overrides, devices=8)
    two = str(tmp_path / "two")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [start(two, arrays, f"--config.num_train_steps={steps}", *overrides,
                       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                       f"--process_id={i}", devices=4,
                       JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo") for i in range(2)]
    stderrs = []
    for process in processes:
        stderrs.append(process.communicate(timeout=600)[1])
        assert process.returncode == 0, stderrs[-1][-3000:]
    assert "process 1 of 2, 4 local / 8 global devices" in stderrs[1]
    return (one, one_run.stderr), (two, stderrs[0])


def test_two_processes_equal_one_process_with_eight_devices_in_float64(tmp_path, real_array_dir):
    """In float64 the only difference, the order of the cross-process sums (gloo vs XLA's
    in-process all-reduce), is far below anything a wrong data split, a missing reduction or a
    wrong BN grouping would change: parameters agree to 1e-10 after 2 steps of 16 real images
    (2 a device: a float64 step takes seconds on this CPU), each checkpointed."""
    (one, one_log), (two, two_log) = two_process_runs(tmp_path, real_array_dir,
                                                      "--config.float64=True",
                                                      "--config.batch_size=16",
                                                      "--config.checkpoint_every_steps=1",
                                                      steps=2)
    assert len(step_losses(one_log)) == 2
    assert step_losses(two_log) == step_losses(one_log)  # as logged, to 4 decimals
    one_state, two_state = saved_state(one)[0], saved_state(two)[0]
    assert flat(one_state["params"]).dtype == np.float64
    halfway = saved_state(one, 1)[0]
    assert np.abs(flat(one_state["params"]) - flat(halfway["params"])).max() > 1e-3  # it trained
    assert_same_params(two_state, one_state, rtol=1e-10, atol=1e-10)
    chex.assert_trees_all_close(two_state["batch_stats"], one_state["batch_stats"], rtol=1e-6)
    r_one = json.load(open(os.path.join(one, "results.json")))
    r_two = json.load(open(os.path.join(two, "results.json")))
    assert r_two["eval"]["32"]["num_examples"] == r_one["eval"]["32"]["num_examples"] == 100
    assert r_two["eval"]["32"]["top1_error"] == r_one["eval"]["32"]["top1_error"]


def step_losses(stderr):
    return [float(m.group(1)) for m in re.finditer(r"step \d+/\d+  loss ([0-9.]+)", stderr)]


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


# Refused by the command line itself: one line, exit code 1, nothing created. One bad config
# value stands for all of them (the rest are refused in-process below, by the same
# `train_and_evaluate` the command calls, as the same one-line errors).
BAD_INPUTS = [
    ("depth", ["--config.model.depth=100"], "depth must be 6n+2"),
    # An unprepared manual-download dataset fails at once; an unreachable or failed download of
    # CIFAR is tested in-process in test_input_pipeline.py (here it would download with internet).
    ("unprepared", ["--config.input_pipeline=tfds", "--config.dataset=imagenet2012",
                    "--config.data_dir={tmp}/tfds"], "needs a manual download"),
    # These runs cannot import TensorFlow (cli_runs): the command names the extra to install.
    ("no_tensorflow", ["--config.input_pipeline=tfds"],
     "tensorflow is not installed: reading tfds needs tensorflow and tensorflow_datasets"),
    # Diverged before the first checkpoint (step N): the message says there is none.
    ("nan", ["--config.learning_rate=1e12"], "no checkpoint was "
     "written yet: lower learning_rate"),
]


@pytest.mark.parametrize("name, overrides, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_ends_with_one_line_and_nonzero_exit(tmp_path, array_dir, name, overrides,
                                                       message):
    workdir = tmp_path / "run"
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    # On 8 devices (the batch check names them); the diverging run on one, the program of
    # test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint.
    result = run(str(workdir), array_dir, *overrides, devices=1 if name == "nan" else 8,
                 check=False, tensorflow=name == "unprepared")
    assert_one_error_line(result, message)
    if name != "nan":  # refused at start: nothing created, not even the dataset's folder
        assert sorted(os.listdir(tmp_path)) == []


BAD_CONFIGS = [
    ("block", {"model.block": "wide"}, "unknown block 'wide'"),
    ("unit", {"model.unit": "preact"}, "unknown unit 'preact'"),
    ("shortcut", {"model.shortcut": "gated"}, "unknown shortcut 'gated'"),
    ("dataset", {"dataset": "mnist"}, "unknown dataset 'mnist'"),
    ("batch", {"batch_size": 60}, "must be a positive multiple of the device count 8"),
    ("boundaries", {"lr_boundaries_steps": (48000, 32000)}, "positive increasing steps"),
    ("parallelism", {"parallelism": "threads"}, "parallelism='threads' is not allowed"),
    ("bn_group", {"bn_group_size": 3}, "bn_group_size=3 must divide"),
    ("steps", {"num_train_steps": -1, "num_epochs": 0}, "num_train_steps > 0"),
    ("arrays", {"array_dir": "/nonexistent"}, "not found"),
    ("input", {"input_pipeline": "grain"}, "input_pipeline='grain' is not allowed"),
]


@pytest.mark.parametrize("name, overrides, message", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_values_are_refused_before_anything_is_written(tmp_path, array_dir, name,
                                                                   overrides, message):
    """What the command (8 devices here too) ends with in one line: one of the package's own
    errors (`cli.guard`), its message one line, raised before the workdir exists."""
    with pytest.raises(errors.Error, match=re.escape(message)) as refused:
        train.train_and_evaluate(quick_config(array_dir, overrides), str(tmp_path / "run"))
    assert "\n" not in str(refused.value)
    assert os.listdir(tmp_path) == []


def test_workdir_with_another_models_checkpoint_is_refused(tmp_path, array_dir, uninterrupted):
    workdir = copy_of(uninterrupted, tmp_path)
    before = snapshot(workdir)
    result = run(workdir, array_dir, f"--config.num_train_steps={3 * N}",
                 "--config.model.depth=14", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: " in result.stderr and "checkpoint of another network" in result.stderr
    assert "stage_sizes: checkpoint [1, 1, 1] vs config [2, 2, 2]" in result.stderr
    assert "model.depth=8 there vs 14 now" in result.stderr
    assert snapshot(workdir) == before  # nothing lost


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, array_dir):
    workdir = str(tmp_path)
    result = run(workdir, array_dir, "--config.learning_rate=1e12",
                 "--config.checkpoint_every_steps=1", check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at step"), result.stderr[-3000:]
    bad_step = int(last.split(" at step ")[1].split(":")[0])
    assert (f"the last checkpoint (step {bad_step - 1}) is intact" if bad_step > 1 else
            "no checkpoint was written yet") in last
    if bad_step > 1:
        state, step = saved_state(workdir)
        assert step == bad_step - 1
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
    else:  # diverged in the first step: nothing may have been saved
        assert not os.path.exists(os.path.join(workdir, "checkpoints", "1"))


@pytest.mark.parametrize("sig, delay", [(signal.SIGINT, 0.05), (signal.SIGINT, 0.4),
                                        (signal.SIGINT, 1.2), (signal.SIGTERM, 0.4)])
def test_a_signal_while_the_command_starts_ends_it_in_one_line(tmp_path, array_dir, sig, delay):
    """While Python imports JAX and the rest: never swallowed (the run went on to train), never
    a library's ImportError or a traceback; one line, exit 130 or 143, nothing written."""
    process = start(str(tmp_path / "run"), array_dir)
    time.sleep(delay)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    assert_one_error_line(result, "interrupted", returncode=128 + sig)
    assert "Exception ignored" not in stderr and not (tmp_path / "run" / "results.json").exists()


def test_a_config_copied_anywhere_loads(tmp_path):
    """Configs import their base from the package: a copy outside configs/ is a config."""
    copy = tmp_path / "my.py"
    copy.write_text(open(CONFIG).read())
    result = subprocess.run([sys.executable, "-m", "resnet_v2_jax.main", "--config=my.py",
                             "--config.model.depth=20", "--print_config"], cwd=tmp_path,
                            text=True, capture_output=True, env=environment(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.depth = 20" in result.stdout


def test_print_config_lists_every_key_with_its_meaning_and_help_takes_h():
    """The keys are discoverable from the command line: --print_config (no --workdir needed)
    prints each with its value after overrides and its meaning; -h is --help, whose usage keeps
    its line continuations; a training run without --workdir is refused in one line."""
    from resnet_v2_jax import base_config
    main = [sys.executable, "-m", "resnet_v2_jax.main", f"--config={CONFIG}"]
    listed = subprocess.run([*main, "--config.model.depth=20", "--print_config"], cwd=ROOT,
                            text=True, capture_output=True, env=environment(), timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    lines = listed.stdout.splitlines()
    keys = list(configuration.flatten(base_config.get_config()))
    assert sorted(line.split(" = ")[0] for line in lines) == sorted(keys)
    assert [line.split(" = ")[0] for line in lines] == [
        k for k in configuration.key_help() if k in keys]  # in the base config's order
    assert all(" # " in line for line in lines)  # every key has its meaning
    assert "model.depth = 20" in listed.stdout and "# devices per BN group: 0 = all devices" in \
        listed.stdout
    assert re.search(r"^model.unit = 'full_preact' +# Fig. 4: original \| bn_after_add \| "
                     r"relu_before_add \| relu_preact \| full_preact$", listed.stdout, re.M)
    usage = subprocess.run([sys.executable, "-m", "resnet_v2_jax.main", "-h"], cwd=ROOT,
                           text=True, capture_output=True, env=environment(), timeout=300)
    # (absl's --help exits with code 1)
    assert "--workdir=gs://bucket/run \\\n" in usage.stdout
    assert "--print_config" in usage.stdout
    refused = subprocess.run(main, cwd=ROOT, text=True, capture_output=True, env=environment(),
                             timeout=300)
    assert_one_error_line(refused, "--workdir is required to train", returncode=2)


def test_library_noise_is_dropped_and_warnings_are_kept(monkeypatch, capsys):
    """What the commands drop of the libraries' logs (cli.quiet_libraries), seen on real runs
    (most not reproducible here: tests pin JAX to the CPU and prepare no data): JAX's and
    TensorBoard's INFO lines by their loggers' levels; Orbax's INFO lines and two warnings no
    setting of Orbax or tfds reaches by the absl handler's filter. Warnings, ours and the
    libraries' own, are kept, and so is every unraisable exception but Orbax's closed loop."""
    handler = absl_logging.get_absl_handler()
    monkeypatch.setattr(handler, "filters", list(handler.filters))
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    for name in ("jax", "tensorboard", "asyncio"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
    cli.quiet_libraries()
    logging.getLogger("jax").manager._clear_cache()

    def shown(name, level):
        return logging.getLogger(name).isEnabledFor(level)

    assert not shown("jax._src.xla_bridge", logging.INFO)  # "Unable to initialize backend 'tpu'"
    assert shown("jax._src.xla_bridge", logging.WARNING)  # "An NVIDIA GPU may be present ..."
    assert not shown("tensorboard", logging.INFO)  # "No path found after", "Directory watcher"
    assert shown("tensorboard", logging.WARNING)

    def kept(level, message, pathname="/site-packages/lib/module.py"):
        record = logging.LogRecord("absl", level, pathname, 1, message, None, None)
        return all(f.filter(record) for f in handler.filters)

    orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    tfds = "/site-packages/tensorflow_datasets/core/utils/file_utils.py"
    assert not kept(logging.WARNING, "Variant folder /data/cifar100/3.0.2 has no "
                    "dataset_info.json", tfds)
    assert not kept(logging.WARNING, "Given directory is read only=/run/checkpoints", orbax)
    assert not kept(logging.INFO, "Saving checkpoint at step 4", orbax)
    assert kept(logging.WARNING, "/run/checkpoints is read only, save will be skipped", orbax)
    assert kept(logging.WARNING, "Variant folder /data/cifar100/3.0.2 has invalid version", tfds)
    assert kept(logging.WARNING, "cifar100 is not prepared in /data: downloading and "
                "preparing it with tfds", "/repo/resnet_v2_jax/tfds_input.py")
    assert kept(logging.INFO, "Saving checkpoint at step 4", "/repo/resnet_v2_jax/checkpoint.py")

    class Raising:  # an exception where nobody can catch it: Python hands it to the hook
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    Raising(RuntimeError("Event loop is closed"))
    assert capsys.readouterr().err == ""
    Raising(ZeroDivisionError("in a __del__ of ours"))
    assert "ZeroDivisionError: in a __del__ of ours" in capsys.readouterr().err


def test_tensorflow_says_nothing_at_import_or_of_a_partly_read_cache():
    """In the commands (cli.import_tensorflow_quietly), TensorFlow's C++ start-up lines, and its
    warning when a cache is left partly read (every CIFAR run stopped in its first epoch), reach
    no output; afterwards TF_CPP_MIN_LOG_LEVEL is JAX's default again, for XLA's warnings."""
    code = ("import os\n"
            "import jax\n"  # as the commands do, before TensorFlow
            "from resnet_v2_jax import cli\n"
            "cli.import_tensorflow_quietly()\n"
            "from resnet_v2_jax import tfds_input\n"
            "batches = iter(tfds_input.tf.data.Dataset.range(10).cache().repeat())\n"
            "next(batches)\n"
            "del batches\n"
            "print(os.environ['TF_CPP_MIN_LOG_LEVEL'])\n")
    env = environment(tensorflow=True)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True, env=env,
                            capture_output=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    assert result.stdout == "1\n"
