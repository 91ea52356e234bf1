"""`wsol-bench` in a child process, for the scripts that time or watch whole runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def start_bench(args: list[str], log: Path, *, fork: bool, new_session: bool = False) -> int:
    """Start `wsol-bench args` with its output in `log` and return the child's process id.

    fork=True runs it in a child of this process, which keeps the imports this process has
    done (seconds of torch and timm per run saved) but must not have run a model; fork=False
    starts a new Python, as a user's command does. new_session=True puts the child in a new
    session, so a signal to its process group reaches its workers too."""
    if fork:
        from wsol_bench.cli.bench import main as bench_main
    sys.stdout.flush()  # nothing printed so far is written twice
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: the command, then exit without this process's clean-up
        if new_session:
            os.setsid()
        handle = log.open("w")
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        if not fork:
            os.execv(sys.executable, [sys.executable, "-m", "wsol_bench", *args])
        sys.stdout = sys.stderr = handle
        sys.argv = ["wsol-bench", *args]
        bench_main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.stdout.flush()
        os._exit(code)
