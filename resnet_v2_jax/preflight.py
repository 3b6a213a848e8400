r"""Compile a config for a named TPU slice or GPU cluster on this machine, and say whether it fits.

    python -m resnet_v2_jax.preflight --config=configs/imagenet_200.py --target=v4-32
    python -m resnet_v2_jax.preflight --config=configs/cifar10_resnet164.py --target=h100 \
        --config.batch_size=256 --max_batch
    python -m resnet_v2_jax.preflight --target=list

The train and eval steps are the run's own: `recipe.build` over `parallel.DataParallel` on the
target's compile-only devices (`targets`), with the config's mesh, BN groups, per-device batch,
dtype, unit layout (scan, remat) and runs, and every `--config.x=` override. Nothing runs:
XLA compiles the global program of every host for the target's chips, as process 0 of the slice
would, and reports per device:

- memory: arguments, temporaries, outputs (less what the donated state aliases) and code, for
  the train step and, while training, for each eval step beside the optimiser's state (plus the
  training split of a device-resident pipeline); the verdict against the device's HBM (a GPU's
  allocator takes 75% of it by default), with the margin, or what to change;
- FLOPs per step per device (XLA's count of the unrolled network without remat, on this CPU: a
  scanned loop's body counts once in the target's own count) and the step time and images/s
  the chip's dense bf16 peak allows: a lower bound on time, never a measured speed;
- the program's structure: fusions, convolutions, copies and transposes outside fusions,
  loops, and the collectives with their bytes and group sizes;
- compile seconds on this machine.

`--max_batch` finds the largest per-device batch (a multiple of `--batch_multiple`) whose
train step fits, by doubling then bisection, one compile per try. A JSON and a markdown report
go to `--out`. The TPU and GPU compilers are extras (`pip install 'resnet_v2_jax[tpu]'`,
`[cuda]`); without them the command says so in one line. Exit code 0 when the config fits
the target, 3 when it does not (a launch script stops on it), 1 or 2 on bad input.
"""

if __name__ == "__main__":  # first: the imports below take seconds (see `startup`)
    from resnet_v2_jax import startup
    startup.exit_on_signals()

import collections
import dataclasses
import json
import os
import re
import time
from typing import Any, Dict, List, Optional

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from resnet_v2_jax import cli, configuration, datasets, parallel, recipe, targets

FLAGS = flags.FLAGS
DOES_NOT_FIT = 3
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# Instructions that launch no work of their own (they name, bundle or reinterpret buffers).
_NO_KERNEL = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
              "partition-id", "replica-id", "opt-barrier", "add-dependency")


# --- the program's structure ------------------------------------------------------------------

def _array_bytes(hlo_type: str) -> int:
    """Bytes of every array in an HLO type (`f32[2,16]{1,0}` or a tuple of them)."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", hlo_type):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _DTYPE_BYTES.get(dtype, 0)
    return total


def _instruction(line: str):
    """(op, result type, rest of the line) of an HLO instruction line, else None."""
    match = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*", line)
    if not match:
        return None
    text = line[match.end():]
    if text.startswith("("):                      # a tuple type: up to its closing parenthesis
        depth = 0
        for i, ch in enumerate(text):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        hlo_type, text = text[:i + 1], text[i + 1:].lstrip()
    else:
        hlo_type, _, text = text.partition(" ")
    op = re.match(r"([\w\-]+)\(", text)
    return (op.group(1), hlo_type, text) if op else None


def _group_size(rest: str, num_devices: int) -> int:
    """Devices per replica group of a collective (all of them where no groups are named)."""
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
    if explicit:
        return len(explicit.group(1).split(","))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", rest)
    return int(iota.group(2)) if iota else num_devices


def program_structure(hlo: str, num_devices: int) -> Dict[str, Any]:
    """Counts of an optimised HLO module: what runs as separate operations (in the entry
    computation, loop bodies and branches: fusions, copies, transposes, custom calls, loops,
    collectives with bytes per group size, and `kernels`, every instruction that does work of
    its own) and the convolutions anywhere (inside fusions on TPUs, cuDNN calls on GPUs). A
    loop's body counts once, not once per iteration."""
    computations: Dict[str, List[str]] = {}
    name = None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            name = header.group(1)
            computations[name] = []
        elif name is not None and line.startswith(" "):
            computations[name].append(line)
    inside = set()                                # fusion bodies and reducers
    for lines in computations.values():
        for line in lines:
            for kind in ("calls", "to_apply"):
                inside.update(re.findall(kind + r"=%?([\w.\-]+)", line))
    ops: collections.Counter = collections.Counter()
    custom_calls: collections.Counter = collections.Counter()
    collectives: Dict[str, Dict[str, int]] = {}
    convolutions = 0
    for comp, lines in computations.items():
        for line in lines:
            parsed = _instruction(line)
            if parsed is None:
                continue
            op, hlo_type, rest = parsed
            if op == "convolution":
                convolutions += 1
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            if op == "custom-call" and target and "conv" in target.group(1).lower():
                convolutions += 1
            if comp in inside:
                continue
            ops[op] += 1
            if op == "custom-call" and target:
                custom_calls[target.group(1)] += 1
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base in COLLECTIVES:
                key = f"{base} over {_group_size(rest, num_devices)}"
                entry = collectives.setdefault(key, {"count": 0, "bytes": 0})
                entry["count"] += 1
                entry["bytes"] += _array_bytes(hlo_type if not op.endswith("-start")
                                               else hlo_type.split("),")[-1])
    return {"fusions": ops["fusion"], "convolutions": convolutions,
            "copies": ops["copy"] + ops["copy-start"], "transposes": ops["transpose"],
            "loops": ops["while"], "custom_calls": dict(custom_calls),
            "collectives": collectives,
            "kernels": sum(n for op, n in ops.items() if op not in _NO_KERNEL
                           and not op.endswith("-done"))}


