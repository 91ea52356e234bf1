"""What `pip install .` gives a user: a wheel that holds every module and data file of the
package folders and nothing else, and an installed copy (not editable) that runs a real
benchmark and its report from the repository root and from any other folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import PACKAGE_ROOTS, REPO

SHIPPED = (".py", ".yaml", ".json", ".safetensors")


def source_files() -> set[str]:
    """Every file a wheel must hold, named as in the wheel."""
    found = set()
    for folder, installed in PACKAGE_ROOTS.items():
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix in SHIPPED and "__pycache__" not in path.parts:
                found.add(f"{installed}/{path.relative_to(REPO / folder).as_posix()}")
    return found


def test_the_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(source_files() - names)
    assert not missing, f"the wheel lacks {len(missing)} files, e.g. {missing[:5]}"
    for needed in ("wsol_bench/run/scorers/__init__.py", "wsol_bench/methods/agcam.py",
                   "wsol_bench/datasets/synthetic.py", "wsol_bench/conf/config.yaml",
                   "wsol_bench/weights/wsol_synthetic_vit.safetensors",
                   "hydra_plugins/wsol_bench_searchpath/__init__.py"):
        assert needed in names, needed


def test_the_wheel_ships_only_the_package(wheel):
    """No tests, results, scripts or docs: only the package folders and the wheel's metadata."""
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"wsol_bench", "hydra_plugins", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                    + ".dist-info"}, tops


def _run(command: list[str], cwd: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # two runs and two examples in new Pythons: `pytest -m slow` (CI runs it)
def test_the_installed_copy_runs_a_benchmark_and_its_report_from_any_folder(installed_copy, tmp_path):
    """The installed console scripts, from the repository root (whose wsol_bench/ folder must
    not be imported) and from an unrelated folder: two methods on a few synthetic images, the
    gallery, and the report's check of the tables; the README's Python example works from both
    folders too."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bin_dir = installed_copy / "bin"
    tables = []
    for cwd in (REPO, elsewhere):
        run_dir = tmp_path / f"run_{cwd.name}"
        proc = _run([str(bin_dir / "wsol-bench"), "method=[rollout,center]", "dataset.params.num_images=3",
                     "gallery_images=1", "progress=false", f"store.root={tmp_path / cwd.name}",
                     f"hydra.run.dir={run_dir}"], cwd, installed_copy)
        assert proc.returncode == 0, (cwd, proc.stderr[-3000:])
        assert "Pixel Acc" in proc.stdout and (run_dir / "gallery.png").is_file()
        assert json.loads((run_dir / "environment.json").read_text())["wsol_bench_code"] == "installed"
        tables.append(pd.read_csv(run_dir / "table.csv"))
    pd.testing.assert_frame_equal(*tables)
    report = _run([str(bin_dir / "wsol-bench-report"), str(run_dir), "--check"], elsewhere, installed_copy)
    assert report.returncode == 0 and "tables match its records" in report.stdout, report.stderr[-2000:]
    # `python -c` puts the current folder first on sys.path: in the checkout's root its own
    # wsol_bench/ folder is imported (its methods/, datasets/ and conf/ found at the top level)
    # the example saves a figure into the current folder: once the package is imported from
    # where the test looks for it, the example works in a folder of its own
    example = readme_python_example() + "\nprint(tuple(result.maps.shape))"
    for cwd, imported in ((REPO, REPO), (elsewhere, installed_copy)):
        figures = tmp_path / f"figures_{cwd.name}"
        figures.mkdir()
        prelude = f"import os, wsol_bench; print(wsol_bench.__file__); os.chdir({str(figures)!r})\n"
        proc = _run([sys.executable, "-c", prelude + example], cwd, installed_copy)
        assert proc.returncode == 0, (cwd, proc.stderr[-2000:])
        location, *_, shape = proc.stdout.split("\n")[:-1]
        assert location.startswith(str(imported)) and shape == "(1, 14, 14)", proc.stdout
        assert (figures / "agcam.png").is_file()


def readme_python_example() -> str:
    """The code block of the README's "From Python" section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### From Python"):]
    start = section.index("```python") + len("```python")
    return section[start:section.index("```", start)]
