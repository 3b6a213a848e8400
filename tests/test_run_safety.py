"""Never lose a run: workdir paths, resumes that do not fit, concurrent runs, finished runs,
bad data and bad configs, through the real command line (tests/cli_runs.py; a refusal of each
kind there, the other cases of a kind in-process). Every refusal is one line, and each test
checks that nothing written before was lost or changed."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_runs import (CONFIG, N, assert_one_error_line, kill, quick_config, run, saved_state,
                      snapshot, start, wait_for_checkpoint)
from resnet_v2_jax import (checkpoint, configuration, device_input, errors, models, rundir,
                           train)

# Command-line runs and training: outside the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory, array_dir):
    """A finished 2N-step run, to be copied by tests that try to spoil it."""
    workdir = str(tmp_path_factory.mktemp("finished"))
    run(workdir, array_dir)
    return workdir


@pytest.fixture
def copy_of_finished(tmp_path, finished):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished, workdir)
    return workdir


def strict_json(path):
    """Parses JSON the strict way: NaN or Infinity would raise."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


# --- workdir paths ---------------------------------------------------------------------------

def test_relative_and_home_workdirs_train_and_resume_from_any_directory(tmp_path, array_dir):
    """`--workdir=runs/r` from another directory (config given by absolute path) trains and
    checkpoints; the same run named as `~/runs/r` resumes from it."""
    run("runs/r", array_dir, f"--config.num_train_steps={N}", cwd=str(tmp_path))
    workdir = tmp_path / "runs" / "r"
    assert (workdir / "checkpoints" / str(N) / "state").is_dir()
    assert strict_json(workdir / "results.json")["step"] == N
    resumed = run("~/runs/r", array_dir, cwd="/", env={"HOME": str(tmp_path)})
    assert f"resuming from step {N}" in resumed.stderr
    assert strict_json(workdir / "results.json")["step"] == 2 * N
    assert not (workdir / rundir.LOCK_FILE).exists()  # released at the end


# --- resumes that do not fit -----------------------------------------------------------------

def test_a_resume_that_does_not_fit_is_refused_and_renames_nothing(copy_of_finished, array_dir):
    before = snapshot(copy_of_finished)
    result = run(copy_of_finished, array_dir, f"--config.num_train_steps={3 * N}",
                 "--config.weight_decay_bn_and_bias=False", check=False)
    assert_one_error_line(result, "does not fit the state this config builds")
    assert "weight_decay_bn_and_bias=True there vs False" in result.stderr.splitlines()[-1]
    assert snapshot(copy_of_finished) == before
    resumed = run(copy_of_finished, array_dir, f"--config.num_train_steps={3 * N}")
    assert f"resuming from step {2 * N}" in resumed.stderr


def test_a_resume_in_another_layout_or_precision_converts_the_checkpoint(copy_of_finished,
                                                                         array_dir):
    """How the network runs is not what it is: an unrolled float32 run resumes scanned and in
    float64 (cast), for one step (a float64 step takes seconds on this CPU). ResNet-8 has one
    unit a stage, nothing to scan: the conversion of scanned units, momentum included, is
    tests/test_network_schema.py's."""
    resumed = run(copy_of_finished, array_dir, f"--config.num_train_steps={2 * N + 1}",
                  "--config.model.scan_units=True", "--config.float64=True")
    assert f"resuming from step {2 * N}" in resumed.stderr
    state, step = saved_state(copy_of_finished)
    assert step == 2 * N + 1
    assert state["params"]["head"]["kernel"].dtype == np.float64


