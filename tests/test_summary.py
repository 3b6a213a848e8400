"""python -m resnet_v2_jax.summary: per-stage shapes, parameters and FLOPs."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cli_runs import ROOT, environment
from resnet_v2_jax import models, summary


@pytest.mark.parametrize("depth, params", [(164, 1_703_258), (1001, 10_327_706)])
def test_totals_are_the_papers_parameter_counts(depth, params):
    rows = summary.summarize(models.cifar_resnet(depth, scan_units=True), 32)
    assert [r["part"] for r in rows] == ["stem", "stage1", "stage2", "stage3", "head", "total"]
    assert rows[-1]["params"] == params == sum(r["params"] for r in rows[:-1])
    assert [r["output"] for r in rows[1:4]] == [(32, 32, 64), (16, 16, 128), (8, 8, 256)]


def test_flops_of_a_scanned_network_are_those_of_the_whole_unrolled_one():
    """XLA counts a loop body once; the one-and-two-units method counts every unit."""
    model = models.cifar_resnet(56, block="basic")
    images = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    whole = summary.flops(lambda v, x: model.apply(v, x, train=False), variables, images)
    rows = summary.summarize(model.clone(scan_units=True), 32)
    assert rows[-1]["flops"] == pytest.approx(whole, rel=1e-6)  # float32 counts
    assert all(r["flops"] > 0 for r in rows[:4])


def test_command_prints_the_table():
    result = subprocess.run(
        [sys.executable, "-m", "resnet_v2_jax.summary", "--config=configs/cifar10_resnet164.py"],
        cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("cifar ResNet-164 (full_preact units, identity shortcuts)")
    assert lines[-2].split()[:3] == ["total", "10", "1,703,258"]
    assert lines[-1] == "0.240 G multiply-adds per image"
