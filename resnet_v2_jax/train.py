"""Training: `train_and_evaluate(config, workdir)` is what the command line runs.

`recipe.build` makes the network, optimiser and compiled steps from the config; this module
runs them: the loop (step, log, checkpoint, evaluate), the `Evaluator`, stopping on signals
and writing TensorBoard files and results. What is written where: `train_and_evaluate`.
"""

import itertools
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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

    def __init__(self, workdir: epath.Path, num_runs: int = 1):
        self.writers = []
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            folders = [workdir] + ([workdir / "runs" / str(k) for k in range(num_runs)]
                                   if num_runs > 1 else [])
            self.writers = [SummaryWriter(logdir=str(f), flush_secs=30) for f in folders]

    def scalars(self, step: int, values: Dict[str, Any]):
        """Writes `values` (floats; or, with several runs, per-run sequences, whose median goes
        to the workdir's file and each run's value to its own)."""
        for name, value in values.items():
            if np.ndim(value) == 0:
                for writer in self.writers[:1]:
                    writer.add_scalar(name, float(value), step)
                continue
            value = np.asarray(value, np.float64)
            for writer in self.writers[:1]:
                writer.add_scalar(name, float(np.nanmedian(value)), step)
            for writer, run_value in zip(self.writers[1:], value):
                writer.add_scalar(name, float(run_value), step)

    def close(self):
        for writer in self.writers:
            writer.flush()
            writer.close()


class _StepMetrics:
    """Per-step training metrics kept on the devices until fetched (no host sync per step)."""

    def __init__(self, dp: parallel.DataParallel):
        self.dp = dp
        self.pending: List[Tuple[int, Dict[str, jax.Array]]] = []

    def add(self, step: int, metrics: Dict[str, jax.Array]) -> None:
        self.pending.append((step, metrics))

    def fetch(self) -> Tuple[Dict[str, Any], Optional[Tuple[int, float]]]:
        """(means of the pending steps' metrics, per run with several runs; (step, loss) of the
        first non-finite loss of a single run)."""
        values = [(step, self.dp.to_host(m)) for step, m in self.pending]
        self.pending = []
        bad = next(((step, float(m["loss"])) for step, m in values
                    if np.ndim(m["loss"]) == 0 and not np.isfinite(m["loss"])), None)
        means = {}
        for key in (values[0][1] if values else {}):
            mean = np.mean([m[key] for _, m in values], axis=0)
            means[key] = float(mean) if np.ndim(mean) == 0 else [float(v) for v in mean]
        return means, bad


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
    """Top-1/top-5 error over a whole eval split at each crop size (pad and mask); of every
    run, with several runs."""

    def __init__(self, config: ml_collections.ConfigDict, dp: parallel.DataParallel,
                 eval_step: Callable):
        self.config, self.dp, self.step = config, dp, eval_step
        # Built once; every evaluation iterates them afresh (no reloading of the split).
        self.batches = {crop: inputs.eval_batches(config, crop) for crop in config.eval_crop_sizes}

    def __call__(self, variables: Dict[str, Any],
                 diverged: Sequence[int] = ()) -> Dict[str, Dict[str, Any]]:
        """Evaluates the network's `variables` {"params", "batch_stats"}, placed for the steps
        (`DataParallel.put_state`). Batches are put onto the devices two ahead of the step (as
        in training) and the sums stay on the devices until the pass is over: one fetch per
        crop size. With several runs each metric is the median over the runs not `diverged`,
        and "runs" / "stats" give every run's value and the statistics (`summarize`)."""
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
            if np.ndim(count) == 0:
                results[str(crop)] = {**{k: float(v) for k, v in metrics.items()},
                                      "num_examples": int(count)}
                continue
            stats = {k: summarize(v, diverged) for k, v in metrics.items()}
            results[str(crop)] = {**{k: stats[k]["median"] for k in metrics},
                                  "num_examples": int(count[0]),
                                  "runs": {k: [float(x) for x in v] for k, v in metrics.items()},
                                  "stats": stats, "diverged": sorted(diverged)}
        return results


