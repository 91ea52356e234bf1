"""A finished run folder, read and validated: its `config.yaml` and `records.csv` (every run
has them), and the reading of the other files for the scorers that wrote them, each of which
rebuilds its own tables from the folder (`Scorer.tables`; `wsol_bench.run.run_tables` puts them
together). Also the comparison of a rebuilt table with the one on disk (`--check`).

A run writes into a hidden staging folder and publishes it when it finishes
(`wsol_bench.run.folder`), so the rows of a killed run are in its staging folder, not in the
run folder: reading a run folder with `allow_incomplete` finds them there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wsol_bench.errors import InputFileError, MissingInputError
from wsol_bench.metrics.bootstrap import BootstrapSettings, Replicates
from wsol_bench.report.manifest import check_complete

log = logging.getLogger("wsol_bench")
VARIANTS = {"box": "union of ground-truth boxes", "mask": "ground-truth segmentation mask"}
FILTER_WORDS = {"correct": "correctly classified images", "all": "all images"}
CHECK_TOLERANCE = 1e-9  # tables on disk are written at full precision
STAGING_PREFIX = ".incomplete-"  # a run's staging folder: .<run>.incomplete-<pid> beside it, or inside it


@dataclass
class RunFolder:
    """The files of one run folder, read and validated."""

    path: Path
    config: dict
    records: pd.DataFrame
    allow_incomplete: bool = False  # rows a killed writer left unfinished are dropped, with a warning
    killed_run_of: Path | None = None  # the run folder whose killed run's staging folder `path` is

    @cached_property
    def bootstrap(self) -> BootstrapSettings:
        """The run's interval settings (`report.ci`, `report.resamples`, `report.seed`; a folder
        written before they existed gets the defaults)."""
        defaults = BootstrapSettings()
        level = self.setting("report.ci", defaults.level)
        return BootstrapSettings(level=None if level is None else float(level),
                                 resamples=int(self.setting("report.resamples", defaults.resamples)),
                                 seed=int(self.setting("report.seed", defaults.seed)))

    @cached_property
    def replicates(self) -> Replicates | None:
        """The bootstrap replicates of the run's images, drawn once and shared by every table
        (None when `report.ci` is null: no intervals)."""
        if self.bootstrap.level is None:
            return None
        return Replicates(self.records["image_id"].astype(str).tolist(), self.bootstrap)

    def setting(self, key: str, default=None):
        """A config value by dotted key (`dataset.name`), or `default` when absent."""
        node = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def dataset_label(self) -> str:
        """"name/split" of the run's dataset."""
        return f"{self.setting('dataset.name', '?')}/{self.setting('dataset.split', '?')}"

    def per_image_rows(self, name: str) -> pd.DataFrame | None:
        """The per-image CSV `name` a scorer wrote into the folder (None when absent), its rows
        checked to be of the run's dataset; in an incomplete run, unfinished rows are dropped."""
        frame = _read_csv(self.path / name, optional=True, partial=self.allow_incomplete)
        _check_dataset(frame, self.path / name, self.setting("dataset.name"))
        return frame

    def table_file(self, name: str) -> pd.DataFrame | None:
        """The CSV table `name` in the folder, read as it is (None when absent)."""
        frame = _read_csv(self.path / name, optional=True)
        _check_dataset(frame, self.path / name, self.setting("dataset.name"))
        return frame


def read_table(path: Path, **options) -> pd.DataFrame:
    """One CSV file of a run folder; a file that is no CSV table (binary, not UTF-8, empty, an
    unclosed quote) is an `InputFileError` naming it."""
    try:
        return pd.read_csv(path, **options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path} is not a readable CSV table ({exc}); restore the file, or rerun the "
                             "benchmark into this folder") from exc


def _read_csv(path: Path, optional: bool, partial: bool = False) -> pd.DataFrame | None:
    """A CSV of the run folder; with `partial`, rows a killed writer left unfinished (too few
    or too many fields) are dropped with a warning instead of breaking the read."""
    if not path.is_file():
        if optional:
            return None
        raise MissingInputError(f"{path} not found: tables are rebuilt from a run's records; run "
                                "`wsol-bench` to make a run folder (folders made before records.csv "
                                "existed cannot be rebuilt)")
    if not partial:
        return read_table(path)
    frame = read_table(path, on_bad_lines="skip")
    finished = _finished_rows(frame, path)
    if not finished.all():
        log.warning("%s: %d unfinished row(s) dropped", path, int((~finished).sum()))
        frame = frame[finished]
    return frame


def _finished_rows(frame: pd.DataFrame, path: Path) -> pd.Series:
    """Rows a killed writer finished: its identifying values present, and not the file's last
    line when that line has no newline (the writer appends whole lines, so only the last can be
    cut off). Scores may be missing on purpose (a degenerate map, a dataset without masks, an
    empty region); the measure that reads them decides, so they do not make a row unfinished."""
    ids = [c for c in frame.columns if c in ("image_id", "dataset", "split", "method", "label", "prediction",
                                              "target", "degenerate", "threshold")]
    finished = frame[ids].notna().all(axis=1) if ids else pd.Series(True, index=frame.index)
    if len(frame) and not _ends_with_newline(path):
        finished.iloc[-1] = False
    return finished


def _ends_with_newline(path: Path) -> bool:
    """Whether the file's last byte is a newline (an empty file counts as ended)."""
    with path.open("rb") as handle:
        handle.seek(0, 2)
        if handle.tell() == 0:
            return True
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"


