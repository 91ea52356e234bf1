"""scripts/benchmark_paper_table.py on CPU with the shipped model: every stage is timed from
real runs and projected, the fast mode is compared with strict fp32, and the scoring kernels
are re-run from the stored maps with one and two workers."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "benchmark_paper_table.py"


@pytest.mark.slow  # a whole benchmark script end to end: `pytest -m slow` (CI runs it)
def test_paper_table_benchmark_times_every_stage_and_projects_imagenet(tmp_path):
    # The fewest images that still give every stage two batches and a measurable time. --fork:
    # the six runs are forked from the script after one import of wsol-bench (a new Python per
    # run spends more time importing than running; both ways of starting a run are tested
    # below). One intra-op thread: under `pytest -n 2` the other test process has the other
    # core, and two threads each on two cores slow the runs down many times.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "wsol_synthetic_vit", "--images", "4",
                           "--batch-size", "2", "--rescore-images", "8", "--fork", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
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
    for run in ("run0", "run1", "rescore_explain", "rescore0", "rescore1", "rescore2"):
        assert (tmp_path / run / "run.json").is_file(), run
        assert f"run folder: {tmp_path / run}" in (tmp_path / f"{run}.log").read_text(), run


@pytest.mark.parametrize("fork", [False, True], ids=["new python", "fork"])
def test_a_run_gets_its_settings_and_a_failed_run_ends_the_script_with_its_log(tmp_path, fork):
    """A run started either way (`python -m wsol_bench`, or forked with --fork) gets the settings
    and writes its output to its log; a refused run stops the script with the end of that log
    (refused before any model is loaded, so this takes a second)."""
    spec = importlib.util.spec_from_file_location("benchmark_paper_table", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    log = tmp_path / "run.log"
    refused = r"(?s)run failed \(2\); see .*run\.log:.*batch_size=0 must be at least 1"
    with pytest.raises(SystemExit, match=refused):
        script.run_bench(["batch_size=0"], tmp_path / "run", tmp_path / "store", log, fork=fork)
    assert "wsol-bench: error: batch_size=0 must be at least 1" in log.read_text()
    assert not (tmp_path / "store").exists()