def test_workdir_of_unreadable_checkpoints_is_never_trained_from_scratch(copy_of_finished,
                                                                          array_dir):
    checkpoints = os.path.join(copy_of_finished, "checkpoints")
    for step in (N, 2 * N):  # both checkpoints damaged
        for root, _, files in os.walk(os.path.join(checkpoints, str(step), "state")):
            for name in files:
                path = os.path.join(root, name)
                if os.path.getsize(path) > 10_000:
                    with open(path, "r+b") as f:
                        f.truncate(os.path.getsize(path) // 3)
    results = open(os.path.join(copy_of_finished, "results.json")).read()
    for _ in range(2):  # the first run sets them aside; the second finds only those
        result = run(copy_of_finished, array_dir, f"--config.num_train_steps={3 * N}",
                     check=False)
        assert_one_error_line(result, "no readable checkpoint")
        assert "does not start from scratch" in result.stderr
        assert set(os.listdir(checkpoints)) == {f"{N}.unreadable", f"{2 * N}.unreadable"}
    assert open(os.path.join(copy_of_finished, "results.json")).read() == results


def test_interrupted_saves_are_cleaned_up_before_checkpoints_is_used(tmp_path):
    """Orbax (0.12) deletes the temporary folders of interrupted saves in a background thread.
    Checkpoints waits for it, so nothing races a rename of a damaged checkpoint, and a run that
    fails before its first save does not end with that thread's traceback (a CI failure once)."""
    folder = tmp_path / "checkpoints"
    for step in range(40):
        leftover = folder / f"{step}.orbax-checkpoint-tmp-{1000 + step}" / "state"
        leftover.mkdir(parents=True)
        (leftover / "data").write_bytes(b"x" * 1000)
    checkpoints = checkpoint.Checkpoints(tmp_path, models.cifar_resnet(8, block="basic"))
    assert os.listdir(folder) == []
    assert checkpoints.latest_step() is None
    checkpoints.close()


def test_checkpoints_waits_for_orbax_clean_up_through_its_private_method(tmp_path, monkeypatch):
    """Orbax 0.12 has no public way to wait for the background clean-up: Checkpoints calls
    CheckpointManager._maybe_await_cleanup_tmp_directory. A rename in Orbax, or the call gone
    from Checkpoints, fails here instead of silently bringing the race back."""
    import orbax.checkpoint as ocp
    wait = ocp.CheckpointManager._maybe_await_cleanup_tmp_directory  # pylint: disable=protected-access
    waited = []
    monkeypatch.setattr(ocp.CheckpointManager, "_maybe_await_cleanup_tmp_directory",
                        lambda manager: waited.append(manager) or wait(manager))
    checkpoints = checkpoint.Checkpoints(tmp_path, models.cifar_resnet(8, block="basic"))
    assert waited == [checkpoints.manager]
    checkpoints.close()


def test_a_checkpoint_whose_arrays_read_back_not_finite_is_set_aside(tmp_path, caplog):
    """Garbage in an array file can decode to NaN: such a checkpoint is damaged (a run never
    saves a non-finite state), not a divergence to blame on the learning rate."""
    model = models.cifar_resnet(8, block="basic")
    checkpoints = checkpoint.Checkpoints(tmp_path, model)
    checkpoints.save(1, {"w": jnp.ones(4)})
    checkpoints.save(2, {"w": jnp.array([1.0, jnp.nan, 1.0, 1.0])})  # as if decoded from garbage
    checkpoints.close()
    checkpoints = checkpoint.Checkpoints(tmp_path, model)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=one_device)}
    with caplog.at_level("WARNING"):
        state, step, _ = checkpoints.restore_latest(abstract)
    checkpoints.close()
    assert step == 1 and np.asarray(state["w"]).tolist() == [1.0] * 4
    assert (f"checkpoint at step 2 in {tmp_path}/checkpoints is unreadable (CheckpointError: its "
            "arrays hold NaN or Inf, which no run saves: their files are damaged); trying an "
            "older one") in caplog.text
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2.unreadable"]


def test_a_run_that_saved_nothing_leaves_no_checkpoints_folder(tmp_path):
    """checkpoints/ is made by the first save: a run stopped before it (Ctrl-C while
    compiling) leaves no empty folder to be read as a run that saved nothing."""
    checkpoints = checkpoint.Checkpoints(tmp_path, models.cifar_resnet(8, block="basic"))
    assert checkpoints.restore_latest(None) == (None, 0, {})
    checkpoints.prune()
    checkpoints.close()
    assert os.listdir(tmp_path) == []


# --- one run per workdir -----------------------------------------------------------------------

def test_second_run_is_refused_while_the_first_runs_and_a_killed_runs_lock_is_taken_over(
        tmp_path, array_dir):
    workdir = str(tmp_path)
    first = start(workdir, array_dir, "--config.num_train_steps=1000")
    wait_for_checkpoint(workdir, N, first)
    lock = json.loads(open(os.path.join(workdir, rundir.LOCK_FILE)).read())
    assert lock["pid"] == first.pid
    second = run(workdir, array_dir, check=False)
    assert_one_error_line(second, f"is in use by another run (pid {first.pid}")
    assert first.poll() is None  # the first run goes on
    kill(first, signal.SIGKILL)
    saved = max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    third = run(workdir, array_dir, f"--config.num_train_steps={saved + 1}")
    assert "taking over" in third.stderr and f"resuming from step {saved}" in third.stderr


COMPETITOR = r"""
import os, sys, time
import jax
from resnet_v2_jax import errors, rundir
workdir, results, t0, rounds = rundir.resolve(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
jax.process_index()  # the backend starts before the rounds do
for r in range(rounds):
    while time.time() < t0 + r / 2:  # a round every half second
        time.sleep(0.001)
    lock = rundir.RunLock(workdir)
    try:
        lock.__enter__()
    except errors.WorkdirError:
        continue
    with open(results, "a") as f:
        f.write(f"{r} {os.getpid()}\n")
    time.sleep(max(0.0, t0 + r / 2 + 0.4 - time.time()))  # hold while the others try
    if r % 2:
        lock.release()  # a clean end: the file is removed
    else:
        os.close(lock._fd)  # a killed run: its file stays, the OS lock goes with the process
"""


def test_exactly_one_of_many_simultaneous_starters_holds_the_lock(tmp_path):
    """8 processes try to take the lock at the same instant, 24 times: on a fresh folder (odd
    rounds follow a clean release) and over a dead run's lock file (even rounds follow a
    holder that let go without removing it). Each round has exactly one holder."""
    results = tmp_path / "holders"
    rounds, t0 = 24, time.time() + 8  # the processes start (import JAX) before t0
    competitors = [subprocess.Popen([sys.executable, "-c", COMPETITOR, str(tmp_path),
                                     str(results), str(t0), str(rounds)],
                                    env=dict(os.environ, JAX_PLATFORMS="cpu"))
                   for _ in range(8)]
    assert all(p.wait(timeout=300) == 0 for p in competitors)
    holders = [line.split()[0] for line in results.read_text().splitlines()]
    assert sorted(holders, key=int) == [str(r) for r in range(rounds)]


def test_a_live_runs_lock_is_kept_and_a_killed_runs_taken_over(tmp_path):
    holder_code = ("import sys, time\nfrom resnet_v2_jax import rundir\n"
                   "lock = rundir.RunLock(rundir.resolve(sys.argv[1])).__enter__()\n"
                   "print('held', flush=True)\ntime.sleep(60)\n")
    with subprocess.Popen([sys.executable, "-c", holder_code, str(tmp_path)], text=True,
                          stdout=subprocess.PIPE,
                          env=dict(os.environ, JAX_PLATFORMS="cpu")) as holder:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(errors.WorkdirError, match=f"in use by another run .pid {holder.pid} "):
            rundir.RunLock(rundir.resolve(str(tmp_path))).__enter__()
        holder.kill()
        holder.wait()
    assert (tmp_path / rundir.LOCK_FILE).exists()  # a killed run leaves its file
    with rundir.RunLock(rundir.resolve(str(tmp_path))) as lock:
        assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["token"] == lock.token
    assert not (tmp_path / rundir.LOCK_FILE).exists()


def test_heartbeat_locks_where_the_filesystem_has_no_file_locks(tmp_path, monkeypatch):
    """Object stores (and filesystems without flock): a lock of a live process on this host is
    kept, of a dead one taken over; another host's is kept while its heartbeat is fresh, taken
    over once it is STALE_AFTER_S old; a file being written is a run starting."""
    monkeypatch.setattr(rundir.RunLock, "_acquire_flock", lambda self: False)
    workdir = rundir.resolve(str(tmp_path))
    path = tmp_path / rundir.LOCK_FILE
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as sleeper:
        holder = rundir.RunLock(workdir)._record()
        path.write_text(json.dumps(dict(holder, pid=sleeper.pid)))
        with pytest.raises(errors.WorkdirError, match=f"pid {sleeper.pid}"):
            rundir.RunLock(workdir).__enter__()
        sleeper.kill()
        sleeper.wait()
        with rundir.RunLock(workdir) as lock:
            assert json.loads(path.read_text())["token"] == lock.token
        assert not path.exists()
    path.write_text("")
    with pytest.raises(errors.WorkdirError, match="in use by another run that is starting"):
        rundir.RunLock(workdir).__enter__()
    elsewhere = dict(holder, host="another-host", pid=1)
    path.write_text(json.dumps(elsewhere))
    with pytest.raises(errors.WorkdirError, match="another-host"):
        rundir.RunLock(workdir).__enter__()
    path.write_text(json.dumps(dict(elsewhere, heartbeat=time.time() - rundir.STALE_AFTER_S - 1)))
    with rundir.RunLock(workdir):
        pass


