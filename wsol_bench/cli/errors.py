"""How every command ends: one handler for `wsol-bench`, `wsol-bench-train` and
`wsol-bench-report`.

A refusal (a `UserError`, a configuration Hydra cannot compose, a preset's missing value, a full
disk or a forbidden folder) ends the command with one line, `<prog>: error: <line>`, and exit
code 2. Any other exception is a bug in the suite: its traceback is printed, then a line saying
so, and the exit code is 1. WSOL_BENCH_DEBUG=1 (or Hydra's HYDRA_FULL_ERROR=1) raises refusals
with their traceback too. Ctrl-C (SIGINT) and SIGTERM end the command with one line saying what
was kept, and exit code 130 or 143 (128 + the signal's number, as shells report it).

Hydra prints its composition errors itself, over several lines, unless HYDRA_FULL_ERROR=1 is
set; `run_command` sets it around the call so that those errors reach the handler. This module
imports no torch: the commands refuse a bad configuration before the heavy libraries load."""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf.errors import MissingMandatoryValue

from wsol_bench.config.errors import COMPOSE_ERRORS, one_line
from wsol_bench.errors import UserError
from wsol_bench.files import DISK_FULL

FULL_ERROR = "HYDRA_FULL_ERROR"
DEBUG = "WSOL_BENCH_DEBUG"
# The user's machine, not a bug: errno -> (what failed, the fix).
_FILE_SYSTEM_FIXES = {
    errno.ENOSPC: ("write", "free some space or choose another folder"),
    errno.EDQUOT: ("write", "free some space or choose another folder"),
    errno.EROFS: ("write", "choose a writable folder"),
    errno.EACCES: ("write", "choose a folder you may write to, or fix its permissions"),
    errno.EPERM: ("write", "choose a folder you may write to, or fix its permissions"),
    errno.ENOTDIR: ("use", "a part of the path is a file; choose another path"),
    errno.EISDIR: ("use", "it is a folder where a file is expected; name a file"),
    errno.ENAMETOOLONG: ("use", "choose a shorter path"),
}
FILE_SYSTEM_ERRORS = frozenset(_FILE_SYSTEM_FIXES)


def file_system_line(exc: OSError) -> str:
    """`cannot write <path>: <reason> (<fix>)` for a file-system error of FILE_SYSTEM_ERRORS."""
    verb, fix = _FILE_SYSTEM_FIXES[exc.errno]
    return f"cannot {verb} {exc.filename or 'a file'}: {exc.strerror or exc} ({fix})"


def refusal_line(exc: BaseException, config_name: str | None = None, argv: Sequence[str] = ()) -> str | None:
    """The one line that refuses `exc`, or None when `exc` is a bug. `config_name` and the
    command line `argv` let an unknown config group option list the valid ones."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", None) or "a setting"
        return f"{key} is required by this preset and has no value; give it on the command line, e.g. {key}=/path/to/it"
    if isinstance(exc, COMPOSE_ERRORS):
        return one_line(exc, config_name, argv)
    if isinstance(exc, OSError) and exc.errno in FILE_SYSTEM_ERRORS and (exc.filename or exc.errno in DISK_FULL):
        return file_system_line(exc)
    return None


@contextmanager
def job_refusals(prog: str) -> Iterator[None]:
    """Around the work of a Hydra job. A single run's refusal ends the command here, with its
    line and exit code 2 (raised further, Hydra would add a line of its own). In a sweep the
    job raises a UserError holding the line, so the launcher (joblib, submitit) records it,
    finishes the other jobs, and the sweep's process prints it. Bugs pass unchanged."""
    try:
        yield
    except Exception as exc:
        line = refusal_line(exc)
        if line is None or os.environ.get(DEBUG):
            raise
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # the job's own log names its refusal too
            logging.getLogger("wsol_bench").error("%s", line)
            raise (exc if isinstance(exc, UserError) else UserError(line)) from exc
        print(f"{prog}: error: {line}", file=sys.stderr)
        sys.exit(2)


# What an interrupted command keeps, and how to go on.
KEPT = {
    "wsol-bench": ("the run folder holds its last complete run, and the map shards finished so far stay in the "
                   "store, so the same command resumes from them"),
    "wsol-bench-train": ("the last checkpoint written is kept, and the same command (resume=auto) goes on from it"),
    "wsol-bench-report": "every file it wrote is either its previous or its new version; run it again",
}


class Interrupted(KeyboardInterrupt):
    """A signal that ends the command (SIGTERM raised as an exception, so every `finally` and
    context manager on the way cleans up as it does for Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signum)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Interrupted` in the block (in the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_line(prog: str, exc: KeyboardInterrupt) -> tuple[str, int]:
    """The line that ends an interrupted command, and its exit code (128 + the signal)."""
    signum = getattr(exc, "signum", signal.SIGINT)
    name = signal.Signals(signum).name
    return f"{prog}: interrupted ({name}): {KEPT.get(prog, KEPT['wsol-bench-report'])}", 128 + int(signum)


def bug_line(prog: str) -> str:
    """What follows a bug's traceback."""
    return (f"{prog}: internal error: the traceback above is a bug in wsol-bench, not a problem with your "
            "settings or files; please report it with the command line and this output")


def run_command(prog: str, body: Callable[[], int | None], config_name: str | None = None) -> int:
    """Run `body` (a @hydra.main function, or any function returning an exit code) and return
    its exit code: 0 (or body's own), 2 for a refusal (its line printed on stderr), 1 for a bug
    (its traceback and a line saying so printed on stderr)."""
    before = os.environ.get(FULL_ERROR)
    debug = before == "1" or bool(os.environ.get(DEBUG))
    os.environ[FULL_ERROR] = "1"
    try:
        with terminate_as_interrupt():
            return int(body() or 0)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        line, code = interrupted_line(prog, exc)
        print(line, file=sys.stderr)
        return code
    except Exception as exc:
        if debug:
            raise
        line = refusal_line(exc, config_name, sys.argv[1:])
        if line is not None:
            print(f"{prog}: error: {line}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(bug_line(prog), file=sys.stderr)
        return 1
    finally:
        if before is None:
            os.environ.pop(FULL_ERROR, None)
        else:
            os.environ[FULL_ERROR] = before
