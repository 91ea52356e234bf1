"""Writing a run folder so that it is either the previous complete run or the new complete run,
never a mix: every output goes to a hidden staging folder beside the outputs, and only when
the run has finished are the files moved into place (each by an atomic rename), the previous
run's files the new run did not write removed, and run.json written last."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wsol_bench.environment import package_version
from wsol_bench.errors import InputFileError
from wsol_bench.files import write_json
from wsol_bench.report.manifest import MANIFEST, manifest_payload, read_manifest

log = logging.getLogger("wsol_bench")
STAGING_PREFIX = ".incomplete-"


@contextmanager
def staged_run(out_dir: Path, summary: dict[str, Any] | None = None) -> Iterator[Path]:
    """A fresh staging folder inside `out_dir`; published into `out_dir` (with `summary`, which
    the block may fill, in run.json) when the block ends without an error, removed when it
    raises (the previous outputs stay untouched). Staging folders of killed runs go first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    previous_files(out_dir)  # a run.json that lists files outside the folder is refused before any work
    for stale in out_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    stage = out_dir / f"{STAGING_PREFIX}{os.getpid()}"
    stage.mkdir()
    try:
        yield stage
        publish(stage, out_dir, summary)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, out_dir: Path, summary: dict[str, Any] | None = None) -> list[str]:
    """Move every file of `stage` into `out_dir`, remove the files of the previous run there
    that this one did not write, and write run.json last. Returns the files (relative)."""
    files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
    previous = previous_files(out_dir)
    for name in files:
        check_inside(out_dir, name, "the new run")
    (out_dir / MANIFEST).unlink(missing_ok=True)  # from here until the end the folder is not complete
    for name in previous:
        if name not in files:
            (out_dir / name).unlink(missing_ok=True)
    for name in files:
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / name, target)
    payload = manifest_payload(out_dir, files, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                                "wsol_bench": package_version(), **(summary or {})})
    write_json(out_dir / MANIFEST, payload)
    return files


def check_inside(out_dir: Path, name: str, what: str) -> None:
    """Refuse a file name that would reach outside the run folder `out_dir`: an absolute path,
    a `..` part, or a folder on the way that is a symbolic link (a run deletes and overwrites
    only files it created inside its own folder)."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise InputFileError(f"{what} names {name!r}, outside the run folder {out_dir}; a run only replaces "
                             f"files inside its own folder (remove {out_dir / MANIFEST} if you edited it, or "
                             "choose another hydra.run.dir)")
    folder = out_dir
    for part in relative.parts[:-1]:
        folder = folder / part
        if folder.is_symlink():
            raise InputFileError(f"{folder} is a symbolic link: {what} would write {name!r} through it, outside "
                                 "the run folder; replace the link by a folder or choose another hydra.run.dir")


def previous_files(out_dir: Path) -> list[str]:
    """The files the previous run's run.json lists (each checked to lie inside `out_dir`); a
    run.json whose list is not a list of file names is refused naming it."""
    listed = (read_manifest(out_dir) or {}).get("files", [])
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise InputFileError(f"{out_dir / MANIFEST} is damaged (its \"files\" are not a list of file names); "
                             "remove it, or choose another hydra.run.dir")
    for name in listed:
        check_inside(out_dir, name, f"the previous {MANIFEST}")
    return listed