# --- finished runs -----------------------------------------------------------------------------

def test_rerunning_a_finished_run_keeps_its_results(copy_of_finished, array_dir):
    before = snapshot(copy_of_finished)
    results = strict_json(os.path.join(copy_of_finished, "results.json"))
    assert results["train"] and results["steps_this_run"] == 2 * N
    again = run(copy_of_finished, array_dir)
    assert f"already holds the final checkpoint (step {2 * N} of {2 * N})" in again.stderr
    assert f"step {2 * N}: test accuracy" in again.stdout
    shorter = run(copy_of_finished, array_dir, "--config.num_train_steps=4")
    assert f"is at step {2 * N}, past this config's 4 steps" in shorter.stderr
    assert snapshot(copy_of_finished) == before
    # Without results.json (say a crash right after the final checkpoint), the rerun rebuilds it
    # from the checkpoint: evaluation, and the training metrics saved beside the checkpoint.
    os.remove(os.path.join(copy_of_finished, "results.json"))
    run(copy_of_finished, array_dir)
    rebuilt = strict_json(os.path.join(copy_of_finished, "results.json"))
    assert rebuilt["step"] == 2 * N and rebuilt["train"] == results["train"]
    assert rebuilt["eval"] == results["eval"]


def test_a_rerun_with_nothing_to_train_still_keeps_only_keep_checkpoints(copy_of_finished,
                                                                          array_dir):
    again = run(copy_of_finished, array_dir, "--config.keep_checkpoints=1")
    assert "nothing to train" in again.stderr
    assert sorted(os.listdir(os.path.join(copy_of_finished, "checkpoints"))) == [str(2 * N)]


def test_a_resume_keeps_the_earlier_configs_and_names_what_changed(copy_of_finished, array_dir):
    """config.json is the config training runs with now; the config of every start that
    changed settings stays in config_history/<its first step>.json, and the resume says what
    changed in one warning."""
    first = strict_json(os.path.join(copy_of_finished, "config.json"))
    resumed = run(copy_of_finished, array_dir, f"--config.num_train_steps={3 * N}",
                  "--config.seed=1", "--config.nesterov=False")
    warning = next(line for line in resumed.stderr.splitlines() if "other settings" in line)
    assert (f"resuming at step {2 * N} with other settings than before: nesterov=True -> False, "
            f"num_train_steps={2 * N} -> {3 * N}, seed=0 -> 1") in warning
    history = os.path.join(copy_of_finished, "config_history")
    assert sorted(os.listdir(history)) == ["0.json", f"{2 * N}.json"]
    assert strict_json(os.path.join(history, "0.json")) == first
    current = strict_json(os.path.join(copy_of_finished, "config.json"))
    assert current == strict_json(os.path.join(history, f"{2 * N}.json"))
    assert (current["seed"], current["nesterov"]) == (1, False)
    again = run(copy_of_finished, array_dir, f"--config.num_train_steps={3 * N}",
                "--config.seed=1", "--config.nesterov=False")
    assert "other settings" not in again.stderr  # same settings: nothing new recorded
    assert sorted(os.listdir(history)) == ["0.json", f"{2 * N}.json"]


def test_rates_and_eta_ignore_a_wall_clock_that_jumps(tmp_path, array_dir, monkeypatch, caplog):
    """The wall clock jumps (NTP, a suspended VM): here an hour forward at every reading. The
    log's images/s and ETA come from the monotonic clock, so they stay those of the steps."""
    import re
    import time
    import types
    from configs import cifar10_quick
    from resnet_v2_jax import train
    config = cifar10_quick.get_config()
    config.model.depth = 8
    config.update(dict(input_pipeline="device_resident", array_dir=array_dir, batch_size=64,
                       eval_batch_size=40, num_train_steps=2 * N, checkpoint_every_steps=1000,
                       eval_every_steps=1000, log_every_steps=1))
    jumps = iter(range(1, 10**9))
    clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if k[0] != "_"})
    clock.time = lambda: time.time() + 3600 * next(jumps)  # the training loop's clock only
    monkeypatch.setattr(train, "time", clock)
    with caplog.at_level("INFO"):
        results = train.train_and_evaluate(config, str(tmp_path))
    assert results["wall_time_s"] < 3600
    speeds = re.findall(r"(\d+) img/s  ETA (\d+):(\d\d):(\d\d)", caplog.text)
    assert len(speeds) == 2 * N - 1, caplog.text[-3000:]  # every step but the first
    assert all(int(rate) > 0 and int(hours) == 0 for rate, hours, _, _ in speeds), speeds


