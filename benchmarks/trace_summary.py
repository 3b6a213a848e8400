"""What a `jax.profiler` trace says about a step: kernels, their time, the longest ones.

Reads the `perfetto_trace.json.gz` that `jax.profiler.trace(..., create_perfetto_trace=True)`
writes (Chrome trace JSON; `accelerator.py --profile` keeps one per part) and sums the
device's rows per step. Kernels are the events of the device's "Stream ..." rows (a GPU's
CUDA streams; a TPU's "XLA Ops" row where there is none), their time summed over streams.
Every device row is listed with its event count, so a trace laid out otherwise still says what
it holds. Kernel time far below the step's wall time means the host's launches set the pace;
close to it, the kernels do.

    python benchmarks/trace_summary.py TRACE.json.gz --steps=3
"""
import collections
import gzip
import json
from typing import Dict

from absl import app, flags


def summarize(path: str, steps: int, top: int = 12) -> Dict:
    """Per step: the device rows' event counts and times, kernels, kernel time, the longest."""
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    names = {("process", e["pid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    names.update({(e["pid"], e["tid"]): e["args"]["name"] for e in events
                  if e.get("ph") == "M" and e.get("name") == "thread_name"})
    rows = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "/device:" in names.get(("process", e["pid"]), ""):
            rows[(e["pid"], e["tid"])].append(e)
    if not rows:
        return {"note": "no device rows in the trace (a CPU's XLA work shows as host threads; "
                        "a GPU's kernels need CUPTI, which jax[cuda] installs)"}
    label = {key: f"{names[('process', key[0])]} / {names.get(key, key[1])}" for key in rows}
    kernel_rows = ([k for k in rows if str(names.get(k, "")).startswith("Stream")]
                   or [k for k in rows if names.get(k) == "XLA Ops"])
    per_kernel = collections.defaultdict(lambda: [0, 0.0])
    for key in kernel_rows:
        for e in rows[key]:
            per_kernel[e["name"]][0] += 1
            per_kernel[e["name"]][1] += e.get("dur", 0.0)
    longest = sorted(per_kernel.items(), key=lambda item: -item[1][1])[:top]
    return {
        "rows": {label[k]: {"events_per_step": len(v) / steps,
                            "ms_per_step": sum(e.get("dur", 0.0) for e in v) / 1000 / steps}
                 for k, v in rows.items()},
        "kernels_per_step": sum(n for n, _ in per_kernel.values()) / steps,
        "kernel_ms_per_step": sum(us for _, us in per_kernel.values()) / 1000 / steps,
        "top_kernels": [{"name": name[:120], "per_step": n / steps,
                         "ms_per_step": us / 1000 / steps} for name, (n, us) in longest],
    }


def markdown(summary: Dict) -> str:
    """The summary as markdown: a line of totals, the longest kernels, the device rows."""
    if "kernels_per_step" not in summary:
        return summary.get("note", "")
    lines = [f"Kernels: {summary['kernels_per_step']:,.0f} per step, "
             f"{summary['kernel_ms_per_step']:.2f} ms of kernel time per step.",
             "", "| longest kernels | per step | ms per step |", "| --- | --- | --- |"]
    lines += [f"| `{k['name']}` | {k['per_step']:.0f} | {k['ms_per_step']:.3f} |"
              for k in summary["top_kernels"]]
    lines += ["", "| device row | events per step | ms per step |", "| --- | --- | --- |"]
    lines += [f"| {row} | {v['events_per_step']:.0f} | {v['ms_per_step']:.2f} |"
              for row, v in summary["rows"].items()]
    return "\n".join(lines)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("give one trace: python benchmarks/trace_summary.py TRACE.json.gz")
    print(markdown(summarize(argv[1], flags.FLAGS.steps, flags.FLAGS.top)))


if __name__ == "__main__":
    flags.DEFINE_integer("steps", 1, "Steps the trace holds (figures are per step).")
    flags.DEFINE_integer("top", 12, "Longest kernels to list.")
    app.run(main)
