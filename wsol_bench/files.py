"""Writing files so that a reader never sees a partial one: every write goes to a temporary
file in the same folder and is renamed over the target when complete. A write that finds its
disk full is a `DiskFullError` naming the file, the space free and the space it needed."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from wsol_bench.errors import DiskFullError

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def size_text(size: float) -> str:
    """`size` bytes in the unit that reads best (1.2 GB, 640 KB, 12 B)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def free_space(path: str | Path) -> int | None:
    """Bytes free on the file system of `path` (its nearest existing folder), None if unknown."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full_error(path: str | Path, needed: int | None = None) -> DiskFullError:
    """The one-line refusal of a write of `path` (about `needed` bytes) that found its disk full."""
    free = free_space(path)
    where = f"{size_text(free)} free there" if free is not None else "free space unknown"
    need = f"; it needs about {size_text(needed)}" if needed else ""
    return DiskFullError(f"cannot write {path}: the disk is full ({where}{need}); free some space or choose "
                         "a folder on a larger disk. Every file finished before is kept, so a rerun resumes "
                         "from them", str(path))


@contextmanager
def disk_full_refused(path: str | Path, needed: int | None = None) -> Iterator[None]:
    """Turn a disk-full OSError raised in the block (writing `path`) into a `DiskFullError`."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise disk_full_error(path, needed) from exc


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = False, needed: int | None = None) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends
    without an error, removed when it raises (nothing partial is left behind). `durable`
    flushes the file to disk before the rename (checkpoints that must survive a power cut);
    `needed`, the file's size when known, is named if the disk is full."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with disk_full_refused(path, needed):
            yield tmp
            if durable:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], Any], *, durable: bool = False,
                 needed: int | None = None) -> Path:
    """Call `write(tmp)` to write the file, then rename it over `path`; returns `path`."""
    with atomic_path(path, durable=durable, needed=needed) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = False) -> Path:
    """Write `data` to `path` atomically; a full disk is refused naming the bytes needed."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=durable, needed=len(data))


def write_json(path: str | Path, payload: Any) -> Path:
    """Write `payload` as indented JSON atomically (values JSON cannot hold are written as text)."""
    return atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def csv_text(rows: Iterable[dict], columns: list[str]) -> str:
    """`rows` formatted as CSV lines under the header `columns` (no header line): what
    `CsvRows.write` would append, for building the text in a worker process."""
    buffer = io.StringIO(newline="")
    csv.DictWriter(buffer, fieldnames=columns).writerows(rows)
    return buffer.getvalue()


class CsvRows:
    """An append-only CSV file with a fixed header, flushed after every batch of rows, so a
    killed run leaves every finished row on disk."""

    def __init__(self, path: str | Path, columns: list[str]) -> None:
        self.path, self.columns = Path(path), list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        self._writer.writeheader()

    def write(self, rows: Iterable[dict]) -> None:
        """Append rows (dicts keyed by the header's columns)."""
        self.write_text(csv_text(rows, self.columns))

    def write_text(self, text: str) -> None:
        """Append rows already formatted by `csv_text` with this file's columns."""
        with disk_full_refused(self.path, len(text)):
            self._file.write(text)
            self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._file.closed:
            with disk_full_refused(self.path):
                self._file.close()


def append_csv_bodies(target: str | Path, parts: Iterable[str | Path]) -> Path:
    """Append the rows of CSV files `parts` (each with the same header as `target`) to `target`,
    in order, without parsing them: the bytes of the rows stay exactly as written. A part that
    does not exist holds no rows; `target` gets the first part's header when it has none."""
    target = Path(target)
    with disk_full_refused(target), target.open("ab") as out:
        for part in parts:
            part = Path(part)
            if not part.is_file():
                continue
            with part.open("rb") as handle:
                header = handle.readline()
                if out.tell() == 0:
                    out.write(header)
                shutil.copyfileobj(handle, out, 1 << 20)
    return target


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically, in the format its file name says."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
