"""Named accelerator targets and their compile-only devices: the hardware `preflight` compiles for.

A target is named as Cloud TPU names its accelerator types (`v4-32`, `v5litepod-16` or
`v5e-16`, `v5p-64`, `v6e-8`) or as a GPU model with a device count (`h100`, `h100x8`,
`a100-80gbx16`, `h200x8`). `devices(target)` returns the devices of the whole slice or
cluster, which XLA can compile for without the hardware (`jax.experimental.topologies`):
libtpu for TPUs, the CUDA plugin with a target spec (resnet_v2_jax/gpu_specs/) for GPUs. Each
device carries the index of the process that would drive it, so a program built for them is the
global program of every host, seen from process 0.

The slices match what JAX sees on the real machines (the chips' arrangement and hosts of each
accelerator type, as Cloud TPU documents them): v4 and v5p run one device per chip (megacore)
with four chips per host; v5e and v6e slices of up to 8 chips are one host, larger ones four
chips per host. GPU clusters are 8 GPUs per host. Figures per chip: HBM, dense bf16 peak and
memory bandwidth from the vendors' data sheets.
"""

import dataclasses
import importlib.util
import os
import re
from typing import Dict, List, NamedTuple, Tuple

from resnet_v2_jax import errors

GiB = 2**30


class _Generation(NamedTuple):
    dims: int                    # 3: a 3-D torus (v4, v5p); 2: a 2-D one (v5e, v6e)
    hbm_bytes: int               # per chip
    tflops: float                # dense bf16 per chip
    hbm_gbps: float              # per chip
    cores_counted: int           # TensorCores per chip in the accelerator type's number
    megacore: bool               # one JAX device per chip (two TensorCores as one)
    max_chips: int


_TPU = {
    "v4": _Generation(3, 32 * GiB, 275.0, 1228.0, 2, True, 2048),
    "v5p": _Generation(3, 95 * 10**9, 459.0, 2765.0, 2, True, 6144),
    "v5e": _Generation(2, 16 * GiB, 197.0, 819.0, 1, False, 256),
    "v6e": _Generation(2, 32 * GiB, 918.0, 1640.0, 1, False, 256),
}
# Chips of a slice -> its arrangement (Cloud TPU's topologies for each size).
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 768: "8x8x12", 1024: "8x8x16", 2048: "8x16x16",
              4096: "16x16x16", 6144: "16x16x24"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
# GPU models: (spec file in gpu_specs/, HBM bytes, bf16 TFLOP/s dense, HBM GB/s).
_GPU = {
    "h100": ("h100_sxm.txtpb", 84_942_979_072, 989.0, 3352.0),
    "h200": ("h200.txtpb", 151_397_597_184, 989.0, 4800.0),
    "a100-80gb": ("a100_sxm_80.txtpb", 85_100_068_864, 312.0, 2039.0),
}
GPUS_PER_HOST = 8
# The share of a GPU's memory JAX's allocator takes at start: XLA_PYTHON_CLIENT_MEM_FRACTION,
# else JAX's default.
DEFAULT_GPU_MEMORY_FRACTION = 0.75


def gpu_memory_fraction() -> float:
    value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
    try:
        fraction = float(value) if value else DEFAULT_GPU_MEMORY_FRACTION
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise errors.SetupError(
            f"XLA_PYTHON_CLIENT_MEM_FRACTION={value!r}: give a share of the GPU's "
            "memory between 0 and 1 (JAX's default 0.75)")
    return fraction


@dataclasses.dataclass(frozen=True)
class Target:
    """A slice or cluster to compile for, and what one of its devices offers."""
    name: str                    # as given (v4-32, h100x8)
    platform: str                # "tpu" | "cuda"
    topology: str                # what jax.experimental.topologies is asked for
    num_devices: int             # JAX devices of the whole slice
    num_processes: int           # hosts (one process each)
    hbm_bytes: int               # per device
    usable_bytes: int            # what a program may take of it (GPU: the allocator's share)
    peak_flops: float            # dense bf16 FLOP/s per device
    hbm_bytes_per_s: float       # per device
    chip: str                    # the device, in words
    gpu_spec: str = ""           # GPU: its target spec, a file in resnet_v2_jax/gpu_specs

    def describe(self) -> str:
        hosts = f"{self.num_processes} host(s)"
        return (f"{self.name}: {self.num_devices} x {self.chip} ({self.hbm_bytes / GiB:.1f} GiB "
                f"HBM each), {hosts}")


def _slices(generation: str) -> Dict[int, str]:
    """Chips -> arrangement of every slice of a TPU generation."""
    g = _TPU[generation]
    return {chips: shape for chips, shape in (_SHAPES_3D if g.dims == 3 else _SHAPES_2D).items()
            if chips <= g.max_chips}