def _check_dataset(frame: pd.DataFrame | None, path: Path, dataset: str | None) -> None:
    """Per-image files from another dataset than the config's would mix runs."""
    if frame is None or dataset is None or "dataset" not in frame.columns:
        return
    other = sorted(set(frame["dataset"].astype(str)) - {dataset})
    if other:
        raise InputFileError(f"{path} holds rows of dataset(s) {other} but the run's config.yaml says "
                             f"dataset.name={dataset}; the file belongs to another run")


def staging_folders(out_dir: Path) -> list[Path]:
    """The staging folders of runs into `out_dir` (finished ones leave none; killed ones do)."""
    out_dir = Path(out_dir)
    beside = list(out_dir.parent.glob(f".{out_dir.name}{STAGING_PREFIX}*")) if out_dir.parent.is_dir() else []
    inside = list(out_dir.glob(f"{STAGING_PREFIX}*")) if out_dir.is_dir() else []
    return sorted(beside + inside)


def killed_run_rows(run_dir: Path) -> Path:
    """The staging folder holding the rows of the run killed while writing `run_dir` (which
    then has no config.yaml): the newest one with a config and records. Refused naming what
    was looked for when there is none, and listing them when the newest is not clear."""
    stages = [s for s in staging_folders(run_dir) if (s / "config.yaml").is_file() and (s / "records.csv").is_file()]
    if not stages:
        raise MissingInputError(
            f"{run_dir / 'config.yaml'} not found, and no staging folder of a killed run holds rows "
            f"(.{run_dir.name}{STAGING_PREFIX}<pid> beside it or {STAGING_PREFIX}<pid> inside it): the run "
            "ended before it wrote any; rerun `wsol-bench` into this folder")
    times = sorted(((s / "records.csv").stat().st_mtime_ns, s) for s in stages)
    if len(times) > 1 and times[-1][0] == times[-2][0]:
        raise MissingInputError(
            f"{run_dir} has several staging folders of killed runs written at the same time "
            f"({', '.join(str(s) for s in stages)}); pass the one to report as RUN_DIR")
    return times[-1][1]


def read_run(run_dir: str | Path, allow_incomplete: bool = False) -> RunFolder:
    """Read the config and records of a complete run (run.json, inputs unchanged);
    `allow_incomplete` reads what is there, and for a folder whose run was killed before it
    published anything (no config.yaml), the rows in the killed run's staging folder (the
    RunFolder's `path` is then that folder, and `killed_run_of` the folder asked for)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise MissingInputError(f"run folder {path} does not exist")
    if not allow_incomplete:
        check_complete(path)
    asked = None
    if allow_incomplete and not (path / "config.yaml").is_file():
        asked, path = path, killed_run_rows(path)
        log.warning("%s holds no finished run: reading the rows of the killed run in %s", asked, path)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise MissingInputError(f"{config_path} not found: a run folder needs the config it ran with "
                                "(metric.image_filter decides which images the table averages)")
    config = _read_config(config_path)
    run = RunFolder(path, config, _read_csv(path / "records.csv", optional=False, partial=allow_incomplete),
                    allow_incomplete, killed_run_of=asked)
    _check_dataset(run.records, path / "records.csv", run.setting("dataset.name"))
    if run.setting("metric.image_filter") is None:
        raise InputFileError(f"{config_path} has no metric.image_filter; add `image_filter: correct` "
                             "(the paper) or `all` under metric")
    return run


def _read_config(path: Path) -> dict:
    """The run's config.yaml as a plain dict; a file that is no YAML mapping is an
    `InputFileError` naming it."""
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as exc:
        raise InputFileError(f"{path} is not a readable YAML config ({exc}); restore the file the run "
                             "wrote, or rerun the benchmark into this folder") from exc
    try:
        config = OmegaConf.to_container(loaded, resolve=True)
    except OmegaConfBaseException:  # a hand-edited config with interpolations it cannot resolve outside Hydra
        config = OmegaConf.to_container(loaded, resolve=False)
    if not isinstance(config, dict):
        raise InputFileError(f"{path} holds a {type(config).__name__}, not a config (a YAML mapping); restore "
                             "the file the run wrote, or rerun the benchmark into this folder")
    return config


def frame_differences(expected: pd.DataFrame, actual: pd.DataFrame, name: str,
                      tolerance: float = CHECK_TOLERANCE) -> list[str]:
    """Where two tables differ (columns, rows, or any cell beyond `tolerance`), as lines."""
    if list(expected.columns) != list(actual.columns):
        return [f"{name}: columns differ: rebuilt {list(expected.columns)}, on disk {list(actual.columns)}"]
    if len(expected) != len(actual):
        return [f"{name}: {len(expected)} rows rebuilt, {len(actual)} on disk"]
    lines = []
    for column in expected.columns:
        want, have = expected[column].reset_index(drop=True), actual[column].reset_index(drop=True)
        if pd.api.types.is_numeric_dtype(want) and pd.api.types.is_numeric_dtype(have):
            a, b = want.to_numpy(float), have.to_numpy(float)
            same = np.isclose(a, b, rtol=0, atol=tolerance, equal_nan=True)
        else:
            same = (want.astype(str) == have.astype(str)).to_numpy()
        for row in np.flatnonzero(~same):
            label = actual.iloc[row, 0]
            lines.append(f"{name}: row {row} ({label}), {column}: rebuilt {want[row]}, on disk {have[row]}")
    return lines


def disk_differences(expected: pd.DataFrame, file: Path) -> list[str]:
    """`frame_differences` against the table in `file`; a file that is no CSV table differs."""
    try:
        actual = read_table(file)
    except InputFileError as exc:
        return [str(exc)]
    return frame_differences(expected, actual, file.name)
