"""scripts/benchmark_paper_table.py on CPU with the shipped model: every stage is timed from
real runs and projected, the fast mode is compared with strict fp32, and the scoring kernels
are re-run from the stored maps with one and two workers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "benchmark_paper_table.py"


def test_paper_table_benchmark_times_every_stage_and_projects_imagenet(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "wsol_synthetic_vit", "--images", "6",
                           "--batch-size", "3", "--rescore-images", "24", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    for mode in ("strict fp32", "fast (TF32, autocast, compile)"):
        assert mode in out
    stages = re.findall(r"^  (explain \w+|ABPC|loading|scoring kernels)\s+([\d.]+)\s+([\d.inf]+)\s+([\d.]+)$",
                        out, re.MULTILINE)
    names = [s[0] for s in stages]
    for name in ("explain agcam", "explain rollout", "explain gradcam", "explain transformer_attribution",
                 "ABPC", "scoring kernels"):
        assert names.count(name) == 2, name  # once per mode
    assert all(float(s[1]) > 0 for s in stages if s[0] != "loading")
    assert len(re.findall(r"projected ImageNet val table: [\d.]+ min", out)) == 2
    assert re.search(r"agcam\s+-?[\d.]+\s+-?[\d.]+\s+-?[\d.]+\s+[\d.]+", out)  # the fast-mode ABPC comparison
    assert re.search(r"[\d.]+ s in the main process, [\d.]+ s with 1 worker, [\d.]+ s with 2 workers \(2 vs 1: [\d.]+x\)",
                     out)
    assert re.search(r"50,000 images on 16 cores: [\d.]+ min", out)
    assert (tmp_path / "run0" / "run.json").is_file() and (tmp_path / "run1" / "run.json").is_file()
