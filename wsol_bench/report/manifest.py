"""run.json: the record that a run folder is complete, written last by the run.

It lists every file the run wrote (so a later run into the same folder can replace them all)
and the sha256 of the files the tables are built from (records, faithfulness rows, metric
states, config), with the number of record rows per method. A folder without it, or whose
inputs no longer match it, is not a complete run: it was killed, failed, or edited."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from wsol_bench.errors import UserError

MANIFEST = "run.json"
FORMAT = 1
# the files the tables are built from: a report checks them against the manifest
INPUTS = ("config.yaml", "records.csv", "faithfulness.csv", "states/sweep.json", "states/sweep_replicates.npz",
          "states/sweep_curve_replicates.npz", "states/segmentation_replicates.npz")


class IncompleteRun(UserError, ValueError):
    """A run folder that is not a complete run; the message says why and what to do."""


def file_sha256(path: Path) -> str:
    """sha256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_payload(folder: Path, files: list[str], summary: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a finished run whose files (relative to `folder`) are `files`."""
    inputs = {name: file_sha256(folder / name) for name in INPUTS if (folder / name).is_file()}
    return {"format": FORMAT, "complete": True, "files": sorted(files), "inputs": inputs, **summary}


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of `folder`, or None when it has none (or an unreadable one)."""
    try:
        payload = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def incompleteness(folder: Path) -> str | None:
    """Why `folder` is not a complete run (None: it is)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return (f"it has no readable {MANIFEST}: the run was killed or failed before it finished, or the folder "
                "was written by an older wsol-bench")
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        return f"its {MANIFEST} does not mark it complete"
    recorded = manifest.get("inputs", {})
    if not isinstance(recorded, dict):
        return f"its {MANIFEST} is damaged (its inputs are not a mapping of file names to sha256)"
    for name in INPUTS:
        path = folder / name
        if name not in recorded:
            if path.is_file():
                return f"{name} was added after the run finished (the run did not write it)"
            continue
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != recorded[name]:
            return f"{name} changed after the run wrote it (its sha256 differs from {MANIFEST})"
    return None


def check_complete(folder: Path) -> None:
    """Raise IncompleteRun naming the folder, the reason and the way out."""
    problem = incompleteness(folder)
    if problem:
        raise IncompleteRun(f"{folder} is not a complete run: {problem}. Rerun the benchmark into it, or pass "
                            "--allow-incomplete to build tables from what is there")