def _log_eval(writer: _MetricsWriter, step: int, results: Dict[str, Dict[str, Any]]) -> None:
    for crop, r in results.items():
        runs = r.get("runs", {})
        if "stats" in r and r["stats"]["top1_error"]["runs"]:
            top1 = r["stats"]["top1_error"]
            logging.info("eval at step %d, crop %s: top-1 error %.2f%% (%.2f±%.2f), median of %d "
                         "runs; top-5 error %.2f%% on %d examples", step, crop,
                         100 * top1["median"], 100 * top1["mean"], 100 * top1["std"],
                         top1["runs"], 100 * r["top5_error"], r["num_examples"])
        elif "stats" not in r:
            logging.info("eval at step %d, crop %s: top-1 error %.2f%%, top-5 error %.2f%% on %d "
                         "examples", step, crop, 100 * r["top1_error"], 100 * r["top5_error"],
                         r["num_examples"])
        writer.scalars(step, {f"eval/{k}_{crop}": runs.get(k, r[k])
                              for k in ("top1_error", "top5_error", "loss")})


def _diverged(checkpoints: checkpoint.Checkpoints, what: str,
              step: int) -> errors.NonFiniteLossError:
    checkpoints.wait()
    latest = checkpoints.latest_step()
    kept = ("no checkpoint was written yet" if latest is None else
            f"the last checkpoint (step {latest}) is intact")
    return errors.NonFiniteLossError(f"training diverged at step {step}: {what}; {kept}: "
                                     "lower learning_rate or use warmup='constant'")


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


def _restore(checkpoints: checkpoint.Checkpoints, setup: recipe.Setup, workdir: epath.Path,
             config: ml_collections.ConfigDict):
    try:
        return checkpoints.restore_latest(setup.abstract_state, setup.layouts)
    except errors.CheckpointMismatchError as e:
        raise errors.CheckpointMismatchError(f"{e}{_config_changes(workdir, config)}") from e


def _finished_run(workdir: epath.Path, step: int, total_steps: int, meta: dict, state,
                  evaluator: Evaluator, dp: parallel.DataParallel) -> Dict[str, Any]:
    """A rerun of a run that has nothing left to train: keeps its results.json."""
    found = (f"{workdir} already holds the final checkpoint (step {step} of {total_steps})"
             if step == total_steps else
             f"the run in {workdir} is at step {step}, past this config's {total_steps} steps "
             "(use a new --workdir for a shorter run)")
    path = workdir / "results.json"
    try:
        results = json.loads(path.read_text())
        if results.get("step") == step:
            logging.warning("nothing to train: %s; its results.json is kept as it is", found)
            return results
    except (OSError, ValueError):
        pass
    logging.warning("nothing to train: %s; results.json is missing or stale, so the checkpoint "
                    "is evaluated and results.json written", found)
    diverged = ([k for k, at in enumerate(np.asarray(state.diverged_at)) if at >= 0]
                if isinstance(state, recipe.Runs) else [])
    results = {"step": step, "total_steps": total_steps, "preempted": False,
               "train": meta.get("train", {}),
               "eval": evaluator(dp.put_state(recipe.variables_of(state)), diverged),
               "eval_step": step,
               "wall_time_s": None, "steps_this_run": 0,
               "devices": dp.describe(evaluator.config.model.norm)}
    if jax.process_index() == 0:
        rundir.write_json(path, results)
    return results


# --- training ------------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Trains (resuming from `workdir` if it holds a checkpoint), evaluates, returns results.

    Writes into `workdir`: config.json (and config_history/<step>.json, the config of each
    start that changed settings), run.lock (while running), checkpoints/ (Orbax), TensorBoard
    event files and results.json. Raises ValueError (DataError, WorkdirError, CheckpointError),
    NonFiniteLossError or Interrupted with one-line messages; everything that can be checked
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
            try:
                state, start_step, meta = _restore(checkpoints, setup, workdir, config)
                checkpoints.prune()  # keep_checkpoints holds whatever an earlier run left
                if start_step >= setup.total_steps:
                    return _finished_run(workdir, start_step, setup.total_steps, meta, state,
                                         evaluator, dp)
                results = _start(config, setup, dp, workdir, checkpoints, evaluator, source,
                                 signals, state, start_step, meta)
            finally:
                checkpoints.close()
            results.update(wall_time_s=round(time.monotonic() - t_start, 1),
                           devices=dp.describe(setup.model.norm))
            if jax.process_index() == 0:
                rundir.write_json(workdir / "results.json", results)
    return results


