"""The `wsol-bench` command (Hydra). With no arguments it runs the quickstart preset.

Only Hydra and the config schemas are imported before the configuration is composed and
checked, so `--help`, `--cfg job` and every refusal of a setting answer before torch and timm
load (the run imports them once there is work to do)."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from wsol_bench.cli.errors import job_refusals, run_command
from wsol_bench.config.checks import check_settings
from wsol_bench.config.keys import check_known_keys
from wsol_bench.config.resolvers import START_VARIABLE
from wsol_bench.errors import SettingError


@hydra.main(config_path="pkg://wsol_bench.conf", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    with job_refusals("wsol-bench"):
        check_known_keys(cfg)  # keys added with +key=value, which Hydra lets past the schema
        check_settings(cfg)  # every check that needs no library: refused before torch loads
        from wsol_bench.run.runner import run  # torch, timm and the explainers: there is work to do

        run(cfg, Path(HydraConfig.get().runtime.output_dir))


def _launched_as_ranks() -> bool:
    """Whether a launcher started this process as one rank of several (torchrun sets WORLD_SIZE,
    a submitit job SUBMITIT_EXECUTOR); only then torch is imported before the configuration."""
    return "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" in os.environ


def _agree_on_the_run(ranks) -> None:
    """Before Hydra starts on the ranks of a torchrun launch: every rank names the run folder by
    rank 0's start time, and only rank 0 writes Hydra's files there (the others log to
    wsol-bench.rank<r>.log)."""
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        raise SettingError("a torchrun launch is one run, split over its ranks; start a sweep (-m) without "
                           "torchrun, e.g. with hydra/launcher=submitit_slurm and tasks per node")
    os.environ[START_VARIABLE] = ranks.broadcast(datetime.now().isoformat())
    if not ranks.main:
        log_file = f"${{hydra.runtime.output_dir}}/wsol-bench.rank{ranks.rank}.log"
        sys.argv += ["hydra.output_subdir=null", f"hydra.job_logging.handlers.file.filename={log_file}"]


def _run_as_rank() -> None:
    """One rank of a launch: join the launch's process group (once), agree on the run, run."""
    import torch

    from wsol_bench.run.distributed import join

    ranks = join("cuda" if torch.cuda.is_available() else "cpu")
    if ranks.distributed:
        _agree_on_the_run(ranks)
    _main()


def main() -> None:
    """Console entry point (set WSOL_BENCH_DEBUG=1 for the traceback of a refusal). Under
    torchrun every rank runs it; they join one process group first, and leave it only once the
    command's last line is said (the ranks agree in it on who prints a refusal)."""
    if not _launched_as_ranks():
        sys.exit(run_command("wsol-bench", _main, "config"))
    try:
        code = run_command("wsol-bench", _run_as_rank, "config")
    finally:
        from wsol_bench.run.distributed import leave

        leave()
    sys.exit(code)


if __name__ == "__main__":
    main()
