"""gs:// workdirs and arrays, against a local Cloud Storage server (fake-gcs-server, started by
conftest's `gcs_server`): the run lock's generation preconditions, and the command lines (train,
preemption, SIGKILL and resume, evaluate, export, analyze, plot, init_from) reading and writing
a bucket through the clients users run: gcsfs (etils.epath), TensorStore (Orbax's arrays),
google-cloud-storage (the lock) and tensorboardX (event files). One run trains once and the
command tests read it."""
import json
import random
import signal
import subprocess
import sys
import threading
import time

import fsspec
import numpy as np
import pytest
from etils import epath

from cli_runs import (N, ROOT, assert_one_error_line, assert_only_our_info_lines,
                      assert_same_params, environment, run, saved_state, start)
from resnet_v2_jax import device_input, errors, rundir

BUCKET = "runs"


@pytest.fixture(scope="module")
def bucket(gcs_server):
    from google.cloud import storage
    return storage.Client().create_bucket(BUCKET)


def lock_record(bucket, folder):
    """The lock object's record, or None without one (a new handle: one that has read a
    generation reads that generation only)."""
    blob = bucket.blob(f"{folder}/{rundir.LOCK_FILE}")
    return json.loads(blob.download_as_text()) if blob.exists() else None


def objects(prefix):
    """The names of the objects under gs://BUCKET/<prefix>, read now (no listing cache)."""
    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    return {name.removeprefix(f"{BUCKET}/{prefix}/") for name in fs.find(f"{BUCKET}/{prefix}")}


def test_gs_paths_without_the_clients_are_one_line(monkeypatch):
    find_spec = rundir.importlib.util.find_spec
    monkeypatch.setattr(rundir.importlib.util, "find_spec",
                        lambda name: None if name == "gcsfs" else find_spec(name))
    with pytest.raises(errors.WorkdirError, match=r"^cannot use gs://b/r: gs:// paths need gcsfs "
                                                  r"and google-cloud-storage; pip install "):
        rundir.resolve("gs://b/r")
    assert str(rundir.resolve("/tmp/r")) == "/tmp/r"


# --- the run lock ------------------------------------------------------------------------------

def race(path, n=8):
    """`n` threads enter RunLock(path) at once; returns (holders, refusals)."""
    barrier, held, refused = threading.Barrier(n), [], []

    def enter():
        lock = rundir.RunLock(path)
        barrier.wait()
        try:
            lock.__enter__()
            held.append(lock)
        except errors.WorkdirError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=enter) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return held, refused


def test_exactly_one_of_many_takes_a_gs_lock_fresh_or_from_a_dead_run(bucket):
    """Cloud Storage creates the lock object for one writer only (ifGenerationMatch=0) and
    replaces a dead run's lock for one writer only (ifGenerationMatch=<generation read>)."""
    workdir = epath.Path(f"gs://{BUCKET}/locked")
    for _ in range(3):
        held, refused = race(workdir)
        assert len(held) == 1 and len(refused) == 7, refused
        assert all("is in use by another run (pid" in e for e in refused), refused
        assert lock_record(bucket, "locked")["token"] == held[0].token
        # written once, by the holder: the others' writes were refused by the store
        assert bucket.get_blob(f"locked/{rundir.LOCK_FILE}").generation == held[0]._generation
        held[0].release()
        assert lock_record(bucket, "locked") is None
    dead = dict(rundir.RunLock(workdir)._record(), host="another-host", pid=1,
                heartbeat=time.time() - rundir.STALE_AFTER_S - 1)
    for _ in range(3):
        bucket.blob(f"locked/{rundir.LOCK_FILE}").upload_from_string(json.dumps(dead))
        held, refused = race(workdir)
        assert len(held) == 1 and len(refused) == 7, refused
        assert lock_record(bucket, "locked")["token"] == held[0].token
        held[0].release()


