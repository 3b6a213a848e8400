r"""Training curves in the paper's figure style (Figs. 1, 3 and 6), from TensorBoard event files.

    python -m resnet_v2_jax.plot --workdir=/tmp/r110 --workdir=/tmp/r164 \
        --labels=ResNet-110,ResNet-164 --out=curves.png

As in the paper: iterations on the x axis, one colour per run, training loss dashed (left y
axis) and test error solid and bold (right y axis, %). `--train=error` draws the training error
(dashed) on the test error's axis instead, so the figure has one y axis in %. Runs are read from
the event files in their workdirs (local or gs://): "train/loss" or "train/error", and
"eval/top1_error_<crop>" at the smallest crop logged unless `--crop` says. A resumed run logs
some steps twice; the later value is kept. A workdir of several runs (`num_runs`) is drawn as
its median with the band between its best and worst run (`--spread=band`), or with every run
as a thin line (`--spread=all`), from the runs' own files in runs/<k>.
"""

if __name__ == "__main__":  # first: the imports below take seconds (see `startup`)
    from resnet_v2_jax import startup
    startup.exit_on_signals()

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import flags
from etils import epath

from resnet_v2_jax import cli, errors

TEST_PREFIX = "eval/top1_error_"
Series = Tuple[np.ndarray, np.ndarray]  # (steps, values)


@dataclasses.dataclass(frozen=True)
class Curves:
    """One workdir's curves: training loss or error, and test top-1 error (fractions); of a
    workdir of several runs, the medians, and each run's curves in `runs`."""
    label: str
    train: Optional[Series]
    test: Optional[Series]
    runs: Sequence["Curves"] = ()


def read_scalars(workdir: str) -> Dict[str, Series]:
    """Every scalar tag in `workdir`'s event files, as (steps, values) sorted by step."""
    from tensorboard.backend.event_processing import event_accumulator  # imports TensorFlow
    if not epath.Path(workdir).exists():
        raise errors.NotFoundError(f"run folder {workdir} does not exist")
    events = event_accumulator.EventAccumulator(
        str(workdir), size_guidance={event_accumulator.SCALARS: 0})  # 0 = keep every point
    events.Reload()
    series = {}
    for tag in events.Tags()["scalars"]:
        by_step = {e.step: e.value for e in events.Scalars(tag)}  # later files win
        steps = np.array(sorted(by_step))
        series[tag] = (steps, np.array([by_step[s] for s in steps]))
    return series


def load_run(workdir: str, label: str, train: str = "loss",
             crop: Optional[int] = None) -> Curves:
    """The curves of the run in `workdir` (and of each of its runs in runs/<k>); `train` is
    "loss" or "error"."""
    series = read_scalars(workdir)
    crops = sorted(int(t[len(TEST_PREFIX):]) for t in series if t.startswith(TEST_PREFIX))
    if crop is None and crops:
        crop = crops[0]
    folder = epath.Path(workdir) / "runs"
    runs = [load_run(str(folder / k), f"{label} run {k}", train, crop)
            for k in sorted((p.name for p in folder.iterdir() if p.name.isdigit()), key=int)
            ] if folder.is_dir() else []
    curves = Curves(label, series.get(f"train/{train}"), series.get(f"{TEST_PREFIX}{crop}"),
                    runs)
    if curves.train is None and curves.test is None:
        raise errors.WorkdirError(f"no train/{train} or {TEST_PREFIX}{crop or '<crop>'} scalars in "
                                  f"{workdir} (crops logged: {crops or 'none'})")
    return curves


def _spread(runs: Sequence[Curves], which: str) -> Optional[Tuple[np.ndarray, ...]]:
    """(steps, lowest, highest) over the runs' `which` curves, at the steps all of them have."""
    series = [getattr(r, which) for r in runs if getattr(r, which) is not None]
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s[0].tolist()) for s in series)))
    values = np.array([[dict(zip(*s))[step] for step in steps] for s in series])
    return np.array(steps), np.nanmin(values, axis=0), np.nanmax(values, axis=0)