# --- compiling --------------------------------------------------------------------------------

def _per_device_bytes(tree) -> int:
    """Bytes one device holds of abstract arrays with shardings."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def _memory(compiled) -> Dict[str, int]:
    stats = compiled.memory_analysis()
    memory = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
              "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
              "code": stats.generated_code_size_in_bytes}
    memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                       + memory["temporaries"] + memory["code"])
    return memory


def abstract_batches(config, dp, crop_size: Optional[int] = None) -> Dict[str, Any]:
    """Shapes and shardings of a train batch (`crop_size` None) or an eval batch at a crop."""
    if crop_size is None:
        runs = (config.num_runs,) if dp.batch_per_run else ()
        size, batch, sharding = config.image_size, config.batch_size, dp.train_batch_sharding
        fields = {"image": np.uint8, "label": np.int32}
    else:
        runs, size, batch, sharding = (), crop_size, config.eval_batch_size, dp.batch_sharding
        fields = {"image": np.uint8, "label": np.int32, "mask": np.bool_}
    shapes = {"image": runs + (batch, size, size, 3), "label": runs + (batch,),
              "mask": runs + (batch,)}
    return {k: jax.ShapeDtypeStruct(shapes[k], dtype, sharding=sharding)
            for k, dtype in fields.items()}


def model_flops(config, per_device_batch: int) -> Optional[float]:
    """XLA's FLOP count of one run's train step on one device's share of the batch, counted on
    this machine's CPU for the unrolled network without remat (GPU backends leave cuDNN's
    convolutions out of their count, a scanned stage's loop body counts once, and remat's
    recomputation is not the model's work); lowered, not compiled."""
    config = config.copy_and_resolve_references()
    config.batch_size = config.eval_batch_size = per_device_batch
    config.model.scan_units = config.model.remat_units = False
    config.num_runs = 1
    dp = parallel.DataParallel(config.parallelism, 1, devices=jax.devices("cpu")[:1])
    setup = recipe.build(config, dp)
    analysis = setup.train_step.lower(setup.abstract_state, abstract_batches(config, dp),
                                      recipe.ABSTRACT_SEED).cost_analysis()
    if isinstance(analysis, (list, tuple)):          # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


@dataclasses.dataclass
class Compiled:
    """One program compiled for the target: its memory per device, structure and time; or the
    compiler's refusal (`out_of_memory`: a TPU compiler refuses a program over its HBM)."""
    memory: Dict[str, int]
    structure: Dict[str, Any]
    seconds: float
    out_of_memory: str = ""
    hlo: str = dataclasses.field(default="", repr=False)  # the optimised program, as text


def _compile(step, *args, num_devices: int) -> Compiled:
    start = time.perf_counter()
    lowered = step.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as error:  # noqa: BLE001 (XlaRuntimeError, a class private to jaxlib)
        message = str(error)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        # "... HLO temporaries (20.57G) exceeds available HBM (15.75G)": sizes in GiB.
        sizes = [float(v) * targets.GiB for v in re.findall(r"\(([\d.]+)G\)", message)]
        arguments = _per_device_bytes(args)
        memory = {"arguments": arguments, "outputs": 0, "aliased": 0,
                  "temporaries": int(sizes[0]) if sizes else 0, "code": 0}
        memory["total"] = arguments + memory["temporaries"]
        return Compiled(memory, {}, time.perf_counter() - start,
                        out_of_memory=message.strip().splitlines()[-1].strip())
    seconds = time.perf_counter() - start
    hlo = compiled.as_text()
    return Compiled(_memory(compiled), program_structure(hlo, num_devices), seconds, hlo=hlo)


