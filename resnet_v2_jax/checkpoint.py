"""Orbax checkpoints of the training state, with the checks a long run needs.

Each step directory holds two items: "state" (the train state as global arrays, written
asynchronously) and "meta" (JSON: the step, the network's `weights.signature`, the state's
structure and the run's training metrics at that step). Every process takes part in saving
and restoring; Orbax decides which process writes what.

* Restoring onto another device count works: the state is restored into the shardings of the
  current run, whatever wrote it. Floating-point leaves are cast to the run's dtypes, and a
  state of another layout the caller can convert (`Layout`: the network's scanned or unrolled
  units) is restored in its own layout and converted.
* A checkpoint that does not fit this run (another network, optimiser or dtype) is refused with
  one line naming what differs (`CheckpointMismatchError`); nothing is renamed. Checkpoints of
  release 0.1 (meta "model" instead of "network") are compared on what they recorded.
* A checkpoint whose files cannot be read (a truncated file, a half-copied folder), or whose
  arrays read back as NaN or Inf (no run saves such a state), is set aside as
  `<step>.unreadable` with a warning naming what is wrong, and the one before it is used. A
  workdir whose checkpoints are all unreadable is refused rather than trained from scratch.
"""

import contextlib
import dataclasses
import re
import shutil
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from resnet_v2_jax import errors, models, weights

UNREADABLE_SUFFIX = ".unreadable"


# The state is written by every device that holds a copy of it (Orbax's replica-parallel save:
# each of them a slice of each replicated array), except arrays whose slice would be under
# 1 MiB, which the first copy writes whole: each slice is a program compiled and run per array
# and device, which costs more than a small array's copy. ResNet-164's state over 8 CPU devices
# saved in 1.6 s a checkpoint (6.1 s the first) sliced to the byte, in 0.2 s (0.4 s) so.
# Unlike Orbax's default handler, one built with options writes no per-array metadata files
# (array_metadatas/, which Orbax compares across hosts at a save); no restore reads them.
MIN_SLICE_BYTES = 2**20
_STATE_TYPES = ocp.type_handlers.create_type_handler_registry(
    (jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES)))


def tree_structure(tree: Any) -> Dict[str, str]:
    """{path: "dtype[shape]"} of every leaf, empty optimiser states included (they tell, say, a
    masked weight decay from an unmasked one). What `restore` compares before reading arrays."""
    empty = lambda x: x is None or (isinstance(x, tuple) and not x)  # EmptyState(), (), None
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=empty)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"):
            type(x).__name__ if empty(x) else f"{x.dtype}{list(x.shape)}" for path, x in leaves}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Another state structure a checkpoint of this run may hold (its shapes, dtypes and
    shardings as `abstract_state`), and `convert`, which brings such a state into the run's."""
    abstract_state: Any
    convert: Callable[[Any], Any]


# What a restore may also accept: a function giving the other layouts (built only when needed).
Layouts = Callable[[], Sequence[Layout]]


def _castable(structure: Dict[str, str]) -> Dict[str, str]:
    """A `tree_structure` with every dtype written as its kind ("float", "int"): a restore casts
    between the widths of a kind (float32 and float64, int32 and int64 under 64-bit JAX)."""
    return {k: re.sub(r"^(?:b?(float)|u?(int))\d+\[", r"\1\2[", v)
            for k, v in structure.items()}


def has_checkpoints(workdir: epath.Path) -> bool:
    """Whether `workdir` holds a checkpoint step folder (readable or not), read without Orbax."""
    directory = epath.Path(workdir) / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