def draw(runs: Sequence[Curves], out: str, train: str = "loss",
         title: Optional[str] = None, spread: str = "band") -> None:
    """Writes the figure of `runs` to `out` (the format follows its suffix, e.g. .png, .pdf).
    Curves of several runs are drawn as their median with the band from best to worst run
    (`spread="band"`), or with every run as a thin line (`spread="all"`)."""
    import matplotlib  # the [train] extra
    from matplotlib.figure import Figure  # no pyplot: files only, no display or global state
    from matplotlib.lines import Line2D
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    train_ax = fig.subplots()
    test_ax = train_ax.twinx() if train == "loss" else train_ax
    train_scale = 1 if train == "loss" else 100
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        for ax, which, scale in ((train_ax, "train", train_scale), (test_ax, "test", 100)):
            if spread == "all":
                for each in run.runs:
                    if getattr(each, which) is not None:
                        steps, values = getattr(each, which)
                        ax.plot(steps, scale * values, "--" if which == "train" else "-",
                                color=colour, lw=0.6, alpha=0.5)
            else:
                band = _spread(run.runs, which)
                if band is not None:
                    ax.fill_between(band[0], scale * band[1], scale * band[2], color=colour,
                                    alpha=0.15 if which == "test" else 0.08, lw=0)
        if run.train is not None:
            train_ax.plot(run.train[0], train_scale * run.train[1], "--", color=colour, lw=1)
        if run.test is not None:
            steps, errors = run.test
            test_ax.plot(steps, 100 * errors, "-", color=colour, lw=2,
                         marker="o" if len(steps) <= 20 else None, ms=4)
    train_ax.set_xlabel("iterations")
    train_ax.set_ylabel("training loss" if train == "loss" else "error (%)")
    test_ax.set_ylabel("test error (%)" if train == "loss" else "error (%)")
    for ax in {train_ax, test_ax}:
        ax.set_ylim(0, 1.08 * ax.get_ylim()[1])  # from zero, with room above the curves
    train_ax.set_xlim(left=0)
    handles = [Line2D([], [], color=colours[i % len(colours)], lw=2, label=run.label)
               for i, run in enumerate(runs)]
    handles += [Line2D([], [], color="black", ls="--", lw=1, label=f"training {train}"),
                Line2D([], [], color="black", lw=2, label="test error")]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")
    train_ax.grid(alpha=0.3)
    if title:
        train_ax.set_title(title)
    epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
    with epath.Path(out).open("wb") as f:
        fig.savefig(f, format=epath.Path(out).suffix[1:] or "png", dpi=150,
                    bbox_inches="tight")


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined by the command only, so importing defines none."""
    flags.DEFINE_multi_string("workdir", None, "A run's folder; repeat for several runs.")
    flags.DEFINE_list("labels", None, "One legend label per --workdir; default: folder names.")
    flags.DEFINE_string("out", "curves.png", "Output image (.png, .pdf, .svg; local or gs://).")
    flags.DEFINE_enum("train", "loss", ["loss", "error"], "Training curve: loss (the paper's "
                      "figures, own axis) or error (same axis as the test error).")
    flags.DEFINE_integer("crop", None, "Test crop whose error is drawn; default: the smallest.")
    flags.DEFINE_string("title", None, "Figure title.")
    flags.DEFINE_enum("spread", "band", ["band", "all"], "Workdirs of several runs: their "
                      "median with a band from best to worst run, or every run drawn thin.")
    flags.mark_flag_as_required("workdir")


def main(argv: List[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    cli.import_tensorflow_quietly()  # TensorBoard's reader imports TensorFlow where installed
    labels = FLAGS.labels or [epath.Path(w).name for w in FLAGS.workdir]
    if len(labels) != len(FLAGS.workdir):
        cli.fail(f"{len(labels)} --labels for {len(FLAGS.workdir)} --workdir", 2)
    runs = [load_run(w, label, FLAGS.train, FLAGS.crop) for w, label in zip(FLAGS.workdir, labels)]
    draw(runs, FLAGS.out, FLAGS.train, FLAGS.title, FLAGS.spread)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