def resident_data_bytes(config, dp) -> int:
    """Per device, the training split a device-resident pipeline keeps in accelerator memory
    (sharded over the devices of a run; 0 for the tfds pipeline)."""
    if config.input_pipeline != "device_resident":
        return 0
    info = datasets.get(config.dataset)
    image = config.image_size * config.image_size * 3 + 4          # uint8 image, int32 label
    return -(-info.num_train_examples * image // dp.devices_per_run)


def check(config, target: targets.Target, devices,
          train_step_only: bool = False) -> Dict[str, Any]:
    """Compiles the run of `config` for `target` (its compile-only `devices`) and returns the
    report: memory per program, the peak while training, the verdict (`fits`; `train_fits` for
    the train step alone), FLOPs, the bound, the structure and compile seconds.
    `train_step_only` (a `max_batch` try) compiles no eval step and counts no FLOPs."""
    dp = parallel.for_config(config, devices)
    setup = recipe.build(config, dp)
    per_device = dp.check_batch_size(config.batch_size)
    train = _compile(setup.train_step, setup.abstract_state, abstract_batches(config, dp),
                     recipe.ABSTRACT_SEED, num_devices=dp.num_devices)
    state_bytes = _per_device_bytes(setup.abstract_state)
    variables_bytes = _per_device_bytes(recipe.variables_of(setup.abstract_state.state))
    evals = {}
    if not train_step_only:
        for crop in config.eval_crop_sizes:
            evals[int(crop)] = _compile(setup.eval_step, recipe.variables_of(setup.abstract_state.state),
                                        abstract_batches(config, dp, crop),
                                        num_devices=dp.num_devices)
    resident = resident_data_bytes(config, dp)
    # While training, an eval step runs beside the rest of the state (the optimiser's).
    peaks = {"train step": train.memory["total"]}
    peaks.update({f"eval at {crop}": e.memory["total"] + state_bytes - variables_bytes
                  for crop, e in evals.items()})
    peak_name = max(peaks, key=peaks.get)
    peak = peaks[peak_name] + resident
    refused = [c.out_of_memory for c in [train, *evals.values()] if c.out_of_memory]
    flops = None if train_step_only else model_flops(config, per_device)
    step_flops = flops * dp.local_runs if flops else None
    bound_s = step_flops / target.peak_flops if step_flops else None
    report = {
        "target": target.name, "target_description": target.describe(),
        "devices": dp.describe(setup.model.norm), "processes": dp.process_count,
        "config": {"batch_size": config.batch_size, "per_device_batch": per_device,
                   "eval_batch_size": config.eval_batch_size,
                   "per_process_batch": config.batch_size // dp.process_count,
                   "num_runs": config.num_runs, "half_precision": config.half_precision,
                   "scan_units": config.model.scan_units,
                   "remat_units": config.model.remat_units, "image_size": config.image_size,
                   "bn_group_size": dp.bn_group_size},
        "hbm_bytes": target.hbm_bytes, "usable_bytes": target.usable_bytes,
        "train": _program(train), "eval": {crop: _program(e) for crop, e in evals.items()},
        "state_bytes": state_bytes, "resident_data_bytes": resident,
        "peak_bytes": peak, "peak_program": peak_name,
        "fits": peak <= target.usable_bytes and not refused,
        "train_fits": (train.memory["total"] + resident <= target.usable_bytes
                       and not train.out_of_memory),
        "margin_bytes": target.usable_bytes - peak, "compiler_refused": refused,
        "flops_per_step": step_flops,
        "bound_ms_per_step": 1000 * bound_s if bound_s else None,
        "bound_img_per_s": (config.batch_size * config.num_runs / bound_s) if bound_s else None,
        "total_steps": setup.total_steps,
        "bound_run_hours": setup.total_steps * bound_s / 3600 if bound_s else None,
        "compile_s": train.seconds + sum(e.seconds for e in evals.values()),
    }
    report["advice"] = [] if report["fits"] else advice(config, report)
    report["train_hlo"] = train.hlo
    return report


def _program(compiled: Compiled) -> Dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(compiled).items() if k != "hlo"}


