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
    previous = read_manifest(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # from here until the end the folder is not complete
    for name in (previous or {}).get("files", []):
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