def _tpu(name: str, generation: str, number: int) -> Target:
    g = _TPU[generation]
    chips, slices = number // g.cores_counted, _slices(generation)
    if number % g.cores_counted or chips not in slices:
        sizes = ", ".join(f"{generation}-{c * g.cores_counted}" for c in slices)
        raise errors.ConfigError(f"unknown TPU slice {name!r}: {generation} comes as {sizes}")
    one_host = g.dims == 2 and chips <= 8
    return Target(name=name, platform="tpu", topology=f"{generation}:{slices[chips]}",
                  num_devices=chips, num_processes=1 if one_host else max(chips // 4, 1),
                  hbm_bytes=g.hbm_bytes, usable_bytes=g.hbm_bytes, peak_flops=g.tflops * 1e12,
                  hbm_bytes_per_s=g.hbm_gbps * 1e9, chip=f"TPU {generation} chip")


def _gpu(name: str, model: str, count: int) -> Target:
    spec, hbm, tflops, gbps = _GPU[model]
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
        raise errors.ConfigError(
            f"unknown GPU target {name!r}: give 1 to {GPUS_PER_HOST} GPUs, or a "
            f"multiple of {GPUS_PER_HOST} (hosts of {GPUS_PER_HOST})")
    hosts = max(count // GPUS_PER_HOST, 1)
    return Target(name=name, platform="cuda", topology=f"1x{hosts}x{count // hosts}",
                  num_devices=count, num_processes=hosts, hbm_bytes=hbm,
                  usable_bytes=int(hbm * gpu_memory_fraction()), peak_flops=tflops * 1e12,
                  hbm_bytes_per_s=gbps * 1e9, chip=f"NVIDIA {model.upper()}", gpu_spec=spec)


def get(name: str) -> Target:
    """The target of a name (v4-32, v5litepod-16, v5e-16, v5p-64, v6e-8, h100, h100x8, ...)."""
    key = name.strip().lower()
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", key)
    if match:
        generation = "v5e" if match.group(1) == "v5litepod" else match.group(1)
        return _tpu(name, generation, int(match.group(2)))
    match = re.fullmatch(r"(h100|h200|a100-80gb)(?:x(\d+))?", key)
    if match:
        return _gpu(name, match.group(1), int(match.group(2) or 1))
    raise errors.ConfigError(
        f"unknown target {name!r}: name a Cloud TPU accelerator type (v4-32, "
        f"v5litepod-16, v5p-64, v6e-8) or a GPU (h100, h100x8, a100-80gb, h200); "
        f"--target=list lists them")


def examples() -> List[Tuple[str, str]]:
    """(name, description) of the targets `--target=list` shows: every TPU size, one and eight
    GPUs of each model (any count of GPUs up to 8, and multiples of 8, is accepted)."""
    names = [f"{generation}-{chips * g.cores_counted}" for generation, g in _TPU.items()
             for chips in _slices(generation)]
    names += [f"{model}{suffix}" for model in _GPU for suffix in ("", "x8", "x16")]
    return [(name, get(name).describe()) for name in names]


# --- compile-only devices ----------------------------------------------------------------------

_COMPILER_MODULES = {"tpu": "libtpu", "cuda": "jax_cuda12_plugin"}


def check_compiler(target: Target) -> None:
    """Raises MissingCompilerError, naming the extra to install (named as the platform),
    unless the target's compiler (libtpu; JAX's CUDA plugin) is importable."""
    if importlib.util.find_spec(_COMPILER_MODULES[target.platform]) is None:
        raise errors.MissingCompilerError(
            f"compiling for {target.name} needs the {target.platform.upper()} compiler: "
            f"pip install 'resnet_v2_jax[{target.platform}]'")


def quiet_compilers(target: Target) -> None:
    """Environment that keeps this machine's own backend the CPU (call before JAX initialises
    its backends), quiets libtpu's search for TPU hosts and lets several processes compile with
    libtpu at once (it otherwise takes a machine-wide lock meant for the TPU chips). For a
    process that only compiles (the preflight command): a training process given these
    variables would take itself for a TPU pod's worker."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if target.platform == "tpu":
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    else:
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")


def devices(target: Target) -> list:
    """The target's devices, compile-only, in the order JAX lists them on the real machines
    (`quiet_compilers` first, in a process of its own, where several compile with libtpu)."""
    check_compiler(target)
    from jax.experimental import topologies
    if target.platform == "tpu":
        options: Dict = {}
        if _TPU[target.topology.split(":")[0]].megacore:
            options["chip_config_name"] = "megacore"
        if target.num_processes == 1:
            x, y = (int(v) for v in target.topology.split(":")[1].split("x")[:2])
            options["chips_per_host_bounds"] = (x, y, 1)
        topology = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                                **options)
    else:
        spec = os.path.join(os.path.dirname(__file__), "gpu_specs", target.gpu_spec)
        with open(spec) as f:
            topology = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                                    target_config=f.read())
    found = list(topology.devices)
    processes = len({d.process_index for d in found})
    if len(found) != target.num_devices or processes != target.num_processes:
        raise RuntimeError(f"{target.name}: the compiler gave {len(found)} devices in "
                           f"{processes} processes, expected {target.num_devices} in "
                           f"{target.num_processes}")
    return found
