"""benchmarks/accelerator.py in its smoke mode: every part runs, tiny, without TensorFlow.

No figure is asserted (this CPU is shared and noisy); what is checked is that every part's code
path works, that the FLOP count is the model's, and that the JSON and markdown are written.
"""
import json
import os
import subprocess
import sys

from cli_runs import ROOT, environment


def test_accelerator_smoke_runs_every_part_without_tensorflow(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "accelerator.py")
    done = subprocess.run([sys.executable, script, "--smoke", f"--out={tmp_path}"], cwd=tmp_path,
                          env=environment(1), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "accelerator.json").read_text())["results"]
    assert list(results) == ["cifar110_b128", "cifar164_b128", "cifar164_b1024",
                             "cifar1001_b128", "imagenet50_b256", "imagenet200_b128",
                             "timm_resnetv2_50"]
    for name, result in results.items():
        if name.startswith("timm"):  # no torch/timm/CUDA here: skipped with its reason
            assert "train" in result or "no PyTorch peer" in result["skipped"]
            continue
        assert "error" not in result, (name, result)
        assert result["train"]["img_per_s"] > 0 and result["eval"]["img_per_s"] > 0
        assert result["mfu"] is None  # a CPU has no listed peak
    # FLOPs are the unrolled network's even where the part runs scanned (ResNet-20 bottleneck,
    # 9n+2 with n=2, vs ResNet-11, n=1: about twice the units, so well over the 1.3x of the
    # scanned count, which XLA counts once per loop body).
    scanned, smaller = results["cifar1001_b128"], results["cifar164_b128"]
    assert scanned["layout"] == "scan+remat" and smaller["layout"] == "unrolled"
    assert scanned["gflop_per_step"] > 1.5 * smaller["gflop_per_step"]
    table = (tmp_path / "accelerator.md").read_text()
    assert "| cifar1001_b128 |" in table and "SMOKE" in table