def test_a_signal_during_evaluation_stops_there_and_labels_the_results(tmp_path, array_dir,
                                                                       monkeypatch):
    """SIGTERM while step N is evaluated: the run stops at step N (saved), and the figures are
    labelled with the step they evaluated, in results.json and on stdout."""
    from configs import cifar10_quick
    from resnet_v2_jax import cli, train
    config = cifar10_quick.get_config()
    config.model.depth = 8
    config.update(dict(input_pipeline="device_resident", array_dir=array_dir, batch_size=64,
                       eval_batch_size=40, num_train_steps=3 * N, checkpoint_every_steps=1000,
                       eval_every_steps=N, log_every_steps=1))
    evaluate = train.Evaluator.__call__

    def signalled(self, variables, *rest):
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the run: stop after this evaluation
        return evaluate(self, variables, *rest)
    monkeypatch.setattr(train.Evaluator, "__call__", signalled)
    results = train.train_and_evaluate(config, str(tmp_path))
    assert (results["step"], results["eval_step"], results["stop_signal"]) == (N, N, "SIGTERM")
    assert strict_json(tmp_path / "results.json")["eval_step"] == N
    assert os.listdir(tmp_path / "checkpoints") == [str(N)]
    cli.print_results(results, "cifar10", "test")


def test_final_checkpoint_is_written_before_evaluation(tmp_path, array_dir, monkeypatch):
    """If the final evaluation fails, the trained state is already on disk."""
    from configs import cifar10_quick
    from resnet_v2_jax import train
    config = cifar10_quick.get_config()
    config.model.depth = 8
    config.update(dict(input_pipeline="device_resident", array_dir=array_dir,
                       batch_size=64, eval_batch_size=40, num_train_steps=2,
                       checkpoint_every_steps=1000, eval_every_steps=1000))

    def broken_eval(self, variables, *rest):
        raise RuntimeError("evaluation failed")
    monkeypatch.setattr(train.Evaluator, "__call__", broken_eval)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train.train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "checkpoints" / "2" / "state").is_dir()
    assert not (tmp_path / rundir.LOCK_FILE).exists()


def test_results_json_is_strict():
    path = rundir.resolve(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"r{os.getpid()}.json"))
    rundir.write_json(path, {"loss": float("nan"), "eval": {"32": {"top1": np.float32(np.inf)}},
                             "n": np.int64(3)})
    assert strict_json(path) == {"loss": None, "eval": {"32": {"top1": None}}, "n": 3}
    os.remove(path)


# --- bad data: refused before anything is written ----------------------------------------------

def _arrays(folder, train_images, train_labels, test_images=None, test_labels=None,
            train_extra=None):
    rng = np.random.RandomState(1)
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, "cifar10_train.npz"),
             **{"image": train_images, "label": train_labels, **(train_extra or {})})
    if test_images is None:
        test_images = rng.randint(0, 256, (100, 32, 32, 3)).astype(np.uint8)
        test_labels = rng.randint(0, 10, 100)
    np.savez(os.path.join(folder, "cifar10_test.npz"), image=test_images, label=test_labels)
    return folder


