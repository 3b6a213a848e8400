r"""The shipped configs compiled for their natural targets: the table of docs/preflight.md.

    python benchmarks/preflight_table.py --out=/tmp/preflight        # compile what is missing
    python benchmarks/preflight_table.py --out=/tmp/preflight --rows=imagenet_200@v4-32

Each row is `python -m resnet_v2_jax.preflight --config=configs/<config>.py --target=<target>`
in its own process (TPU rows need the [tpu] extra, GPU rows the [cuda] extra, in the same
Python); a report already in --out is read, not compiled again. GPU rows search the largest
per-device batch (--max_batch); TPU compiles of the ImageNet networks take minutes each on a
small CPU, so those rows report the shipped batch only. Prints the markdown table.
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_TARGETS = ("v4-32", "v5e-32", "v5p-32", "v6e-8", "h100x8", "a100-80gbx8")
CIFAR_TARGETS = ("h100", "v5e-8", "v4-8")
ROWS = ([f"imagenet_{d}@{t}" for d in (200, 50) for t in IMAGENET_TARGETS]
        + ["imagenet_200@v4-128"]
        + [f"{c}@{t}" for c in ("cifar10_resnet110", "cifar10_resnet164", "cifar10_resnet1001",
                                "cifar10_resnet1001_batch64") for t in CIFAR_TARGETS])


def report(out, row):
    config, target = row.split("@")
    path = os.path.join(out, f"{config}_{target}.json")
    if not os.path.exists(path):
        extra = ["--max_batch", "--batch_multiple=64"] if target.startswith(("h", "a")) else []
        result = subprocess.run([sys.executable, "-m", "resnet_v2_jax.preflight",
                                 f"--config=configs/{config}.py", f"--target={target}",
                                 f"--out={out}", *extra], cwd=REPO, capture_output=True,
                                text=True, env=dict(os.environ, PYTHONPATH=REPO))
        if not os.path.exists(path):
            return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    with open(path) as f:
        return json.load(f)


def line(row, r):
    config, target = row.split("@")
    if "error" in r:
        return f"| `{config}` | {target} | refused: {r['error']} | | | | | |"
    gib = 2**30
    fits = "yes" if r["fits"] else "**no**"
    largest = r.get("max_batch", {}).get("per_device", "not searched")
    hours = r.get("bound_run_hours") or 0
    run = (f"{hours:.1f} h" if hours >= 1 else f"{60 * hours:.0f} min" if hours >= 1 / 60
           else f"{3600 * hours:.0f} s")
    return (f"| `{config}` | {target} | {fits} | {r['config']['per_device_batch']} | "
            f"{r['peak_bytes'] / gib:.2f} of {r['usable_bytes'] / gib:.1f} | {largest} | "
            f"{r['flops_per_step'] / 1e12:.2f} | {r['bound_ms_per_step']:.1f} ms, {run} | "
            f"{r['compile_s']:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default=",".join(ROWS))
    args = parser.parse_args()
    print("| config | target | fits | batch per device | GiB per device (of usable) | "
          "largest batch per device | TFLOP per device per step | bound: step, whole run | "
          "compile s |")
    print("| --- " * 9 + "|")
    for row in args.rows.split(","):
        print(line(row, report(args.out, row)), flush=True)


if __name__ == "__main__":
    main()
