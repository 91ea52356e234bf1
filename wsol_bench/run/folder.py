"""Writing a run folder so that at every instant it holds either the previous complete run or
the new complete run, never a mix, and touching no file but its own.

The run takes the folder's lock (`wsol_bench.locks`: one writer at a time) and writes every
output into a hidden staging folder beside the run folder (`.<name>.incomplete-<pid>`). When the
run has finished, the staging folder receives run.json and, as hard links, every file of the run
folder that no run wrote (Hydra's files, the log, the user's own files), and the two folders are
exchanged by one system call (Linux `renameat2` with RENAME_EXCHANGE); the staging name then
holds the previous run, which is removed. A kill at any moment leaves the old folder or the new
one under the run folder's name, and at most a staging folder, which the next run removes.

Where the exchange is not possible (another system, a file system without it, a parent folder
that is not writable, or a run folder that is the working directory, which must not move), the
staging folder is made inside the run folder and its files are moved into place one by one,
run.json last: then a kill while publishing leaves a folder without run.json, which the report
refuses as incomplete until a rerun completes it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wsol_bench.environment import package_version
from wsol_bench.errors import InputFileError
from wsol_bench.files import write_json
from wsol_bench.locks import FolderLock
from wsol_bench.report.manifest import MANIFEST, manifest_payload, read_manifest
from wsol_bench.report.run_folder import STAGING_PREFIX, staging_folders  # the report reads killed runs' rows

log = logging.getLogger("wsol_bench")
RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@contextmanager
def staged_run(out_dir: Path, summary: dict[str, Any] | None = None) -> Iterator[Path]:
    """A fresh staging folder for a run into `out_dir`; published into `out_dir` (with
    `summary`, which the block may fill, in run.json) when the block ends without an error,
    removed when it raises (the previous outputs stay untouched). The folder's lock is held
    throughout; staging folders of killed runs go first."""
    out_dir = Path(out_dir).resolve()  # a run folder that is a link: the folder it names is replaced
    with FolderLock(out_dir):
        previous_files(out_dir)  # a run.json that lists files outside the folder is refused before any work
        for stale in staging_folders(out_dir):  # the lock is ours: no other run is writing these
            shutil.rmtree(stale, ignore_errors=True)
        stage = _make_stage(out_dir)
        try:
            yield stage
            publish(stage, out_dir, summary)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _make_stage(out_dir: Path) -> Path:
    """The staging folder: beside `out_dir` when the two can be exchanged, else inside it."""
    beside = out_dir.parent / f".{out_dir.name}{STAGING_PREFIX}{os.getpid()}"
    if exchange_supported() and not _is_working_directory(out_dir):
        try:
            beside.mkdir()
            return beside
        except OSError as exc:  # a parent folder the user may not write to
            log.info("staging inside %s (%s): publishing is not one step", out_dir, exc.strerror)
    inside = out_dir / f"{STAGING_PREFIX}{os.getpid()}"
    inside.mkdir()
    return inside


def _is_working_directory(out_dir: Path) -> bool:
    """Whether the working directory is `out_dir` or inside it (exchanging it would leave this
    process, and the user's shell, in the removed previous run)."""
    cwd = Path.cwd().resolve()
    return cwd == out_dir or out_dir in cwd.parents


def exchange_supported() -> bool:
    """Whether this system can exchange two folders in one step (Linux with renameat2)."""
    return sys.platform.startswith("linux") and _renameat2() is not None


def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a C library older than glibc 2.28
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


def exchange(first: Path, second: Path) -> None:
    """Swap the two folders' names in one step; an OSError when the system cannot."""
    result = _renameat2()(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(first), None, str(second))


def publish(stage: Path, out_dir: Path, summary: dict[str, Any] | None = None) -> list[str]:
    """Make `out_dir` hold the run in `stage`: every file of `stage`, none of the previous run's,
    and run.json listing them. Returns the files (relative)."""
    files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
    previous = previous_files(out_dir)
    for name in files:
        check_inside(out_dir, name, "the new run")
    payload = manifest_payload(stage, files, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                              "wsol_bench": package_version(), **(summary or {})})
    if stage.parent == out_dir.parent:
        try:
            _publish_by_exchange(stage, out_dir, set(previous) | set(files), payload)
            return files
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
                raise
            log.info("%s cannot exchange folders (%s): publishing file by file", out_dir, exc.strerror)
    _publish_file_by_file(stage, out_dir, previous, files, payload)
    return files


def _publish_by_exchange(stage: Path, out_dir: Path, run_files: set[str], payload: dict[str, Any]) -> None:
    """Complete `stage` (run.json, and links to every file of `out_dir` that no run wrote), then
    exchange it with `out_dir` and remove what the staging name then holds: the previous run."""
    write_json(stage / MANIFEST, payload)
    carry_foreign_files(out_dir, stage, run_files | {MANIFEST})
    shutil.copymode(out_dir, stage)
    exchange(stage, out_dir)
    shutil.rmtree(stage, ignore_errors=True)


def carry_foreign_files(out_dir: Path, stage: Path, run_files: set[str]) -> None:
    """Hard-link into `stage` every file of `out_dir` that is not one of `run_files` (nor
    a staging folder), keeping symbolic links as links: what the run did not write survives the
    exchange unchanged, and a file still being written (the log) stays the same file."""
    for root, folders, names in os.walk(out_dir):
        here = Path(root)
        relative = here.relative_to(out_dir)
        folders[:] = [f for f in folders if not (relative == Path(".") and f.startswith(STAGING_PREFIX))]
        for name in names + [f for f in folders if (here / f).is_symlink()]:
            key = (relative / name).as_posix()
            if key in run_files or (stage / key).exists():
                continue
            source, target = here / name, stage / key
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                os.symlink(os.readlink(source), target)
            else:
                os.link(source, target)


def _publish_file_by_file(stage: Path, out_dir: Path, previous: list[str], files: list[str],
                          payload: dict[str, Any]) -> None:
    """The fallback: move every file of `stage` into `out_dir`, remove the files of the previous
    run there that this one did not write, and write run.json last."""
    (out_dir / MANIFEST).unlink(missing_ok=True)  # from here until the end the folder is not complete
    for name in previous:
        if name not in files:
            (out_dir / name).unlink(missing_ok=True)
    for name in files:
        target = out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / name, target)
    write_json(out_dir / MANIFEST, payload)


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
