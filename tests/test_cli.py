"""End to end through the CLI: preemption, resume, restore across device counts, two processes,
and the bad-input table. Each run is a real `python -m resnet_v2_jax.main` subprocess on a small
array dataset (device-resident input, so no TensorFlow start-up cost)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import cifar10_quick
from resnet_v2_jax import device_input, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 3  # checkpoint interval; runs are 2N steps


@pytest.fixture(scope="module")
def array_dir(tmp_path_factory):
    """512 training and 100 test images of CIFAR shape, random but fixed."""
    folder = str(tmp_path_factory.mktemp("arrays"))
    rng = np.random.RandomState(0)
    for split, n in (("train", 512), ("test", 100)):
        device_input.write_arrays(folder, "cifar10", split,
                                  rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8),
                                  rng.randint(0, 10, n))
    return folder


def command(workdir, array_dir, *overrides):
    return [sys.executable, "-m", "resnet_v2_jax.main", "--config=configs/cifar10_quick.py",
            f"--workdir={workdir}", "--config.depth=20", "--config.input_pipeline=device_resident",
            f"--config.array_dir={array_dir}", "--config.batch_size=64",
            "--config.eval_batch_size=40", f"--config.num_train_steps={2 * N}",
            f"--config.checkpoint_every_steps={N}", "--config.log_every_steps=1",
            "--config.eval_every_steps=1000", "--config.lr_schedule=steps", "--config.warmup=none",
            "--config.lr_boundaries_steps=(1000,)", *overrides]


def environment(devices=1, **extra):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra)
    return env


def run(workdir, array_dir, *overrides, devices=1, check=True):
    result = subprocess.run(command(workdir, array_dir, *overrides), cwd=ROOT, text=True,
                            env=environment(devices), capture_output=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def start(workdir, array_dir, *overrides, devices=1, **env):
    return subprocess.Popen(command(workdir, array_dir, *overrides), cwd=ROOT, text=True,
                            env=environment(devices, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def wait_for_checkpoint(workdir, step, process, timeout=300):
    """Polls until checkpoint `step` is finalised (Orbax renames it into place when done)."""
    path = os.path.join(workdir, "checkpoints", str(step))
    deadline = time.time() + timeout
    while not os.path.isdir(os.path.join(path, "state")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def saved_state(workdir, step=None):
    directory = os.path.join(workdir, "checkpoints")
    step = step if step is not None else max(int(s) for s in os.listdir(directory) if s.isdigit())
    path = os.path.join(directory, str(step), "state")
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                              checkpointer.metadata(path).item_metadata.tree)
        state = checkpointer.restore(path, target)
    return jax.tree.map(np.asarray, state), step


def assert_same_params(a, b, **tolerance):
    flat_a = dict(ocp.tree.to_flat_dict(a["params"]))
    flat_b = dict(ocp.tree.to_flat_dict(b["params"]))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        if tolerance:
            np.testing.assert_allclose(flat_a[key], flat_b[key], err_msg=str(key), **tolerance)
        else:
            np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=str(key))


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
    state, step = saved_state(workdir)
    reference, ref_step = saved_state(uninterrupted)
    assert step == ref_step == 2 * N
    assert_same_params(state, reference)  # bitwise: XLA on CPU is deterministic


def test_sigterm_saves_exits_zero_and_resumes(tmp_path, array_dir, uninterrupted):
    workdir = str(tmp_path)
    process = start(workdir, array_dir)
    wait_for_checkpoint(workdir, N, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert N <= results["step"] <= 2 * N
    stopped_at = results["step"]
    if stopped_at < 2 * N:
        assert results["preempted"] and "preempted" in stderr
        assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped_at)))
    resumed = run(workdir, array_dir)
    if stopped_at < 2 * N:
        assert f"resuming from step {stopped_at}" in resumed.stderr
    assert json.load(open(os.path.join(workdir, "results.json")))["step"] == 2 * N
    assert_same_params(saved_state(workdir)[0], saved_state(uninterrupted)[0])


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path, array_dir):
    workdir = str(tmp_path)
    run(workdir, array_dir)
    state_dir = os.path.join(workdir, "checkpoints", str(2 * N), "state")
    data_files = [os.path.join(root, f) for root, _, files in os.walk(state_dir) for f in files
                  if os.path.getsize(os.path.join(root, f)) > 10_000]
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    resumed = run(workdir, array_dir, f"--config.num_train_steps={3 * N}")
    assert f"checkpoint at step {2 * N} is unreadable" in resumed.stderr
    assert f"resuming from step {N}" in resumed.stderr
    assert json.load(open(os.path.join(workdir, "results.json")))["step"] == 3 * N


@pytest.mark.parametrize("first, second", [(8, 1), (1, 8)])
def test_restore_onto_another_device_count(tmp_path, array_dir, first, second):
    workdir = str(tmp_path)
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


def test_two_processes_equal_one_process_with_eight_devices(tmp_path, array_dir):
    one = str(tmp_path / "one")
    one_run = run(one, array_dir, f"--config.num_train_steps={N}", devices=8)
    two = str(tmp_path / "two")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = [start(two, array_dir, f"--config.num_train_steps={N}",
                       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                       f"--process_id={i}", devices=4,
                       JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo") for i in range(2)]
    stderrs = []
    for process in processes:
        stderrs.append(process.communicate(timeout=600)[1])
        assert process.returncode == 0, stderrs[-1][-3000:]
    assert "process 1 of 2, 4 local / 8 global devices" in stderrs[1]
    # The same data and steps: every step's loss agrees (a wrong data split or a missing
    # reduction changes it in the second or third digit).
    assert step_losses(stderrs[0]) == pytest.approx(step_losses(one_run.stderr), rel=1e-5)
    assert len(step_losses(stderrs[0])) == N
    # Only the all-reduce differs (gloo across processes vs XLA's in-process one; each alone is
    # deterministic). Random labels leave tiny gradients, mostly cancelling terms inside BN's
    # backward pass, so float32 sums in another order move the parameters by 2-4% of how far
    # the 3 steps moved them (measured); half the batch per gradient would differ far more.
    initial = initial_params()
    two_params = flat(saved_state(two)[0]["params"])
    one_params = flat(saved_state(one)[0]["params"])
    moved = np.linalg.norm(one_params - initial)
    assert moved > 0 and np.linalg.norm(two_params - one_params) < 0.1 * moved
    r_one = json.load(open(os.path.join(one, "results.json")))
    r_two = json.load(open(os.path.join(two, "results.json")))
    assert r_two["eval"]["32"]["num_examples"] == r_one["eval"]["32"]["num_examples"] == 100
    assert r_two["eval"]["32"]["top1_error"] == pytest.approx(r_one["eval"]["32"]["top1_error"])


def step_losses(stderr):
    return [float(m.group(1)) for m in re.finditer(r"step \d+/\d+  loss ([0-9.]+)", stderr)]


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def initial_params():
    """The parameters every run of `command` starts from (seeded init, as train does)."""
    config = cifar10_quick.get_config()
    config.depth = 20
    model = train.create_model(config, 10)
    state = train.create_train_state(jax.random.PRNGKey(config.seed), model,
                                     optax.sgd(0.1), config.image_size)
    return flat(state.params)


BAD_INPUTS = [
    ("depth", ["--config.depth=100"], "depth must be 6n+2"),
    ("block", ["--config.block=wide"], "unknown block 'wide'"),
    ("unit", ["--config.unit=preact"], "unknown unit 'preact'"),
    ("shortcut", ["--config.shortcut=gated"], "unknown shortcut 'gated'"),
    ("dataset", ["--config.dataset=mnist"], "unknown dataset 'mnist'"),
    ("batch", ["--config.batch_size=60"], "must be a positive multiple of the device count 8"),
    ("boundaries", ["--config.lr_boundaries_steps=(48000,32000)"], "positive and increasing"),
    ("parallelism", ["--config.parallelism=threads"], "unknown parallelism 'threads'"),
    ("bn_group", ["--config.bn_group_size=3"], "bn_group_size=3 must divide"),
    ("steps", ["--config.num_train_steps=0", "--config.num_epochs=0"], "num_train_steps > 0"),
    ("arrays", ["--config.array_dir=/nonexistent"], "not found"),
    ("input", ["--config.input_pipeline=grain"], "unknown input_pipeline 'grain'"),
    ("unprepared", ["--config.input_pipeline=tfds", "--config.dataset=cifar100",
                    "--config.data_dir=/nonexistent/tfds"], "cifar100"),
    ("nan", ["--config.learning_rate=1e12", "--config.checkpoint_every_steps=1"],
     "training diverged at step"),
]


@pytest.mark.parametrize("name, overrides, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_ends_with_one_line_and_nonzero_exit(tmp_path, array_dir, name, overrides,
                                                       message):
    result = run(str(tmp_path), array_dir, *overrides, devices=8, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    # The run ends with exactly one line that says what is wrong; no traceback of ours
    # (tfds may log the traceback of its own failed download attempt before that).
    assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert 'resnet_v2_jax/' not in "".join(
        line for line in lines if line.startswith('  File "')), result.stderr[-3000:]


def test_workdir_with_another_models_checkpoint_is_refused(tmp_path, array_dir):
    workdir = str(tmp_path)
    run(workdir, array_dir, f"--config.num_train_steps={N}")
    result = run(workdir, array_dir, "--config.depth=14", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: " in result.stderr and "checkpoint of another model" in result.stderr
    assert "depth: checkpoint 20 vs config 14" in result.stderr
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(N)))  # nothing lost


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, array_dir):
    workdir = str(tmp_path)
    result = run(workdir, array_dir, "--config.learning_rate=1e12",
                 "--config.checkpoint_every_steps=1", check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at step"), result.stderr[-3000:]
    bad_step = int(last.split(" at step ")[1].split(":")[0])
    assert f"the last checkpoint (step {bad_step - 1}) is intact" in last
    if bad_step > 1:
        state, step = saved_state(workdir)
        assert step == bad_step - 1
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
    else:  # diverged in the first step: nothing may have been saved
        assert not os.path.exists(os.path.join(workdir, "checkpoints", "1"))
