"""Every table of a run, rebuilt from the files in its folder: the one path that the
benchmark run and `wsol-bench-report` both use.

A run folder holds `config.yaml`, `records.csv` and optionally `faithfulness.csv` and the
metric states of a sweep (`states/sweep.json`, from which `sweep.csv` and `wsoleval.csv` are
built; folders written before the states existed keep only `wsoleval.csv`, read as it is);
`run_tables` aggregates them (`wsol_bench.report.tables`), `write_run_tables` writes the results
as CSV, Markdown and LaTeX, `check_run` compares them with the tables on disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wsol_bench.errors import InputFileError, MissingInputError, SettingError
from wsol_bench.files import atomic_write
from wsol_bench.metrics.base import RunMetric
from wsol_bench.report.manifest import IncompleteRun, check_complete
from wsol_bench.report.paper_numbers import PAPER_SETTINGS, published_numbers, published_settings
from wsol_bench.report.sweep_tables import read_sweep_states, sweep_table, wsoleval_table
from wsol_bench.report.table_format import to_text, write_table_files
from wsol_bench.report.tables import (
    ALL_DEGENERATE,
    PUBLISHED_SUFFIX,
    degenerate_methods,
    faithfulness_summary,
    localization_table,
    ordered_columns,
    paper_table,
    wsoleval_summary,
)

log = logging.getLogger("wsol_bench")
VARIANTS = {"box": "union of ground-truth boxes", "mask": "ground-truth segmentation mask"}
FILTER_WORDS = {"correct": "correctly classified images", "all": "all images"}
CHECK_TOLERANCE = 1e-9  # tables on disk are written at full precision
SWEEP_STATES = Path("states") / "sweep.json"
SWEEP_TABLES = ("sweep", "wsoleval")  # tables of a sweep, written as <name>.csv


@dataclass
class RunFolder:
    """The files of one run folder, read and validated."""

    path: Path
    config: dict
    records: pd.DataFrame
    faithfulness: pd.DataFrame | None = None
    wsoleval: pd.DataFrame | None = None
    sweep: pd.DataFrame | None = None  # rebuilt from the sweep's metric states, when the folder has them

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
    finished = _finished_rows(frame)
    if not finished.all():
        log.warning("%s: %d unfinished row(s) dropped", path, int((~finished).sum()))
        frame = frame[finished]
    return frame


def _finished_rows(frame: pd.DataFrame) -> pd.Series:
    """Rows a killed writer finished: every value present, except the scores of a degenerate
    map, which are missing on purpose (a cut-off last row loses its trailing values)."""
    present = frame.notna()
    if "degenerate" not in frame.columns:
        return present.all(axis=1)
    ids = [c for c in frame.columns if c in ("image_id", "dataset", "split", "method", "label", "prediction",
                                              "target", "degenerate")]
    return present[ids].all(axis=1) & ((frame["degenerate"] == 1) | present.all(axis=1))


def _check_dataset(frame: pd.DataFrame | None, path: Path, dataset: str | None) -> None:
    """Per-image files from another dataset than the config's would mix runs."""
    if frame is None or dataset is None or "dataset" not in frame.columns:
        return
    other = sorted(set(frame["dataset"].astype(str)) - {dataset})
    if other:
        raise InputFileError(f"{path} holds rows of dataset(s) {other} but the run's config.yaml says "
                             f"dataset.name={dataset}; the file belongs to another run")


def read_run(run_dir: str | Path, allow_incomplete: bool = False) -> RunFolder:
    """Read config, records and the optional faithfulness and wsolevaluation files of a
    complete run (run.json, inputs unchanged); `allow_incomplete` reads what is there."""
    path = Path(run_dir)
    if not path.is_dir():
        raise MissingInputError(f"run folder {path} does not exist")
    if not allow_incomplete:
        check_complete(path)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise MissingInputError(f"{config_path} not found: a run folder needs the config it ran with "
                                "(metric.image_filter decides which images the table averages)")
    config = _read_config(config_path)
    run = RunFolder(path, config, _read_csv(path / "records.csv", optional=False, partial=allow_incomplete),
                    _read_csv(path / "faithfulness.csv", optional=True, partial=allow_incomplete),
                    _read_csv(path / "wsoleval.csv", optional=True))
    if (path / SWEEP_STATES).is_file():
        _rebuild_sweep_tables(run, read_sweep_states(path / SWEEP_STATES))
    for name, frame in (("records.csv", run.records), ("faithfulness.csv", run.faithfulness),
                        ("wsoleval.csv", run.wsoleval)):
        _check_dataset(frame, path / name, run.setting("dataset.name"))
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


def _rebuild_sweep_tables(run: RunFolder, states: dict[str, dict[str, RunMetric]]) -> None:
    """sweep.csv's and wsoleval.csv's tables from the metric states (they replace what the
    folder's wsoleval.csv says, which `check_run` compares with them)."""
    image_filter = run.setting("metric.image_filter", "correct")
    run.sweep = sweep_table(states, image_filter)
    run.wsoleval = wsoleval_table(states, image_filter, dataset=str(run.setting("dataset.name")),
                                  split=str(run.setting("dataset.split")))


