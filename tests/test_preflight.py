"""The preflight command: a config compiled for a named TPU slice on this CPU (libtpu's
compile-only devices), its report, its verdict, and its refusals. Compiles run where libtpu is
installed (the [tpu] extra, part of the test extra); the GPU compile where JAX's CUDA plugin is."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from resnet_v2_jax import base_config, batching, parallel, preflight, recipe, targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "cifar10_quick.py")
# The smallest CIFAR network: the compiler's time, not the network's, is what a test waits for.
TINY = ("--config.model.depth=8", "--config.input_pipeline=device_resident")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install '.[tpu]')")


def preflight_command(out, *args, env=None):
    environment = dict(os.environ, PYTHONPATH=ROOT)
    environment.update(env or {})
    environment.pop("JAX_PLATFORMS", None)     # the command itself keeps this machine on CPU
    environment.pop("XLA_FLAGS", None)         # the target's compile as a user's (conftest)
    return subprocess.run([sys.executable, "-m", "resnet_v2_jax.preflight", f"--out={out}",
                           *args], cwd=ROOT, text=True, capture_output=True, timeout=900,
                          env=environment)


@pytest.fixture(scope="module")
def pod_report(tmp_path_factory):
    """v4-16: 8 chips in 2 hosts, BN groups of 2 devices; global batch 64."""
    out = tmp_path_factory.mktemp("preflight")
    result = preflight_command(out, f"--config={CONFIG}", "--target=v4-16", *TINY,
                               "--config.batch_size=64", "--config.eval_batch_size=64",
                               "--config.bn_group_size=2")
    return result, out


@pytest.mark.slow
@needs_libtpu
def test_a_pod_slice_compiles_as_one_program_and_reports_it(pod_report):
    result, out = pod_report
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip() == "", "libtpu's or JAX's noise reached the user"
    report = json.load(open(out / "cifar10_quick_v4-16.json"))
    assert report["fits"] and report["margin_bytes"] > 0
    assert report["devices"].startswith("shard_map over 8 devices (4 local, 2 processes), "
                                        "platform tpu, BN groups of 2 device(s)")
    memory = report["train"]["memory"]
    assert memory["total"] == (memory["arguments"] + memory["outputs"] - memory["aliased"]
                               + memory["temporaries"] + memory["code"]) > 0
    assert memory["aliased"] > 0, "the train step no longer donates its state"
    assert set(report["eval"]) == {"32"}
    assert report["flops_per_step"] > 0 and report["bound_img_per_s"] > 0
    structure = report["train"]["structure"]
    assert structure["fusions"] > 0 and structure["convolutions"] > 0
    text = (out / "cifar10_quick_v4-16.md").read_text()
    assert text == result.stdout and "**fits**" in text and "lower bound" in text


@pytest.mark.slow
@needs_libtpu
def test_the_compiled_reductions_are_the_ones_the_config_asks_for(pod_report):
    """BN statistics within groups of 2 devices, gradients and metrics over all 8, the running
    BN averages over all 8 (several groups): no other collective."""
    result, out = pod_report
    collectives = json.load(open(out / "cifar10_quick_v4-16.json"))["train"]["structure"][
        "collectives"]
    assert set(collectives) == {"all-reduce over 2", "all-reduce over 8"}, collectives
    # depth 8 has 1 unit per stage: BN layers = 3 units x 2 + the final one = 7, each reducing
    # mean and mean of squares within its group (XLA may combine them, never drop them).
    assert collectives["all-reduce over 2"]["count"] >= 1
    assert collectives["all-reduce over 8"]["bytes"] > collectives["all-reduce over 2"]["bytes"]


@pytest.mark.slow
@needs_libtpu
def test_the_batch_arithmetic_is_what_the_target_s_processes_compute(pod_report):
    result, out = pod_report
    config = json.load(open(out / "cifar10_quick_v4-16.json"))["config"]
    target = targets.get("v4-16")
    assert config["per_process_batch"] == batching.local_batch_size(
        64, target.num_processes, target.num_devices) == 32
    assert config["per_device_batch"] == 64 // target.num_devices == 8


@pytest.mark.slow
@needs_libtpu
def test_a_program_that_cannot_fit_is_reported_with_what_to_change(tmp_path):
    # 65,536 images per v5e chip of a depth-8 network in float32: over its 16 GiB (the
    # compiler refuses it; 32,768 fit, 5.4 GiB at 16,384). --max_batch in multiples of 65,536
    # tries nothing more and finds none (its search: the test below).
    result = preflight_command(tmp_path, f"--config={CONFIG}", "--target=v5e-1", *TINY,
                               "--config.batch_size=65536", "--config.eval_batch_size=64",
                               "--max_batch", "--batch_multiple=65536")
    assert result.returncode == preflight.DOES_NOT_FIT, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cifar10_quick does not fit v5e-1: "
                                                   "over by "), lines
    assert "half_precision=True" in lines[0] and "remat_units=True" in lines[0]
    report = json.load(open(tmp_path / "cifar10_quick_v5e-1.json"))
    assert not report["fits"] and report["peak_bytes"] > targets.get("v5e-1").hbm_bytes
    assert "Ran out of memory" in report["compiler_refused"][0]
    assert report["max_batch"] == {"per_device": 0, "global": 0, "tries": {"65536": False}}
    assert "does not fit" in result.stdout and "Largest per-device batch that fits: 0 (global " \
        "0); tried 65536 over." in result.stdout


def test_max_batch_doubles_then_bisects_to_the_largest_multiple_that_fits(monkeypatch):
    """One train-step compile (`check`) per try, none for a batch already tried. The compiler
    here is a stand-in that fits up to 20,000 images per device; the real one's verdicts are
    the tests above."""
    compiled = []

    def check(config, target, devices, train_step_only=False):
        assert train_step_only
        compiled.append(config.batch_size // 8)
        return {"train_fits": config.batch_size // 8 <= 20000}
    monkeypatch.setattr(preflight, "check", check)
    config = base_config.cifar("cifar10", 8, batch_size=8 * 1024)
    found = preflight.max_batch(config, targets.get("v5e-8"), jax.devices(), 1024, {1024: True})
    assert compiled == [2048, 4096, 8192, 16384, 32768, 24576, 20480, 18432, 19456]
    assert found == {"per_device": 19456, "global": 8 * 19456,
                     "tries": {1024: True, **{b: b <= 20000 for b in compiled}}}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                    reason="JAX's CUDA plugin is not installed (pip install '.[cuda]')")
def test_the_h100_target_compiles_to_cudnn_convolutions(tmp_path):
    result = preflight_command(tmp_path, f"--config={CONFIG}", "--target=h100", *TINY,
                               "--config.batch_size=64", "--config.eval_batch_size=64",
                               env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "cifar10_quick_h100.json"))
    assert report["usable_bytes"] == int(0.5 * report["hbm_bytes"])
    assert "platform gpu" in report["devices"] and report["fits"]
    structure = report["train"]["structure"]
    assert structure["custom_calls"]["__cudnn$convForward"] > 0
    assert structure["convolutions"] == sum(n for name, n in structure["custom_calls"].items()
                                            if "conv" in name.lower())


def test_unknown_targets_and_a_missing_compiler_are_one_line(tmp_path):
    result = preflight_command(tmp_path, f"--config={CONFIG}", "--target=v4-12")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: unknown TPU slice 'v4-12': v4 comes as v4-8, "
                                     "v4-16, v4-32, v4-64, v4-128, v4-256, v4-512, v4-1024, "
                                     "v4-1536, v4-2048, v4-4096")
    result = preflight_command(tmp_path, f"--config={CONFIG}", "--target=tpu-v9")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "--target=list lists them" in result.stderr
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['libtpu'] = None\n"
                                           "sys.modules['jax_cuda12_plugin'] = None\n")
    for target, extra in (("v5e-8", "tpu"), ("h100x8", "cuda")):
        result = preflight_command(tmp_path, f"--config={CONFIG}", f"--target={target}",
                                   env={"PYTHONPATH": f"{hide}{os.pathsep}{ROOT}"})
        assert result.returncode == 1
        assert result.stderr.strip() == (
            f"error: compiling for {target} needs the {'TPU' if extra == 'tpu' else 'CUDA'} "
            f"compiler: pip install 'resnet_v2_jax[{extra}]'")
    assert not list(tmp_path.glob("*.json")), "a refused check wrote a report"


def test_target_list_names_every_slice_and_the_gpus(tmp_path):
    result = preflight_command(tmp_path, "--target=list")
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"v4-8", "v4-32", "v5e-32", "v5p-32", "v6e-8", "h100", "h100x8",
            "a100-80gbx8"} <= set(names)
    assert "v4-32: 16 x TPU v4 chip (32.0 GiB HBM each), 4 host(s)" in result.stdout


@pytest.mark.parametrize("name,devices,processes,topology", [
    ("v4-8", 4, 1, "v4:2x2x1"), ("v4-32", 16, 4, "v4:2x2x4"), ("v4-128", 64, 16, "v4:4x4x4"),
    ("v5litepod-8", 8, 1, "v5e:2x4"), ("v5e-32", 32, 8, "v5e:4x8"), ("v5p-32", 16, 4, "v5p:2x2x4"),
    ("v6e-8", 8, 1, "v6e:2x4"), ("h100", 1, 1, "1x1x1"), ("h100x16", 16, 2, "1x2x8")])
def test_targets_are_the_slices_jax_sees(name, devices, processes, topology, monkeypatch):
    # What preflight sets in its own process (targets.quiet_compilers), undone after the test:
    # in a training process TPU_WORKER_HOSTNAMES would mean a pod.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", name)
    target = targets.get(name)
    assert (target.num_devices, target.num_processes, target.topology) == (
        devices, processes, topology)
    if target.platform == "tpu" and importlib.util.find_spec("libtpu") is not None:
        found = targets.devices(target)       # compile-only: no TPU needed
        assert len(found) == devices
        assert len({d.process_index for d in found}) == processes


def test_program_structure_counts_what_runs_and_the_groups_of_collectives():
    hlo = "\n".join([
        "%fused_computation (p: f32[8]) -> f32[8] {",
        "  %p = f32[8]{0} parameter(0)",
        "  ROOT %c = f32[8]{0} convolution(%p, %p), window={size=1}",
        "}",
        "%add (a: f32[], b: f32[]) -> f32[] {",
        "  ROOT %s = f32[] add(%a, %b)",
        "}",
        "ENTRY %main (x: f32[8]) -> (f32[8], bf16[4,2]) {",
        "  %x = f32[8]{0} parameter(0)",
        "  %f = f32[8]{0} fusion(%x), kind=kOutput, calls=%fused_computation",
        "  %r = f32[8]{0} all-reduce(%f), replica_groups={{0,1},{2,3}}, to_apply=%add",
        "  %g = bf16[4,2]{1,0} all-reduce(%x), replica_groups=[1,4]<=[4], to_apply=%add",
        "  %t = f32[8]{0} copy(%r)",
        "  ROOT %o = (f32[8]{0}, bf16[4,2]{1,0}) tuple(%t, %g)",
        "}"])
    structure = preflight.program_structure(hlo, num_devices=4)
    assert structure["fusions"] == 1 and structure["convolutions"] == 1
    assert structure["copies"] == 1 and structure["transposes"] == 0
    assert structure["kernels"] == 4   # the fusion, two all-reduces and the copy
    assert structure["collectives"] == {"all-reduce over 2": {"count": 1, "bytes": 32},
                                        "all-reduce over 4": {"count": 1, "bytes": 16}}


def test_flops_of_a_scanned_rematerialised_step_are_the_unrolled_networks():
    """XLA counts a scanned stage's loop body once and remat's recomputation as work: the count
    (of the bound and the benchmarks' MFU) is the unrolled step's, neither. Lowered only."""
    def lowered_flops(config):
        dp = parallel.DataParallel(config.parallelism, 1, devices=jax.devices("cpu")[:1])
        setup = recipe.build(config, dp)
        return setup.train_step.lower(setup.abstract_state, preflight.abstract_batches(
            config, dp), recipe.ABSTRACT_SEED).cost_analysis()["flops"]

    scanned = base_config.cifar("cifar10", 20, batch_size=8, eval_batch_size=8, scan_units=True,
                                remat_units=True)
    unrolled = base_config.cifar("cifar10", 20, batch_size=8, eval_batch_size=8)
    flops = preflight.model_flops(scanned, 8)
    assert flops == lowered_flops(unrolled) != lowered_flops(scanned)
