"""One writer per run folder and per map-store shard, with advisory locks of the operating
system (`fcntl`), which it releases by itself when the holder exits or is killed: a stale lock
never blocks a rerun.

A run folder's lock is the file `.wsol-bench.lock` inside it, held with `flock` and holding who
took it (process, host, command, time), so a second writer is refused naming the first. The
locks of a map store's shards are byte ranges of one file per store (`.shards.lock`; byte i is
shard i), so a store gains one small file, not one per shard. The standard `filelock` package
is not used: it truncates its lock file on every attempt, which would erase the holder's name.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from wsol_bench.errors import FolderInUseError

FOLDER_LOCK = ".wsol-bench.lock"
SHARD_LOCKS = ".shards.lock"


def holder_text(path: Path) -> str:
    """Who holds the lock file `path`, as its holder wrote it (or 'another process')."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not isinstance(holder, dict) or "pid" not in holder:
        return "another process"
    return (f"process {holder.get('pid')} on {holder.get('host', '?')} since {holder.get('since', '?')} "
            f"({holder.get('command', '?')})")


class FolderLock:
    """The exclusive lock of one folder, taken without waiting: `acquire` refuses with
    FolderInUseError while another process holds it. Used as a context manager."""

    def __init__(self, folder: str | Path, fix: str = "wait until it ends, or choose another hydra.run.dir") -> None:
        self.folder, self.fix = Path(folder), fix
        self.path = self.folder / FOLDER_LOCK
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock (creating the folder and the lock file); refuse if it is held."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderInUseError(
                    f"the run folder {self.folder} is being written by {holder_text(self.path)}; {self.fix}") from None
            if self._same_file(fd):
                break
            os.close(fd)  # the holder removed the file as we opened it: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "command": " ".join(os.path.basename(a) if i == 0 else a
                                                     for i, a in enumerate(sys.argv))[:300]}).encode())
        self._fd = fd
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent). The file is removed while
        still held, so a process that opened it meanwhile sees it replaced and retries."""
        if self._fd is None:
            return
        for folder in {self.folder, self.folder.resolve()}:
            path = folder / FOLDER_LOCK
            try:
                if os.stat(path).st_ino == os.fstat(self._fd).st_ino:
                    path.unlink()
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class ShardLocks:
    """Exclusive locks on the shards of one map store, one byte of `<folder>/.shards.lock` per
    shard. `hold(i)` waits while another process computes shard i (and says so once); the
    caller then checks whether that process stored it. POSIX record locks belong to the process,
    so the one descriptor stays open for the store's life."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None
        self.held: set[int] = set()

    def _descriptor(self) -> int:
        if self._fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.folder / SHARD_LOCKS, os.O_RDWR | os.O_CREAT, 0o644)
        return self._fd

    def hold(self, index: int, on_wait=None) -> None:
        """Take shard `index`'s lock, waiting while another process holds it (`on_wait()` is
        called once before waiting)."""
        fd = self._descriptor()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, index)
        except (BlockingIOError, PermissionError):
            if on_wait is not None:
                on_wait()
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX, 1, index)
            except OSError as exc:  # two processes waiting for each other's shards (methods in
                if exc.errno != errno.EDEADLK:  # another order): this one computes it as well
                    raise
                return
        self.held.add(index)

    def release(self, index: int) -> None:
        """Release shard `index`'s lock (if held)."""
        if index in self.held and self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, index)
            self.held.discard(index)

    def close(self) -> None:
        """Release every lock this process holds on the store."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.held.clear()
