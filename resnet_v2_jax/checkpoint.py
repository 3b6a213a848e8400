"""Orbax checkpoints of the training state, with the checks a long run needs.

Each step directory holds two items: "state" (the train state as global arrays, written
asynchronously) and "meta" (JSON: the model's signature and the step). Every process takes part
in saving and restoring; Orbax decides which process writes what.

* Restoring onto another device count works: the state is restored into the shardings of the
  current run, whatever wrote it.
* A latest checkpoint that cannot be read (a truncated file, a half-copied folder) is set aside
  as `<step>.unreadable` with a warning, and the one before it is used.
* A checkpoint of a different model (depth, unit, shortcut, width, classes ...) is refused with a
  one-line error instead of a shape mismatch deep inside Orbax.
"""

import logging as std_logging
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run."""


class Checkpoints:
    """Saves and restores the train state under `<workdir>/checkpoints`.

    Args:
      workdir: the run's folder (local path or gs://).
      signature: JSON-able description of the model; a checkpoint whose signature differs is
        refused.
      keep: how many checkpoints to keep.
      read_only: never write, create, clean up or set aside anything: safe on a run that is
        still training (eval-only).
    """

    def __init__(self, workdir: str, signature: dict, keep: int = 3, read_only: bool = False):
        self.directory = epath.Path(workdir) / "checkpoints"
        self.signature = signature
        self.read_only = read_only
        options = (ocp.CheckpointManagerOptions(read_only=True) if read_only else
                   ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                enable_async_checkpointing=True,
                                                cleanup_tmp_directories=True))
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def save(self, step: int, state: Any) -> None:
        """Starts writing `state` (global arrays) for `step`; returns before it is on disk."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"step": step, "model": self.signature})), force=True)

    def reached_preemption(self, step: int) -> bool:
        """True on every process once JAX's multi-host preemption sync point is reached."""
        return self.manager.reached_preemption(step)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The state of checkpoint `step`, in `abstract_state`'s shapes and shardings.

        Raises CheckpointError if there is no such step or it holds another model; Orbax's own
        errors if its files cannot be read.
        """
        if step not in self.manager.all_steps():
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory} (steps "
                                  f"{sorted(self.manager.all_steps())})")
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("model") != self.signature:
            raise CheckpointError(
                f"{self.directory} holds a checkpoint of another model "
                f"({_diff(meta.get('model'), self.signature)}); use a new --workdir or "
                "the matching config")
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    def restore_latest(self, abstract_state: Any) -> Tuple[Optional[Any], int]:
        """Restores the newest readable checkpoint into `abstract_state`'s shapes and shardings.

        Returns (state, step), or (None, 0) when there is no checkpoint. Unreadable checkpoints
        are skipped newest first with a warning; a different model's checkpoint raises.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                state = self.restore(step, abstract_state)
            except CheckpointError:
                raise
            except Exception as e:  # Orbax/tensorstore raise many types for damaged files.
                logging.warning("checkpoint at step %d is unreadable (%s: %s); trying an older one",
                                step, type(e).__name__, str(e).splitlines()[0][:200])
                self._set_aside(step)
                continue
            logging.info("restored checkpoint of step %d from %s", step, self.directory)
            return state, step
        if steps:
            raise CheckpointError(f"no readable checkpoint in {self.directory} (steps {steps}); "
                                  "move the folder away to start afresh")
        return None, 0

    def _set_aside(self, step: int) -> None:
        """Renames an unreadable step folder to `<step>.unreadable` (kept for inspection; the
        resumed run will write that step again). Read-only managers leave it in place."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            source = self.directory / str(step)
            target = self.directory / f"{step}.unreadable"
            if target.exists():
                target.rmtree()
            source.rename(target)
            logging.warning("moved it to %s", target)
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous writes are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _diff(saved: Optional[dict], current: dict) -> str:
    saved = saved or {}
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
                     for k in keys)


def quiet_orbax_info(record: std_logging.LogRecord) -> bool:
    """A logging filter: Orbax logs every save in detail at INFO; keep its warnings and errors."""
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname
