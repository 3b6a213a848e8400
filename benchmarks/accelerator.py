"""What a GPU/TPU user asks, in one command: train and eval img/s, compile time, memory, MFU.

Every JAX part builds its network with `recipe.build` (the real train and eval steps, over every
device, uint8 images normalised inside the step) from the project's own recipe configs, in bf16.
The PyTorch peer is timm's `resnetv2_50` with bf16 autocast, channels_last and `torch.compile`,
run with the same batch, the same uint8 input and the same timing method, where torch, timm and a
CUDA device are there.

Method, the same for every part: synthetic batches already on the device (the accelerator's
figure, not the input pipeline's); compile (and the first run) excluded; the steps of one timed
repetition are sized to take about `--rep_s` seconds; `--reps` repetitions; the median
repetition's images/s is reported. Each part runs in its own process, so that its peak memory is
its own and a failure (out of memory, a missing package) costs that part alone; a part stops
timing when its `--part_budget_s` is spent, and the whole run starts no part once `--budget_s`
is spent. MFU = XLA's FLOP count of one compiled train step (`cost_analysis`, per device) / step
time / the device's dense bf16 peak (`PEAK_TFLOPS`; n/a for devices not listed).

    python benchmarks/accelerator.py                       # every part; JSON + markdown in --out
    python benchmarks/accelerator.py --parts=cifar164_b128,timm_resnetv2_50
    python benchmarks/accelerator.py --smoke               # every part, tiny, on any CPU (CI)
    python benchmarks/accelerator.py --parts=cifar164_b128 --variants=default,command_buffers \
        --profile                                # XLA flag presets side by side, kernel profile

`--variants` runs each JAX part once per preset of XLA flags (`VARIANTS`, added to the
environment's XLA_FLAGS), each in its own process. `--profile` then traces a few train steps
with `jax.profiler` (a `perfetto_trace.json.gz` per part, for ui.perfetto.dev) and summarises
the device's rows: kernels per step, their summed time per step against the step's wall time
(far below it: the host's launches set the pace; close to it: the kernels do) and the kernels
that take longest. A profiled step runs op by op (XLA turns command buffers off while
profiling), so the profile's wall time is not the timed figure.

Nothing here imports TensorFlow or tfds: it runs on a GPU machine with
no internet once ml_collections' wheel is there (benchmarks/README.md gives the recipe).
"""
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import trace_summary  # noqa: E402  (benchmarks/, beside this script)

# Dense bf16 peak per chip, TFLOP/s, matched against `device_kind` (first match wins).
PEAK_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("TPU v4", 275.0),
               ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
               ("TPU v6 lite", 918.0), ("TPU v6e", 918.0))


@dataclasses.dataclass(frozen=True)
class Part:
    """One measured network: a recipe config (resnet_v2_jax/base_config.py) at one batch size."""
    recipe: str                  # "cifar" | "imagenet" | "timm"
    depth: int
    batch: int
    smoke_depth: int             # the depth --smoke uses (same unit type, same layout options)
    remat: bool = False
    scan: Optional[bool] = None  # None: the recipe's default (scan for ResNet-1001)
    runs: int = 1                # runs trained together (config.num_runs)
    runs_layout: str = "auto"    # how a device computes them (config.runs_layout)
    unit: str = "full_preact"    # the residual unit (Fig. 4; "original": conv-BN-ReLU)