_IMAGES = np.random.RandomState(0).randint(0, 256, (512, 32, 32, 3)).astype(np.uint8)
_LABELS = np.random.RandomState(0).randint(0, 10, 512)
BAD_DATA = [
    ("label_10", dict(train_labels=np.where(np.arange(512) == 7, 10, _LABELS)),
     "cifar10_train.npz: label 10 at index 7 is outside [0, 10)"),
    ("label_255", dict(train_labels=np.where(np.arange(512) >= 5, 255, _LABELS)),
     "label 255 at index 5"),
    ("label_minus_1", dict(train_labels=np.where(np.arange(512) == 3, -1, _LABELS)),
     "label -1 at index 3"),
    ("cifar100_labels", dict(train_labels=np.arange(512) % 100),
     "label 10 at index 10 is outside [0, 10) for cifar10 (452 such labels)"),
    ("eval_labels", dict(test_images=_IMAGES[:100], test_labels=np.full(100, 12)),
     "cifar10_test.npz: label 12 at index 0"),
    ("float_images", dict(train_images=_IMAGES.astype(np.float32) / 255),
     "images are float32, expected uint8"),
    ("grayscale", dict(train_images=_IMAGES[..., 0]),
     "shape (32, 32) per example, expected (height, width, 3)"),
    ("fewer_labels", dict(train_labels=_LABELS[:500]),
     "512 images but labels of shape (500,)"),
    ("float_labels", dict(train_labels=_LABELS.astype(np.float32)),
     "labels are float32, expected integers"),
    ("channels_first", dict(train_images=np.transpose(_IMAGES, (0, 3, 1, 2))),
     "shape (3, 32, 32) per example, channels first; expected (height, width, 3)"),
    ("fewer_than_a_batch", dict(train_images=_IMAGES[:40], train_labels=_LABELS[:40]),
     "cifar10 train holds 40 training examples, fewer than one batch of 64"),
]


@pytest.mark.parametrize("name, arrays, message", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_is_refused_in_one_line_before_anything_is_written(tmp_path, name, arrays,
                                                                    message):
    """The first case through the command line (one `error:` line, exit code 1); the others
    in-process, through the `train_and_evaluate` it calls: one of the package's own errors
    (which `cli.guard` prints as that line), its message one line."""
    folder = _arrays(str(tmp_path / "arrays"), **{"train_images": _IMAGES,
                                                   "train_labels": _LABELS, **arrays})
    if name == BAD_DATA[0][0]:
        assert_one_error_line(run(str(tmp_path / "run"), folder, check=False), message)
    else:
        with pytest.raises(errors.DataError, match=re.escape(message)) as refused:
            train.train_and_evaluate(quick_config(folder), str(tmp_path / "run"))
        assert "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists()


def test_npz_without_labels_or_truncated_is_refused(tmp_path, array_dir):
    folder = str(tmp_path / "arrays")
    shutil.copytree(array_dir, folder)
    path = os.path.join(folder, "cifar10_train.npz")
    np.savez(path, image=_IMAGES)
    assert_one_error_line(run(str(tmp_path / "run"), folder, check=False),
                          "cifar10_train.npz has no label array")
    device_input.write_arrays(folder, "cifar10", "train", _IMAGES, _LABELS)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert_one_error_line(run(str(tmp_path / "run"), folder, check=False),
                          "cifar10_train.npz cannot be read")
    device_input.write_arrays(folder, "cifar10", "train", _IMAGES, _LABELS)
    with open(path, "r+b") as f:  # flipped bits inside the pixels: the zip checksum says so
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 64)
    assert_one_error_line(run(str(tmp_path / "run"), folder, check=False),
                          "cifar10_train.npz cannot be read (BadZipFile: the checksum of "
                          "image.npy does not match); it is damaged or truncated: write it again")
    assert not (tmp_path / "run").exists()


def test_a_bad_init_from_source_is_refused_before_the_workdir_exists(tmp_path, array_dir,
                                                                     finished):
    random_npz = tmp_path / "random.npz"
    np.savez(random_npz, weights=np.array([{"a": 1}], dtype=object))
    cases = [(tmp_path / "missing", "does not exist: give a run's workdir"),
             (random_npz, f"{random_npz} is not a readable state dict of arrays"),
             (finished, "is another network (stage_sizes [1, 1, 1] there vs [2, 2, 2] here)")]
    for source, message in cases:
        result = run(str(tmp_path / "run"), array_dir, f"--config.init_from={source}",
                     "--config.model.depth=14", check=False)
        assert_one_error_line(result, message)
        assert not (tmp_path / "run").exists()


def test_a_damaged_config_json_is_named(copy_of_finished, array_dir):
    from cli_runs import ROOT, environment
    with open(os.path.join(copy_of_finished, "config.json"), "w") as f:
        f.write("\x00garbage")
    result = subprocess.run([sys.executable, "-m", "resnet_v2_jax.evaluate",
                             f"--workdir={copy_of_finished}"], cwd=ROOT, env=environment(),
                            text=True, capture_output=True, timeout=300)
    assert_one_error_line(result, f"{copy_of_finished}/config.json is not a config a run wrote "
                          "(JSONDecodeError")