def _caption(run: RunFolder, variant: str, faith: bool, wsol: bool) -> str:
    image_filter = run.setting("metric.image_filter")
    parts = [(f"{run.dataset_label}, model {run.setting('model.name', '?')}, target "
              f"{run.setting('target', '?')}. Pixel Acc to Recall: predicted box-union vs "
              f"{VARIANTS[variant]}, percent, mean over {FILTER_WORDS.get(image_filter, image_filter)} "
              f"(metric.image_filter={image_filter}; n_images).")]
    if faith:
        parts.append("ABPC, AUC MoRF, AUC LeRF: pixel perturbation of the ground-truth class, "
                     "percent, mean over all images (n_images_abpc).")
    if wsol:
        # wsoleval.csv files written before the OpenCV mode have no `boxes` column: float components
        written = run.wsoleval.get("boxes", [])
        boxes = ", ".join(sorted(set(written))) or "components"
        source = ("its own OpenCV contours" if boxes == "opencv"
                  else f"the float variant sweep.boxes={boxes}, not the published procedure")
        parts.append(f"MaxBoxAccV2 (and PxAP): wsolevaluation, boxes from {source}, percent (n_images_wsol).")
    return " ".join(parts)


def _published_notes(run: RunFolder, published: list, thresholds: list[float]) -> list[str]:
    if not published:
        known = "; ".join(f"{d}/{s} with {m}" for d, s, m in published_settings())
        return [(f"No published numbers for {run.dataset_label} with {run.setting('model.name', '?')} "
                 f"(published numbers exist for {known}).")]
    notes = []
    for source in dict.fromkeys(p.source for p in published):
        methods = ", ".join(dict.fromkeys(p.method + PUBLISHED_SUFFIX for p in published if p.source == source))
        notes.append(f"{methods}: {source}.")
    differing = [f"{key}={run.setting(key)} (published: {value})" for key, value in PAPER_SETTINGS.items()
                 if run.setting(key) != value]
    if published[0].threshold not in thresholds:
        differing.append(f"metric.thresholds={thresholds} (published: {published[0].threshold})")
    if differing:
        notes.append("This run's localization settings differ from the published protocol: "
                     + ", ".join(differing) + ".")
    return notes


def degenerate_notes(run: RunFolder, all_degenerate: list[str]) -> list[str]:
    """One line per method with degenerate maps (constant or NaN/inf), so they are never
    hidden in an average: how many, and what the table does with them."""
    first = run.records[run.records["threshold"] == run.records["threshold"].iloc[0]]
    counts = first.groupby("method", sort=False)["degenerate"].agg(["sum", "size"])
    notes = []
    for method, (bad, total) in counts.iterrows():
        if method in all_degenerate:
            notes.append(ALL_DEGENERATE.format(method=method))
        elif bad:
            notes.append(f"{method}: {int(bad)} of {int(total)} maps are degenerate (constant or NaN/inf); "
                         "they count as empty predictions here (n_degenerate).")
    return notes


def _coverage_notes(run: RunFolder) -> list[str]:
    """Faithfulness rows that do not cover every image of a method are reported, not hidden."""
    if run.faithfulness is None:
        return []
    totals = run.records.groupby("method", sort=False)["image_id"].nunique()
    counts = run.faithfulness.groupby("method", sort=False)["image_id"].nunique()
    notes = [f"faithfulness.csv covers {int(counts.get(m, 0))} of {int(n)} images for {m}."
             for m, n in totals.items() if int(counts.get(m, 0)) != int(n)]
    if "degenerate" in run.faithfulness.columns:
        bad = run.faithfulness[run.faithfulness["degenerate"] == 1].groupby("method", sort=False).size()
        notes += [f"{m}: ABPC averages {int(counts[m]) - int(n)} of {int(counts[m])} images; {int(n)} "
                  "ground-truth-class maps are degenerate and have no curve." for m, n in bad.items()]
    return notes


def run_tables(run_dir: str | Path | RunFolder, allow_incomplete: bool = False) -> dict[str, pd.DataFrame]:
    """Every table of a run, from its files: "localization" (per method and threshold, all
    columns; what `table.csv` holds) and one paper-layout table per ground-truth variant
    ("box", "mask" when the records have masks) with ABPC, MaxBoxAccV2 and published numbers
    where available. Each paper table carries `attrs["caption"]` and `attrs["notes"]`."""
    run = run_dir if isinstance(run_dir, RunFolder) else read_run(run_dir, allow_incomplete)
    localization = localization_table(run.records, run.setting("metric.image_filter"),
                                      str(run.path / "records.csv"))
    faith = faithfulness_summary(run.faithfulness, str(run.path / "faithfulness.csv")) \
        if run.faithfulness is not None else None
    wsol = wsoleval_summary(run.wsoleval, str(run.path / "wsoleval.csv")) if run.wsoleval is not None else None
    published = published_numbers(str(run.setting("dataset.name")), str(run.setting("dataset.split")),
                                  str(run.setting("model.name")))
    thresholds = sorted(set(localization.index.get_level_values("threshold").astype(float)))
    tables = {"localization": localization}
    blank = degenerate_methods(run.records)
    degenerate = degenerate_notes(run, blank)
    localization.attrs["degenerate_notes"] = degenerate
    if run.sweep is not None:
        tables["sweep"], tables["wsoleval"] = run.sweep, run.wsoleval
    for variant in VARIANTS:
        if f"{variant}_iou" not in localization.columns:
            continue
        view = paper_table(localization, variant, faithfulness=faith, wsoleval=wsol,
                           published=published if variant == "box" else (), all_degenerate=blank)
        view.attrs["caption"] = _caption(run, variant, faith is not None, wsol is not None)
        notes = _published_notes(run, published, thresholds) if variant == "box" else []
        view.attrs["notes"] = notes + degenerate + _coverage_notes(run)
        view.attrs["thresholds"] = thresholds
        tables[variant] = view
    return tables


