"""The `wsol-bench` command (Hydra). With no arguments it runs the quickstart preset."""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from wsol_bench.config.errors import UserError, file_system_line, run_app
from wsol_bench.config.keys import check_known_keys
from wsol_bench.config.resolvers import START_VARIABLE
from wsol_bench.methods.base import MissingLibraryError
from wsol_bench.methods.capture import UnsupportedModelError
from wsol_bench.methods.registry import PluginImportError
from wsol_bench.models import ModelLoadError
from wsol_bench.regions.contours import MissingDependencyError
from wsol_bench.run.distributed import Ranks, join, leave
from wsol_bench.run.store import InvalidShard

log = logging.getLogger("wsol_bench")
# Errors caused by the user's settings or files: print the message, not a traceback.
USER_ERRORS = (ModelLoadError, UnsupportedModelError, MissingDependencyError, MissingLibraryError, PluginImportError,
               InvalidShard, ValueError, FileNotFoundError, KeyError)


def _refuse(line: str) -> None:
    """End the job with the one-line user error `line`. A job of a multirun sweep raises it, so
    Hydra's run_job records it in the job's result and the launcher (joblib, submitit) finishes
    the other jobs; run_app prints it after the sweep. A single run exits at once."""
    log.error("%s", line)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise UserError(line)
    print(f"wsol-bench: error: {line}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="pkg://wsol_bench.conf", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from wsol_bench.run.runner import run

    try:
        check_known_keys(cfg)  # keys added with +key=value, which Hydra lets past the schema
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except MissingMandatoryValue as exc:
        if os.environ.get("WSOL_BENCH_DEBUG"):
            raise
        key = getattr(exc, "full_key", None) or "a setting"
        _refuse(f"{key} is required by this preset and has no value; give it on the "
                f"command line, e.g. {key}=/path/to/it")
    except USER_ERRORS as exc:
        if os.environ.get("WSOL_BENCH_DEBUG"):
            raise
        _refuse(str(exc))
    except OSError as exc:  # a full disk, a read-only or forbidden folder: name the path
        if os.environ.get("WSOL_BENCH_DEBUG") or not exc.filename:
            raise
        _refuse(file_system_line(exc))


def _agree_on_the_run(ranks: Ranks) -> None:
    """Before Hydra starts on the ranks of a torchrun launch: every rank names the run folder by
    rank 0's start time, and only rank 0 writes Hydra's files there (the others log to
    wsol-bench.rank<r>.log)."""
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        print("wsol-bench: error: a torchrun launch is one run, split over its ranks; start a sweep (-m) "
              "without torchrun, e.g. with hydra/launcher=submitit_slurm and tasks per node", file=sys.stderr)
        sys.exit(2)
    os.environ[START_VARIABLE] = ranks.broadcast(datetime.now().isoformat())
    if not ranks.main:
        sys.argv += ["hydra.output_subdir=null",
                     f"hydra.job_logging.handlers.file.filename=${{hydra.runtime.output_dir}}/"
                     f"wsol-bench.rank{ranks.rank}.log"]


def main() -> None:
    """Console entry point (set WSOL_BENCH_DEBUG=1 for tracebacks of user errors). Under
    torchrun every rank runs it; they join one process group first."""
    import torch

    ranks = join("cuda" if torch.cuda.is_available() else "cpu")
    if ranks.distributed:
        _agree_on_the_run(ranks)
    try:
        run_app(_main, "wsol-bench", "config")
    finally:
        leave()


if __name__ == "__main__":
    main()
