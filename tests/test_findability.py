"""Results that are easy to find: a refused run leaves no folder behind, every command ends by
naming where its outputs are, a sweep's job folders are named by their settings, other
libraries' INFO lines stay off the console, and the report of a killed run reads the rows in its
staging folder."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import forked_command

from wsol_bench.run import hydra_job

SCRIPT = Path(sys.executable).parent / "wsol-bench"
LIBRARY_LINE = "Loaded  from checkpoint 'weights.safetensors'"  # what timm logs at INFO, word for word


def _folders(root: Path) -> list[str]:
    """Every file and folder under `root`, relative."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _chatty_run(cfg, out_dir: Path) -> None:
    """A stand-in for the runner: a line of a library at INFO and one at WARNING, a line of
    wsol-bench's own, and the table."""
    logging.getLogger("timm.models._helpers").info(LIBRARY_LINE)
    logging.getLogger("timm").warning("a library's warning")
    logging.getLogger("wsol_bench").info("our own progress line")
    print("the table")


def _failing_run(exc: BaseException):
    def run(cfg, out_dir: Path) -> None:
        raise exc
    return run


# -- a refused run leaves nothing behind -------------------------------------------------------------


def test_a_setting_refused_after_hydra_made_the_run_folder_leaves_nothing(tmp_path):
    """The console script in a process of its own: Hydra makes results/runs/quickstart/<time>/
    with .hydra/ and the log, then the job refuses batch_size=0; when the process ends, none of
    it is left."""
    env = {k: v for k, v in os.environ.items() if k not in ("WSOL_BENCH_DEBUG", "HYDRA_FULL_ERROR")}
    proc = subprocess.run([str(SCRIPT), "batch_size=0"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["wsol-bench: error: batch_size=0 must be at least 1"]
    assert _folders(tmp_path) == []


def test_a_run_the_runner_refuses_leaves_nothing_when_the_process_ends(tmp_path, command):
    """A missing dataset, refused inside the runner (after it took the folder's lock and made its
    staging folder): Hydra's folder stays until the process ends, then it, the folders above it
    that the run made, the staging folder and the lock are all gone."""
    (tmp_path / "voc").mkdir()
    result = command("wsol-bench", ["dataset=voc", f"dataset.params.root={tmp_path / 'voc'}", "method=[center]",
                                    f"store.root={tmp_path / 'cache'}"], tmp_path)
    assert result.returncode == 2 and "no VOC2012 folder" in result.stderr.strip().splitlines()[-1]
    (run,) = (tmp_path / "results" / "runs" / "quickstart").iterdir()
    assert _folders(run) == [".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml",
                             "wsol-bench.log"]
    hydra_job.discard_unfinished_runs()  # what the process does when it exits
    assert _folders(tmp_path) == ["voc"]


def test_a_refused_run_into_an_existing_folder_leaves_the_folder_and_its_files(tmp_path, command):
    """A folder that was there before the run is never removed, nor anything in it."""
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("the user's notes")
    result = command("wsol-bench", ["batch_size=0", f"hydra.run.dir={kept}"], tmp_path)
    assert result.returncode == 2
    hydra_job.discard_unfinished_runs()
    assert (kept / "notes.txt").read_text() == "the user's notes"
    assert (kept / "wsol-bench.log").is_file() and (kept / ".hydra" / "config.yaml").is_file()


def test_an_interrupted_run_without_results_leaves_nothing_and_a_bug_keeps_its_folder(tmp_path, command,
                                                                                    monkeypatch):
    """Interrupted before it published anything, a run leaves no folder either (its map shards
    stay in the store); a bug's folder and log stay for its report."""
    monkeypatch.setattr("wsol_bench.run.runner.run", _failing_run(KeyboardInterrupt()))
    assert command("wsol-bench", ["hydra.run.dir=interrupted"], tmp_path).returncode == 130
    monkeypatch.setattr("wsol_bench.run.runner.run", _failing_run(RuntimeError("a bug")))
    assert command("wsol-bench", ["hydra.run.dir=bug"], tmp_path).returncode == 1
    hydra_job.discard_unfinished_runs()
    assert not (tmp_path / "interrupted").exists()
    assert (tmp_path / "bug" / "wsol-bench.log").is_file()


# -- every command ends by naming its outputs --------------------------------------------------------


def test_summary_mode_ends_by_naming_its_folder_and_files(tmp_path, command):
    result = command("wsol-bench", ["mode=summary", "dataset.params.num_images=2", "hydra.run.dir=s"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "s"
    assert result.stdout.strip().splitlines()[-3:] == [
        f"run folder: {folder}", f"summary: {folder / 'summary.json'}", f"coverage map: {folder / 'coverage.png'}"]
    assert (folder / "coverage.png").is_file()


def test_training_ends_by_naming_its_folder(tmp_path, command, monkeypatch):
    monkeypatch.setattr("wsol_bench.train.recipe.train_from_config", lambda cfg, out_dir: None)
    result = command("wsol-bench-train", ["out_dir=trained"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"run folder: {tmp_path / 'trained'}"


# -- a sweep's job folders are named by their settings ------------------------------------------------


def test_sweep_job_folders_are_named_by_number_preset_and_settings(tmp_path, command):
    """Two tiny jobs (mode=summary): each folder is the job's number, the preset and the job's
    own settings; paths and settings that change no number are left out of the name."""
    sweep = tmp_path / "sweep"
    result = command("wsol-bench", ["-m", "mode=summary", "dataset.params.num_images=2,3", "progress=false",
                                    f"store.root={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    names = ["0_quickstart_dataset.params.num_images=2,mode=summary",
             "1_quickstart_dataset.params.num_images=3,mode=summary"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == names
    for name in names:
        assert f"run folder: {sweep / name}" in result.stdout
        assert (sweep / name / "summary.json").is_file()


def test_a_sweep_job_without_settings_of_its_own_is_named_by_number_and_preset(tmp_path, command, monkeypatch):
    monkeypatch.setattr("wsol_bench.run.runner.run", _chatty_run)
    sweep = tmp_path / "sweep"
    result = command("wsol-bench", ["-m", "progress=false", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_quickstart"]


# -- other libraries' INFO lines stay off the console ---------------------------------------------------


def test_library_info_lines_are_off_the_console_unless_verbose_and_always_in_the_log(tmp_path, command,
                                                                                   monkeypatch):
    monkeypatch.setattr("wsol_bench.run.runner.run", _chatty_run)
    quiet = command("wsol-bench", ["hydra.run.dir=quiet"], tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert LIBRARY_LINE not in quiet.stdout
    for line in ("a library's warning", "our own progress line", "the table"):
        assert line in quiet.stdout, line
    assert LIBRARY_LINE in (tmp_path / "quiet" / "wsol-bench.log").read_text()
    verbose = command("wsol-bench", ["hydra.run.dir=verbose", "verbose=true"], tmp_path)
    assert LIBRARY_LINE in verbose.stdout and "our own progress line" in verbose.stdout


def test_a_sweeps_launcher_lines_are_off_the_console_unless_verbose(tmp_path, command, monkeypatch):
    monkeypatch.setattr("wsol_bench.run.runner.run", _chatty_run)
    quiet = command("wsol-bench", ["-m", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'a'}"], tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "Launching 2 jobs" not in quiet.stdout and LIBRARY_LINE not in quiet.stdout
    assert quiet.stdout.count("our own progress line") == 2
    verbose = command("wsol-bench", ["-m", "seed=1,2", "verbose=true", f"hydra.sweep.dir={tmp_path / 'b'}"], tmp_path)
    assert "Launching 2 jobs" in verbose.stdout and LIBRARY_LINE in verbose.stdout


# -- the report of a killed run -------------------------------------------------------------------------


def _kill_mid_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run SIGKILLed once its staging folder holds a few batches of records: (run folder,
    staging folder)."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["method=[rollout]", "dataset.params.num_images=400", "batch_size=2", "store.shard_size=2",
            "gallery_images=0", "progress=false", "metric.image_filter=all", f"store.root={cache}",
            f"hydra.run.dir={out}"]
    child = forked_command("wsol-bench", args, tmp_path, output=tmp_path / "printed.txt")
    deadline = time.monotonic() + 300  # a hang guard only
    records = None
    while child.is_alive() and time.monotonic() < deadline:
        stages = [s / "records.csv" for s in (tmp_path.glob(".run.incomplete-*"))]
        if stages and stages[0].is_file() and stages[0].read_text().count("\n") > 20:
            records = stages[0]
            break
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    assert records is not None, (tmp_path / "printed.txt").read_text()[-2000:]
    return out, records.parent


def test_report_allow_incomplete_reads_a_killed_runs_staging_folder(tmp_path, command):
    """`wsol-bench-report RUN --allow-incomplete` on a run killed mid-way builds the tables from
    the complete rows of the killed run's staging folder, names it, and writes the tables there;
    several staging folders of the same age are refused naming them, the newest is taken."""
    out, stage = _kill_mid_run(tmp_path)
    assert not (out / "config.yaml").exists()
    result = command("wsol-bench-report", [str(out), "--allow-incomplete", "--no-gallery"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"tables written to {stage}\n(the staging folder of the run killed in {out}: " in result.stdout
    images = pd.read_csv(stage / "records.csv", on_bad_lines="skip")["image_id"].nunique()
    table = pd.read_csv(stage / "table_box.csv")
    assert 0 < table["n_images"].iloc[0] <= images < 400

    twin = tmp_path / ".run.incomplete-1"
    shutil.copytree(stage, twin)  # copies the times too: which is newer is not clear
    ambiguous = command("wsol-bench-report", [str(out), "--allow-incomplete", "--no-gallery"], tmp_path)
    assert ambiguous.returncode == 2
    line = ambiguous.stderr.strip().splitlines()[-1]
    assert "several staging folders" in line and str(stage) in line and str(twin) in line
    newer = time.time() + 10
    os.utime(twin / "records.csv", (newer, newer))
    newest = command("wsol-bench-report", [str(out), "--allow-incomplete", "--no-gallery"], tmp_path)
    assert newest.returncode == 0 and f"tables written to {twin}" in newest.stdout


def test_report_allow_incomplete_without_rows_anywhere_names_what_it_looked_for(tmp_path, command):
    folder = tmp_path / "run"
    (folder / ".hydra").mkdir(parents=True)
    (tmp_path / ".run.incomplete-7").mkdir()  # killed before it wrote any rows
    result = command("wsol-bench-report", [str(folder), "--allow-incomplete"], tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert f"{folder / 'config.yaml'} not found" in line and ".run.incomplete-<pid>" in line


@pytest.mark.parametrize("inside", [False, True], ids=["beside", "inside"])
def test_report_finds_a_staging_folder_beside_or_inside_the_run_folder(tmp_path, inside):
    """The two places a run stages its files (run/folder.py): beside the run folder, or inside it
    when the two cannot be exchanged."""
    from wsol_bench.report.run_folder import killed_run_rows

    folder = tmp_path / "run"
    folder.mkdir()
    stage = folder / ".incomplete-5" if inside else tmp_path / ".run.incomplete-5"
    stage.mkdir()
    for name in ("config.yaml", "records.csv"):
        (stage / name).write_text("")
    assert killed_run_rows(folder) == stage


def test_a_job_folder_is_one_valid_name_whatever_its_settings():
    """A group choice's "/" does not nest folders, no settings give no trailing separator, and a
    name too long for a file system is cut with a digest that keeps two jobs apart."""
    from wsol_bench.config.resolvers import job_folder

    assert job_folder(3, "quickstart", "") == "3_quickstart"
    assert job_folder(0, "quickstart", "hydra/launcher=joblib,seed=1") == "0_quickstart_hydra-launcher=joblib,seed=1"
    long_a, long_b = (job_folder(1, "quickstart", "method=[" + ",".join(["agcam"] * 60) + f"],seed={s}")
                      for s in (1, 2))
    assert long_a != long_b and len(long_a.encode()) <= 200 and "/" not in long_a