def write_run_tables(run_dir: str | Path, out_dir: str | Path | None = None,
                     tables: dict[str, pd.DataFrame] | None = None) -> list[Path]:
    """Write a run's tables (into the run folder unless `out_dir` is given): `table.csv`
    (localization, all columns) and `table_<variant>.csv/.md/.tex` (paper layout). Returns
    the paths."""
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    tables = tables if tables is not None else run_tables(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [atomic_write(out / "table.csv", tables["localization"].to_csv)]
    for name in SWEEP_TABLES:
        if name in tables:
            paths.append(atomic_write(out / f"{name}.csv", lambda tmp, t=tables[name]: t.to_csv(tmp, index=False)))
    for variant in VARIANTS:
        if variant in tables:
            view = tables[variant]
            paths += write_table_files(view, out, f"table_{variant}", caption=view.attrs.get("caption"),
                                       notes=view.attrs.get("notes", ()))
    return paths


def format_run_tables(tables: dict[str, pd.DataFrame]) -> str:
    """The paper-layout tables of a run as terminal text, each with its caption and notes."""
    return "\n\n".join(to_text(tables[v], tables[v].attrs.get("caption"), tables[v].attrs.get("notes", ()))
                       for v in VARIANTS if v in tables)


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


def check_run(run_dir: str | Path, allow_incomplete: bool = False) -> list[str]:
    """Rebuild a run's tables from its records and metric states and compare them with
    `table.csv`, any `table_<variant>.csv`, and `sweep.csv` / `wsoleval.csv` on disk; returns the
    differences (empty: they agree). A folder that is not a complete run is one difference."""
    path = Path(run_dir)
    try:
        tables = run_tables(path, allow_incomplete)
    except IncompleteRun as exc:
        return [str(exc)]
    on_disk = path / "table.csv"
    if not on_disk.is_file():
        return [f"{on_disk} is missing"]
    lines = _disk_differences(tables["localization"].reset_index(), on_disk)
    for variant in VARIANTS:
        file = path / f"table_{variant}.csv"
        if variant in tables and file.is_file():
            lines += _disk_differences(tables[variant], file)
    for name in SWEEP_TABLES:
        file = path / f"{name}.csv"
        if name in tables:
            lines += _disk_differences(tables[name], file) if file.is_file() else [f"{file} is missing"]
    return lines


def _disk_differences(expected: pd.DataFrame, file: Path) -> list[str]:
    """`frame_differences` against the table in `file`; a file that is no CSV table differs."""
    try:
        actual = read_table(file)
    except InputFileError as exc:
        return [str(exc)]
    return frame_differences(expected, actual, file.name)


def combined_table(run_dirs: list[str | Path | RunFolder], variant: str = "box",
                   allow_incomplete: bool = False) -> pd.DataFrame:
    """One paper-layout table over several runs (e.g. one per dataset): a block of rows per
    run, labelled by its dataset in a leading `dataset` column, plus the `filter` column.
    Notes name each block's run folder, model and target; `attrs["notes"]` holds them."""
    blocks, notes, seen = [], [], {}
    for run_dir in run_dirs:
        run = run_dir if isinstance(run_dir, RunFolder) else read_run(run_dir, allow_incomplete)
        tables = run_tables(run)
        if variant not in tables:
            raise SettingError(f"{run.path}: no {variant} table (the records have no {variant}_* columns)")
        label = run.dataset_label
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # two runs on one dataset: keep their blocks apart
            label = f"{label} [{run.path.name}]"
        view = tables[variant].copy()
        view.insert(0, "dataset", label)
        view["filter"] = run.setting("metric.image_filter")
        blocks.append(view)
        notes.append(f"{label}: {run.path}, model {run.setting('model.name', '?')}, "
                     f"target {run.setting('target', '?')}.")
        notes += [n for n in tables[variant].attrs.get("notes", ()) if n not in notes]
    combined = pd.concat(blocks, ignore_index=True)
    scores = ordered_columns(combined.drop(columns=["dataset", "filter"]))
    combined = pd.concat([combined[["dataset"]], scores, combined[["filter"]]], axis=1)
    combined.attrs["caption"] = (f"Predicted box-union vs {VARIANTS[variant]}, percent, over the images the "
                                 "filter column names; ABPC over all images; one block of rows per run.")
    combined.attrs["notes"] = notes
    return combined