def _start(config: ml_collections.ConfigDict, setup: recipe.Setup, dp: parallel.DataParallel,
           workdir: epath.Path, checkpoints: checkpoint.Checkpoints, evaluator: Evaluator,
           source: Optional[pretrained.Source], signals: _StopSignals,
           state: Optional[recipe.TrainState], start_step: int, meta: dict) -> Dict[str, Any]:
    """Initialises the state (or takes the restored one), records the config, trains."""
    if state is None:
        state = setup.init_state(config.seed)
        if source is not None:  # a resumed run continues from its own checkpoint
            state = _start_from(source, state, setup.model)
    else:
        logging.info("resuming from step %d", start_step)
    signals.check("before training started")
    if jax.process_index() == 0:
        _record_config(workdir, config, start_step)
    return _train(config, setup, dp, dp.put_state(state), start_step, workdir, checkpoints,
                  evaluator, meta.get("train", {}), signals)


def _start_from(source: pretrained.Source, state, model):
    """`state` (fresh) with `source`'s backbone; each of several runs gets it."""
    if not isinstance(state, recipe.Runs):
        return state.replace(**pretrained.transfer_from(source, recipe.variables_of(state), model))
    variables = recipe.variables_of(state)
    runs = [pretrained.transfer_from(source, jax.tree.map(lambda x, k=k: x[k], variables), model)
            for k in range(len(state.diverged_at))]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *runs)
    return state.replace(state=state.state.replace(**stacked))


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


def _train(config: ml_collections.ConfigDict, setup: recipe.Setup, dp: parallel.DataParallel,
           state: recipe.TrainState, start_step: int, workdir: epath.Path,
           checkpoints: checkpoint.Checkpoints, evaluator: Evaluator,
           train_metrics: Dict[str, float], signals: _StopSignals) -> Dict[str, Any]:
    """The loop from `start_step`: step, then log, checkpoint and evaluate when it is time.
    At the last step the checkpoint is written before evaluation, so nothing that can fail
    afterwards costs the trained state. A signal stops the loop after the step (or the
    evaluation) it arrives in, with a checkpoint of that step."""
    total_steps = setup.total_steps
    eval_every = config.eval_every_steps or setup.steps_per_epoch
    batches = inputs.train_batches(config, dp, start_step)
    writer = _MetricsWriter(workdir, config.num_runs)
    metrics = _StepMetrics(dp)
    eval_results: Dict[str, Dict[str, Any]] = {}
    t_log, steps_since_log, step, stopped = time.monotonic(), 0, start_step, None
    eval_step = None
    diverged = _Divergence(config, dp, checkpoints)

    def save(step, state):
        if not bool(dp.to_host(recipe.all_finite(state))):  # never checkpoint a diverged state
            raise _diverged(checkpoints, "the state is not finite", step)
        checkpoints.save(step, dp.get_state(state), {"train": train_metrics})

    try:
        while step < total_steps and stopped is None:
            state, step_metrics = setup.train_step(state, next(batches))
            step += 1
            steps_since_log += 1
            metrics.add(step, step_metrics)
            if step == start_step + 1:  # keep compilation out of the throughput and ETA
                jax.block_until_ready(step_metrics)
                t_log, steps_since_log = time.monotonic(), 0
            stopped = signals.reached(step, checkpoints)
            saving = stopped is not None or is_time(step, config.checkpoint_every_steps,
                                                    total_steps)
            if saving or is_time(step, config.log_every_steps, total_steps) or \
                    is_time(step, eval_every, total_steps):
                means, bad = metrics.fetch()
                if bad:
                    raise _diverged(checkpoints, f"loss is {bad[1]}", bad[0])
                diverged.update(state)
                if means:
                    train_metrics = diverged.exclude(means)
            if stopped is not None or is_time(step, config.log_every_steps, total_steps):
                now = time.monotonic()
                _log_train(writer, step, total_steps, train_metrics,
                           float(setup.schedule(step - 1)), config.batch_size,
                           (now - t_log) / steps_since_log if steps_since_log else None,
                           config.num_runs)
                t_log, steps_since_log = now, 0
            if saving:
                save(step, state)
            if (stopped is None or step == total_steps) and is_time(step, eval_every, total_steps):
                eval_results = evaluator(recipe.variables_of(state), diverged.runs)
                eval_step = step
                _log_eval(writer, step, eval_results)
                t_log = time.monotonic()  # keep eval time out of the training throughput
                stopped = signals.reached(step, checkpoints)  # a signal during evaluation
                if stopped is not None and step < total_steps and not saving:
                    save(step, state)
    finally:
        writer.close()
        if hasattr(batches, "close"):  # stops a prefetching thread before the process ends
            batches.close()
    if stopped is not None and step < total_steps:
        logging.warning("%s (%s): checkpoint of step %d written; rerun the same command to "
                        "resume", "interrupted" if stopped == "SIGINT" else "preempted", stopped,
                        step)
    results = {"step": step, "total_steps": total_steps, "preempted": step < total_steps,
               "stop_signal": stopped if step < total_steps else None,
               "train": train_metrics, "eval": eval_results, "eval_step": eval_step,
               "steps_this_run": step - start_step}
    if config.num_runs > 1:
        results.update(num_runs=config.num_runs, diverged=diverged.report())
    return results