def test_a_live_gs_lock_is_kept_and_names_its_holder(bucket):
    workdir = epath.Path(f"gs://{BUCKET}/live")
    with rundir.RunLock(workdir) as lock:
        with pytest.raises(errors.WorkdirError, match=r"^gs://runs/live is in use by another run "
                                                      rf"\(pid {lock._record()['pid']} on "):
            rundir.RunLock(workdir).__enter__()
        assert lock._refresh()  # the heartbeat: a write at the generation this run wrote last
        assert lock_record(bucket, "live")["token"] == lock.token
    assert lock_record(bucket, "live") is None


def test_a_gs_lock_taken_over_is_not_refreshed_or_removed_by_its_old_holder(bucket):
    workdir = epath.Path(f"gs://{BUCKET}/taken")
    with rundir.RunLock(workdir) as lock:
        bucket.blob(f"taken/{rundir.LOCK_FILE}").upload_from_string('{"token": "another"}')
        assert not lock._refresh()
    assert lock_record(bucket, "taken") == {"token": "another"}


# --- the command lines on a bucket --------------------------------------------------------------

@pytest.fixture(scope="module")
def gcs_arrays(bucket, array_dir):
    """`array_dir`'s splits written to gs://runs/arrays by device_input.write_arrays."""
    folder = f"gs://{BUCKET}/arrays"
    for split in ("train", "test"):
        with np.load(device_input.array_path(array_dir, "cifar10", split)) as data:
            device_input.write_arrays(folder, "cifar10", split, data["image"], data["label"])
    return folder


@pytest.fixture(scope="module")
def finished(gcs_arrays):
    """gs://runs/finished: a 2N-step run, of two started at once on that workdir (the other is
    refused); returns (workdir, both CompletedProcesses)."""
    workdir = f"gs://{BUCKET}/finished"
    processes = [start(workdir, gcs_arrays) for _ in range(2)]
    done = [subprocess.CompletedProcess(p.args, None, *p.communicate(timeout=600))
            for p in processes]
    for result, process in zip(done, processes):
        result.returncode = process.returncode
    return workdir, done


@pytest.mark.slow  # command lines on a trained gs:// run
def test_of_simultaneous_starters_on_one_gs_workdir_exactly_one_trains(finished):
    workdir, done = finished
    trained = [r for r in done if r.returncode == 0]
    assert len(trained) == 1, [r.stderr[-2000:] for r in done]
    for refused in (r for r in done if r.returncode != 0):
        assert_one_error_line(refused, f"{workdir} is in use by another run (pid ")
    assert "resuming" not in trained[0].stderr
    assert_only_our_info_lines(trained[0])  # no client library's lines in the log


@pytest.mark.slow  # command lines on a trained gs:// run
def test_a_gs_run_leaves_its_results_config_history_checkpoints_and_events(finished):
    names = objects("finished")
    assert {"config.json", "config_history/0.json", "results.json"} <= names
    assert {f"checkpoints/{s}/commit_success.txt" for s in (N, 2 * N)} <= names
    assert [n for n in names if n.startswith("events.out.tfevents.")]
    assert rundir.LOCK_FILE not in names  # released at the end
    results = json.loads(epath.Path(finished[0], "results.json").read_text())
    assert results["step"] == 2 * N and results["eval"]


