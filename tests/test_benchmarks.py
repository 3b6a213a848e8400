"""benchmarks/accelerator.py in its smoke mode: every part runs, tiny, without TensorFlow.

No figure is asserted (this CPU is shared and noisy); what is checked is that every part's code
path works, that the FLOP count is the model's, and that the JSON and markdown are written.
"""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cli_runs import ROOT, environment

# Command-line runs and training: outside the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow


# One part of each kind: a single run (unrolled; test_accelerator_variants_and_profile runs it
# too, its programs then come from the compilation cache), a scanned and rematerialised one,
# several runs, and the PyTorch peer. The other parts differ from these in depth, batch, unit or
# network and input shape only (the ImageNet networks' train steps compile in
# tests/test_configs.py); `--smoke` alone runs every part.
SMOKE_PARTS = ["cifar110_b128", "cifar1001_b128", "cifar110_b128_x8_vmap", "timm_resnetv2_50"]


def test_accelerator_smoke_runs_each_kind_of_part_without_tensorflow(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "accelerator.py")
    done = subprocess.run([sys.executable, script, "--smoke", f"--out={tmp_path}",
                           f"--parts={','.join(SMOKE_PARTS)}"], cwd=tmp_path,
                          env=environment(1), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "accelerator.json").read_text())["results"]
    assert list(results) == SMOKE_PARTS
    for name, result in results.items():
        if name.startswith("timm"):  # no torch/timm/CUDA here: skipped with its reason
            assert "train" in result or "no PyTorch peer" in result["skipped"]
            continue
        assert "error" not in result, (name, result)
        assert result["train"]["img_per_s"] > 0 and result["eval"]["img_per_s"] > 0
        assert result["mfu"] is None  # a CPU has no listed peak
    # FLOPs are per run, and the unrolled network's where a part runs scanned
    # (tests/test_preflight.py checks the count).
    runs, single = results["cifar110_b128_x8_vmap"], results["cifar110_b128"]
    assert (runs["runs"], runs["runs_layout"]) == (8, "vmap")
    assert runs["gflop_per_step"] == single["gflop_per_step"]  # per run
    assert runs["per_run_img_per_s"] == runs["train"]["img_per_s"] / 8
    assert (results["cifar1001_b128"]["layout"], single["layout"]) == ("scan+remat", "unrolled")
    table = (tmp_path / "accelerator.md").read_text()
    assert "| cifar1001_b128 |" in table and "SMOKE" in table


def test_accelerator_variants_and_profile(tmp_path):
    """Each XLA-flag preset runs in its own process with its flags; the PyTorch peer runs once;
    --profile leaves a perfetto trace per JAX part and says what it found in it."""
    script = os.path.join(ROOT, "benchmarks", "accelerator.py")
    done = subprocess.run([sys.executable, script, "--smoke", f"--out={tmp_path}",
                           "--parts=cifar110_b128,timm_resnetv2_50",
                           "--variants=default,no_command_buffers", "--profile"], cwd=tmp_path,
                          env=environment(1), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "accelerator.json").read_text())["results"]
    assert list(results) == ["cifar110_b128", "cifar110_b128@no_command_buffers",
                             "timm_resnetv2_50"]
    base = environment(1)["XLA_FLAGS"]  # the environment's flags stay, the preset's are added
    assert results["cifar110_b128"]["xla_flags"] == base
    assert results["cifar110_b128@no_command_buffers"]["xla_flags"] == \
        f"{base} --xla_gpu_enable_command_buffer="
    for key, folder in (("cifar110_b128", "cifar110_b128"),
                        ("cifar110_b128@no_command_buffers", "cifar110_b128-no_command_buffers")):
        profile = results[key]["profile"]
        assert profile["trace"].startswith(f"traces/{folder}/")
        assert (tmp_path / profile["trace"]).is_file()
        assert "no device rows" in profile["note"]  # a CPU's XLA work runs on host threads
    table = (tmp_path / "accelerator.md").read_text()
    assert f"no_command_buffers: `{base} --xla_gpu_enable_command_buffer=`" in table
    assert "Profile of cifar110_b128@no_command_buffers" in table

    bad = subprocess.run([sys.executable, script, "--smoke", "--variants=fast"], cwd=tmp_path,
                         env=environment(1), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown variant(s) fast; choose from default" in bad.stderr


def test_trace_summary_reads_a_gpu_trace(tmp_path):
    """trace_summary: the device's Stream rows are the kernels (per step, longest first);
    other device rows are listed; host rows are not counted."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import trace_summary  # pylint: disable=import-outside-toplevel

    def meta(kind, pid, name, tid=None):
        event = {"ph": "M", "pid": pid, "name": f"{kind}_name", "args": {"name": name}}
        return event if tid is None else {**event, "tid": tid}

    def run(name, pid, tid, dur):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": 0.0, "dur": dur, "name": name}

    events = [meta("process", 1, "/host:CPU"), meta("thread", 1, "python", 7),
              meta("process", 2, "/device:GPU:0"), meta("thread", 2, "Stream #13(Compute)", 1),
              meta("thread", 2, "XLA Ops", 2), run("PjitFunction(step)", 1, 7, 9000.0)]
    for _ in range(2):  # two steps
        events += [run("convolution.3", 2, 1, 400.0), run("loop_fusion", 2, 1, 50.0),
                   run("loop_fusion", 2, 1, 30.0), run("convolution.3", 2, 2, 400.0)]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)
    summary = trace_summary.summarize(str(path), steps=2)
    assert summary["kernels_per_step"] == 3 and summary["kernel_ms_per_step"] == 0.48
    assert summary["top_kernels"] == [
        {"name": "convolution.3", "per_step": 1, "ms_per_step": 0.4},
        {"name": "loop_fusion", "per_step": 2, "ms_per_step": 0.08}]
    assert summary["rows"] == {
        "/device:GPU:0 / Stream #13(Compute)": {"events_per_step": 3, "ms_per_step": 0.48},
        "/device:GPU:0 / XLA Ops": {"events_per_step": 1, "ms_per_step": 0.4}}
    printed = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "trace_summary.py"),
                              str(path), "--steps=2"], capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith("Kernels: 3 per step, 0.48 ms of kernel time per step.")
    assert "| `convolution.3` | 1 | 0.400 |" in printed.stdout


def test_unrolled_parts_start_from_the_scanned_twins_weights():
    """The benchmark's initial state has the unrolled train state's structure, shapes and
    dtypes; its weights are the scanned network's initial weights, converted."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import accelerator  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    from resnet_v2_jax import parallel, recipe, unit_layout  # pylint: disable=import-outside-toplevel

    config = accelerator.part_config(accelerator.PARTS["cifar164_b128"], smoke=True)
    assert not config.model.scan_units
    dp = parallel.DataParallel(config.parallelism, config.bn_group_size, jax.devices()[:1])
    setup = recipe.build(config, dp)
    state = dp.to_host(accelerator.initial_state(config, setup, dp))
    reference = jax.eval_shape(lambda: setup.init_state(0))
    assert jax.tree.structure(state) == jax.tree.structure(reference)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == \
        [(x.shape, x.dtype) for x in jax.tree.leaves(reference)]
    config.model.scan_units = True
    twin = recipe.build(config, dp).init_state(0)
    converted = unit_layout.scanned_to_unrolled({"params": twin.run(0).params})["params"]
    jax.tree.map(np.testing.assert_array_equal, state.run(0).params, converted)
