"""Training: `train_and_evaluate(config, workdir)` is what the command line runs.

`recipe.build` makes the network, optimiser and compiled steps from the config; this module
runs them: the loop (step, log, checkpoint, evaluate), the `Evaluator`, stopping on signals
and writing TensorBoard files and results. What is written where: `train_and_evaluate`.
"""

import dataclasses
import itertools
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from resnet_v2_jax import (checkpoint, configuration, errors, inputs, parallel, pretrained,
                           recipe, rundir)


# --- the loop's parts ----------------------------------------------------------------------------

def is_time(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (log, eval, checkpoint) runs after `step`: every `every`
    steps and after the last one."""
    return step == last or (every > 0 and step % every == 0)


class _StopSignals:
    """SIGTERM (a preemption notice) and SIGINT (Ctrl-C), from the first moment of a run to its
    end: a signal never interrupts what the run is doing (compiling, restoring, saving). Before
    training starts the run stops at its next phase (`check`: one line, nothing trained); in
    training it finishes the step, saves a checkpoint and stops (`reached`).

    A second Ctrl-C stops at once: one line, and the process ends on the spot (`os._exit`;
    the OS lets go of the run's lock). On several processes JAX's own notifier (installed by
    jax.distributed) receives SIGTERM and the sync point answers the same on every process; a
    Python handler would replace it. Ctrl-C reaches one process only, which cannot stop alone
    without leaving the others waiting in a collective, so it keeps its default there (use
    SIGTERM, e.g. `launch/tpu_vm.sh stop`, to stop a multi-host run cleanly). Outside the main
    thread (a notebook's worker, say) signals are left alone.
    """

    def __init__(self):
        self.received: Optional[str] = None
        self.previous = {}

    def __enter__(self) -> "_StopSignals":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle)
                             for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received == "SIGINT" and signum == signal.SIGINT:
            sys.stderr.write("error: interrupted again (Ctrl-C): stopped at once; rerun the same "
                             "command to resume from the last checkpoint\n")
            sys.stderr.flush()
            os._exit(130)
        logging.warning("%s received: stopping at the end of the current step or phase, "
                        "saving a checkpoint if training has started%s", name,
                        " (Ctrl-C again stops at once)" if signum == signal.SIGINT else "")
        self.received = self.received or name

    def check(self, phase: str) -> None:
        """Raises Interrupted if a signal came before training started (in `phase`)."""
        if self.received is not None:
            raise errors.Interrupted(self.received, f"interrupted ({self.received}) {phase}; "
                                     "nothing was trained: rerun the same command to start")

    def reached(self, step: int, checkpoints: checkpoint.Checkpoints) -> Optional[str]:
        """The signal to stop for after `step`, or None."""
        if self.received is None and jax.process_count() > 1 and \
                checkpoints.reached_preemption(step):
            self.received = "preemption"
        return self.received


class _MetricsWriter:
    """TensorBoard event files (tensorboardX: standard event files without TensorFlow, local or
    gs://), written by process 0 only: in the workdir, and with several runs each run's own in
    runs/<k> (TensorBoard shows them as runs; `plot` draws their spread)."""

    def __init__(self, workdir: epath.Path, num_runs: int):
        self.writers = []
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            folders = [workdir] + ([workdir / "runs" / str(k) for k in range(num_runs)]
                                   if num_runs > 1 else [])
            self.writers = [SummaryWriter(logdir=str(f), flush_secs=30) for f in folders]

    def scalars(self, step: int, per_run: Dict[str, Sequence[float]],
                shared: Optional[Dict[str, float]] = None):
        """Writes `per_run` values (one per run: their median to the workdir's file, each run's
        to its own) and `shared` ones (the same for every run, such as the learning rate)."""
        for name, values in per_run.items():
            values = np.asarray(values, np.float64)
            for writer in self.writers[:1]:
                writer.add_scalar(name, float(np.nanmedian(values)), step)
            for writer, value in zip(self.writers[1:], values):
                writer.add_scalar(name, float(value), step)
        for name, value in (shared or {}).items():
            for writer in self.writers[:1]:
                writer.add_scalar(name, float(value), step)

    def close(self):
        for writer in self.writers:
            writer.flush()
            writer.close()


class _StepMetrics:
    """Per-step training metrics (per run) kept on the devices until fetched: no host sync per
    step."""

    def __init__(self, dp: parallel.DataParallel):
        self.dp = dp
        self.pending: List[Dict[str, jax.Array]] = []

    def add(self, metrics: Dict[str, jax.Array]) -> None:
        self.pending.append(metrics)

    def fetch(self) -> Dict[str, List[float]]:
        """Each metric's mean over the pending steps, per run ({} when none is pending)."""
        values = [self.dp.to_host(m) for m in self.pending]
        self.pending = []
        return {key: [float(v) for v in np.mean([m[key] for m in values], axis=0)]
                for key in (values[0] if values else {})}


def summarize(values: Sequence[float], diverged: Sequence[int] = ()) -> Dict[str, Any]:
    """Statistics of a metric over runs, leaving out `diverged` ones: median (what the paper
    reports), mean, sample standard deviation (0 for one run), best (lowest) and the runs
    counted. None for each where every run diverged."""
    counted = [v for k, v in enumerate(values) if k not in set(diverged)]
    if not counted:
        return {"median": None, "mean": None, "std": None, "best": None, "runs": 0}
    return {"median": float(np.median(counted)), "mean": float(np.mean(counted)),
            "std": float(np.std(counted, ddof=1)) if len(counted) > 1 else 0.0,
            "best": float(np.min(counted)), "runs": len(counted)}


class Evaluator:
    """Top-1/top-5 error over a whole eval split at each crop size (pad and mask), of every
    run."""

    def __init__(self, config: ml_collections.ConfigDict, dp: parallel.DataParallel,
                 eval_step: Callable):
        self.config, self.dp, self.step = config, dp, eval_step
        # Built once; every evaluation iterates them afresh (no reloading of the split).
        self.batches = {crop: inputs.eval_batches(config, crop) for crop in config.eval_crop_sizes}

    def __call__(self, variables: Dict[str, Any],
                 diverged: Sequence[int] = ()) -> Dict[str, Dict[str, Any]]:
        """Evaluates the networks' `variables` {"params", "batch_stats"} (stacked on the run
        axis), placed for the steps (`DataParallel.put_state`). Batches are put onto the
        devices two ahead of the step (as in training) and the sums stay on the devices until
        the pass is over: one fetch per crop size. Each metric is the median over the runs not
        `diverged` (the value itself, of one run); "runs" gives every run's value and "stats"
        the statistics (`summarize`)."""
        results = {}
        limit = None if self.config.steps_per_eval < 0 else self.config.steps_per_eval
        for crop, batches in self.batches.items():
            totals = None
            device_batches = inputs.prefetch_to_device(
                itertools.islice(batches, limit), self.dp.put_batch, size=2)
            for batch in device_batches:
                sums = self.step(variables, batch)
                totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            totals = self.dp.to_host(totals)
            count = np.asarray(totals["count"], np.float64)
            metrics = {"top1_error": totals["top1_wrong"] / count,
                       "top5_error": totals["top5_wrong"] / count, "loss": totals["loss"] / count}
            stats = {k: summarize(v, diverged) for k, v in metrics.items()}
            results[str(crop)] = {**{k: stats[k]["median"] for k in metrics},
                                  "num_examples": int(count[0]),
                                  "runs": {k: [float(x) for x in v] for k, v in metrics.items()},
                                  "stats": stats, "diverged": sorted(diverged)}
        return results


def _runs_clause(counted: int, num_runs: int, what: str = "median") -> str:
    """' (medians of 3 runs)' and the like; nothing for a single run."""
    return f" ({what} of {counted} runs)" if num_runs > 1 else ""


def _log_eval(writer: _MetricsWriter, step: int, results: Dict[str, Dict[str, Any]]) -> None:
    for crop, r in results.items():
        top1 = r["stats"]["top1_error"]
        if top1["runs"]:
            spread = (f" ({100 * top1['mean']:.2f}±{100 * top1['std']:.2f})"
                      if top1["runs"] > 1 else "")
            logging.info("eval at step %d, crop %s: top-1 error %.2f%%%s%s, top-5 error %.2f%% "
                         "on %d examples", step, crop, 100 * top1["median"], spread,
                         _runs_clause(top1["runs"], len(r["runs"]["top1_error"])),
                         100 * r["top5_error"], r["num_examples"])
        writer.scalars(step, {f"eval/{k}_{crop}": r["runs"][k]
                              for k in ("top1_error", "top5_error", "loss")})


def _log_train(writer: _MetricsWriter, step: int, total_steps: int, metrics: Dict[str, Any],
               lr: float, images_per_step: int, seconds_per_step: Optional[float]) -> None:
    shared = {"train/learning_rate": lr}
    speed = ""
    if seconds_per_step:  # not right after compilation
        shared["train/images_per_second"] = images_per_step / seconds_per_step
        speed = (f"  {shared['train/images_per_second']:.0f} img/s  "
                 f"ETA {_hms((total_steps - step) * seconds_per_step)}")
    loss, error = np.nanmedian(metrics["loss"]), np.nanmedian(metrics["error"])
    runs = _runs_clause(int(np.sum(np.isfinite(metrics["loss"]))), len(metrics["loss"]),
                        "medians")
    logging.info("step %d/%d  loss %.4f  error %.2f%%%s  lr %.4g%s", step, total_steps, loss,
                 100 * error, runs, lr, speed)
    writer.scalars(step, {"train/loss": metrics["loss"], "train/error": metrics["error"]}, shared)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _diverged(checkpoints: checkpoint.Checkpoints, what: str,
              step: int) -> errors.NonFiniteLossError:
    checkpoints.wait()
    latest = checkpoints.latest_step()
    kept = ("no checkpoint was written yet" if latest is None else
            f"the last checkpoint (step {latest}) is intact")
    return errors.NonFiniteLossError(f"training diverged at step {step}: {what}; {kept}: "
                                     "lower learning_rate or use warmup='constant'")


class _Divergence:
    """Which runs diverged, and when (from the state's `diverged_at`): a run that diverges is
    frozen and reported, the others go on; when every run has diverged (the one run, of a
    single run) training stops."""

    def __init__(self, config: ml_collections.ConfigDict, checkpoints: checkpoint.Checkpoints):
        self.seed, self.num_runs, self.checkpoints = config.seed, config.num_runs, checkpoints
        self.steps: Dict[int, int] = {}

    @property
    def runs(self) -> List[int]:
        return sorted(self.steps)

    def update(self, diverged_at: np.ndarray) -> None:
        for run, step in enumerate(diverged_at):
            if step >= 0 and run not in self.steps:
                self.steps[run] = int(step)
                if len(self.steps) < self.num_runs:
                    logging.warning("run %d (seed %d) diverged at step %d: it is frozen and "
                                    "left out of the statistics; the other runs go on", run,
                                    self.seed + run, step)
        if len(self.steps) == self.num_runs:
            what = (f"every one of the {self.num_runs} runs diverged (at steps "
                    f"{', '.join(map(str, self.steps.values()))})" if self.num_runs > 1 else
                    "the loss or the weights became NaN or Inf")
            raise _diverged(self.checkpoints, what, max(self.steps.values()))

    def exclude(self, metrics: Dict[str, List[float]]) -> Dict[str, List[float]]:
        """Per-run training metrics with the diverged runs' values set to NaN."""
        return {k: [float("nan") if run in self.steps else x for run, x in enumerate(v)]
                for k, v in metrics.items()}

    def report(self) -> List[Dict[str, int]]:
        return _diverged_runs(self.seed, self.steps)


def _diverged_runs(seed: int, steps: Dict[int, int]) -> List[Dict[str, int]]:
    """results.json's "diverged": each diverged run, its seed and the step it diverged at."""
    return [{"run": run, "seed": seed + run, "step": step} for run, step in sorted(steps.items())]


def _config_changes(workdir: epath.Path, config: ml_collections.ConfigDict, limit: int = 4) -> str:
    """The settings in which `config` differs from the run's saved config.json, as a clause."""
    try:
        saved = configuration.flatten(configuration.read(str(workdir)))
    except (OSError, ValueError):
        return ""
    current = configuration.flatten(json.loads(config.to_json_best_effort()))
    keys = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if not keys:
        return ""
    shown = ", ".join(f"{k}={saved.get(k)!r} there vs {current.get(k)!r} now" for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"; the run's config.json differs in {shown}{more}"


HISTORY = "config_history"


def _record_config(workdir: epath.Path, config: ml_collections.ConfigDict, start_step: int):
    """Writes config.json (the config training runs with now). The config of every start that
    changes settings is kept as config_history/<its first step>.json, the previous ones stay,
    and a resume with other settings says which in one warning."""
    current = json.loads(config.to_json_best_effort())
    history = workdir / HISTORY
    path = workdir / configuration.CONFIG_FILE
    if path.exists():
        if not history.exists():  # written by a release without history: its first start
            history.mkdir()
            rundir.write_json(history / "0.json", json.loads(path.read_text()))
        try:
            before = configuration.flatten(configuration.read(str(workdir)))
        except ValueError:
            before = {}
        now = configuration.flatten(current)
        changed = [f"{k}={before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
                   if before.get(k) != now.get(k)]
        if not changed:
            return
        logging.warning("resuming at step %d with other settings than before: %s; the earlier "
                        "configs stay in %s", start_step, ", ".join(changed), history)
    history.mkdir(exist_ok=True)
    rundir.write_json(history / f"{start_step}.json", current)
    rundir.write_json(path, current)


# --- training ------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Trains (resuming from `workdir` if it holds a checkpoint), evaluates, returns results.

    Writes into `workdir`: config.json (and config_history/<step>.json, the config of each
    start that changed settings), run.lock (while running), checkpoints/ (Orbax), TensorBoard
    event files and results.json. Raises this package's `errors` (ConfigError, DataError,
    WorkdirError, CheckpointError, NonFiniteLossError, Interrupted, ...) with one-line
    messages; everything that can be checked
    at start (config, data, the `init_from` source) is checked before anything is written.
    """
    t_start = time.monotonic()
    with _StopSignals() as signals:
        workdir = rundir.resolve(workdir)
        configuration.validate(config)
        dp = parallel.for_config(config)
        num_train_examples = inputs.check_data(config)
        setup = recipe.build(config, dp, num_train_examples)
        evaluator = Evaluator(config, dp, setup.eval_step)
        logging.info("devices: %s", dp.describe(setup.model.norm))
        logging.info("batch: %d global, %d per process, %d per device; %d steps (%.1f epochs of "
                     "%d examples)", config.batch_size, config.batch_size // dp.process_count,
                     dp.check_batch_size(config.batch_size), setup.total_steps,
                     setup.total_steps / setup.steps_per_epoch, num_train_examples)
        source = None
        if config.init_from and not checkpoint.has_checkpoints(workdir):
            source = pretrained.load_source(
                config.init_from, setup.model,
                None if config.init_from_run < 0 else config.init_from_run)
        signals.check("before the workdir was touched")
        rundir.make(workdir)
        with rundir.RunLock(workdir):
            checkpoints = checkpoint.Checkpoints(workdir, setup.model, config.keep_checkpoints,
                                                 num_runs=config.num_runs)
            trainer = _Trainer(config, setup, dp, workdir, checkpoints, evaluator, signals,
                               t_start)
            try:
                return trainer.run(source)
            finally:
                checkpoints.close()


@dataclasses.dataclass(frozen=True)
class _Due:
    """What happens at a step boundary before the next step (`_Trainer.next_action`)."""
    log: bool
    save: bool
    evaluate: bool


@dataclasses.dataclass
class _Trainer:
    """One start of a run: restores or initialises the state, records the config and runs the
    loop, with everything the loop needs in one place."""
    config: ml_collections.ConfigDict
    setup: recipe.Setup
    dp: parallel.DataParallel
    workdir: epath.Path
    checkpoints: checkpoint.Checkpoints
    evaluator: Evaluator
    signals: _StopSignals
    started: float                    # time.monotonic() when the command began

    def run(self, source: Optional[pretrained.Source]) -> Dict[str, Any]:
        """Resumes from the latest checkpoint, or starts afresh (from `source`'s weights where
        given), trains to the end and writes results.json once its checkpoints are on disk; a
        run with nothing left to train keeps its results."""
        try:
            state, step, meta = self.checkpoints.restore_latest(self.setup.abstract_state,
                                                                self.setup.layouts)
        except errors.CheckpointMismatchError as e:
            raise errors.CheckpointMismatchError(
                f"{e}{_config_changes(self.workdir, self.config)}") from e
        self.checkpoints.prune()  # keep_checkpoints holds whatever an earlier run left
        if step >= self.setup.total_steps:
            return self.finished(state, step, meta)
        if state is None:
            state = self.setup.init_state(self.config.seed)
            if source is not None:  # a resumed run continues from its own checkpoint
                state = _start_from(source, state, self.setup.model)
        else:
            logging.info("resuming from step %d", step)
        self.signals.check("before training started")
        if jax.process_index() == 0:
            _record_config(self.workdir, self.config, step)
        results = self.loop(self.dp.put_state(state), step, meta.get("train", {}))
        self.checkpoints.wait()  # results.json never names a step whose checkpoint is not written
        results.update(wall_time_s=round(time.monotonic() - self.started, 1),
                       devices=self.dp.describe(self.setup.model.norm))
        if jax.process_index() == 0:
            rundir.write_json(self.workdir / "results.json", results)
        return results

    def finished(self, state: recipe.Runs, step: int, meta: dict) -> Dict[str, Any]:
        """A rerun of a run that has nothing left to train: keeps its results.json."""
        total = self.setup.total_steps
        found = (f"{self.workdir} already holds the final checkpoint (step {step} of {total})"
                 if step == total else
                 f"the run in {self.workdir} is at step {step}, past this config's {total} "
                 "steps (use a new --workdir for a shorter run)")
        path = self.workdir / "results.json"
        try:
            results = json.loads(path.read_text())
            if results.get("step") == step:
                logging.warning("nothing to train: %s; its results.json is kept as it is", found)
                return results
        except (OSError, ValueError):
            pass
        logging.warning("nothing to train: %s; results.json is missing or stale, so the "
                        "checkpoint is evaluated and results.json written", found)
        diverged_at = {k: int(at) for k, at in enumerate(np.asarray(state.diverged_at)) if at >= 0}
        results = {"step": step, "total_steps": total, "preempted": False,
                   "train": meta.get("train", {}),
                   "eval": self.evaluator(self.dp.put_state(recipe.variables_of(state.state)),
                                          sorted(diverged_at)),
                   "eval_step": step, "wall_time_s": None, "steps_this_run": 0,
                   "num_runs": self.config.num_runs,
                   "diverged": _diverged_runs(self.config.seed, diverged_at)}
        if jax.process_index() == 0:
            rundir.write_json(path, results)
        return results

    def next_action(self, step: int, start_step: int, stopped: Optional[str],
                    done: Sequence[str]) -> str:
        """The one decision of the loop: what happens next at the boundary after `step`, given
        the actions already `done` there and the signal `stopped` for (None): "log", "save",
        "evaluate" when each is due and not done (in that order: the trained state is on disk
        before anything that can fail afterwards), then "stop" or "train". A signal stops the
        run with a checkpoint of the step it arrives in (or is evaluated in); only the last
        step is evaluated after a signal."""
        config, total = self.config, self.setup.total_steps
        last = step == total
        if step > start_step:
            due = _Due(
                log=stopped is not None or is_time(step, config.log_every_steps, total),
                save=stopped is not None or is_time(step, config.checkpoint_every_steps, total),
                evaluate=(stopped is None or last) and is_time(
                    step, config.eval_every_steps or self.setup.steps_per_epoch, total))
            for action in ("log", "save", "evaluate"):
                if getattr(due, action) and action not in done:
                    return action
        return "stop" if stopped is not None or last else "train"

    def loop(self, state: recipe.Runs, start_step: int,
             train_metrics: Dict[str, List[float]]) -> Dict[str, Any]:
        """Trains from `start_step` to the end or to a signal; each step boundary takes the
        actions `next_action` decides, one by one."""
        config, setup, dp = self.config, self.setup, self.dp
        batches = inputs.train_batches(config, dp, start_step)
        writer = _MetricsWriter(self.workdir, config.num_runs)
        pending = _StepMetrics(dp)
        divergence = _Divergence(config, self.checkpoints)
        eval_results, eval_step, stopped, done = {}, None, None, []
        step, timer = start_step, _Throughput(start_step)
        seed = np.int32(config.seed)  # an argument of the step: every seed runs one program
        try:
            while True:
                if step > start_step:
                    stopped = self.signals.reached(step, self.checkpoints)
                action = self.next_action(step, start_step, stopped, done)
                if action in ("log", "save", "evaluate") and pending.pending:
                    divergence.update(dp.to_host(state.diverged_at))
                    train_metrics = divergence.exclude(pending.fetch())
                if action == "train":
                    state, metrics = setup.train_step(state, next(batches), seed)
                    step, done = step + 1, []
                    pending.add(metrics)
                    timer.stepped(step, metrics)
                elif action == "log":
                    _log_train(writer, step, setup.total_steps, train_metrics,
                               float(setup.schedule(step - 1)),
                               config.batch_size * config.num_runs, timer.seconds_per_step())
                elif action == "save":
                    self.save(step, state, train_metrics)
                elif action == "evaluate":
                    eval_results = self.evaluator(recipe.variables_of(state.state), divergence.runs)
                    eval_step = step
                    _log_eval(writer, step, eval_results)
                    timer.paused()  # keep eval time out of the training throughput
                else:  # "stop"
                    break
                done.append(action)
        finally:
            writer.close()
        preempted = step < setup.total_steps
        if preempted:
            logging.warning("%s (%s): checkpoint of step %d written; rerun the same command to "
                            "resume", "interrupted" if stopped == "SIGINT" else "preempted",
                            stopped, step)
        return {"step": step, "total_steps": setup.total_steps, "preempted": preempted,
                "stop_signal": stopped if preempted else None, "train": train_metrics,
                "eval": eval_results, "eval_step": eval_step, "steps_this_run": step - start_step,
                "num_runs": config.num_runs, "diverged": divergence.report()}

    def save(self, step: int, state: recipe.Runs, train_metrics: Dict[str, List[float]]) -> None:
        """The one save path: a checkpoint of `step`, never of a state that is not finite."""
        if not bool(self.dp.to_host(recipe.all_finite(state))):
            raise _diverged(self.checkpoints, "the state is not finite", step)
        self.checkpoints.save(step, self.dp.get_state(state), {"train": train_metrics})


class _Throughput:
    """Seconds per training step since the last log, with compilation (the first step) and
    evaluation left out; monotonic time."""

    def __init__(self, start_step: int):
        self.start_step, self.since, self.steps = start_step, time.monotonic(), 0

    def stepped(self, step: int, metrics: Dict[str, jax.Array]) -> None:
        self.steps += 1
        if step == self.start_step + 1:  # keep compilation out of the throughput and ETA
            jax.block_until_ready(metrics)
            self.paused()

    def paused(self) -> None:
        self.since, self.steps = time.monotonic(), 0

    def seconds_per_step(self) -> Optional[float]:
        """The mean since the last call (None right after compilation); restarts the count."""
        now = time.monotonic()
        seconds = (now - self.since) / self.steps if self.steps else None
        self.since, self.steps = now, 0
        return seconds


def _start_from(source: pretrained.Source, state: recipe.Runs, model) -> recipe.Runs:
    """`state` (fresh) with `source`'s backbone in each of its runs."""
    runs = [pretrained.transfer_from(source, recipe.variables_of(state.run(k)), model)
            for k in range(len(state.diverged_at))]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *runs)
    return state.replace(state=state.state.replace(**stacked))