class _Divergence:
    """Which of several runs diverged, and when (from the state's `diverged_at`): a run that
    diverges is frozen and reported, the others go on; when every run has diverged the run
    stops as a single run does. A single run stops at its first non-finite loss."""

    def __init__(self, config: ml_collections.ConfigDict, dp: parallel.DataParallel,
                 checkpoints: checkpoint.Checkpoints):
        self.seed, self.num_runs, self.dp, self.checkpoints = (config.seed, config.num_runs, dp,
                                                               checkpoints)
        self.steps: Dict[int, int] = {}

    @property
    def runs(self) -> List[int]:
        return sorted(self.steps)

    def update(self, state) -> None:
        if not isinstance(state, recipe.Runs):
            return
        for run, step in enumerate(self.dp.to_host(state.diverged_at)):
            if step >= 0 and run not in self.steps:
                self.steps[run] = int(step)
                logging.warning("run %d (seed %d) diverged at step %d: it is frozen and left "
                                "out of the statistics; the other runs go on", run,
                                self.seed + run, step)
        if len(self.steps) == self.num_runs:
            raise _diverged(self.checkpoints, f"every one of the {self.num_runs} runs diverged "
                            f"(at steps {', '.join(map(str, self.steps.values()))})",
                            max(self.steps.values()))

    def exclude(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        """Per-run training metrics with the diverged runs' values set to NaN."""
        return {k: [float("nan") if run in self.steps else x for run, x in enumerate(v)]
                if isinstance(v, list) else v for k, v in metrics.items()}

    def report(self) -> List[Dict[str, int]]:
        return [{"run": run, "seed": self.seed + run, "step": step}
                for run, step in sorted(self.steps.items())]


def _log_train(writer: _MetricsWriter, step: int, total_steps: int, metrics: Dict[str, Any],
               lr: float, batch_size: int, seconds_per_step: Optional[float],
               num_runs: int = 1) -> None:
    scalars = {"train/loss": metrics["loss"], "train/error": metrics["error"],
               "train/learning_rate": lr}
    speed, runs = "", ""
    if seconds_per_step:  # not right after compilation
        images = batch_size * num_runs / seconds_per_step
        scalars["train/images_per_second"] = images
        speed = f"  {images:.0f} img/s  ETA {_hms((total_steps - step) * seconds_per_step)}"
    loss, error = metrics["loss"], metrics["error"]
    if num_runs > 1:
        loss, error = np.nanmedian(loss), np.nanmedian(error)
        runs = f" (medians of {np.sum(np.isfinite(metrics['loss']))} runs)"
    logging.info("step %d/%d  loss %.4f  error %.2f%%%s  lr %.4g%s", step, total_steps, loss,
                 100 * error, runs, lr, speed)
    writer.scalars(step, scalars)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
