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
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from resnet_v2_jax import (checkpoint, configuration, inputs, parallel, pretrained, recipe,
                           rundir)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


# --- the loop's parts ----------------------------------------------------------------------------

def is_time(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (log, eval, checkpoint) runs after `step`: every `every`
    steps and after the last one."""
    return step == last or (every > 0 and step % every == 0)


class Interrupted(Exception):
    """SIGINT or SIGTERM before training started: nothing was trained."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal_name = signal_name


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
            raise Interrupted(self.received, f"interrupted ({self.received}) {phase}; nothing "
                              "was trained: rerun the same command to start")

    def reached(self, step: int, checkpoints: checkpoint.Checkpoints) -> Optional[str]:
        """The signal to stop for after `step`, or None."""
        if self.received is None and jax.process_count() > 1 and \
                checkpoints.reached_preemption(step):
            self.received = "preemption"
        return self.received


class _MetricsWriter:
    """TensorBoard event files (tensorboardX: standard event files without TensorFlow, local or
    gs://), written by process 0 only."""

    def __init__(self, workdir: epath.Path):
        self.writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(logdir=str(workdir), flush_secs=30)

    def scalars(self, step: int, values: Dict[str, float]):
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self):
        if self.writer:
            self.writer.flush()
            self.writer.close()


class _StepMetrics:
    """Per-step training metrics kept on the devices until fetched (no host sync per step)."""

    def __init__(self, dp: parallel.DataParallel):
        self.dp = dp
        self.pending: List[Tuple[int, Dict[str, jax.Array]]] = []

    def add(self, step: int, metrics: Dict[str, jax.Array]) -> None:
        self.pending.append((step, metrics))

    def fetch(self) -> Tuple[Dict[str, float], Optional[Tuple[int, float]]]:
        """(means of the pending steps' metrics, (step, loss) of the first non-finite loss)."""
        values = [(step, self.dp.to_host(m)) for step, m in self.pending]
        self.pending = []
        bad = next(((step, float(m["loss"])) for step, m in values
                    if not np.isfinite(m["loss"])), None)
        means = {k: float(np.mean([m[k] for _, m in values])) for k in values[0][1]} \
            if values else {}
        return means, bad


