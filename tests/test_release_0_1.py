"""A workdir written by release 0.1 (tests/fixtures/workdir_release_0_1: network keys at the
top level of config.json, checkpoint meta "model") still resumes, evaluates and exports with
today's code, and a resume with another network is still refused."""
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cli_runs import ROOT, assert_one_error_line, environment, run, snapshot
from resnet_v2_jax import configuration, evaluate, weights

# Command-line runs and training: outside the fast tier (pytest -m 'not slow').
pytestmark = pytest.mark.slow

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "workdir_release_0_1"


def copy(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(FIXTURE, workdir)
    return workdir


def test_its_config_reads_into_the_model_section():
    config = configuration.read(str(FIXTURE))
    assert config.model.depth == 8 and config.model.block == "basic"
    assert config.model.stride_on == "1x1" and "stem_norm" not in config.model
    assert "depth" not in config and "augment_on_device" not in config
    configuration.validate(config)


def test_it_resumes_evaluates_and_exports(tmp_path, array_dir):
    workdir = copy(tmp_path)
    # The run's own command, in today's keys, two steps further.
    resumed = run(str(workdir), array_dir, "--config.num_train_steps=4",
                  "--config.checkpoint_every_steps=2", "--config.eval_batch_size=50")
    assert "resuming from step 2" in resumed.stderr
    assert json.loads((workdir / "results.json").read_text())["step"] == 4
    evaluated = evaluate.evaluate(str(workdir / "checkpoints" / "2"), array_dir=array_dir,
                                  eval_batch_size=40)
    assert evaluated["step"] == 2 and evaluated["eval"]["32"]["num_examples"] == 100
    out = tmp_path / "release_0_1.safetensors"
    exported = subprocess.run([sys.executable, "-m", "resnet_v2_jax.export",
                               f"--workdir={workdir}/checkpoints/2", f"--out={out}"],
                              env=environment(), capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    model, variables = weights.load(str(out))
    assert model.stage_sizes == (1, 1, 1) and not model.bottleneck
    assert np.isfinite(np.asarray(variables["params"]["head"]["kernel"])).all()


def test_another_network_is_still_refused(tmp_path, array_dir):
    workdir = copy(tmp_path)
    before = snapshot(workdir)
    result = run(str(workdir), array_dir, "--config.model.unit=original",
                 "--config.num_train_steps=4", check=False)
    assert_one_error_line(result, "holds a checkpoint of another network (unit: checkpoint "
                          "'full_preact' vs config 'original')")
    assert snapshot(workdir) == before