def test_tfds_metadata_checks(tfds_data_dir, tmp_path):
    """The tfds pipeline checks splits, image size and classes from metadata, and an unprepared
    manual-download dataset (ImageNet) fails at once without creating folders."""
    from resnet_v2_jax import base_config
    from resnet_v2_jax import inputs
    config = base_config.cifar("cifar10", 20)
    config.data_dir = tfds_data_dir
    assert inputs.check_data(config) == 50_000
    config.train_split = "train[:90%]"
    assert inputs.check_data(config) == 45_000
    config.image_size = 48
    with pytest.raises(errors.DataError, match="images are 32x32, but the config has "
                                             "image_size=48"):
        inputs.check_data(config)
    config.image_size, config.eval_split = 32, "validation"
    with pytest.raises(errors.DataError, match="has no split 'validation'"):
        inputs.check_data(config)
    imagenet = base_config.imagenet(50)
    imagenet.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="needs a manual download"):
        inputs.check_data(imagenet)
    assert not (tmp_path / "tfds").exists()


# --- bad configs and workdirs: one line, nothing created ---------------------------------------

def _write(path, text):
    path.write_text(text)
    return str(path)


def test_bad_config_files_and_overrides_are_one_line(tmp_path, array_dir):
    cases = [
        (dict(config=tmp_path / "missing.py"), "config file", 2),
        (dict(config=_write(tmp_path / "syntax.py", "x = (")), "syntax error", 2),
        (dict(config=_write(tmp_path / "empty.py", "X = 1")), "has no get_config()", 2),
        (dict(overrides=["--config.foo=1"]), "unknown config key 'foo'", 2),
        (dict(overrides=["--config.model.foo=1"]), "unknown config key 'model.foo'", 2),
        (dict(overrides=["--config.steps_per_eval=0"]), "steps_per_eval=0 is not allowed", 1),
        (dict(overrides=["--config.image_size=48"]), "image_size=48", 1),
    ]
    workdir = tmp_path / "run"
    for case, message, code in cases:
        result = run(str(workdir), array_dir, *case.get("overrides", []), check=False,
                     config=case.get("config", CONFIG))
        assert_one_error_line(result, message, returncode=code)
        assert not workdir.exists(), case


def test_unusable_workdirs_are_one_line(tmp_path, array_dir):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for workdir, message in ((a_file, "it is a file"), (a_file / "sub", "Not a directory")):
        assert_one_error_line(run(str(workdir), array_dir, check=False), message)
    assert a_file.read_text() == "keep me"
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(read_only)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        assert_one_error_line(run(str(read_only / "run"), array_dir, check=False),
                              "Read-only file system")
    finally:
        subprocess.run(["umount", str(read_only)], check=True)


