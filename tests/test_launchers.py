"""`wsol-bench -m` through Hydra's launcher plugins (the `cluster` extra): joblib runs a sweep's
jobs in parallel local processes, submitit submits one job per run (SLURM; its local executor
here). Each job must be a complete run folder with the numbers a plain run gives. The sweeps
start in this process (the launchers start the jobs' processes as they would from the command);
the plain runs they are compared with run in this process too."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import CommandResult, command_in_process
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from wsol_bench.run.run_tables import check_run
from wsol_bench.run.runner import run as run_benchmark

# a run of a few seconds: 4 synthetic images, no progress bars, no gallery figure
# every image counts, so each table holds the 4 images whatever the shipped model predicts
# every test starts a sweep's jobs as processes: `pytest -m slow` (CI runs them)
pytestmark = pytest.mark.slow

TINY = ["dataset.params.num_images=4", "metric.image_filter=all", "progress=false", "gallery_images=0"]
BAD_BATCH = "batch_size=0 must be at least 1"  # the one-line user error of a job with batch_size=0


def _need(launcher: str) -> None:
    """Skip unless Hydra's `launcher` plugin and the library it drives are installed (the
    cluster extra: pip install -e ".[cluster]")."""
    for module in (f"hydra_plugins.hydra_{launcher}_launcher", launcher):  # the plugin imports it lazily
        pytest.importorskip(module, reason=f"{module} is not installed (the cluster extra)")


def _run(args: list[str], cwd: Path) -> CommandResult:
    """`wsol-bench args` (a sweep) in this process, without the debug switches, so user errors
    take their one-line form. The jobs' processes get one intra-op thread each: two jobs (or
    tasks) at a time share the cores with the other test process."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        return command_in_process("wsol-bench", args, cwd)


def _plain_run(overrides: list[str], out: Path) -> Path:
    """The same run without a launcher, in this process: its run folder `out`."""
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "run_name=quickstart"])
    run_benchmark(cfg, out)
    return out


def _job_folders(sweep: Path) -> list[str]:
    return sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def _job(sweep: Path, num: int) -> Path:
    """Job `num`'s folder: its number, the preset and the job's own settings name it."""
    (folder,) = (p for p in sweep.iterdir() if p.is_dir() and p.name.startswith(f"{num}_quickstart_"))
    return folder


def _assert_complete(job: Path, method: str) -> pd.DataFrame:
    """A finished run of `method` over the 4 images: run.json marks it complete and its tables
    are what its records rebuild to. Returns its table_box.csv."""
    assert check_run(job) == [], job
    box = pd.read_csv(job / "table_box.csv")
    assert list(box["method"]) == [method] and list(box["n_images"]) == [4]
    return box


def _launcher(job: Path) -> str:
    """The launcher Hydra recorded for the job."""
    return OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.runtime.choices["hydra/launcher"]