PARTS = {
    "cifar110_b128": Part("cifar", 110, 128, smoke_depth=8),
    "cifar164_b128": Part("cifar", 164, 128, smoke_depth=11),
    "cifar164_b128_scan": Part("cifar", 164, 128, smoke_depth=11, scan=True),
    # Post-activation units: BN-ReLU after each convolution, which cuDNN can fuse into the
    # convolution's epilogue (benchmarks/gpu_programs.py compares the programs).
    "cifar164_b128_original": Part("cifar", 164, 128, smoke_depth=11, unit="original"),
    "cifar164_b1024": Part("cifar", 164, 1024, smoke_depth=11),
    "cifar1001_b128": Part("cifar", 1001, 128, smoke_depth=20, scan=True, remat=True),
    # Several runs in one program (config.num_runs), in each layout; "_x8_vmap" is in the
    # default list, the others are asked for with --parts.
    **{f"cifar{depth}_b128_x{runs}_{layout}": Part("cifar", depth, 128, smoke_depth=smoke,
                                                   runs=runs, runs_layout=layout)
       for depth, smoke in ((110, 8), (164, 11)) for runs in (4, 8)
       for layout in ("vmap", "unrolled")},
    "imagenet50_b256": Part("imagenet", 50, 256, smoke_depth=50),
    "imagenet200_b128": Part("imagenet", 200, 128, smoke_depth=18),
    "timm_resnetv2_50": Part("timm", 50, 256, smoke_depth=50),
}
SMOKE_BATCH, SMOKE_IMAGENET_SIZE = 8, 32
# Presets of XLA flags for --variants (GPU flags; a CPU accepts and ignores them). Flags a JAX
# version does not know stop that variant's process with XLA's "Unknown flag" line.
VARIANTS = {
    "default": "",
    # Every kind of command XLA can put into CUDA graphs, and graphs of any size.
    "command_buffers": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,"
                       "CUSTOM_CALL,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1",
    "no_command_buffers": "--xla_gpu_enable_command_buffer=",  # every kernel launched alone
    "conv_fusion": "--xla_gpu_experimental_enable_conv_fusion=true",
    "nhwc": "--xla_gpu_force_conv_nhwc=true",
    "autotune_4": "--xla_gpu_autotune_level=4",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    "latency_hiding": "--xla_gpu_enable_latency_hiding_scheduler=true",
}
PROFILE_STEPS = 3

FLAGS = flags.FLAGS
flags.DEFINE_list("parts", [p for p in PARTS if not (p.endswith("_scan") or "_x" in p)
                            or p == "cifar164_b128_x8_vmap"],
                  f"Parts to run, from {', '.join(PARTS)}.")
flags.DEFINE_list("variants", ["default"], "Presets of XLA flags to run each JAX part under, "
                  f"from {', '.join(VARIANTS)} (benchmarks/accelerator.py, VARIANTS).")
flags.DEFINE_bool("profile", False, f"Also trace {PROFILE_STEPS} train steps of each JAX part "
                  "with jax.profiler and summarise the device's kernels.")
flags.DEFINE_bool("smoke", False, "Tiny sizes (batch 8, smaller depths, 32px ImageNet), one "
                  "short repetition: checks every part's code path on any CPU; no figure counts.")
flags.DEFINE_float("rep_s", 1.0, "Seconds one timed repetition aims at.")
flags.DEFINE_integer("reps", 5, "Timed repetitions per measurement (median reported).")
flags.DEFINE_float("part_budget_s", 150.0, "Seconds after which a part stops timing.")
flags.DEFINE_float("budget_s", 420.0, "Seconds after which no further part is started.")
flags.DEFINE_string("out", "benchmark_results", "Folder for accelerator.json and accelerator.md.")
flags.DEFINE_string("part", None, "Internal: run this one part in this process, print its JSON.")
flags.DEFINE_string("variant", "default", "Internal: the preset this process's XLA_FLAGS hold.")


# --- timing, shared by the JAX and the PyTorch parts -------------------------------------------

def time_steps(run: Callable[[int], None], batch: int, deadline: float, smoke: bool) -> Dict:
    """Median images/s of `run(n)` (n steps, then wait for the device) over timed repetitions;
    `smoke`: one warm-up step and one timed step, only to run the code."""
    run(1 if smoke else 2)                           # warm-up, excluded
    steps = 1
    if not smoke:
        start = time.perf_counter()
        run(3)
        per_step = (time.perf_counter() - start) / 3
        steps = max(3, min(500, round(FLAGS.rep_s / per_step)))
    rates = []
    for _ in range(1 if smoke else FLAGS.reps):
        start = time.perf_counter()
        run(steps)
        rates.append(steps * batch / (time.perf_counter() - start))
        if time.perf_counter() > deadline:
            break
    median = statistics.median(rates)
    return {"img_per_s": median, "ms_per_step": 1000 * batch / median, "steps_per_rep": steps,
            "reps": len(rates), "spread": (max(rates) - min(rates)) / median}


def profile_steps(run: Callable[[int], None], folder: str) -> Dict:
    """Traces PROFILE_STEPS steps of `run` into `folder` and summarises the device's rows."""
    import glob
    import jax
    start = time.perf_counter()
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        run(PROFILE_STEPS)
    wall_ms = 1000 * (time.perf_counter() - start) / PROFILE_STEPS
    traces = sorted(glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"),
                              recursive=True), key=os.path.getmtime)
    if not traces:
        return {"note": f"jax.profiler wrote no perfetto_trace.json.gz under {folder}"}
    for other in glob.glob(os.path.join(os.path.dirname(traces[-1]), "*")):
        if other != traces[-1]:  # the same trace in other formats: keep the results small
            os.remove(other)
    summary = trace_summary.summarize(traces[-1], PROFILE_STEPS)
    summary.update(wall_ms_per_step=wall_ms, trace=os.path.relpath(traces[-1], FLAGS.out))
    return summary


