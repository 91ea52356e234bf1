"""How every command ends: one handler for `wsol-bench`, `wsol-bench-train` and
`wsol-bench-report`.

A refusal (a `UserError`, a configuration Hydra cannot compose, a preset's missing value, a full
disk or a forbidden folder) ends the command with one line, `<prog>: error: <line>`, and exit
code 2. Any other exception is a bug in the suite: its traceback is printed, then a line saying
so, and the exit code is 1. WSOL_BENCH_DEBUG=1 (or Hydra's HYDRA_FULL_ERROR=1) raises refusals
with their traceback too. Ctrl-C (SIGINT) and SIGTERM end the command with one line saying what
was kept, and exit code 130 or 143 (128 + the signal's number, as shells report it).

Each refusal is said once, on stderr. In a sweep a refused job writes its line to its own log
file (not to the terminal it may share with the sweep), and the sweep's process prints it. Under
torchrun (or a submitit job of several tasks) rank 0 prints it and the other ranks exit with the
same code quietly; a rank that alone refuses prints its own line. torchrun itself still ends with
its ChildFailedError summary: it prints one for any rank that exits with a non-zero code.

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
from datetime import timedelta

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf.errors import MissingMandatoryValue

from wsol_bench.config.checks import check_launcher
from wsol_bench.config.errors import COMPOSE_ERRORS, one_line
from wsol_bench.errors import UserError
from wsol_bench.files import DISK_FULL

FULL_ERROR = "HYDRA_FULL_ERROR"
DEBUG = "WSOL_BENCH_DEBUG"
# How long the ranks of a launch wait for each other's refusal: long enough for ranks refusing the
# same setting at once, short enough not to hold a rank that alone refuses.
RANK_AGREEMENT = timedelta(seconds=5)
REFUSAL_KEY = "wsol_bench/refusal/{rank}"  # in the process group's key-value store
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


def _process_group():
    """torch.distributed when this process is one rank of a joined group of several, else None
    (one process, or torch not loaded: nothing imports it here)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    return dist


def launch_rank() -> int:
    """This process's rank in its launch: the process group's, else the launcher's RANK (0 when
    started plainly)."""
    dist = _process_group()
    if dist is not None:
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def says_refusal(line: str) -> bool:
    """Whether this process prints the refusal `line`. One process always does. The ranks of a
    group first post their lines in the group's store: rank 0 prints its own after waiting
    (briefly) for the others', so that they all exit together with the same code rather than be
    ended by the launcher; another rank prints only when rank 0 posted no such line in time (a
    refusal of that rank alone). Without a group (it was never joined, or is gone) rank 0 prints."""
    dist = _process_group()
    if dist is None:
        return launch_rank() == 0
    if threading.current_thread() is threading.main_thread():
        # this rank ends now with the refusal's code; the SIGTERM torchrun sends the ranks still
        # running when one rank has ended must not turn that code into a kill
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        from torch.distributed.distributed_c10d import _get_default_store  # the group's own store

        store = _get_default_store()
        store.set(REFUSAL_KEY.format(rank=rank), line)
        if rank == 0:
            store.wait([REFUSAL_KEY.format(rank=r) for r in range(1, world)], RANK_AGREEMENT)
            return True
        store.wait([REFUSAL_KEY.format(rank=0)], RANK_AGREEMENT)
        return store.get(REFUSAL_KEY.format(rank=0)).decode() != line
    except Exception:  # a timeout, a store that is gone or unknown: this rank says its line  # noqa: BLE001
        return True


def print_refusal(prog: str, line: str) -> None:
    """`<prog>: error: <line>` on stderr, once per launch (`says_refusal`)."""
    if says_refusal(line):
        print(f"{prog}: error: {line}", file=sys.stderr)


def log_to_files(line: str, logger_name: str = "wsol_bench") -> None:
    """`line` as an ERROR record of `logger_name`, written only to the log files among its
    handlers and its ancestors' (a job's wsol-bench.log), not to the console."""
    logger = logging.getLogger(logger_name)
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (line,), None)
    node: logging.Logger | None = logger
    while node is not None:
        for handler in node.handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)
        node = node.parent if node.propagate else None


@contextmanager
def job_refusals(prog: str) -> Iterator[None]:
    """Around the work of a Hydra job. A single run's refusal ends the command here, with its
    line and exit code 2 (raised further, Hydra would add a line of its own). In a sweep the
    job writes the line to its own log file and raises a UserError holding it, so the launcher
    (joblib, submitit) records it, finishes the other jobs, and the sweep's process prints it;
    a submitit job also prints it to its own stderr file. Bugs pass unchanged."""
    try:
        yield
    except Exception as exc:
        line = refusal_line(exc)
        if line is None or os.environ.get(DEBUG):
            raise
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            log_to_files(line)  # not the console: joblib's and Hydra's own jobs share the sweep's terminal
            if "SUBMITIT_EXECUTOR" in os.environ:  # a job of its own, whose stderr is a file the user reads
                print_refusal(prog, line)
            raise (exc if isinstance(exc, UserError) else UserError(line)) from exc
        print_refusal(prog, line)
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
        if signal.getsignal(signal.SIGTERM) is _raise_interrupted:  # a handler set in the block stays
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
            if config_name is not None:  # a Hydra command: what its launcher needs, before Hydra starts it
                check_launcher(sys.argv[1:])
            return int(body() or 0)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        line, code = interrupted_line(prog, exc)
        if launch_rank() == 0:  # every rank of a launch gets the signal; one says so
            print(line, file=sys.stderr)
        return code
    except Exception as exc:
        if debug:
            raise
        line = refusal_line(exc, config_name, sys.argv[1:])
        if line is not None:
            print_refusal(prog, line)
            return 2
        traceback.print_exc()
        print(bug_line(prog), file=sys.stderr)
        return 1
    finally:
        if before is None:
            os.environ.pop(FULL_ERROR, None)
        else:
            os.environ[FULL_ERROR] = before