@pytest.fixture(scope="module")
def commands(finished, tmp_path_factory):
    """evaluate, plot, analyze and export of gs://runs/finished, run at once (they only read
    it); {name: (CompletedProcess, its output)}."""
    workdir, out = finished[0], tmp_path_factory.mktemp("analysis")
    arguments = {
        "evaluate": [f"--workdir={workdir}"],
        "plot": [f"--workdir={workdir}", f"--out=gs://{BUCKET}/plots/curves.png"],
        "analyze": ["--config=configs/ablation.py:depth=8,unit=full_preact",
                    f"--workdir={workdir}", "--batch=4", f"--out={out}"],
        "export": [f"--workdir={workdir}", f"--out=gs://{BUCKET}/exported/weights.safetensors"],
    }
    processes = {name: subprocess.Popen([sys.executable, "-m", f"resnet_v2_jax.{name}", *args],
                                        cwd=ROOT, text=True, env=environment(1),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for name, args in arguments.items()}
    done = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    outputs = {"evaluate": f"{workdir}/eval_results.json", "plot": arguments["plot"][1][6:],
               "analyze": str(out / "analysis.json"), "export": arguments["export"][1][6:]}
    return {name: (done[name], outputs[name]) for name in arguments}


def succeeded(commands, name):
    result, output = commands[name]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return output


@pytest.mark.slow  # command lines on a trained gs:// run
def test_evaluate_a_gs_run_reproduces_its_error(finished, commands):
    output = succeeded(commands, "evaluate")
    logged = json.loads(epath.Path(finished[0], "results.json").read_text())["eval"]
    evaluated = json.loads(epath.Path(output).read_text())["eval"]
    assert evaluated.keys() == logged.keys()
    for crop in logged:
        assert evaluated[crop]["top1_error"] == logged[crop]["top1_error"]


@pytest.mark.slow  # command lines on a trained gs:// run
def test_plot_reads_the_event_files_of_a_gs_run(commands):
    """TensorBoard's reader (without TensorFlow: through fsspec) reads the event files that
    tensorboardX wrote to the bucket, and the figure is written there."""
    assert epath.Path(succeeded(commands, "plot")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # command lines on a trained gs:// run
def test_analyze_a_gs_run(finished, commands):
    analysis, = json.loads(epath.Path(succeeded(commands, "analyze")).read_text())["results"]
    assert f"step {2 * N} in {finished[0]}" in analysis["weights"]


@pytest.fixture(scope="module")
def exported(commands):
    return succeeded(commands, "export")


@pytest.mark.slow  # command lines on a trained gs:// run
@pytest.mark.parametrize("source", ["export", "run"])
def test_init_from_a_gs_export_or_run(finished, exported, gcs_arrays, source):
    from_path = exported if source == "export" else finished[0]
    workdir = f"gs://{BUCKET}/init_from_{source}"
    result = run(workdir, gcs_arrays, f"--config.init_from={from_path}",
                 "--config.num_train_steps=1")
    assert from_path in result.stderr
    assert_only_our_info_lines(result)
    assert json.loads(epath.Path(workdir, "results.json").read_text())["step"] == 1


def read_until(process, text):
    """Lines of the process's stderr up to one that contains `text`."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        if text in line:
            return "".join(lines)
    raise AssertionError(f"{text!r} never came:\n{''.join(lines)[-3000:]}")


@pytest.mark.slow  # command lines on a trained gs:// run
def test_preempted_killed_and_resumed_gs_run_is_bitwise_the_uninterrupted_one(finished,
                                                                               gcs_arrays):
    """SIGTERM after the first step: saved, exit 143; resumed and SIGKILLed at a random moment
    (perhaps while it saves); resumed again to the end: the weights of the uninterrupted run."""
    workdir = f"gs://{BUCKET}/interrupted"
    process = start(workdir, gcs_arrays)
    seen = read_until(process, f"step 1/{2 * N}")
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=600)
    stderr = seen + rest
    results = json.loads(epath.Path(workdir, "results.json").read_text())
    stopped = results["step"]
    assert 1 <= stopped < 2 * N and results["preempted"]
    assert_one_error_line(subprocess.CompletedProcess(process.args, process.returncode, "", stderr),
                          f"preempted (SIGTERM) at step {stopped} of {2 * N}", returncode=143)

    process = start(workdir, gcs_arrays)
    read_until(process, f"resuming from step {stopped}")
    delay = random.uniform(0, 3)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=600)

    resumed = run(workdir, gcs_arrays)
    assert "resuming from step" in resumed.stderr, delay
    assert_same_params(saved_state(workdir, 2 * N)[0], saved_state(finished[0], 2 * N)[0])