def advice(config, report: Dict[str, Any]) -> List[str]:
    """What would bring a program that does not fit under the device's memory."""
    over = max(-report["margin_bytes"], 0)
    lines = [f"over by {over / targets.GiB:.2f} GiB per device"] if over else [
        "the compiler found it over the device's memory"]
    temps = report["train"]["memory"]["temporaries"]
    batch = report["config"]["per_device_batch"]
    if temps and batch > 1:
        # Temporaries grow about linearly with the batch: a first guess; --max_batch compiles.
        guess = int(batch * max(0.0, 1 - over / temps))
        lines.append(f"a per-device batch near {max(guess, 1)} (now {batch}); --max_batch "
                     "finds the largest that compiles within the memory")
    if not (config.model.scan_units and config.model.remat_units):
        lines.append("--config.model.scan_units=True --config.model.remat_units=True "
                     "(recompute each unit in the backward pass)")
    if not config.half_precision and not config.float64:
        lines.append("--config.half_precision=True (bf16 activations)")
    return lines


def max_batch(config, target: targets.Target, devices, multiple: int,
              tried: Dict[int, bool]) -> Dict[str, Any]:
    """The largest per-device batch (a multiple of `multiple`) whose train step fits: doubling
    from the config's, then bisection; one compile per try, none for a batch in `tried`
    ({per-device batch: fits}). Returns it with the tries."""
    per_run = parallel.for_config(config, devices).devices_per_run
    tries = dict(tried)

    def fits(per_device: int) -> bool:
        if per_device in tries:
            return tries[per_device]
        trial = config.copy_and_resolve_references()
        trial.batch_size = per_device * per_run
        tries[per_device] = check(trial, target, devices, train_step_only=True)["train_fits"]
        return tries[per_device]

    start = max(multiple, (config.batch_size // per_run) // multiple * multiple)
    lo, hi = 0, None
    size = start
    while hi is None:
        if fits(size):
            lo, size = size, size * 2
            if size > 1 << 16:
                break
        else:
            hi = size
    while hi is not None and hi - lo > multiple:
        mid = (lo + hi) // 2 // multiple * multiple
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return {"per_device": lo, "global": lo * per_run, "tries": tries}


# --- report -----------------------------------------------------------------------------------

def _gib(value) -> str:
    return f"{value / targets.GiB:.2f}"


def markdown(report: Dict[str, Any]) -> str:
    """The report as markdown, as `main` prints it."""
    c = report["config"]
    verdict = (f"**fits**: {_gib(report['peak_bytes'])} of {_gib(report['usable_bytes'])} GiB "
               f"per device (margin {_gib(report['margin_bytes'])} GiB)" if report["fits"] else
               f"**does not fit**: {_gib(report['peak_bytes'])} GiB per device, "
               f"{_gib(report['usable_bytes'])} GiB usable")
    lines = [f"# {report['config_name']} on {report['target']}", "",
             f"{report['target_description']}; {report['devices']}.",
             f"Batch {c['batch_size']} global, {c['per_process_batch']} per process, "
             f"{c['per_device_batch']} per device; {c['num_runs']} run(s); "
             f"{'bf16' if c['half_precision'] else 'float32'}; units "
             f"{'scanned' if c['scan_units'] else 'unrolled'}"
             f"{' with remat' if c['remat_units'] else ''}.", "",
             verdict + f", at the {report['peak_program']}."]
    lines += [f"- {line}" for line in report["advice"]]
    if report["usable_bytes"] != report["hbm_bytes"]:
        share = report["usable_bytes"] / report["hbm_bytes"]
        lines.append(f"- usable: JAX's GPU allocator takes {share:.0%} of the "
                     f"{_gib(report['hbm_bytes'])} GiB (XLA_PYTHON_CLIENT_MEM_FRACTION)")
    lines += ["", "| program | arguments | outputs | aliased | temporaries | code | total GiB |"
              " compile s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    programs = [("train step", report["train"])] + [
        (f"eval step at {crop}", e) for crop, e in report["eval"].items()]
    for name, program in programs:
        m = program["memory"]
        lines.append(f"| {name} | {_gib(m['arguments'])} | {_gib(m['outputs'])} | "
                     f"{_gib(m['aliased'])} | {_gib(m['temporaries'])} | {_gib(m['code'])} | "
                     f"{_gib(m['total'])} | {program['seconds']:.1f} |")
    if report["resident_data_bytes"]:
        lines.append(f"\nThe device-resident training split adds "
                     f"{_gib(report['resident_data_bytes'])} GiB per device.")
    if report["flops_per_step"]:
        lines += ["", f"{report['flops_per_step'] / 1e9:,.1f} GFLOP per device per train step: "
                  f"at the chip's dense bf16 peak no faster than "
                  f"{report['bound_ms_per_step']:.2f} ms per step, "
                  f"{report['bound_img_per_s']:,.0f} images/s; the run's "
                  f"{report['total_steps']:,} steps no faster than "
                  f"{report['bound_run_hours']:.2f} hours (lower bounds on time, not speeds)."]
    lines += [f"- the compiler: {message}" for message in report["compiler_refused"]]
    s = report["train"]["structure"]
    if s:  # none where the compiler refused the program
        lines += ["", f"Train step program: {s['fusions']} fusions, {s['convolutions']} "
                  f"convolutions, {s['copies']} copies and {s['transposes']} transposes outside "
                  f"fusions, {s['kernels']} operations in all, {s['loops']} loops (a loop body "
                  "counts once)."]
        lines += [f"- {key} devices: {entry['count']} ({entry['bytes'] / 2**20:.2f} MiB)"
                  for key, entry in sorted(s["collectives"].items())]
    if "max_batch" in report:
        m = report["max_batch"]
        tried = ", ".join(f"{b} {'fits' if ok else 'over'}" for b, ok in sorted(m["tries"].items()))
        lines += ["", f"Largest per-device batch that fits: {m['per_device']} (global "
                  f"{m['global']}); tried {tried}."]
    lines += ["", f"Compiled on this machine in {report['compile_s']:.1f} s "
              f"({report['versions']})."]
    return "\n".join(lines) + "\n"


def _versions() -> str:
    import importlib.metadata
    found = [f"jax {jax.__version__}"]
    for package in ("libtpu", "jax-cuda12-plugin"):
        try:
            found.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def list_targets() -> None:
    for name, description in targets.examples():
        print(f"{name:<14} {description}")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}", 2)
    if FLAGS.target == "list":
        list_targets()
        return
    if FLAGS.config is None:
        cli.fail("--config is required (e.g. --config=configs/imagenet_200.py)", 2)
    target = targets.get(FLAGS.target)
    targets.quiet_compilers(target)
    config = FLAGS.config
    # Compile-only executables cannot be read back from JAX's persistent cache (no client to
    # load them into), and the compile seconds reported are this compile's.
    jax.config.update("jax_enable_compilation_cache", False)
    cli.prepare_process(config, reads_data=False)
    configuration.validate(config)
    devices = targets.devices(target)
    report = check(config, target, devices)
    if FLAGS.max_batch:
        report["max_batch"] = max_batch(config, target, devices, FLAGS.batch_multiple,
                                        {report["config"]["per_device_batch"]:
                                         report["train_fits"]})
    name = os.path.splitext(os.path.basename(
        config_flags.get_config_filename(FLAGS["config"]).split(":")[0]))[0]
    report.update(config_name=name, versions=_versions())
    text = markdown(report)
    print(text, end="")
    os.makedirs(FLAGS.out, exist_ok=True)
    stem = os.path.join(FLAGS.out, f"{name}_{target.name}")
    hlo = report.pop("train_hlo")
    if FLAGS.save_hlo:
        with open(stem + ".train_step.hlo.txt", "w") as f:
            f.write(hlo)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(text)
    if not report["fits"]:
        cli.fail(f"{name} does not fit {target.name}: {'; '.join(report['advice'])}",
                 DOES_NOT_FIT)


def define_flags() -> None:
    """The command line's flags; defined by the command only, so importing defines none."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/imagenet_200.py; "
                                    "--config.key=value overrides.", lock_config=True)
    flags.DEFINE_string("target", None, "A Cloud TPU accelerator type (v4-32, v5litepod-16, "
                        "v5p-64, v6e-8) or GPUs (h100, h100x8, a100-80gb, h200x16); 'list' "
                        "lists them.")
    flags.DEFINE_bool("max_batch", False, "Also find the largest per-device batch whose train "
                      "step fits (one compile per try).")
    flags.DEFINE_integer("batch_multiple", 8, "--max_batch searches multiples of this.")
    flags.DEFINE_bool("save_hlo", False, "Also write the train step's optimised program "
                      "(<config>_<target>.train_step.hlo.txt).")
    flags.DEFINE_string("out", "preflight", "Folder for <config>_<target>.json and .md.")
    flags.mark_flags_as_required(["target"])


if __name__ == "__main__":
    define_flags()
    cli.run(main)