class Checkpoints:
    """Saves and restores the train state under `<workdir>/checkpoints`.

    Args:
      workdir: the run's folder (an absolute local path or gs://; see `rundir.resolve`).
      model: the network the state's parameters belong to; a checkpoint of a network with
        another `weights.signature` is refused.
      keep: how many checkpoints to keep.
      read_only: never write, create, clean up or set aside anything: safe on a run that is
        still training (eval-only).
      num_runs: how many runs the state holds (`config.num_runs`); a checkpoint of another
        number is refused.
    """

    def __init__(self, workdir: epath.Path, model: models.ResNetV2, keep: int = 3,
                 read_only: bool = False, num_runs: int = 1):
        self.directory = epath.Path(workdir) / "checkpoints"
        self.model = model
        self.signature = weights.signature(model)
        self.keep = keep
        self.num_runs = num_runs
        self._failed = False
        self.read_only = read_only
        # The folder is made by the first save (create=False): a run stopped before it, say
        # while compiling, leaves no empty checkpoints/ to be read as a run that saved nothing.
        # read_only comes with the options it implies, which Orbax would otherwise warn it sets.
        options = (ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                save_interval_steps=0) if read_only else
                   ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                                enable_async_checkpointing=True,
                                                cleanup_tmp_directories=True))
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(
                               type_handler_registry=_STATE_TYPES),
                           "meta": ocp.JsonCheckpointHandler()})
        # Orbax 0.12 deletes the temporary folders of interrupted saves in a background thread
        # and waits for it only at the first save. A run that restores, sets a damaged
        # checkpoint aside or fails before saving would race that thread, which then dies at
        # interpreter exit with a traceback after our error line. Orbax has no public way to
        # wait for it: this private method is called directly, so that a rename in Orbax fails
        # loudly (and tests/test_run_safety.py names it) instead of bringing the race back.
        self.manager._maybe_await_cleanup_tmp_directory()  # pylint: disable=protected-access

    def save(self, step: int, state: Any, extra: Optional[dict] = None) -> None:
        """Starts writing `state` (global arrays) for `step`; returns before it is on disk.
        `extra` (JSON-able, e.g. the training metrics) is stored beside it, see `meta`.
        Raises CheckpointError, in one line, when there is no room for it on a local disk or
        when writing it (or the previous one, which finishes first) fails."""
        meta = {"step": step, "network": self.signature, "num_runs": self.num_runs,
                "structure": tree_structure(state), **(extra or {})}
        self._check_space(step, state)
        with self._writing(step):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def _check_space(self, step: int, state: Any) -> None:
        if "://" in str(self.directory) or jax.process_index() != 0:
            return
        need = sum(x.nbytes for x in jax.tree.leaves(state)) * 1.05 + 2**20
        free = shutil.disk_usage(self.directory.parent).free  # checkpoints/ may not exist yet
        if free < need:
            latest = self.manager.latest_step()
            then = f"to resume from step {latest}" if latest is not None else "to start again"
            raise errors.CheckpointError(
                f"no room for checkpoint {step} in {self.directory}: it needs about "
                f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; free space and rerun "
                f"the same command {then}")

    @contextlib.contextmanager
    def _writing(self, step: Optional[int]):
        """Turns a failed write (in this call, or an earlier asynchronous one it waits for) into
        one CheckpointError line naming the folder and the cause."""
        try:
            yield
        except Exception as e:  # Orbax and tensorstore raise many types
            self._failed = True
            text = str(e)
            cause = re.search(r"No space left on device|Permission denied|Read-only file system|"
                              r"Disk quota exceeded|Input/output error", text)
            cause = cause[0] if cause else (text.splitlines() or [type(e).__name__])[0][:200]
            raise errors.CheckpointError(
                f"writing a checkpoint{'' if step is None else f' (step {step})'} in "
                f"{self.directory} failed: {cause}; fix that and rerun the same command to "
                f"resume from the newest complete checkpoint") from e

    def reached_preemption(self, step: int) -> bool:
        """True on every process once JAX's multi-host preemption sync point is reached."""
        return self.manager.reached_preemption(step)

    def prune(self) -> None:
        """Deletes all but the newest `keep` checkpoints (Orbax does it at a save; a run that
        saves nothing, such as a rerun of a finished run, does it here)."""
        if self.read_only:
            return
        for step in sorted(self.manager.all_steps())[:-self.keep or None]:
            self.manager.delete(step)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def meta(self, step: int) -> dict:
        """The JSON saved beside checkpoint `step` (raises Orbax's errors if unreadable)."""
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def check_fits(self, step: int, meta: dict, abstract_state: Any,
                   layouts: Layouts = tuple) -> Layout:
        """The layout to restore checkpoint `step` (whose `meta` is given) in: the run's own
        (`abstract_state`, converted by nothing) or one of `layouts()` (called only when the
        run's own does not fit). Raises
        CheckpointMismatchError, naming what differs, if it holds another network or a state
        of another structure (the widths of dtypes aside: restoring casts them)."""
        if "network" in meta:
            differences = weights.signature_differences(meta["network"], self.signature)
        else:  # release 0.1
            current = _signature_of_0_1(self.model)
            differences = [(k, meta.get("model", {}).get(k), current[k]) for k in current
                           if meta.get("model", {}).get(k) != current[k]]
        if differences:
            shown = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, a, b in differences)
            raise errors.CheckpointMismatchError(
                f"{self.directory} holds a checkpoint of another network ({shown}); use a new "
                "--workdir or the matching config")
        if meta.get("num_runs", 1) != self.num_runs:
            raise errors.CheckpointMismatchError(
                f"checkpoint {step} in {self.directory} holds {meta.get('num_runs', 1)} run(s), "
                f"this config trains {self.num_runs} (num_runs): resume with "
                f"--config.num_runs={meta.get('num_runs', 1)} or use a new --workdir")
        own = Layout(abstract_state, lambda state: state)
        saved = meta.get("structure")
        if saved is None or _castable(saved) == _castable(tree_structure(abstract_state)):
            return own
        for layout in layouts():
            if _castable(saved) == _castable(tree_structure(layout.abstract_state)):
                return layout
        raise errors.CheckpointMismatchError(
            f"checkpoint {step} in {self.directory} does not fit the state this config "
            f"builds ({_structure_diff(saved, tree_structure(abstract_state))}); resume with the "
            "settings of the run that wrote it or use a new --workdir")

    def restore(self, step: int, abstract_state: Any, layouts: Layouts = tuple) -> Any:
        """The state of checkpoint `step`, in `abstract_state`'s shapes, dtypes and shardings
        (converted from one of `layouts` where it holds that).

        Raises CheckpointError if there is no such step, CheckpointMismatchError if it holds
        another network or state structure; Orbax's own errors if its files cannot be read.
        """
        if step not in self.manager.all_steps():
            raise errors.CheckpointError(f"no checkpoint of step {step} in {self.directory} (steps "
                                         f"{sorted(self.manager.all_steps())})")
        layout = self.check_fits(step, self.meta(step), abstract_state, layouts)
        return self._converted(layout, self._read_state(step, layout.abstract_state),
                               abstract_state)

    def read(self, abstract_state: Any, step: Optional[int] = None,
             layouts: Layouts = tuple) -> Tuple[Any, int]:
        """(state, step) of checkpoint `step`, or of the latest readable one, for commands that
        read a run without training it; CheckpointError if there is none."""
        if step is not None:
            return self.restore(step, abstract_state, layouts), step
        state, step, _ = self.restore_latest(abstract_state, layouts)
        if state is None:
            raise errors.CheckpointError(
                f"no checkpoint in {self.directory}: the run has not saved one yet")
        return state, step

    @staticmethod
    def _converted(layout: Layout, state: Any, abstract_state: Any) -> Any:
        """`layout.convert(state)`, checked to have exactly the run's structure."""
        state = layout.convert(state)
        if _castable(tree_structure(state)) != _castable(tree_structure(abstract_state)):
            raise errors.CheckpointError(
                "a checkpoint of another layout did not convert into this "
                "run's state; resume with the settings of the run that wrote "
                "it or use a new --workdir")
        return state

    def _read_state(self, step: int, abstract_state: Any) -> Any:
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                abstract_state,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))))["state"]

    def restore_latest(self, abstract_state: Any,
                       layouts: Layouts = tuple) -> Tuple[Optional[Any], int, dict]:
        """Restores the newest readable checkpoint into `abstract_state`'s shapes, dtypes and
        shardings (converted from one of `layouts` where it holds that).

        Returns (state, step, meta), or (None, 0, {}) when the folder holds no checkpoint at
        all. A checkpoint that does not fit raises CheckpointMismatchError and nothing is
        touched. Damaged ones (their files cannot be read, though their structure fits) are set
        aside newest first with a warning; if none is left, or only set-aside ones exist,
        CheckpointError: the run must not start from scratch over checkpoints it could not use.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                meta = self.meta(step)
            except Exception as e:  # Orbax/tensorstore raise many types for damaged files.
                self._set_aside(step, e)
                continue
            layout = self.check_fits(step, meta, abstract_state, layouts)  # not damage
            try:
                state = self._read_state(step, layout.abstract_state)
            except Exception as e:
                if "structure" not in meta:  # written before structures were saved: unsure
                    raise errors.CheckpointError(
                        f"checkpoint {step} in {self.directory} cannot be restored into this "
                        f"run's state ({type(e).__name__}); use a new --workdir or the config of "
                        "the run that wrote it") from e
                self._set_aside(step, e)
                continue
            if not _all_finite(state):
                # No run saves a state that is not finite (a diverged run is frozen at its last
                # finite one): its array files decoded to NaN or Inf, so they are damaged.
                self._set_aside(step, errors.CheckpointError(
                    "its arrays hold NaN or Inf, which no run saves: their files are damaged"))
                continue
            logging.info("restored checkpoint of step %d from %s", step, self.directory)
            return self._converted(layout, state, abstract_state), step, meta
        set_aside = sorted(p.name for p in self.directory.glob(f"*{UNREADABLE_SUFFIX}")) \
            if self.directory.exists() else []
        if steps or set_aside:
            raise errors.CheckpointError(
                f"no readable checkpoint in {self.directory} (unreadable: "
                f"{', '.join(set_aside) or steps}); a run does not start from scratch over "
                "checkpoints it could not use: move the folder away to start afresh")
        return None, 0, {}

    def _set_aside(self, step: int, error: Exception) -> None:
        """Renames a damaged step folder to `<step>.unreadable` (kept for inspection; the
        resumed run will write that step again). Read-only managers leave it in place."""
        logging.warning("checkpoint at step %d in %s is unreadable (%s); trying an older one",
                        step, self.directory, _damage(error))
        if self.read_only:
            return
        if jax.process_index() == 0:
            source = self.directory / str(step)
            target = self.directory / f"{step}{UNREADABLE_SUFFIX}"
            if target.exists():
                target.rmtree()
            source.rename(target)
            logging.warning("moved it to %s", target)
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous writes are on disk."""
        with self._writing(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending writes and closes the manager. A failure already reported (by a
        save or wait) is not raised again."""
        failed_before = self._failed
        try:
            self.wait()
        except errors.CheckpointError:
            if not failed_before:
                raise
        finally:
            try:
                self.manager.close()
            except Exception:  # after a failed write Orbax may fail again here
                if not self._failed:
                    raise


@jax.jit
def _all_finite(state: Any) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state)
                              if jnp.issubdtype(x.dtype, jnp.inexact)] or [True]))


def _damage(error: BaseException) -> str:
    """What is wrong with a damaged checkpoint, in one line: the innermost cause of Orbax's
    error. Orbax wraps TensorStore's error, which names the array and what is wrong with its
    file (say a byte range past the end of a truncated file), in one that quotes a method's
    repr instead of the details."""
    while error.__cause__ is not None or (error.__context__ is not None
                                          and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {line[:400]}" if line else type(error).__name__


def _signature_of_0_1(model: models.ResNetV2) -> dict:
    """What release 0.1 recorded of a network in its checkpoints' meta, for this network."""
    signature = {"num_classes": model.num_classes, "arch": model.stem,
                 "depth": 2 + sum(model.stage_sizes) * (3 if model.bottleneck else 2),
                 "bottleneck": model.bottleneck, "unit": model.unit, "shortcut": model.shortcut,
                 "stride_on": model.stride_on}
    if model.stem == "imagenet":
        signature["stem_norm"] = model.stem_norm
    return signature


def _structure_diff(saved: Dict[str, str], current: Dict[str, str], examples: int = 2) -> str:
    """A short account of how two `tree_structure`s differ, grouped by the train state's
    top-level field (paths are shown below the runs' "state/", the part every run shares)."""
    saved, current = ({k.removeprefix("state/"): v for k, v in s.items()}
                      for s in (saved, current))

    def group(keys):
        return sorted({k.split("/")[0] for k in keys})
    only_saved = [k for k in saved if k not in current]
    only_current = [k for k in current if k not in saved]
    changed = [k for k in saved if k in current and saved[k] != current[k]]
    parts = []
    if changed:
        parts.append(f"{len(changed)} entries differ in {'/'.join(group(changed))}, e.g. "
                     + "; ".join(f"{k}: checkpoint {saved[k]} vs config {current[k]}"
                                 for k in changed[:examples]))
    if only_saved:
        parts.append(f"{len(only_saved)} entries of {'/'.join(group(only_saved))} only in the "
                     f"checkpoint, e.g. {', '.join(only_saved[:examples])}")
    if only_current:
        parts.append(f"{len(only_current)} entries of {'/'.join(group(only_current))} only in "
                     f"this config, e.g. {', '.join(only_current[:examples])}")
    return "; ".join(parts)