def test_joblib_runs_the_jobs_in_parallel_with_the_numbers_of_a_plain_run(tmp_path):
    """Two jobs in two worker processes, each a complete run folder whose maps are in the shared
    store; a job's table equals that of the same run made without a launcher."""
    _need("joblib")
    sweep = tmp_path / "sweep"
    proc = _run(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=[center],[random]", *TINY,
                 "verbose=true", f"store.root={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2," in proc.stdout  # Hydra's log line (verbose): the plugin ran the sweep
    assert _job_folders(sweep) == [f"{i}_quickstart_dataset.params.num_images=4,method=[{method}],"
                                   "metric.image_filter=all" for i, method in ((0, "center"), (1, "random"))]
    for job, method in ((_job(sweep, 0), "center"), (_job(sweep, 1), "random")):
        _assert_complete(job, method)
        assert _launcher(job) == "joblib"
        folder = Path(json.loads((job / "maps.json").read_text())[method]["folder"])
        assert folder.parent == (tmp_path / "cache").resolve()  # the store every job shares

    # its own store: the maps are explained again, not read back
    plain = _plain_run(["method=[random]", *TINY, f"store.root={tmp_path / 'cache_plain'}"],
                       tmp_path / "plain")
    pd.testing.assert_frame_equal(pd.read_csv(_job(sweep, 1) / "table_box.csv"),
                                  pd.read_csv(plain / "table_box.csv"), check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(_job(sweep, 1) / "records.csv"),
                                  pd.read_csv(plain / "records.csv"), check_exact=True)


def test_submitit_local_runs_each_job_as_a_submitit_job_and_finishes_past_a_refused_one(tmp_path):
    """submitit's local executor (what SLURM jobs run, without SLURM): each job a complete run
    folder with its own override, and submitit's job folders with their logs and results. Every
    job is its own process: a refused job's error is in its submitit logs and its run log, the
    other jobs are complete runs, and the sweep exits non-zero (one sweep for both: each costs
    a process start per job)."""
    _need("submitit")
    sweep = tmp_path / "sweep"
    proc = _run(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "method=[center]",
                 "method.center.params.sigma=0.2,0.4", "batch_size=0,4", *TINY, f"store.root={tmp_path / 'cache'}",
                 f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode != 0
    assert f"wsol-bench: error: {BAD_BATCH}" in proc.stderr  # quoted from the job's stderr by submitit
    assert _job_folders(sweep) == [f"{i}_quickstart_batch_size={b},dataset.params.num_images=4,"
                                   f"method.center.params.sigma={s},method=[center],metric.image_filter=all"
                                   for i, (s, b) in enumerate(((0.2, 0), (0.2, 4), (0.4, 0), (0.4, 4)))]
    boxes = [_assert_complete(_job(sweep, i), "center") for i in (1, 3)]
    assert boxes[0]["IoU"].iloc[0] != boxes[1]["IoU"].iloc[0]  # each job got its own sigma

    # submitit's folder: one folder per job id (= hydra.job.id), with the job's stdout and result
    submitit = sweep / ".submitit"
    ids = sorted(p.name for p in submitit.iterdir() if p.name.isdigit())
    assert len(ids) == 4
    for i in (1, 3):
        job = _job(sweep, i)
        hydra_job = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.job
        assert _launcher(job) == "submitit_local" and str(hydra_job.id) in ids
        out = submitit / str(hydra_job.id)
        assert (out / f"{hydra_job.id}_0_result.pkl").is_file()
        assert f"run folder: {job}" in (out / f"{hydra_job.id}_0_log.out").read_text()
    for i in (0, 2):
        bad = _job(sweep, i)
        assert not (bad / "run.json").exists()
        assert f"[wsol_bench][ERROR] - {BAD_BATCH}" in (bad / "wsol-bench.log").read_text()
        job_id = OmegaConf.load(bad / ".hydra" / "hydra.yaml").hydra.job.id
        logs = submitit / str(job_id)  # what a SLURM user reads: the job's stdout and stderr
        assert BAD_BATCH in "".join((logs / f"{job_id}_0_log.{ext}").read_text() for ext in ("out", "err"))


@pytest.fixture(scope="module")
def joblib_sweep_with_a_bad_job(tmp_path_factory) -> tuple[CommandResult, Path]:
    """A joblib sweep whose job 0 is refused (batch_size=0) while job 1 is a valid run."""
    _need("joblib")
    tmp = tmp_path_factory.mktemp("joblib_bad")
    # 16 images: job 1 is still running when job 0 is refused (job 0 fails as soon as it starts)
    proc = _run(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=[center]", "batch_size=0,4",
                 "dataset.params.num_images=16", "progress=false", "gallery_images=0",
                 f"store.root={tmp / 'cache'}", f"hydra.sweep.dir={tmp / 'sweep'}"], tmp)
    return proc, tmp / "sweep"


def test_joblib_reports_a_refused_job_in_one_line(joblib_sweep_with_a_bad_job):
    """The refused job's error ends stderr in one line (exit code 2, no traceback) and is in its
    own log file, and its folder holds no run."""
    proc, sweep = joblib_sweep_with_a_bad_job
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"wsol-bench: error: {BAD_BATCH}"
    assert "Traceback" not in proc.stderr
    bad = _job(sweep, 0)
    assert f"[wsol_bench][ERROR] - {BAD_BATCH}" in (bad / "wsol-bench.log").read_text()
    assert not (bad / "run.json").exists()


def test_joblib_finishes_the_other_jobs_of_a_sweep_with_a_refused_job(joblib_sweep_with_a_bad_job):
    """A refused job leaves the other jobs of the sweep to finish their runs: the task function
    raises the user error instead of exiting, so Hydra records it in the job's result and the
    sweep reports it after every job ran."""
    _, sweep = joblib_sweep_with_a_bad_job
    assert check_run(_job(sweep, 1)) == []


def test_submitit_job_with_two_tasks_is_one_data_parallel_run(tmp_path):
    """tasks_per_node=2: submitit starts the job's two tasks, which join one gloo process group
    from submitit's environment (no torchrun) and split the shards; the job's folder is one
    run with 2 ranks and the numbers of a one-process run."""
    _need("submitit")
    sweep = tmp_path / "sweep"
    run = ["method=[center,random]", "dataset.params.num_images=10", "store.shard_size=3", "progress=false",
           "gallery_images=0"]
    proc = _run(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                 "hydra.launcher.tasks_per_node=2", *run, f"store.root={tmp_path / 'cache'}",
                 f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = _job(sweep, 0)
    assert check_run(job) == []
    assert json.loads((job / "run.json").read_text())["ranks"] == 2
    plain = _plain_run([*run, f"store.root={tmp_path / 'cache_plain'}"], tmp_path / "plain")
    for name in ("records.csv", "table.csv", "table_box.csv"):
        assert (job / name).read_bytes() == (plain / name).read_bytes(), name