def peak_tflops(device_kind: str) -> Optional[float]:
    return next((peak for name, peak in PEAK_TFLOPS if name.lower() in device_kind.lower()), None)


def mfu(flops_per_step: Optional[float], ms_per_step: float, peak: Optional[float]):
    if not flops_per_step or not peak:
        return None
    return flops_per_step / (ms_per_step / 1000) / (peak * 1e12)


# --- JAX parts ---------------------------------------------------------------------------------

def part_config(part: Part, smoke: bool):
    from resnet_v2_jax import base_config
    config = (base_config.cifar("cifar10", part.depth, part.unit) if part.recipe == "cifar"
              else base_config.imagenet(part.depth, part.unit))
    config.model.depth = part.smoke_depth if smoke else part.depth  # the recipe's block kept
    config.batch_size = config.eval_batch_size = SMOKE_BATCH if smoke else part.batch
    config.half_precision = True
    config.model.remat_units = part.remat
    if part.scan is not None:
        config.model.scan_units = part.scan
    config.num_runs, config.runs_layout = part.runs, part.runs_layout
    if smoke and part.recipe == "imagenet":
        config.image_size = SMOKE_IMAGENET_SIZE
    return config


def initial_state(config, setup, dp):
    """The part's initial train state on the devices. An unrolled network is initialised in its
    scanned twin's layout and converted (`unit_layout.scanned_to_unrolled`): the unrolled init
    program (one set of random initialisers per unit) compiles about as long as the train step
    itself, and a throughput figure does not depend on which random weights it starts from."""
    from resnet_v2_jax import recipe

    if config.model.scan_units:
        return dp.put_state(setup.init_state(0))
    scanned = config.copy_and_resolve_references()
    scanned.model.scan_units = True
    twin = dp.put_state(recipe.build(scanned, dp).init_state(0))
    return setup.layouts()[0].convert(twin)  # scanned -> this layout, on the devices


def measure_jax(part: Part, smoke: bool, deadline: float) -> Dict:
    import flax
    import jax
    import numpy as np
    from resnet_v2_jax import datasets, parallel, preflight, recipe

    config = part_config(part, smoke)
    dp = parallel.DataParallel(config.parallelism, config.bn_group_size,
                               num_runs=config.num_runs)
    setup = recipe.build(config, dp)
    state = initial_state(config, setup, dp)
    rng = np.random.RandomState(0)
    size, batch, runs = config.image_size, config.batch_size, config.num_runs
    classes = datasets.get(config.dataset).num_classes
    data = dp.put_batch({"image": rng.randint(0, 256, (batch, size, size, 3)).astype(np.uint8),
                         "label": rng.randint(0, classes, (batch,)).astype(np.int32),
                         "mask": np.ones((batch,), np.bool_)})
    per_run = (runs,) if dp.batch_per_run else ()  # runs with a batch of their own each
    train_data = dp.put_batch(
        {"image": rng.randint(0, 256, per_run + (batch, size, size, 3)).astype(np.uint8),
         "label": rng.randint(0, classes, per_run + (batch,)).astype(np.int32)},
        dp.train_batch_sharding)

    start = time.perf_counter()
    seed = np.int32(config.seed)
    train_step = setup.train_step.lower(state, train_data, seed).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    eval_step = setup.eval_step.lower(recipe.variables_of(state.state), data).compile()
    eval_compile_s = time.perf_counter() - start
    flops = preflight.model_flops(config, dp.check_batch_size(batch))
    params = sum(x.size for x in jax.tree.leaves(recipe.variables_of(state.state)["params"]))

    holder = {"state": state}

    def run_train(n):
        for _ in range(n):
            holder["state"], metrics = train_step(holder["state"], train_data, seed)
        jax.block_until_ready(metrics)

    def run_eval(n):
        sums = [eval_step(recipe.variables_of(holder["state"].state), data) for _ in range(n)]
        jax.block_until_ready(sums)

    train_timing = time_steps(run_train, batch * runs, deadline, smoke)
    eval_timing = time_steps(run_eval, batch * runs, deadline, smoke)
    folder = os.path.join(FLAGS.out, "traces",
                          part_key(FLAGS.part, FLAGS.variant).replace("@", "-"))
    profile = profile_steps(run_train, folder) if FLAGS.profile else None
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {
        "framework": f"jax {jax.__version__}, flax {flax.__version__}",
        "device": device.device_kind,
        "num_devices": jax.device_count(), "depth": config.model.depth, "batch": batch,
        "image_size": size, "layout": ("scan" if config.model.scan_units else "unrolled")
        + ("+remat" if config.model.remat_units else ""), "params": int(params),
        "runs": runs, "runs_layout": recipe.runs_layout(config.runs_layout, device.platform, dp.local_runs)
        if runs > 1 else None, "per_run_img_per_s": train_timing["img_per_s"] / runs,
        "compile_s": compile_s, "eval_compile_s": eval_compile_s,
        "train": train_timing, "eval": eval_timing,
        "gflop_per_step": flops / 1e9 if flops else None,
        "mfu": mfu(flops and flops * runs, train_timing["ms_per_step"],
                   peak_tflops(device.device_kind)),
        "peak_memory_gib": peak / 2**30 if peak else None,
        "variant": FLAGS.variant, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        **({"profile": profile} if profile else {}),
    }


