"""The layering of the stages (pyproject's import-linter contract): a lower stage never
imports a higher one. Checked on an installed copy, where every subpackage sits inside
wsol_bench as a user gets it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([str(LINT), str(REPO / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_no_stage_imports_a_higher_one(installed_copy, tmp_path):
    proc = lint(installed_copy, tmp_path)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_an_upward_import_breaks_the_contract(installed_copy, tmp_path):
    """The check can fail: the region engine importing the runner is reported."""
    site = tmp_path / "site"
    shutil.copytree(installed_copy / "wsol_bench", site / "wsol_bench")
    engine = site / "wsol_bench" / "regions" / "engine.py"
    engine.write_text(engine.read_text() + "\nimport wsol_bench.run.runner  # noqa\n")
    proc = lint(site, tmp_path)
    assert proc.returncode == 1 and "BROKEN" in proc.stdout
    assert "wsol_bench.regions.engine -> wsol_bench.run.runner" in proc.stdout
