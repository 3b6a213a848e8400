r"""The CIFAR networks' train-step programs for a GPU, compiled on this machine: kernels, not time.

    python benchmarks/gpu_programs.py                  # every variant for an H100; a table
    python benchmarks/gpu_programs.py --variants=r110,r164,r164_original --target=a100-80gb

Each variant is `python -m resnet_v2_jax.preflight --target=h100` (the CUDA compiler, no GPU:
`pip install '.[cuda]'`) on a CIFAR config at batch 128 in bf16 with some overrides or XLA
flags, in its own process (XLA reads its flags once per process). The table counts what the
step launches (fusions, cuDNN convolutions, copies and transposes outside fusions, all
kernels), its temporary memory and compile seconds, and each count against ResNet-164's.

What it shows and what it does not: the structure of the program XLA would run, not its
speed. Without a GPU XLA autotunes nothing (cuDNN's algorithms are chosen on the device, so
every convolution here reads `algo_id:-1`), and a kernel's cost is unknown. A lent GPU measures
the promising variants with `benchmarks/accelerator.py` (its parts `cifar164_b128_original`,
`cifar164_b128_scan`, `cifar164_b1024`, `cifar164_b128_x8_vmap` and `--variants=conv_fusion`).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ("--config.half_precision=True", "--config.batch_size=128")
# name: (config, overrides, XLA flags)
VARIANTS = {
    "r110": ("cifar10_resnet110", (), ""),
    "r164": ("cifar10_resnet164", (), ""),
    "r164_original": ("cifar10_resnet164_original", (), ""),
    "r164_scan": ("cifar10_resnet164", ("--config.model.scan_units=True",), ""),
    "r164_b1024": ("cifar10_resnet164", ("--config.batch_size=1024",), ""),
    "r164_x8_vmap": ("cifar10_resnet164", ("--config.num_runs=8", "--config.runs_layout=vmap",
                                           "--config.share_batches=True"), ""),
    "r164_float32": ("cifar10_resnet164", ("--config.half_precision=False",), ""),
    "r164_conv_fusion": ("cifar10_resnet164", (),
                         "--xla_gpu_experimental_enable_conv_fusion=true"),
    "r164_nhwc": ("cifar10_resnet164", (), "--xla_gpu_force_conv_nhwc=true"),
}


def compile_variant(name, target, out):
    config, overrides, xla_flags = VARIANTS[name]
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=xla_flags)
    folder = os.path.join(out, name)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "resnet_v2_jax.preflight", f"--config=configs/{config}.py",
         f"--target={target}", f"--out={folder}", *BASE, *overrides],
        cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode not in (0, 3):
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    with open(os.path.join(folder, f"{config}_{target}.json")) as f:
        report = json.load(f)
    structure = report["train"]["structure"]
    return {"fusions": structure["fusions"], "convolutions": structure["convolutions"],
            "copies": structure["copies"], "transposes": structure["transposes"],
            "kernels": structure["kernels"],
            "temporaries_gib": report["train"]["memory"]["temporaries"] / 2**30,
            "compile_s": report["train"]["seconds"], "wall_s": time.perf_counter() - start,
            "images_per_step": report["config"]["batch_size"] * report["config"]["num_runs"]}


def table(results, baseline="r164"):
    base = results.get(baseline, {})
    keys = ("fusions", "convolutions", "copies", "transposes", "kernels")
    lines = ["| variant | " + " | ".join(keys) + " | kernels per 128 images | temporaries GiB "
             "| compile s |", "| --- " * (len(keys) + 4) + "|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |")
            continue
        cells = [f"{r[k]:,}" + (f" ({r[k] / base[k]:.2f}x)" if base.get(k) and name != baseline
                                else "") for k in keys]
        per_128 = r["kernels"] * 128 / r["images_per_step"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per_128:,.0f} | "
                     f"{r['temporaries_gib']:.2f} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="h100")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=None, help="folder for the reports (default: temp)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="gpu_programs_")
    results = {}
    for name in args.variants.split(","):
        results[name] = compile_variant(name, args.target, out)
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    with open(os.path.join(out, "gpu_programs.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
