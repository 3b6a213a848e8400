r"""Runs compared by their final test error, as docs/reproduction.md's ablation reports them.

    python -m resnet_v2_jax.compare --workdir=/tmp/cpu_ablation/full_preact \
        --workdir=/tmp/cpu_ablation/original --labels="full pre-activation,original"

For each workdir (of one run or of several, `num_runs`): the test top-1 error of its
results.json at the smallest crop, as the median (the paper reports medians), mean±std and
every run; then, for every two workdirs, the p-value of Welch's two-sample t-test on their runs'
errors (`scipy.stats.ttest_ind(..., equal_var=False)`: the seed spread of two settings need not
be equal). A pair needs two runs on each side.
"""

if __name__ == "__main__":  # first: the imports below take seconds (see `startup`)
    from resnet_v2_jax import startup
    startup.exit_on_signals()

import itertools
import json
from typing import List, Sequence

import numpy as np
from absl import flags
from etils import epath
from scipy import stats

from resnet_v2_jax import cli, errors

FLAGS = flags.FLAGS


def final_errors(workdir: str) -> np.ndarray:
    """The test top-1 errors (%) of every run in `workdir`'s results.json, at its smallest crop
    (runs that diverged left out)."""
    path = epath.Path(workdir) / "results.json"
    if not path.exists():
        raise errors.NotFoundError(f"{path} does not exist: the run has not finished")
    evaluation = json.loads(path.read_text())["eval"]
    result = evaluation[min(evaluation, key=int)]
    if "runs" not in result:
        return np.array([100 * result["top1_error"]])
    run_errors = result["runs"]["top1_error"]
    return np.array([100 * e for k, e in enumerate(run_errors) if k not in result["diverged"]])


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """The two-sided p-value of Welch's t-test (unequal variances) of `a` against `b`."""
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def report(labels: Sequence[str], errors: Sequence[np.ndarray]) -> List[str]:
    """The lines `compare` prints: one per workdir, then one per pair of workdirs."""
    lines = []
    for label, e in zip(labels, errors):
        std = np.std(e, ddof=1) if len(e) > 1 else 0.0
        lines.append(f"{label}: test error {np.median(e):.2f}% ({np.mean(e):.2f}±{std:.2f}), "
                     f"{len(e)} run(s): {' / '.join(f'{x:.2f}' for x in e)}")
    for (a, ea), (b, eb) in itertools.combinations(zip(labels, errors), 2):
        if min(len(ea), len(eb)) < 2:
            lines.append(f"{a} vs {b}: no test (a side has one run)")
            continue
        lines.append(f"{a} vs {b}: {np.mean(ea) - np.mean(eb):+.2f} points, Welch's t-test "
                     f"p = {welch_p(ea, eb):.2f}")
    return lines


def define_flags() -> None:
    """The command line's flags; defined by the command only, so importing defines none."""
    flags.DEFINE_multi_string("workdir", None, "A run's folder; repeat for each setting.")
    flags.DEFINE_list("labels", None, "One label per --workdir; default: folder names.")
    flags.mark_flag_as_required("workdir")


def main(argv: List[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    labels = FLAGS.labels or [epath.Path(w).name for w in FLAGS.workdir]
    if len(labels) != len(FLAGS.workdir):
        cli.fail(f"{len(labels)} --labels for {len(FLAGS.workdir)} --workdir", 2)
    print("\n".join(report(labels, [final_errors(w) for w in FLAGS.workdir])))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
