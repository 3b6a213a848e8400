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
"""

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import flax.jax_utils
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from resnet_v2_jax import inputs

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

    State (params, optimizer and BN statistics) is replicated; batches are split on their
    leading axis. In the shard_map executor both are global `jax.Array`s on the mesh; in the pmap
    executor they carry a leading local-device axis, as `jax.pmap` expects.
    """

    def __init__(self, executor: str = "shard_map", bn_group_size: int = 0,
                 devices: Optional[Sequence[jax.Device]] = None):
        if executor not in EXECUTORS:
            raise ValueError(f"unknown parallelism {executor!r}; choose one of {', '.join(EXECUTORS)}")
        self.executor = executor
        self.devices = list(devices if devices is not None else jax.devices())
        n = len(self.devices)
        group = bn_group_size or n
        if group < 1 or n % group:
            raise ValueError(f"bn_group_size={bn_group_size} must divide the device count {n} "
                             "(0 = all devices, 1 = per device)")
        self.bn_group_size = group
        self.mesh = Mesh(np.array(self.devices).reshape(n // group, group), ("data", "bn"))
        # Collectives only where they reduce something: none on one device, no BN reduction
        # with per-device BN, and the running BN averages (identical within a group) averaged
        # over all devices only when there are several groups.
        several_groups = 1 < n // group
        if executor == "shard_map":
            grad = ("data", "bn")
            self.axes = Axes(grad=grad if n > 1 else None, bn="bn" if group > 1 else None,
                             bn_stats=grad if several_groups else None)
        else:
            groups = [list(range(i, i + group)) for i in range(0, n, group)]
            self.axes = Axes(grad="data" if n > 1 else None, bn="data" if group > 1 else None,
                             bn_groups=groups if group > 1 and several_groups else None,
                             bn_stats="data" if several_groups else None)
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(("data", "bn")))
        # pmap layout: a leading axis over this process's devices.
        self.local_batch_sharding = NamedSharding(Mesh(np.array(self.local_devices), ("local",)),
                                                  P("local"))

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def describe(self) -> str:
        return (f"{self.executor} over {self.num_devices} devices ({len(self.local_devices)} local, "
                f"{jax.process_count()} processes), platform {self.devices[0].platform}, "
                f"BN groups of {self.bn_group_size} device(s)")

    def check_batch_size(self, global_batch: int, name: str = "batch_size") -> int:
        """Returns the per-device batch, or raises if `global_batch` does not split evenly
        (the rule of `inputs.local_batch_size`, which the input pipelines apply too)."""
        per_process = inputs.local_batch_size(global_batch, jax.process_count(),
                                              self.num_devices, name)
        return per_process // len(self.local_devices)

    # --- placement -------------------------------------------------------------------------

    def put_state(self, state):
        """Places a host or replicated state for the step functions."""
        if self.executor == "shard_map":
            return jax.device_put(state, self.replicated)
        return flax.jax_utils.replicate(jax.device_get(state), self.local_devices)

    def get_state(self, state):
        """Returns the state as replicated global arrays on the mesh (checkpoints, export)."""
        if self.executor == "shard_map":
            return state
        return jax.device_put(self.to_host(state), self.replicated)

    def put_batch(self, batch):
        """Turns this process's share of a batch (numpy, leading axis) into device arrays."""
        if self.executor == "shard_map":
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch)
        n = len(self.local_devices)
        return jax.tree.map(lambda x: jax.device_put(
            np.reshape(x, (n, -1) + x.shape[1:]), self.local_batch_sharding), batch)

    # --- compilation -----------------------------------------------------------------------

    def compile(self, per_device_step: Callable, *, returns_state: bool) -> Callable:
        """Compiles a per-device `step(state, batch)` for all devices.

        The step sees one device's share of the batch and reduces over `self.axes` whatever
        must be global. It returns (new state, metrics) when `returns_state` (the state buffers
        are then donated), else metrics only; both replicated.
        """
        donate = (0,) if returns_state else ()
        if self.executor == "pmap":
            return jax.pmap(per_device_step, axis_name="data", donate_argnums=donate)
        sharded = jax.shard_map(per_device_step, mesh=self.mesh,
                                in_specs=(P(), P(("data", "bn"))),
                                out_specs=(P(), P()) if returns_state else P(),
                                # pmap semantics: the step itself guarantees replicated outputs.
                                check_vma=False)
        return jax.jit(sharded, donate_argnums=donate)

    def to_host(self, tree):
        """Fetches one copy of replicated outputs (state or metrics) as numpy."""
        return jax.tree.map(self._first_replica, tree)

    def _first_replica(self, x):
        first = np.asarray(x.addressable_data(0))
        return first.reshape(x.shape[1:]) if self.executor == "pmap" else first


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
