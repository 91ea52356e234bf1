"""No folder for a refused run: a Hydra callback of the `wsol-bench` command, listed in
conf/config.yaml under `hydra.callbacks`.

Hydra makes the run folder, writes .hydra/ into it and opens the log file before the job's
code runs, so a single run that ends without a result (refused by a setting, a missing dataset
or a check of the runner, or interrupted before it published anything) would leave a folder
with no run in it. A refusal ends the job with sys.exit and an interrupt with
KeyboardInterrupt, after which Hydra calls no callback; so the callback notes, before Hydra
makes the folder, which folders are new, and when the process exits it removes what Hydra wrote
into them and the new folders, provided they hold nothing else. A folder that existed before
the run is never touched, nor is the folder of a job that returned or failed with a bug (its
log stays), nor a sweep's job folders (a refused job's log names the job, which the sweep's
one-line error does not).
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra writes into hydra.output_subdir


@dataclass
class NewRunFolder:
    """A run folder Hydra makes for this run: `path`, and `top`, the outermost folder on the
    way to it that did not exist (the path itself when only it was missing)."""

    path: Path
    top: Path
    pid: int = field(default_factory=os.getpid)
    hydra_files: list[Path] = field(default_factory=list)  # .hydra/'s files and the log files


# the single runs of this process whose job has not returned, by folder
_UNFINISHED: dict[Path, NewRunFolder] = {}
_EXIT_HOOK = False


def outermost_missing(path: Path) -> Path | None:
    """The outermost folder of `path` (itself included) that does not exist; None when it does."""
    if path.exists():
        return None
    top = path
    while not top.parent.exists():
        top = top.parent
    return top


def planned_run_folder(config: DictConfig) -> Path | None:
    """The absolute folder Hydra will make for a single run (`hydra.run.dir`), or None when it
    cannot be resolved now. Its `${run_start:...}` is cached in `config`, so Hydra then names the
    same folder."""
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    try:
        hydra_config.set_config(config)  # `${hydra:...}` in the name reads it (Hydra sets it next itself)
        return Path(os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir"))))
    except (OmegaConfBaseException, ValueError):  # Hydra refuses it next, in its own words
        return None
    finally:
        hydra_config.cfg = previous


def files_hydra_wrote(config: DictConfig, folder: Path) -> list[Path]:
    """The files Hydra wrote into the job's `folder` before the job: .hydra/'s config files
    (when `hydra.output_subdir` is set) and the files the log handlers write."""
    files = [folder / config.hydra.output_subdir / name for name in HYDRA_FILES] if config.hydra.output_subdir else []
    return files + [Path(h.baseFilename) for h in _file_handlers() if folder in Path(h.baseFilename).parents]


def _loggers() -> list[logging.Logger]:
    """The root logger and every named logger (not the placeholders of unused names)."""
    named = logging.Logger.manager.loggerDict.values()
    return [logging.getLogger(), *(logger for logger in named if isinstance(logger, logging.Logger))]


def _file_handlers() -> list[logging.FileHandler]:
    """Every log file handler of the loggers."""
    return [h for logger in _loggers() for h in logger.handlers if isinstance(h, logging.FileHandler)]


def discard_new_run_folder(new: NewRunFolder) -> bool:
    """Remove what Hydra wrote for a run that ended without a result, and the folders it made,
    when they hold nothing but that; returns whether the run folder is gone. Anything else in
    the folder (a run's outputs, a staging folder, a lock, the user's files) keeps it all."""
    if not new.path.is_dir():
        return True
    expected = set(new.hydra_files) | {p for f in new.hydra_files for p in f.parents if new.path in p.parents}
    if any(entry not in expected for entry in new.path.rglob("*")):
        return False
    _close_logs_in(new.path)
    try:
        for file in new.hydra_files:
            file.unlink(missing_ok=True)
        for folder in sorted(expected - set(new.hydra_files), key=lambda p: len(p.parts), reverse=True):
            folder.rmdir()
        folder = new.path
        while True:  # the run folder, then each parent this run made, while empty
            folder.rmdir()
            if folder == new.top or any(folder.parent.iterdir()):
                return True
            folder = folder.parent
    except OSError:  # something appeared there meanwhile: it stays, with the folders that hold it
        return not new.path.exists()


def _close_logs_in(folder: Path) -> None:
    """Detach and close the log handlers writing into `folder`, so that a later record does not
    open their file again."""
    for handler in _file_handlers():
        if folder in Path(handler.baseFilename).parents:
            for logger in _loggers():
                logger.removeHandler(handler)
            handler.close()


def discard_unfinished_runs() -> None:
    """At the exit of the process: discard the new folder of each single run whose job never
    returned (a refusal's sys.exit, an interrupt). A run that got as far as publishing keeps
    its folder (run.json is in it)."""
    for path, new in list(_UNFINISHED.items()):
        if new.pid == os.getpid():  # a forked child leaves its parent's runs alone
            del _UNFINISHED[path]
            discard_new_run_folder(new)


def _watch(new: NewRunFolder) -> None:
    """Check `new` when the process exits, unless its job returns first."""
    global _EXIT_HOOK
    _UNFINISHED[new.path] = new
    if not _EXIT_HOOK:
        atexit.register(discard_unfinished_runs)
        _EXIT_HOOK = True


class JobCallback(Callback):
    """The callback of `wsol-bench`'s Hydra jobs (see the module's docstring)."""

    def __init__(self) -> None:
        self._new: NewRunFolder | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Before Hydra makes a single run's folder: which of its folders are new."""
        path = planned_run_folder(config)
        top = outermost_missing(path) if path is not None else None
        self._new = NewRunFolder(path, top) if top is not None else None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """After Hydra made the job's folder and files, before the job's code: watch a new
        single run's folder until the job returns."""
        new, self._new = self._new, None
        if new is not None and Path(config.hydra.runtime.output_dir) == new.path:
            new.hydra_files = files_hydra_wrote(config, new.path)
            _watch(new)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """The job returned, or raised what Hydra records (a bug; a sweep job's refusal): its
        folder stays as it is."""
        _UNFINISHED.pop(Path(config.hydra.runtime.output_dir), None)
