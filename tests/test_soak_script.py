"""scripts/soak.py on a few images: the peaks at its checkpoints, the store's size, the seconds
per stage, and a run killed at a seeded random moment that resumes to the same records and
table as the uninterrupted run."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "soak.py"


def load_script():
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up
    spec.loader.exec_module(script)
    return script


@pytest.mark.slow  # a whole benchmark script end to end: `pytest -m slow` (CI runs it)
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the kernel's peaks from /proc")
def test_soak_reports_peaks_store_stages_and_an_identical_resume(tmp_path):
    # --fork: each of the three runs is forked after one import of wsol-bench (a new Python per
    # run spends more time importing than running). Shards of 4 images, so the kill usually
    # lands between stored shards and the rerun resumes from them; one intra-op thread, as the
    # other test process of `pytest -n 2` has the other core.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--images", "12", "--checkpoints", "4,8",
                           "--kill-at", "random", "--fork", "--interval", "0.02", "--out", str(tmp_path / "soak"),
                           "--", "batch_size=4", "store.shard_size=4", "gallery_images=0"],
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    rows = re.findall(r"^ +(\d+) +([\d,]+) MiB +([\d,]+) MiB +([\d,]+) MiB +[\d.]+$", out, re.MULTILINE)
    assert [int(images) for images, *_ in rows] == [4, 8, 12]
    for _, now, peak, _ in rows:  # a Python with torch, in MiB; resident memory never above the peak
        assert 50 < int(now.replace(",", "")) <= int(peak.replace(",", ""))
    for what in ("resident memory", "peak"):
        assert re.search(rf"growth of the {what} from 4 to 12 images \(least-squares slope\): -?[\d,]+ bytes per image", out)
    for method in ("rollout", "agcam"):
        assert re.search(rf"store {method}: [\d.]+ MiB \([\d,]+ bytes per image\)", out), method
    for stage in ("loading", "explaining/rollout", "explaining/agcam", "scoring_kernels/sweep"):
        assert re.search(rf"^    {re.escape(stage)} +[\d.]+ s$", out, re.MULTILINE), stage
    assert re.search(r"killed at [\d.]+ s|finished at [\d.]+ s, before the kill", out)
    assert "records.csv: identical to the uninterrupted run's" in out
    assert "table.csv: identical to the uninterrupted run's" in out

    # The same kill and resume against the run above, given with --reference: no first run.
    again = subprocess.run([sys.executable, str(SCRIPT), "--images", "12", "--kill-at", "random", "--seed", "1",
                            "--fork", "--interval", "0.02", "--reference", str(tmp_path / "soak" / "run"),
                            "--out", str(tmp_path / "again"), "--", "batch_size=4", "store.shard_size=4",
                            "gallery_images=0"],
                           capture_output=True, text=True, timeout=600, check=False,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "the uninterrupted run: " in again.stdout and "growth of" not in again.stdout  # no first run
    assert not (tmp_path / "again" / "run").exists()
    assert "records.csv: identical to the uninterrupted run's" in again.stdout
    assert "table.csv: identical to the uninterrupted run's" in again.stdout


def test_a_reference_of_other_settings_is_refused(tmp_path):
    script = load_script()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(SystemExit):  # not a run folder
        script.parse_args(["--kill-at", "5", "--reference", str(run_dir)])
    for name in ("run.json", "records.csv", "table.csv"):
        (run_dir / name).write_text("{}")
    (run_dir / "config.yaml").write_text("dataset: {params: {num_images: 100}}\nmethod: {rollout: {}, agcam: {}}\n")
    assert script.reference_problem(run_dir, 100, "rollout,agcam") is None
    assert "100 images" in script.reference_problem(run_dir, 50_000, "rollout,agcam")
    assert "methods rollout,agcam" in script.reference_problem(run_dir, 100, "agcam")
    with pytest.raises(SystemExit):  # a reference needs a kill
        script.parse_args(["--reference", str(run_dir), "--images", "100"])
    assert script.parse_args(["--kill-at", "5", "--reference", str(run_dir), "--images", "100"]).reference


def test_the_records_counter_reads_images_as_rows_grow(tmp_path):
    """Images scored = data rows / (methods x thresholds), a half-written line not counted, and
    only the staging folder of the watched process is read."""
    script = load_script()
    run_dir = tmp_path / "run"
    other = tmp_path / ".run.incomplete-999"
    stage = tmp_path / ".run.incomplete-123"
    for folder in (other, stage):
        folder.mkdir()
        (folder / "config.yaml").write_text("method: {a: {}, b: {}}\nmetric: {thresholds: [0.3, 0.5]}\n")
    (other / "records.csv").write_text("header\n" + "row\n" * 40)
    counter = script.RecordCounter(run_dir, 123)
    assert counter.images() == 0  # no records.csv yet
    records = stage / "records.csv"
    records.write_text("header\n" + "row\n" * 7 + "ro")
    assert counter.images() == 1  # 7 rows: one image of 2 methods x 2 thresholds, and part of the next
    with records.open("a") as handle:
        handle.write("w\n")
    assert counter.images() == 2


def test_a_busy_output_folder_is_refused(tmp_path):
    script = load_script()
    (tmp_path / "left").write_text("x")
    with pytest.raises(SystemExit):
        script.parse_args(["--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        script.parse_args(["--kill-at", "soon"])