# --- the PyTorch peer ------------------------------------------------------------------------

def measure_timm(part: Part, smoke: bool, deadline: float) -> Dict:
    try:
        import timm
        import torch
    except ImportError as error:
        return {"skipped": f"no PyTorch peer: {error}"}
    if not torch.cuda.is_available():
        return {"skipped": "no PyTorch peer: torch sees no CUDA device"}
    import torch.nn.functional as F
    from resnet_v2_jax import datasets

    device = torch.device("cuda")
    batch = SMOKE_BATCH if smoke else part.batch
    size = SMOKE_IMAGENET_SIZE if smoke else 224
    info = datasets.get("imagenet2012")
    mean = torch.tensor(info.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(info.std, device=device).view(1, 3, 1, 1) * 255
    model = timm.create_model("resnetv2_50", num_classes=1000).to(device)
    model = model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    compiled = torch.compile(model)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device,
                           generator=gen)
    labels = torch.randint(0, 1000, (batch,), device=device, generator=gen)

    def inputs():  # uint8 NHWC -> normalised NCHW in channels_last memory, as the JAX step does
        x = images.permute(0, 3, 1, 2).float()
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    def step(net):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(inputs()), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    flops = None
    try:
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            step(model)
        flops = float(counter.get_total_flops())
    except Exception:  # pylint: disable=broad-except  (an older torch: MFU is n/a)
        pass

    def run_train(n):
        for _ in range(n):
            step(compiled)
        torch.cuda.synchronize()

    def run_eval(n):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(n):
                compiled(inputs()).argmax(-1)
        torch.cuda.synchronize()

    model.train()
    start = time.perf_counter()
    run_train(1)
    compile_s = time.perf_counter() - start
    train_timing = time_steps(run_train, batch, deadline, smoke)
    model.eval()
    start = time.perf_counter()
    run_eval(1)
    eval_compile_s = time.perf_counter() - start
    eval_timing = time_steps(run_eval, batch, deadline, smoke)
    kind = torch.cuda.get_device_name()
    return {
        "framework": f"torch {torch.__version__}, timm {timm.__version__}", "device": kind,
        "num_devices": 1, "depth": 50, "batch": batch, "image_size": size,
        "layout": "channels_last+compile", "params": int(params),
        "compile_s": compile_s, "eval_compile_s": eval_compile_s,
        "train": train_timing, "eval": eval_timing,
        "gflop_per_step": flops / 1e9 if flops else None,
        "mfu": mfu(flops, train_timing["ms_per_step"], peak_tflops(kind)),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


# --- the driver: one process per part --------------------------------------------------------

def part_key(name: str, variant: str) -> str:
    """A result's name: the part's, with "@variant" unless it ran under the default flags."""
    return name if variant == "default" else f"{name}@{variant}"


def run_part(name: str) -> None:
    part = PARTS[name]
    deadline = time.perf_counter() + FLAGS.part_budget_s
    measure = measure_timm if part.recipe == "timm" else measure_jax
    result = measure(part, FLAGS.smoke, deadline)
    print("RESULT " + json.dumps(result), flush=True)


def run_in_subprocess(name: str, variant: str, timeout_s: float) -> Dict:
    command = [sys.executable, os.path.abspath(__file__), f"--part={name}",
               f"--variant={variant}", f"--rep_s={FLAGS.rep_s}", f"--reps={FLAGS.reps}",
               f"--part_budget_s={FLAGS.part_budget_s}", f"--smoke={FLAGS.smoke}",
               f"--profile={FLAGS.profile}", f"--out={os.path.abspath(FLAGS.out)}"]
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(filter(None, (env.get("XLA_FLAGS", ""), VARIANTS[variant])))
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              check=False, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout_s:.0f} s (the run's time budget)"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = time.perf_counter() - start
            return result
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    sys.stderr.write(done.stderr[-4000:])
    return {"error": f"exit {done.returncode}: {lines[-1] if lines else 'no output'}"}


def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def markdown(results: Dict[str, Dict], header: str) -> str:
    rows = [header, "",
            "| part | framework | layout | batch | train img/s | eval img/s | compile s "
            "| GFLOP/step | MFU | peak GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    profiles = []
    for name, r in results.items():
        if "train" not in r:
            rows.append(f"| {name} | {r.get('skipped') or r.get('error')} |||||||||")
            continue
        if r.get("profile"):
            profiles.append(profile_markdown(name, r))
        rows.append(
            f"| {name} | {r['framework']} | {r['layout']} | {r['batch']} | "
            f"{r['train']['img_per_s']:,.0f} | {r['eval']['img_per_s']:,.0f} | "
            f"{r['compile_s']:.1f} | {_fmt(r['gflop_per_step'], ',.0f')} | "
            f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | "
            f"{_fmt(r['peak_memory_gib'], '.1f')} |")
    flags_used = {r["variant"]: r["xla_flags"] for r in results.values() if "variant" in r}
    if set(flags_used) != {"default"}:
        rows += ["", "XLA_FLAGS per variant: " + "; ".join(
            f"{variant}: `{value or '(none)'}`" for variant, value in flags_used.items())]
    return "\n".join(rows + profiles) + "\n"


def profile_markdown(name: str, r: Dict) -> str:
    p = r["profile"]
    return "\n".join(["", f"Profile of {name} ({PROFILE_STEPS} train steps, op by op, "
                       f"`{p.get('trace')}`): {_fmt(p.get('wall_ms_per_step'), '.2f')} ms wall "
                       f"per step; timed: {r['train']['ms_per_step']:.2f} ms.",
                       trace_summary.markdown(p)])


def main(argv):
    del argv
    if FLAGS.part:
        run_part(FLAGS.part)
        return
    for given, known, what in ((FLAGS.parts, PARTS, "part"), (FLAGS.variants, VARIANTS,
                                                                "variant")):
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise app.UsageError(f"unknown {what}(s) {', '.join(unknown)}; choose from "
                                 f"{', '.join(known)}")
    end = time.perf_counter() + FLAGS.budget_s
    results: Dict[str, Dict] = {}
    # XLA's flags do not reach PyTorch: the peer runs once, under the first variant.
    runs = [(name, variant) for name in FLAGS.parts for variant in FLAGS.variants
            if PARTS[name].recipe != "timm" or variant == FLAGS.variants[0]]
    for name, variant in runs:
        key = part_key(name, variant)
        left = end - time.perf_counter()
        if left <= 0:
            results[key] = {"error": "not started: the run's time budget was spent"}
        else:
            results[key] = run_in_subprocess(name, variant, left + 60)
        r = results[key]
        print(f"{key}: " + (f"train {r['train']['img_per_s']:,.0f} img/s, eval "
                             f"{r['eval']['img_per_s']:,.0f} img/s, compile {r['compile_s']:.1f} s"
                             if "train" in r else r.get("skipped") or r.get("error")), flush=True)
    # The devices are the parts' alone (on a GPU this process would otherwise take its memory).
    first = next((r for r in results.values() if "device" in r), {})
    header = (f"{first.get('num_devices', '?')} x {first.get('device', '?')}, bf16"
              + (", SMOKE: tiny sizes, no figure counts" if FLAGS.smoke else ""))
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "accelerator.json"), "w") as f:
        json.dump({"header": header, "results": results}, f, indent=1)
    table = markdown(results, header)
    with open(os.path.join(FLAGS.out, "accelerator.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    app.run(main)
