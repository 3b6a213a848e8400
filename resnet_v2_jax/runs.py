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
import optax
from etils import epath

from resnet_v2_jax import checkpoint, configuration, datasets, recipe, rundir


@dataclasses.dataclass(frozen=True)
class Run:
    """A run read back: its config (migrated), the network as that config builds it (one
    device, no BN reduction axes), the variables {"params", "batch_stats"} of one checkpoint,
    and which checkpoint that was."""
    config: ml_collections.ConfigDict
    model: Any
    variables: Dict[str, Any]
    step: int
    checkpoint: str


def split_run_path(path: str) -> Tuple[epath.Path, Optional[int]]:
    """(workdir, step) of a step folder `<workdir>/checkpoints/<step>`; (workdir, None) of a
    workdir (its latest readable checkpoint is meant)."""
    path = rundir.resolve(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a run's workdir or one of its step "
                                "folders <workdir>/checkpoints/<step>")
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path, None
    raise ValueError(f"{path} is neither a run's workdir (with checkpoints/) nor a step folder "
                     "<workdir>/checkpoints/<step>")


def read_run(path: str, config: Optional[ml_collections.ConfigDict] = None) -> Run:
    """The run at `path` (a workdir or a step folder): `config` (default: the run's own
    config.json) says what it trained; its checkpoint is restored read-only onto one device.
    Raises one-line errors (FileNotFoundError, CheckpointError) when there is nothing to read."""
    workdir, step = split_run_path(path)
    config = config if config is not None else configuration.read(str(workdir))
    configuration.validate(config)
    model = recipe.create_model(config, datasets.get(config.dataset).num_classes)
    tx = recipe.create_optimizer(config, optax.constant_schedule(0.0))  # the state's structure
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = recipe.abstract_train_state(model, tx, config.image_size, one_device)
    checkpoints = checkpoint.Checkpoints(workdir, model, read_only=True)
    try:
        state, step = checkpoints.read(abstract, step, lambda: recipe.other_layouts(
            model, tx, config.image_size, one_device))
    finally:
        checkpoints.close()
    return Run(config, model, recipe.variables_of(state), step,
               str(workdir / "checkpoints" / str(step)))