class Evaluator:
    """Top-1/top-5 error over a whole eval split at each crop size (pad and mask)."""

    def __init__(self, config: ml_collections.ConfigDict, dp: parallel.DataParallel,
                 eval_step: Callable):
        self.config, self.dp, self.step = config, dp, eval_step
        # Built once; every evaluation iterates them afresh (no reloading of the split).
        self.batches = {crop: inputs.eval_batches(config, crop) for crop in config.eval_crop_sizes}

    def __call__(self, variables: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
        """Evaluates the network's `variables` {"params", "batch_stats"}, placed for the steps
        (`DataParallel.put_state`). Batches are put onto the devices two ahead of the step (as
        in training) and the sums stay on the devices until the pass is over: one fetch per
        crop size."""
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
            count = float(totals["count"])
            results[str(crop)] = {"top1_error": float(totals["top1_wrong"]) / count,
                                  "top5_error": float(totals["top5_wrong"]) / count,
                                  "loss": float(totals["loss"]) / count,
                                  "num_examples": int(count)}
        return results


def _log_eval(writer: _MetricsWriter, step: int, results: Dict[str, Dict[str, float]]) -> None:
    for crop, r in results.items():
        logging.info("eval at step %d, crop %s: top-1 error %.2f%%, top-5 error %.2f%% on %d "
                     "examples", step, crop, 100 * r["top1_error"], 100 * r["top5_error"],
                     r["num_examples"])
        writer.scalars(step, {f"eval/top1_error_{crop}": r["top1_error"],
                              f"eval/top5_error_{crop}": r["top5_error"],
                              f"eval/loss_{crop}": r["loss"]})


def _diverged(checkpoints: checkpoint.Checkpoints, what: str, step: int) -> NonFiniteLossError:
    checkpoints.wait()
    return NonFiniteLossError(
        f"training diverged at step {step}: {what}; the last checkpoint (step "
        f"{checkpoints.latest_step()}) is intact: lower learning_rate or use warmup='constant'")


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
    except checkpoint.CheckpointMismatchError as e:
        raise checkpoint.CheckpointMismatchError(f"{e}{_config_changes(workdir, config)}") from e


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
    results = {"step": step, "total_steps": total_steps, "preempted": False,
               "train": meta.get("train", {}),
               "eval": evaluator(dp.put_state(recipe.variables_of(state))), "eval_step": step,
               "wall_time_s": None, "steps_this_run": 0, "devices": dp.describe()}
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
    t_start = time.time()
    with _StopSignals() as signals:
        workdir = rundir.resolve(workdir)
        configuration.validate(config)
        dp = parallel.DataParallel(config.parallelism, config.bn_group_size)
        num_train_examples = inputs.check_data(config)
        setup = recipe.build(config, dp, num_train_examples)
        evaluator = Evaluator(config, dp, setup.eval_step)
        logging.info("devices: %s", dp.describe())
        logging.info("batch: %d global, %d per process, %d per device; %d steps (%.1f epochs of "
                     "%d examples)", config.batch_size, config.batch_size // jax.process_count(),
                     dp.check_batch_size(config.batch_size), setup.total_steps,
                     setup.total_steps / setup.steps_per_epoch, num_train_examples)
        source = None
        if config.init_from and not checkpoint.has_checkpoints(workdir):
            source = pretrained.load_source(config.init_from, setup.model)
        signals.check("before the workdir was touched")
        rundir.make(workdir)
        with rundir.RunLock(workdir):
            checkpoints = checkpoint.Checkpoints(workdir, setup.model, config.keep_checkpoints)
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
            results.update(wall_time_s=round(time.time() - t_start, 1), devices=dp.describe())
            if jax.process_index() == 0:
                rundir.write_json(workdir / "results.json", results)
    return results


def _start(config: ml_collections.ConfigDict, setup: recipe.Setup, dp: parallel.DataParallel,
           workdir: epath.Path, checkpoints: checkpoint.Checkpoints, evaluator: Evaluator,
           source: Optional[pretrained.Source], signals: _StopSignals,
           state: Optional[recipe.TrainState], start_step: int, meta: dict) -> Dict[str, Any]:
    """Initialises the state (or takes the restored one), records the config, trains."""
    if state is None:
        state = setup.init_state(jax.random.PRNGKey(config.seed))
        if source is not None:  # a resumed run continues from its own checkpoint
            variables = pretrained.transfer_from(source, recipe.variables_of(state),
                                                 setup.model)
            state = state.replace(**variables)
    else:
        logging.info("resuming from step %d", start_step)
    signals.check("before training started")
    if jax.process_index() == 0:
        _record_config(workdir, config, start_step)
    return _train(config, setup, dp, dp.put_state(state), start_step, workdir, checkpoints,
                  evaluator, meta.get("train", {}), signals)


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
    writer = _MetricsWriter(workdir)
    metrics = _StepMetrics(dp)
    eval_results: Dict[str, Dict[str, float]] = {}
    t_log, steps_since_log, step, stopped, eval_step = time.time(), 0, start_step, None, None

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
                t_log, steps_since_log = time.time(), 0
            stopped = signals.reached(step, checkpoints)
            saving = stopped is not None or is_time(step, config.checkpoint_every_steps,
                                                    total_steps)
            if saving or is_time(step, config.log_every_steps, total_steps) or \
                    is_time(step, eval_every, total_steps):
                means, bad = metrics.fetch()
                if bad:
                    raise _diverged(checkpoints, f"loss is {bad[1]}", bad[0])
                if means:
                    train_metrics = means
            if stopped is not None or is_time(step, config.log_every_steps, total_steps):
                now = time.time()
                _log_train(writer, step, total_steps, train_metrics,
                           float(setup.schedule(step - 1)), config.batch_size,
                           (now - t_log) / steps_since_log if steps_since_log else None)
                t_log, steps_since_log = now, 0
            if saving:
                save(step, state)
            if (stopped is None or step == total_steps) and is_time(step, eval_every, total_steps):
                eval_results, eval_step = evaluator(recipe.variables_of(state)), step
                _log_eval(writer, step, eval_results)
                t_log = time.time()  # keep eval time out of the training throughput
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
    return {"step": step, "total_steps": total_steps, "preempted": step < total_steps,
            "stop_signal": stopped if step < total_steps else None,
            "train": train_metrics, "eval": eval_results, "eval_step": eval_step,
            "steps_this_run": step - start_step}


def _log_train(writer: _MetricsWriter, step: int, total_steps: int, metrics: Dict[str, float],
               lr: float, batch_size: int, seconds_per_step: Optional[float]) -> None:
    scalars = {"train/loss": metrics["loss"], "train/error": metrics["error"],
               "train/learning_rate": lr}
    speed = ""
    if seconds_per_step:  # not right after compilation
        scalars["train/images_per_second"] = batch_size / seconds_per_step
        speed = (f"  {batch_size / seconds_per_step:.0f} img/s  ETA "
                 f"{_hms((total_steps - step) * seconds_per_step)}")
    logging.info("step %d/%d  loss %.4f  error %.2f%%  lr %.4g%s", step, total_steps,
                 metrics["loss"], 100 * metrics["error"], lr, speed)
    writer.scalars(step, scalars)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
