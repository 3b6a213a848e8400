"""The launch/ scripts in --dry-run mode: the commands they would run, read back with shlex.

Nothing here calls gcloud, sbatch or pip: dry runs only print. Each printed line is one command
whose words shlex.split recovers exactly; remote commands (gcloud ssh --command=...) are checked
to be valid bash with `bash -n`.
"""
import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("tpu_vm.sh", "gpu.sh", "slurm_gpu.sh")
# Settings the scripts read from the environment; cleared so the caller's shell cannot leak in
# (XLA_FLAGS: the tests' compile level, tests/conftest.py, is not the target's).
SETTINGS = ("TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROJECT", "SPOT",
            "CONFIG", "WORKDIR", "DATA_DIR", "REPO_URL", "GIT_REF", "PYTHON_VERSION",
            "LOG_WORKER", "STOP_TIMEOUT", "DRY_RUN", "GPUS", "MEM_FRACTION", "PYTHON", "NODES", "GPUS_PER_NODE",
            "PARTITION", "ACCOUNT", "TIME", "CPUS_PER_TASK", "JOB_NAME", "TARGET",
            "LOCAL_PYTHON", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS")


def launch(script, *args, check=True, tmp_path=None, timeout=60, **settings):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    if tmp_path is not None:
        env["TMPDIR"] = str(tmp_path)
    env.update(settings)
    result = subprocess.run(["bash", str(REPO / "launch" / script), *args], env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def commands(script, *args, **settings):
    """The argv of every command a dry run prints."""
    return commands_in(launch(script, "--dry-run", *args, **settings).stdout)


def commands_in(stdout):
    """The argv of every command in a dry run's output."""
    return [shlex.split(line) for line in _shell_lines(stdout)]


def _shell_lines(text):
    """Joins lines that continue inside quotes (multi-line --command strings)."""
    lines, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        try:
            shlex.split(current)
        except ValueError:  # an open quote: the command goes on
            continue
        lines.append(current.strip())
        current = ""
    assert not current, f"unterminated quote in {text!r}"
    return [line for line in lines if line]


def option(argv, name):
    """The value of `name=value` in argv."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def assert_valid_bash(script_text):
    result = subprocess.run(["bash", "-n"], input=script_text, capture_output=True, text=True)
    assert result.returncode == 0, (result.stderr, script_text)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    result = launch(script, "--help")
    assert result.stdout.startswith(f"Usage: launch/{script}")
    assert "--dry-run" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_option_is_refused(script):
    result = launch(script, "--dry-run", "--no-such-option", "train", check=False,
                    TPU_NAME="t", WORKDIR="gs://b/r")
    assert result.returncode != 0
    assert "unknown" in result.stderr and "--no-such-option" in result.stderr


# --- Cloud TPU VMs ----------------------------------------------------------------------------

@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_create(accelerator, runtime):
    [argv] = commands("tpu_vm.sh", "create", TPU_NAME="r200", ACCELERATOR_TYPE=accelerator,
                      ZONE="us-west4-a")
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "r200"]
    assert option(argv, "--accelerator-type") == accelerator
    assert option(argv, "--version") == runtime
    assert option(argv, "--zone") == "us-west4-a"
    assert "--spot" not in argv


def test_tpu_flags_override_environment_and_spot():
    [argv] = commands("tpu_vm.sh", "--name=mine", "--accelerator=v5litepod-8", "--spot",
                      "--project=p", "--version=custom", "create", TPU_NAME="env",
                      ACCELERATOR_TYPE="v4-8")
    assert argv[5] == "mine"
    assert option(argv, "--accelerator-type") == "v5litepod-8"
    assert option(argv, "--version") == "custom"
    assert option(argv, "--project") == "p"
    assert "--spot" in argv


def test_tpu_pod_setup_installs_on_every_worker():
    archive, scp, ssh = commands("tpu_vm.sh", "setup", TPU_NAME="pod",
                                 ACCELERATOR_TYPE="v4-32")
    assert archive[:2] == ["git", "-C"] and "archive" in archive and archive[-1] == "HEAD"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5] == option(archive, "--output") and scp[6].startswith("pod:")
    assert option(scp, "--worker") == "all"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert option(ssh, "--worker") == "all"
    remote = option(ssh, "--command")
    assert_valid_bash(remote)
    assert "tar -xzf resnet_v2_jax.tar.gz" in remote
    install = next(shlex.split(line) for line in remote.splitlines() if "jax[tpu]" in line)
    assert install[install.index("-e") + 1] == ".[train]"


def test_tpu_setup_from_a_git_repository():
    [ssh] = commands("tpu_vm.sh", "setup", TPU_NAME="t", REPO_URL="https://example.com/r.git",
                     GIT_REF="v1.0")
    remote = option(ssh, "--command")
    assert_valid_bash(remote)
    assert "git clone --quiet https://example.com/r.git resnet_v2_jax" in remote
    assert "fetch --quiet origin v1.0" in remote


def _train_command(ssh):
    """The resnet_v2_jax.main argv inside a `train` ssh command."""
    remote = option(ssh, "--command")
    assert_valid_bash(remote)
    line = next(line for line in remote.splitlines() if "resnet_v2_jax.main" in line)
    words = shlex.split(line.split(">>")[0])
    return remote, words[words.index("-m") + 2:], words


def test_tpu_pod_train_starts_every_worker_with_a_gs_workdir():
    [ssh] = commands("tpu_vm.sh", "train", "--", "--config.batch_size=1024",
                     TPU_NAME="pod", ACCELERATOR_TYPE="v4-32", WORKDIR="gs://bucket/r200",
                     DATA_DIR="gs://bucket/tensorflow_datasets")
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert option(ssh, "--worker") == "all"
    remote, flags, words = _train_command(ssh)
    assert flags == ["--config=configs/imagenet_200.py", "--workdir=gs://bucket/r200",
                     "--distributed", "--config.batch_size=1024"]
    assert words[:2] == ["TFDS_DATA_DIR=gs://bucket/tensorflow_datasets", "nohup"]
    assert "train.log 2>&1 < /dev/null &" in remote and "echo $! > train.pid" in remote


def test_tpu_single_host_train_allows_a_local_workdir_with_a_warning():
    result = launch("tpu_vm.sh", "--dry-run", "train", TPU_NAME="one",
                    ACCELERATOR_TYPE="v5litepod-8", WORKDIR="/home/me/run",
                    CONFIG="configs/imagenet_50.py")
    assert "warning" in result.stderr
    [ssh] = [shlex.split(line) for line in _shell_lines(result.stdout)]
    _, flags, _ = _train_command(ssh)
    assert flags == ["--config=configs/imagenet_50.py", "--workdir=/home/me/run"]


@pytest.mark.parametrize("accelerator", ["v4-32", "v5litepod-16", "v5p-16", "v9-8"])
def test_tpu_pod_refuses_a_local_workdir_before_running_anything(accelerator):
    result = launch("tpu_vm.sh", "--dry-run", "create", "train", check=False, TPU_NAME="pod",
                    ACCELERATOR_TYPE=accelerator, WORKDIR="/tmp/run")
    assert result.returncode == 1
    assert "gs://" in result.stderr and "local disk" in result.stderr
    assert result.stdout == ""  # not even `create` was printed


def test_tpu_logs_stop_status_delete():
    logs, stop, status, delete = commands("tpu_vm.sh", "logs", "stop", "status", "delete",
                                          TPU_NAME="t", LOG_WORKER="3", ZONE="europe-west4-a")
    assert option(logs, "--worker") == "3"
    assert option(logs, "--command") == "tail -n 200 -F resnet_v2_jax/train.log"
    assert option(stop, "--worker") == "all"
    remote_stop = option(stop, "--command")
    assert_valid_bash(remote_stop)
    assert 'kill "$pid"' in remote_stop and 'kill -9 "$pid"' in remote_stop
    assert "$(seq 300)" in remote_stop
    assert status[4:6] == ["describe", "t"]
    assert delete[4:6] == ["delete", "t"] and "--quiet" in delete
    assert all(option(argv, "--zone") == "europe-west4-a" for argv in (logs, stop, delete))


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_tpu_stop_ends_the_training_process(tmp_path, ignores_sigterm):
    """The remote `stop` command, run here on a stand-in for the training process."""
    [stop] = commands("tpu_vm.sh", "stop", TPU_NAME="t", STOP_TIMEOUT="1")
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignores_sigterm else ""
    (tmp_path / "resnet_v2_jax").mkdir()
    with subprocess.Popen(
            [sys.executable, "-c", f"import signal, time; {ignore}print('ready', flush=True); "
             "time.sleep(60)"], stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout.readline() == "ready\n"
            (tmp_path / "resnet_v2_jax" / "train.pid").write_text(f"{process.pid}\n")
            subprocess.run(["bash", "-c", option(stop, "--command")], cwd=tmp_path, check=True,
                           timeout=30)
            assert process.wait(timeout=10) == (-9 if ignores_sigterm else -15)
        finally:
            process.kill()
    assert not (tmp_path / "resnet_v2_jax" / "train.pid").exists()


def test_tpu_needs_a_name_and_a_known_command():
    assert "TPU_NAME" in launch("tpu_vm.sh", "--dry-run", "create", check=False).stderr
    result = launch("tpu_vm.sh", "--dry-run", "create", "launch", check=False, TPU_NAME="t")
    assert result.returncode == 1 and "unknown command launch" in result.stderr
    assert result.stdout == ""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install '.[tpu]')")
@pytest.mark.slow
@pytest.mark.parametrize("batch, fits", [(64, True), (524288, False)])
def test_tpu_preflight_stops_before_creating_a_slice_the_config_does_not_fit(tmp_path, batch,
                                                                             fits):
    """A depth-8 network on a v4-8 slice: batch 64 fits, 131,072 per chip is over its 32 GiB.
    (16 images per v4 chip compile about 5x faster on this CPU than 64 on one v5e chip.)"""
    result = launch("tpu_vm.sh", "--dry-run", "preflight", "create", "--",
                    "--config.model.depth=8", "--config.input_pipeline=device_resident",
                    f"--config.batch_size={batch}", "--config.eval_batch_size=64",
                    "--workdir=gs://b/r", check=False, tmp_path=tmp_path, timeout=600,
                    TPU_NAME="t", ACCELERATOR_TYPE="v4-8",
                    CONFIG="configs/cifar10_quick.py", LOCAL_PYTHON=sys.executable)
    assert "+ preflight: configs/cifar10_quick.py on v4-8" in result.stderr
    reports = list((tmp_path / "resnet_v2_jax-preflight").glob("cifar10_quick_v4-8.*"))
    assert len(reports) == 2, "the check's JSON and markdown reports"
    if fits:
        assert result.returncode == 0, result.stderr
        assert "**fits**" in result.stderr
        [create] = commands_in(result.stdout)
        assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    else:
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == (
            "error: configs/cifar10_quick.py does not fit v4-8 (see above): nothing "
            "was started")
        assert result.stdout == "", "a command was printed after a failed check"


# --- GPUs -------------------------------------------------------------------------------------

def test_gpu_preflight_stops_without_the_compiler_or_a_target(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['jax_cuda12_plugin'] = None\n")
    result = launch("gpu.sh", "--dry-run", "preflight", "train", "--target=h100x8", check=False,
                    WORKDIR="/data/r", PYTHON=sys.executable, PYTHONPATH=f"{hide}:{REPO}")
    assert result.returncode == 1 and result.stdout == ""
    assert "error: compiling for h100x8 needs the CUDA compiler: pip install " \
        "'resnet_v2_jax[cuda]'" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the preflight check of configs/cifar10_resnet164.py for h100x8 failed (see "
        "above)")
    result = launch("gpu.sh", "--dry-run", "preflight", check=False)
    assert result.returncode == 1 and "set TARGET or --target" in result.stderr



def test_gpu_setup_and_train():
    venv, install, check, train = commands(
        "gpu.sh", "setup", "train", "--gpus=0,1", "--", "--config.batch_size=256",
        WORKDIR="/data/runs/r164", DATA_DIR="/data/tfds")
    assert venv[-3:] == ["-m", "venv", str(REPO / ".venv")]
    assert install[0] == str(REPO / ".venv/bin/pip") and "jax[cuda12]" in install
    assert install[install.index("-e") + 1] == str(REPO)
    assert train[0] == "env"
    assert train[1:4] == ["XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "CUDA_VISIBLE_DEVICES=0,1",
                          "TFDS_DATA_DIR=/data/tfds"]
    assert train[4:] == [str(REPO / ".venv/bin/python"), "-m", "resnet_v2_jax.main",
                         "--config=configs/cifar10_resnet164.py", "--workdir=/data/runs/r164",
                         "--config.batch_size=256"]


def test_gpu_train_needs_a_workdir():
    result = launch("gpu.sh", "--dry-run", "train", check=False)
    assert result.returncode == 1 and "WORKDIR" in result.stderr


def test_slurm_batch_script_runs_one_process_per_gpu(tmp_path):
    out = launch("slurm_gpu.sh", "--dry-run", "--nodes=4", "--partition=gpu", "--",
                 "--config.batch_size=1024", tmp_path=tmp_path, WORKDIR="/shared/r200",
                 GPUS_PER_NODE="4", DATA_DIR="/shared/tfds").stdout
    assert_valid_bash(out)
    lines = out.splitlines()
    script_file = str(tmp_path / "resnet_v2_jax.sbatch")
    assert shlex.split(lines[0])[:3] == ["cat", ">", script_file]
    assert shlex.split(lines[-1]) == ["sbatch", script_file]
    script = lines[1:-2]
    assert script[0] == "#!/bin/bash"
    for directive in ("--nodes=4", "--ntasks-per-node=4", "--gpus-per-node=4",
                      "--partition=gpu"):
        assert f"#SBATCH {directive}" in script
    assert not any("gpus-per-task" in line for line in script)  # JAX picks SLURM_LOCALID
    assert "export TFDS_DATA_DIR=/shared/tfds" in script
    srun = shlex.split(next(line for line in script if line.startswith("srun ")))
    assert srun[2:] == ["-m", "resnet_v2_jax.main", "--config=configs/imagenet_200.py",
                        "--workdir=/shared/r200", "--config.batch_size=1024"]
    assert not (tmp_path / "resnet_v2_jax.sbatch").exists()  # a dry run writes nothing


def test_slurm_needs_a_workdir():
    result = launch("slurm_gpu.sh", "--dry-run", check=False)
    assert result.returncode == 1 and "WORKDIR" in result.stderr
