"""Data parallelism: the one module that knows about devices, meshes and collectives.

Train and eval steps are written once, per device, with named axes for the gradient mean and
the batch-norm statistics (pmap semantics). `DataParallel` runs them over every device of every
process, either with `jax.shard_map` over a 2-D mesh (the default; what `jax.pmap` itself is
built on since JAX 0.8) or with `jax.pmap` for older setups.

Batch-norm groups. The paper's runs normalised over each GPU's share of the batch (64 images
on CIFAR, 32 on ImageNet); the Flax example normalises over all devices. `bn_group_size`
chooses: 1 = per device, k = groups of k consecutive devices, 0 = all devices. Collectives under
`jax.shard_map` reject `axis_index_groups`, so the shard_map executor uses a mesh of shape
(num_devices // k, k) with axes ("data", "bn"): BN statistics are averaged over "bn" (within a
group) and gradients over both axes. The pmap executor has one axis, "data", and passes the
groups as `axis_index_groups`.

Several runs (`num_runs`, shard_map only). Independent runs of one config share the devices:
where the run count and the device count have a common divisor R (on one process), the mesh
gets a leading "runs" axis of size R and each group of devices trains its runs data parallel;
otherwise (R = 1) every run is data parallel over all devices. The per-device step then holds
several runs, computed vectorised or one after another (`recipe`, `runs_layout`). State and
metrics always carry a leading run axis, sharded over "runs" (one training run is the case of
size 1, and its mesh has a "runs" axis of size 1); gradients and BN statistics are reduced
within a run only, never across runs. This module decides the layout once: whether batches
carry a run axis too (`batch_per_run`: several runs that do not share their batches).
"""

import dataclasses
import math
import os
from typing import Any, Callable, Optional, Sequence

import flax.jax_utils
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_v2_jax import batching, errors

EXECUTORS = ("shard_map", "pmap")


@dataclasses.dataclass(frozen=True)
class Axes:
    """Named axes a per-device step reduces over. An axis is None where its reduction would span
    a single device: the step then emits no collective for it (see `pmean`)."""
    grad: Any                     # gradient and metric mean: every device (None: one device)
    bn: Any                       # BN batch statistics (None: per-device BN)
    bn_groups: Optional[Sequence[Sequence[int]]] = None  # pmap only
    bn_stats: Any = None          # running BN averages, when BN groups differ (else None)


def pmean(tree, axis_name):
    """`jax.lax.pmean` over `axis_name`; the tree itself when the axis is None (one device)."""
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def psum(tree, axis_name):
    """`jax.lax.psum` over `axis_name`; the tree itself when the axis is None (one device)."""
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def axis_index(axis_name):
    """This device's index along `axis_name`; 0 when the axis is None (one device)."""
    return 0 if axis_name is None else jax.lax.axis_index(axis_name)


