"""OmegaConf resolvers of the configuration tree.

`${run_start:FORMAT}` names the run folder by the time the run started. Hydra's `${now:...}`
reads the clock in every process, so the ranks of a torchrun launch, started a moment apart,
would each name their own folder; `run_start` reads the time rank 0 shared before Hydra
started (`START_VARIABLE`), or, in a plain run, the clock as `now` does."""

from __future__ import annotations

import os
from datetime import datetime

from omegaconf import OmegaConf

START_VARIABLE = "WSOL_BENCH_START"  # ISO time, set by the command on every rank of a data-parallel launch


def run_start(pattern: str) -> str:
    """The run's start time in strftime `pattern`: the shared time of a data-parallel launch
    (the same on every rank), else the current time."""
    shared = os.environ.get(START_VARIABLE)
    return (datetime.fromisoformat(shared) if shared else datetime.now()).strftime(pattern)


def register_resolvers() -> None:
    """Make `${run_start:...}` known to OmegaConf (idempotent)."""
    # cached per config, as Hydra's `now`: Hydra copies the cache into every job of a sweep, so
    # the sweep folder is read once
    OmegaConf.register_new_resolver("run_start", run_start, replace=True, use_cache=True)