def tmpfs(folder, size):
    """Mounts a tmpfs of `size` on `folder` (root only, else the test is skipped)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    return folder


def test_a_full_disk_is_one_line_and_leaves_no_lock(tmp_path, array_dir):
    """A disk full at the start (the lock cannot be written) and a disk without room for the
    next checkpoint: one line each, and nothing half-written is left."""
    full = tmpfs(tmp_path / "full", "64k")
    try:
        (full / "run").mkdir()
        try:  # fill it to the last block
            with open(full / "filler", "wb") as f:
                while True:
                    f.write(b"x" * 4096)
                    f.flush()
        except OSError:
            pass
        result = run(str(full / "run"), array_dir, check=False)
        assert_one_error_line(result, f"cannot write {full}/run/run.lock: No space left on device")
        assert os.listdir(full / "run") == []
    finally:
        subprocess.run(["umount", str(full)], check=True)
    small = tmpfs(tmp_path / "small", "1500k")  # ResNet-20's first checkpoint needs 3.2 MiB
    try:
        result = run(str(small / "run"), array_dir, check=False)
        assert_one_error_line(result, f"no room for checkpoint {N} in {small}/run/checkpoints: "
                              "it needs about")
        assert not (small / "run" / "checkpoints").exists()  # made by the first save
        assert not (small / "run" / rundir.LOCK_FILE).exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_failed_checkpoint_write_is_one_line(tmp_path, monkeypatch):
    """Orbax's errors from a background write (here a full disk) reach the user as one line
    naming the folder and the cause; a second report at close is not raised."""
    checkpoints = checkpoint.Checkpoints(tmp_path, models.cifar_resnet(8, block="basic"))

    def failing(*args, **kwargs):
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state.1.0.trace" in OCDBT '
                         "database: Failed to write 609477 bytes to file 8: No space left on "
                         "device [os_error_code='28']")
    monkeypatch.setattr(checkpoints.manager, "save", failing)
    monkeypatch.setattr(checkpoints.manager, "wait_until_finished", failing)
    with pytest.raises(errors.CheckpointError, match=r"^writing a checkpoint \(step 2\) in "
                       rf"{tmp_path}/checkpoints failed: No space left on device; fix that"):
        checkpoints.save(2, {"x": np.zeros(3)})
    checkpoints.close()  # the failure was reported already


def test_outputs_that_cannot_be_written_are_refused_before_the_work(tmp_path, array_dir,
                                                                     finished):
    """evaluate --output and export --out: a folder, a path under a file or a read-only place
    ends in one line before anything is evaluated or read."""
    from cli_runs import ROOT, environment
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    commands = [
        (["resnet_v2_jax.evaluate", f"--workdir={finished}", f"--output={tmp_path}"],
         f"cannot write --output={tmp_path}: it is a folder"),
        (["resnet_v2_jax.evaluate", f"--workdir={finished}", f"--output={a_file}/r.json"],
         f"cannot write --output={a_file}/r.json: {a_file} is a file, not a folder"),
        (["resnet_v2_jax.export", f"--workdir={finished}", f"--out={a_file}/w.safetensors"],
         f"cannot write --out={a_file}/w.safetensors: {a_file} is a file, not a folder"),
        (["resnet_v2_jax.export", f"--workdir={finished}", f"--out={tmp_path}/d.safetensors"],
         f"cannot write --out={tmp_path}/d.safetensors: it is a folder"),
    ]
    (tmp_path / "d.safetensors").mkdir()
    for command, message in commands:
        result = subprocess.run([sys.executable, "-m", *command, f"--array_dir={array_dir}"
                                 if "evaluate" in command[0] else "--verbosity=0"],
                                cwd=ROOT, env=environment(), text=True, capture_output=True,
                                timeout=300)
        assert_one_error_line(result, message)
    assert a_file.read_text() == "keep me"


def test_configs_of_older_runs_read_with_the_behaviour_they_had(tmp_path):
    """A run saved before a key existed reads with the value that reproduces what it did;
    every such key is a key of today's config."""
    from resnet_v2_jax import base_config
    config = base_config.get_config()
    assert set(configuration.KEYS_ADDED_LATER) <= set(config.keys())
    older = {k: v for k, v in json.loads(config.to_json()).items()
             if k not in configuration.KEYS_ADDED_LATER}
    (tmp_path / "config.json").write_text(json.dumps(older))
    read = configuration.read(str(tmp_path))
    assert {k: read[k] for k in configuration.KEYS_ADDED_LATER} == \
        configuration.KEYS_ADDED_LATER
    assert read.antialias  # what runs did before the key


@pytest.mark.parametrize("arch, dropped, stride_on", [("cifar", "stem_norm", "1x1"),
                                                      ("imagenet", "block", "3x3")])
def test_release_0_1_configs_move_their_network_keys_into_the_model_section(arch, dropped,
                                                                            stride_on):
    """Release 0.1 kept the network's keys at the top level, with settings the network
    ignored (ImageNet's block, CIFAR's stem_norm, stride_on "" for the default)."""
    flat = {"dataset": "cifar10", "arch": arch, "depth": 50 if arch == "imagenet" else 20,
            "block": "basic", "stem_norm": "before_pool", "stride_on": "", "unit": "original",
            "scan_units": True, "augment_on_device": True, "batch_size": 64}
    migrated = configuration.migrate(flat)
    assert dropped not in migrated["model"] and migrated["model"]["stride_on"] == stride_on
    assert migrated["model"]["unit"] == "original" and migrated["model"]["scan_units"]
    assert "augment_on_device" not in migrated and "depth" not in migrated
    assert migrated["batch_size"] == 64
