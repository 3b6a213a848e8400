"""python -m resnet_v2_jax.compare: the statistics and p-values docs/reproduction.md publishes
for the CPU ablation are what the command prints for the table's runs."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from cli_runs import ROOT, environment
from resnet_v2_jax import compare

REPRODUCTION = ROOT + "/docs/reproduction.md"


def ablation():
    """The CPU ablation table's rows, (label, median, mean, std, runs), and the p-values its
    prose publishes."""
    text = open(REPRODUCTION).read()
    rows = re.findall(r"^\| ([^|]+?) \| \*\*([\d.]+)%\*\* \(([\d.]+)±([\d.]+)\) \| ([\d. /]+?) \|",
                      text, flags=re.MULTILINE)
    prose = text.split("What this shows, with three runs per row")[1].split("\n## ")[0]
    published = [p for claim in re.findall(r"p = 0\.\d\d(?: and 0\.\d\d)?", prose)
                 for p in re.findall(r"0\.\d\d", claim)]
    return rows, published


def write_results(workdir, errors, diverged=()):
    """A results.json as a run of len(errors) runs writes it (errors in %)."""
    workdir.mkdir()
    runs = [e / 100 for e in errors]
    (workdir / "results.json").write_text(json.dumps({"eval": {"32": {
        "top1_error": float(np.median(runs)), "runs": {"top1_error": runs},
        "diverged": list(diverged)}}}))
    return str(workdir)


def test_the_published_statistics_and_p_values_are_what_compare_prints(tmp_path):
    rows, published = ablation()
    assert len(rows) == 4 and len(published) == 6  # every pair of the four rows
    workdirs = [write_results(tmp_path / f"row{i}", [float(x) for x in runs.split("/")])
                for i, (*_, runs) in enumerate(rows)]
    labels = [label for label, *_ in rows]
    lines = compare.report(labels, [compare.final_errors(w) for w in workdirs])
    assert lines[:4] == [f"{label}: test error {median}% ({mean}±{std}), 3 run(s): {runs}"
                         for label, median, mean, std, runs in rows]
    printed = [re.search(r"p = (0\.\d\d)$", line)[1] for line in lines[4:]]
    assert len(printed) == 6 and sorted(printed) == sorted(published)
    # The pair the doc names first: scaling vs full pre-activation, 2.9 points, p = 0.06.
    assert f"{labels[0]} vs {labels[3]}: -2.87 points, Welch's t-test p = 0.06" in lines


@pytest.mark.slow
def test_the_command_prints_the_report(tmp_path):
    workdirs = [write_results(tmp_path / "a", [30.0, 31.0]),
                write_results(tmp_path / "b", [33.0, 34.5])]
    result = subprocess.run([sys.executable, "-m", "resnet_v2_jax.compare",
                             *[f"--workdir={w}" for w in workdirs]],
                            cwd=ROOT, env=environment(), text=True, capture_output=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines() == compare.report(
        ["a", "b"], [np.array([30.0, 31.0]), np.array([33.0, 34.5])])
    missing = subprocess.run([sys.executable, "-m", "resnet_v2_jax.compare",
                              f"--workdir={tmp_path}"], cwd=ROOT, env=environment(), text=True,
                             capture_output=True, timeout=300)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/results.json does not exist: the run has not finished")


def test_welch_p_is_scipys_unequal_variance_test_and_diverged_runs_are_left_out(tmp_path):
    # By hand: t = (2 - 14/3) / sqrt(1/3 + (19/3)/3) = -1.7056 with 2.616 degrees of freedom
    # (Welch-Satterthwaite), two-sided; the pooled-variance test would give 0.163.
    assert compare.welch_p([1.0, 2.0, 3.0], [2.0, 5.0, 7.0]) == pytest.approx(0.1998, abs=1e-4)
    workdir = write_results(tmp_path / "run", [30.0, 99.0, 32.0], diverged=[1])
    assert compare.final_errors(workdir).tolist() == pytest.approx([30.0, 32.0])
    assert compare.report(["a", "b"], [np.array([30.0]), np.array([31.0, 33.0])]) == [
        "a: test error 30.00% (30.00±0.00), 1 run(s): 30.00",
        "b: test error 32.00% (32.00±1.41), 2 run(s): 31.00 / 33.00",
        "a vs b: no test (a side has one run)"]
