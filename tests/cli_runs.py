"""Helpers for tests that run the real command line, `python -m resnet_v2_jax.main`, as
subprocesses on small array datasets (device-resident input). TensorFlow cannot be imported in
them (tests/without_tensorflow): that path must run on machines without it. They train ResNet-8
(one unit per stage: BN, projections and every collective of a deeper network at a fraction of
its compile); what they check does not depend on depth."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from configs import cifar10_quick

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "cifar10_quick.py")
N = 3  # checkpoint interval; runs are 2N steps
OUR_MODULES = {name for name in os.listdir(os.path.join(ROOT, "resnet_v2_jax"))
               if name.endswith(".py")}


# What every run of `command` sets on top of configs/cifar10_quick.py (`quick_config` in-process).
SETTINGS = {"model.depth": 8, "input_pipeline": "device_resident", "batch_size": 64,
            "eval_batch_size": 40, "num_train_steps": 2 * N, "checkpoint_every_steps": N,
            "log_every_steps": 1, "eval_every_steps": 1000, "lr_schedule": "steps",
            "warmup": "none", "lr_boundaries_steps": (1000,)}


def command(workdir, array_dir, *overrides, config=CONFIG):
    settings = [f"--config.{key}={value}".replace(" ", "") for key, value in SETTINGS.items()]
    return [sys.executable, "-m", "resnet_v2_jax.main", f"--config={config}",
            f"--workdir={workdir}", *settings, f"--config.array_dir={array_dir}", *overrides]


def quick_config(array_dir, overrides=None):
    """The config `command` runs, built in this process, with `overrides` ({"key" or
    "model.key": value}): for tests of what the command checks before it writes anything."""
    config = cifar10_quick.get_config()
    for key, value in {**SETTINGS, "array_dir": array_dir, **(overrides or {})}.items():
        section, _, name = key.rpartition(".")
        setattr(config[section] if section else config, name, value)
    return config


WITHOUT_TENSORFLOW = os.path.join(ROOT, "tests", "without_tensorflow")


def environment(devices=1, tensorflow=False, **extra):
    """The tests' environment for a command on `devices` CPU devices: their XLA flags (the
    compile level set in tests/conftest.py) with that device count."""
    path = [ROOT] if tensorflow else [WITHOUT_TENSORFLOW, ROOT]
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count=")]
    return dict(os.environ, XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}",
                                                *flags]),
                JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(path), **extra)


def run(workdir, array_dir, *overrides, devices=1, check=True, cwd=ROOT, env=None,
        config=CONFIG, tensorflow=False):
    result = subprocess.run(command(workdir, array_dir, *overrides, config=config), cwd=cwd,
                            text=True, env=environment(devices, tensorflow, **(env or {})),
                            capture_output=True, timeout=600)
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


def stopped_at(finished, copy, step):
    """Copies a finished run's workdir to `copy` as it was when the run stopped right after its
    checkpoint `step` (the later checkpoints and results.json removed): a resume of the copy
    must reach the finished run's state."""
    shutil.copytree(finished, copy)
    for saved in os.listdir(os.path.join(copy, "checkpoints")):
        if saved.isdigit() and int(saved) > step:
            shutil.rmtree(os.path.join(copy, "checkpoints", saved))
    os.remove(os.path.join(copy, "results.json"))
    return copy


def kill(process, sig=signal.SIGKILL):
    process.send_signal(sig)
    return process.communicate(timeout=300)


def saved_state(workdir, step=None):
    """(the train state of a checkpoint's runs, stacked on the run axis, as numpy; its step):
    of `step`, or the latest."""
    directory = epath.Path(workdir) / "checkpoints"  # local or gs://
    step = step if step is not None else max(int(p.name) for p in directory.iterdir()
                                             if p.name.isdigit())
    path = directory / str(step) / "state"
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # float64 checkpoints (config.float64) read back as float64, whatever this process uses.
    with jax.enable_x64(True), ocp.StandardCheckpointer() as checkpointer:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                              checkpointer.metadata(path).item_metadata.tree)
        state = jax.tree.map(np.asarray, checkpointer.restore(path, target))
    return state["state"], step


def assert_same_params(a, b, **tolerance):
    flat_a = dict(ocp.tree.to_flat_dict(a["params"]))
    flat_b = dict(ocp.tree.to_flat_dict(b["params"]))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        if tolerance:
            np.testing.assert_allclose(flat_a[key], flat_b[key], err_msg=str(key), **tolerance)
        else:
            np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=str(key))


def snapshot(folder):
    """{relative path: (size, mtime_ns)} of every file under `folder`: equal snapshots mean
    nothing was written, renamed or deleted."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            info = os.stat(path)
            files[os.path.relpath(path, folder)] = (info.st_size, info.st_mtime_ns)
    return files


def assert_one_error_line(result, message, returncode=1):
    """The command ended with exactly one `error: ...` line containing `message`, the expected
    exit code and no traceback of ours."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == returncode, result.stderr[-3000:]
    assert lines and lines[-1].startswith("error: ") and message in lines[-1], \
        result.stderr[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def assert_only_our_info_lines(result):
    """Every INFO line of the command's log comes from this project: the libraries' (Orbax logs
    a dozen per save or restore) are dropped by `cli.quiet_libraries`."""
    sources = set(re.findall(r"^I\d{4} [\d:.]+ +\d+ (\S+?):\d+\]", result.stderr, re.M))
    assert sources and sources <= OUR_MODULES, (sorted(sources - OUR_MODULES),
                                                result.stderr[-3000:])
