"""OmegaConf resolvers of the configuration tree.

`${run_start:FORMAT}` names the run folder by the time the run started; `${job_folder:...}` names
the folder of each job of a sweep. Hydra's `${now:...}`
reads the clock in every process, so the ranks of a torchrun launch, started a moment apart,
would each name their own folder; `run_start` reads the time rank 0 shared before Hydra
started (`START_VARIABLE`), or, in a plain run, the clock as `now` does."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime

from omegaconf import OmegaConf

START_VARIABLE = "WSOL_BENCH_START"  # ISO time, set by the command on every rank of a data-parallel launch


def run_start(pattern: str) -> str:
    """The run's start time in strftime `pattern`: the shared time of a data-parallel launch
    (the same on every rank), else the current time."""
    shared = os.environ.get(START_VARIABLE)
    return (datetime.fromisoformat(shared) if shared else datetime.now()).strftime(pattern)


# A file name may hold 255 bytes on the usual file systems; longer override lists are cut and
# end in a digest of the whole list, so two jobs never share a folder
_NAME_BYTES = 200


def job_folder(number: int, preset: str, overrides: str) -> str:
    """The folder of job `number` of a sweep: `<number>_<preset>` and, when the job has settings
    of its own, `_<overrides>` (Hydra's override_dirname), with "/" (a group choice such as
    hydra/launcher=joblib) written as "-" so the name is one folder, and a name too long for a
    file system cut to a prefix plus a digest of the whole."""
    name = f"{number}_{preset}" + (f"_{overrides.replace('/', '-')}" if overrides else "")
    if len(name.encode()) <= _NAME_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return name.encode()[:_NAME_BYTES - 13].decode(errors="ignore") + "~" + digest


def register_resolvers() -> None:
    """Make `${run_start:...}` known to OmegaConf (idempotent)."""
    # cached per config, as Hydra's `now`: Hydra copies the cache into every job of a sweep, so
    # the sweep folder is read once
    OmegaConf.register_new_resolver("run_start", run_start, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("job_folder", job_folder, replace=True)
