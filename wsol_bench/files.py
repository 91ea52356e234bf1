"""Writing files so that a reader never sees a partial one: every write goes to a temporary
file in the same folder and is renamed over the target when complete."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends
    without an error, removed when it raises (nothing partial is left behind). `durable`
    flushes the file to disk before the rename (checkpoints that must survive a power cut)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], Any], *, durable: bool = False) -> Path:
    """Call `write(tmp)` to write the file, then rename it over `path`; returns `path`."""
    with atomic_path(path, durable=durable) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, payload: Any) -> Path:
    """Write `payload` as indented JSON atomically (values JSON cannot hold are written as text)."""
    return atomic_write_text(path, json.dumps(payload, indent=2, default=str))


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
        self._writer.writerows(rows)
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._file.closed:
            self._file.close()


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically, in the format its file name says."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