class DataParallel:
    """Runs per-device steps over all devices, and moves state and batches to them.

    State (params, optimizer and BN statistics) is replicated (per run group, with several
    runs); batches are split on their batch axis. In the shard_map executor both are global
    `jax.Array`s on the mesh; in the pmap executor they carry a leading local-device axis, as
    `jax.pmap` expects.
    """

    def __init__(self, executor: str = "shard_map", bn_group_size: int = 0,
                 devices: Optional[Sequence[jax.Device]] = None, num_runs: int = 1,
                 share_batches: bool = False):
        if executor not in EXECUTORS:
            raise errors.ConfigError(
                f"unknown parallelism {executor!r}; choose one of {', '.join(EXECUTORS)}")
        if num_runs > 1 and executor != "shard_map":
            raise errors.ConfigError(f"num_runs={num_runs} needs parallelism='shard_map'")
        self.executor = executor
        self.devices = list(devices if devices is not None else jax.devices())
        # The processes this program is for: JAX's own for its devices; for compile-only
        # devices of a named target (`targets`), that target's, as if this were its process 0.
        self.process_count = len({d.process_index for d in self.devices})
        self.num_runs = num_runs
        n = len(self.devices)
        self.run_groups = math.gcd(num_runs, n) if self.process_count == 1 else 1
        per_run = n // self.run_groups
        group = bn_group_size or per_run
        if group < 1 or per_run % group:
            raise errors.ConfigError(
                f"bn_group_size={bn_group_size} must divide the {per_run} devices "
                "of a run (0 = all of them, 1 = per device)")
        self.bn_group_size = group
        self.devices_per_run = per_run
        grid = np.array(self.devices).reshape(self.run_groups, per_run // group, group)
        self.mesh = Mesh(grid, ("runs", "data", "bn"))
        # Collectives only where they reduce something: none on one device, no BN reduction
        # with per-device BN, and the running BN averages (identical within a group) averaged
        # over all devices only when there are several groups.
        several_groups = 1 < per_run // group
        if executor == "shard_map":
            grad = ("data", "bn")
            self.axes = Axes(grad=grad if per_run > 1 else None, bn="bn" if group > 1 else None,
                             bn_stats=grad if several_groups else None)
        else:
            groups = [list(range(i, i + group)) for i in range(0, n, group)]
            self.axes = Axes(grad="data" if n > 1 else None, bn="data" if group > 1 else None,
                             bn_groups=groups if group > 1 and several_groups else None,
                             bn_stats="data" if several_groups else None)
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        # Specs of what a step takes and gives: the state (one slice of the run axis per run
        # group), batches (split over the devices of a run; with runs that train on batches of
        # their own, one batch per run on the run axis) and outputs.
        self.batch_per_run = num_runs > 1 and not share_batches
        # The axis a device's first run is numbered along (None: every device holds all runs).
        self.runs_axis = "runs" if self.run_groups > 1 else None
        self.state_spec = P("runs")
        self.batch_spec = P(("data", "bn"))
        self.train_batch_spec = (P("runs", ("data", "bn")) if self.batch_per_run
                                 else self.batch_spec)
        self.replicated = NamedSharding(self.mesh, P())
        self.state_sharding = NamedSharding(self.mesh, self.state_spec)
        self.batch_sharding = NamedSharding(self.mesh, self.batch_spec)
        self.train_batch_sharding = NamedSharding(self.mesh, self.train_batch_spec)
        # pmap layout: a leading axis over this process's devices.
        self.local_batch_sharding = NamedSharding(Mesh(np.array(self.local_devices), ("local",)),
                                                  P("local"))

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def local_runs(self) -> int:
        """Runs a device holds (a slice of the run axis)."""
        return self.num_runs // self.run_groups

    def describe(self, norm: Any = "batch") -> str:
        """The devices, processes, BN groups (for the network's `norm`; other norms normalise
        each example alone) and runs, in one line."""
        runs = ""
        if self.num_runs > 1:
            runs = (f", {self.num_runs} runs: {self.run_groups} group(s) of "
                    f"{self.devices_per_run} device(s), {self.local_runs} run(s) per device")
        return (f"{self.executor} over {self.num_devices} devices ({len(self.local_devices)} local, "
                f"{self.process_count} processes), platform {self.devices[0].platform}, "
                + (f"BN groups of {self.bn_group_size} device(s)" if norm == "batch" else
                   f"{norm if isinstance(norm, str) else 'custom'} norm (per example, no "
                   "statistics across devices)") + runs)

    def check_batch_size(self, global_batch: int, name: str = "batch_size") -> int:
        """Returns the per-device batch, or raises if `global_batch` does not split evenly
        (the rule of `batching.local_batch_size`, which the input pipelines apply too)."""
        per_process = batching.local_batch_size(global_batch, self.process_count,
                                              self.devices_per_run, name)
        return per_process * self.run_groups // len(self.local_devices)

    # --- placement -------------------------------------------------------------------------

    def put_state(self, state):
        """Places a host or replicated state (stacked on the leading run axis) for the step
        functions. The arrays given are not kept: the train step donates the
        state's buffers to its result, so keep a host copy (`jax.device_get`) of a state you
        need after the first step."""
        if self.executor == "shard_map":
            return jax.device_put(state, self.state_sharding)
        return flax.jax_utils.replicate(jax.device_get(state), self.local_devices)

    def get_state(self, state):
        """Returns the state as global arrays on the mesh (checkpoints, export)."""
        if self.executor == "shard_map":
            return state
        return jax.device_put(self.to_host(state), self.replicated)

    def put_batch(self, batch, sharding: Optional[NamedSharding] = None):
        """Turns this process's share of a batch (numpy) into device arrays: split on its batch
        axis (the second, after the run axis, for `train_batch_sharding` with several runs)."""
        if self.executor == "shard_map":
            sharding = sharding or self.batch_sharding
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
        n = len(self.local_devices)
        return jax.tree.map(lambda x: jax.device_put(
            np.reshape(x, (n, -1) + x.shape[1:]), self.local_batch_sharding), batch)

    # --- compilation -----------------------------------------------------------------------

    def compile(self, per_device_step: Callable, *, returns_state: bool,
                batch_spec: Optional[P] = None, shared_args: int = 0) -> Callable:
        """Compiles a per-device `step(state, batch, *shared)` for all devices.

        The step sees its device's slice of the state (its runs), its share of the batch
        (split by `batch_spec`, default `self.batch_spec`) and the `shared_args` arguments after
        the batch whole (scalars such as the seed: values of the program, not constants), and
        reduces over `self.axes` whatever must be global. It returns (new state, metrics) when
        `returns_state` (the state buffers are then donated), else metrics only; metrics are
        per run, like the state.
        """
        donate = (0,) if returns_state else ()
        if self.executor == "pmap":
            return jax.pmap(per_device_step, axis_name="data", donate_argnums=donate,
                            in_axes=(0, 0) + (None,) * shared_args)
        outputs = self.state_spec  # metrics are per run like the state
        sharded = jax.shard_map(per_device_step, mesh=self.mesh,
                                in_specs=(self.state_spec, batch_spec or self.batch_spec,
                                          *(P(),) * shared_args),
                                out_specs=(self.state_spec, outputs) if returns_state else outputs,
                                # pmap semantics: the step itself guarantees replicated outputs.
                                check_vma=False)
        return jax.jit(sharded, donate_argnums=donate)

    def to_host(self, tree):
        """Fetches outputs (state or metrics, with their run axis) as numpy: gathered from
        every process where this one does not hold them whole."""
        return jax.tree.map(self._fetch, tree)

    def _fetch(self, x):
        if self.executor == "pmap":  # one copy per local device: the first
            first = np.asarray(x.addressable_data(0))
            return first.reshape(x.shape[1:])
        return np.asarray(x if x.is_fully_addressable else
                          multihost_utils.process_allgather(x, tiled=True))


def for_config(config, devices: Optional[Sequence[jax.Device]] = None) -> DataParallel:
    """The `DataParallel` a training run of `config` uses, over `devices` (default: all)."""
    return DataParallel(config.parallelism, config.bn_group_size, devices,
                        num_runs=config.num_runs, share_batches=config.share_batches)


# Variables by which cluster environments announce several processes.
_MULTI_PROCESS_ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                              "OMPI_COMM_WORLD_SIZE")


def initialize_distributed(force: Optional[bool] = None, coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
    """Calls `jax.distributed.initialize` where there are several processes; returns whether.

    `force` True/False decides; None decides from the arguments (any given) or the environment
    (TPU pod slices, SLURM with more than one task, Open MPI, JAX_COORDINATOR_ADDRESS). Without
    arguments JAX finds the coordinator, process count and index from that environment.
    """
    if force is None:
        explicit = coordinator_address or num_processes or process_id is not None
        slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
        force = bool(explicit or slurm or any(k in os.environ for k in _MULTI_PROCESS_ENVIRONMENT))
    if force:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return force
