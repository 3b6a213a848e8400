"""Reading a run back: its config and one of its checkpoints as a network and its variables.

Every command that reads a training run without training it goes through `read_run`: eval-only
(`evaluate`), weights export (`export`), the propagation analysis of a trained network
(`analyze --workdir`) and fine-tuning from a run (`--config.init_from=<workdir>`). A run is
named by its workdir (its latest readable checkpoint) or by one step folder
`<workdir>/checkpoints/<step>`; nothing in it is changed.
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections
import numpy as np
import optax
from etils import epath

from resnet_v2_jax import checkpoint, configuration, datasets, errors, recipe, rundir


@dataclasses.dataclass(frozen=True)
class Run:
    """A run read back: its config (migrated), the network as that config builds it (one
    device, no BN reduction axes), the variables {"params", "batch_stats"} of one checkpoint,
    stacked on a leading run axis (of run `run` alone where one of several was chosen, else of
    all `num_runs`), which checkpoint that was, and the runs that had diverged there with the
    step each diverged at (a diverged run's weights are frozen at the step before)."""
    config: ml_collections.ConfigDict
    model: Any
    variables: Dict[str, Any]
    step: int
    checkpoint: str
    num_runs: int = 1
    run: Optional[int] = None
    diverged_at: Dict[int, int] = dataclasses.field(default_factory=dict)

    @property
    def diverged(self) -> Tuple[int, ...]:
        return tuple(sorted(self.diverged_at))

    @property
    def weights_step(self) -> int:
        """The step whose weights `variables` are: the checkpoint's, or for a chosen run that
        diverged, the step before it diverged."""
        if self.run is not None and self.run in self.diverged_at:
            return self.diverged_at[self.run] - 1
        return self.step

    def divergence(self) -> str:
        """'' or, for a chosen run that diverged, a clause saying so."""
        if self.run is None or self.run not in self.diverged_at:
            return ""
        return (f"run {self.run} diverged at step {self.diverged_at[self.run]}: these are its "
                f"last finite weights, of step {self.weights_step}")


def split_run_path(path: str) -> Tuple[epath.Path, Optional[int]]:
    """(workdir, step) of a step folder `<workdir>/checkpoints/<step>`; (workdir, None) of a
    workdir (its latest readable checkpoint is meant)."""
    path = rundir.resolve(path)
    if not path.exists():
        raise errors.NotFoundError(
            f"{path} does not exist: give a run's workdir or one of its step "
            "folders <workdir>/checkpoints/<step>")
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path, None
    raise errors.WorkdirError(
        f"{path} is neither a run's workdir (with checkpoints/) nor a step folder "
        "<workdir>/checkpoints/<step>")


def read_run(path: str, config: Optional[ml_collections.ConfigDict] = None,
             run: Optional[int] = None) -> Run:
    """The run at `path` (a workdir or a step folder): `config` (default: the run's own
    config.json) says what it trained; its checkpoint is restored read-only onto one device.
    Of a workdir of several runs (`config.num_runs`), `run` picks one; None keeps them all.
    Raises one-line errors (`errors.NotFoundError`, `WorkdirError`, `CheckpointError`) when
    there is nothing to read."""
    workdir, step = split_run_path(path)
    config = config if config is not None else configuration.read(str(workdir))
    configuration.validate(config)
    num_runs = config.num_runs
    if run is not None and not 0 <= run < num_runs:
        raise errors.ConfigError(
            f"{workdir} holds {num_runs} run(s): choose a run in 0..{num_runs - 1}, "
            f"not {run}")
    model = recipe.create_model(config, datasets.get(config.dataset).num_classes)
    tx = recipe.create_optimizer(config, optax.constant_schedule(0.0))  # the state's structure
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = recipe.abstract_train_state(
        recipe.runs_initializer(model, tx, config.image_size, num_runs), one_device)
    checkpoints = checkpoint.Checkpoints(workdir, model, read_only=True, num_runs=num_runs)
    try:
        state, step = checkpoints.read(abstract, step, lambda: recipe.other_layouts(
            model, tx, config.image_size, one_device, num_runs))
    finally:
        checkpoints.close()
    variables = recipe.variables_of(state.state)
    steps = np.asarray(state.diverged_at)
    diverged_at = {int(k): int(steps[k]) for k in np.flatnonzero(steps >= 0)}
    if run is not None:
        variables = jax.tree.map(lambda x: x[run:run + 1], variables)
    return Run(config, model, variables, step, str(workdir / "checkpoints" / str(step)),
               num_runs, run, diverged_at)


def one_run(run: Run, flag: str) -> Run:
    """`run` with the variables of its one network (the run axis taken off): of the run it
    holds or the one chosen; raises a one-line `errors.ConfigError` asking for `flag` where it
    holds several and none was chosen."""
    if len(jax.tree.leaves(run.variables)[0]) > 1:
        raise errors.ConfigError(f"{run.checkpoint} holds {run.num_runs} runs: choose one with "
                                 f"{flag}=k (0..{run.num_runs - 1})")
    return dataclasses.replace(run, variables=jax.tree.map(lambda x: x[0], run.variables))
