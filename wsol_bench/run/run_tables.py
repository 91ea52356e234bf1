"""Every table of a run, rebuilt from the files in its folder: the one path that the benchmark
run and `wsol-bench-report` both use.

Each registered scorer rebuilds its own part from the files it wrote (`Scorer.tables`): the
records scorer the localization table, the others per-method columns, caption sentences, notes
and tables of their own. This module only puts the parts together, in the scorers' registration
order, with no knowledge of any one measure: `table.csv` is the localization table with every
scorer's per-method columns joined onto its rows, each ground-truth variant ("box", "mask") gets
a paper-layout table (methods as rows, published numbers beside ours where there are any), and
every scorer's own tables are written as `<name>.csv`. `check_run` compares all of them with the
files on disk.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from wsol_bench.errors import MissingInputError, SettingError
from wsol_bench.files import atomic_write
from wsol_bench.metrics.bootstrap import bound_names, is_bound_column
from wsol_bench.models.loading import weights_label
from wsol_bench.report.comparisons import method_replicate_means, paired_comparisons, wide_values
from wsol_bench.report.manifest import IncompleteRun
from wsol_bench.report.paper_numbers import (
    PAPER_SETTINGS,
    other_weights_note,
    published_numbers,
    published_settings,
)
from wsol_bench.report.rankings import agreement_table, ranking_table
from wsol_bench.report.run_folder import VARIANTS, RunFolder, disk_differences, read_run
from wsol_bench.report.table_format import is_count_column, to_text, write_table_files
from wsol_bench.report.tables import PUBLISHED_SUFFIX, ordered_columns, paper_table
from wsol_bench.run.scorers import SCORERS, MeasureTables

LOCALIZATION = "records"  # the scorer whose localization table every run has
COMPARE = "compare"  # compare.csv: every pair of methods on every measure (docs/protocol.md 7.2)
RANKING, AGREEMENT = "ranking", "agreement"  # ranking.csv, agreement.csv (docs/protocol.md 7.3)


def measure_parts(run: RunFolder) -> dict[str, MeasureTables]:
    """{scorer name: what it adds} for every registered scorer whose files the folder holds."""
    parts = {name: cls.tables(run) for name, cls in SCORERS.entries()}
    parts = {name: part for name, part in parts.items() if part is not None}
    if LOCALIZATION not in parts or parts[LOCALIZATION].localization is None:
        raise MissingInputError(f"{run.path}: no localization table could be built (the records scorer is missing)")
    return parts


def joined_table(localization: pd.DataFrame, summaries: list[pd.DataFrame]) -> pd.DataFrame:
    """`table.csv`: one row per (method, threshold) with the localization scores, and every
    scorer's per-method columns repeated on each of its method's rows."""
    table = localization.reset_index()
    for summary in summaries:
        table = table.merge(summary, left_on="method", right_index=True, how="left")
    return table


def run_tables(run_dir: str | Path | RunFolder, allow_incomplete: bool = False) -> dict[str, pd.DataFrame]:
    """Every table of a run, from its files: "localization" (per method and threshold, indexed
    by both), "table" (what `table.csv` holds: the localization rows with every scorer's
    per-method columns), one paper-layout table per ground-truth variant ("box", "mask" when the
    records have masks) with `attrs["caption"]`, `attrs["notes"]` and `attrs["thresholds"]`, each
    scorer's own tables under their file names (e.g. "sweep", "wsoleval"), "compare": the
    paired comparisons of every two methods on every measure (with intervals on), and
    "ranking" and "agreement": the methods ranked across the measures whose scorers say which
    way is better, and how far those measures agree (with two methods or more)."""
    run = run_dir if isinstance(run_dir, RunFolder) else read_run(run_dir, allow_incomplete)
    parts = measure_parts(run)
    localization = parts[LOCALIZATION].localization
    summaries = [part.summary for part in parts.values() if part.summary is not None]
    tables = {"localization": localization, "table": joined_table(localization, summaries)}
    for part in parts.values():
        tables.update(part.files)
    methods = list(dict.fromkeys(run.records["method"]))
    if len(methods) > 1:
        tables.update(method_comparisons(run, parts, methods))
    published = published_numbers(str(run.setting("dataset.name")), str(run.setting("dataset.split")),
                                  str(run.setting("model.name")), pretrained=run.setting("model.pretrained", True),
                                  checkpoint=run.setting("model.checkpoint"))
    thresholds = sorted(set(localization.index.get_level_values("threshold").astype(float)))
    notes = [line for part in parts.values() for line in part.notes]
    for variant in VARIANTS:
        if f"{variant}_iou" not in localization.columns:
            continue
        view = paper_table(localization, variant, extras=summaries, published=published if variant == "box" else (),
                           all_degenerate=localization.attrs.get("all_degenerate", ()))
        view.attrs["caption"] = " ".join([_run_sentence(run)] + [text for part in parts.values()
                                                                 if (text := part.caption_for(variant))]
                                         + [_interval_sentence(run, view)])
        view.attrs["notes"] = (_published_notes(run, published, thresholds) if variant == "box" else []) + notes
        view.attrs["thresholds"] = thresholds
        tables[variant] = view
    return tables


def method_comparisons(run: RunFolder, parts: dict[str, MeasureTables], methods: list[str]
                       ) -> dict[str, pd.DataFrame]:
    """"compare" (with intervals on), "ranking" and "agreement" of a run of several methods,
    from every scorer's per-image values and dataset-level replicates; each measure's per-image
    values are resampled once, for both the comparisons and the rankings."""
    per_image = {name: values for part in parts.values() for name, values in part.per_image.items()}
    replicated = {name: found for part in parts.values() for name, found in part.replicated.items()}
    better = {name: way for part in parts.values() for name, way in part.better.items()}
    wides = {name: wide_values(values) for name, values in per_image.items()}
    method_means = method_replicate_means(wides, run.replicates) if run.replicates is not None else None
    tables = {}
    if method_means is not None and (per_image or replicated):
        tables[COMPARE] = paired_comparisons(per_image, run.replicates, run.bootstrap.level, replicated,
                                             wides=wides, method_means=method_means)
    if set(better) & (set(per_image) | set(replicated)):
        tables[RANKING] = ranking_table(wides, replicated, better, methods, method_means, run.bootstrap.level)
        tables[AGREEMENT] = agreement_table(wides, replicated, better, methods, method_means, run.bootstrap.level)
    return tables


def model_label(run: RunFolder) -> str:
    """The run's model as its tables name it: the name, and where its weights come from when they
    are not its pretrained tag's (random, or the user's checkpoint)."""
    return weights_label(str(run.setting("model.name", "?")), checkpoint=run.setting("model.checkpoint"),
                         pretrained=run.setting("model.pretrained", True) is not False)


def _run_sentence(run: RunFolder) -> str:
    return f"{run.dataset_label}, model {model_label(run)}, target {run.setting('target', '?')}."


def _interval_sentence(run: RunFolder, view: pd.DataFrame) -> str:
    """What "±" means in the tables (or that the run has no intervals), and which of the view's
    columns have none (dataset-level measures of a run that kept no bootstrap replicates)."""
    settings = run.bootstrap
    if settings.level is None:
        return "No confidence intervals (report.ci=null)."
    sentence = (f"± half the width of the {100 * settings.level:g} % bootstrap interval over images "
                f"({settings.resamples} Poisson resamples, seed {settings.seed}; docs/protocol.md 7.1).")
    bare = [c for c in view.columns if c not in ("method", "threshold") and not is_count_column(c)
            and not is_bound_column(c) and bound_names(c)[0] not in view.columns]
    if bare:
        sentence += f" {', '.join(bare)}: no interval (the run kept no bootstrap replicates of them)."
    return sentence


def _published_notes(run: RunFolder, published: list, thresholds: list[float]) -> list[str]:
    """Where the published numbers beside ours come from, and the settings in which this run
    departs from the published protocol (or that there are no published numbers)."""
    if not published:
        other_weights = other_weights_note(str(run.setting("dataset.name")), str(run.setting("dataset.split")),
                                           str(run.setting("model.name")), model_label(run))
        if other_weights is not None:
            return [other_weights]
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


def own_tables(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The scorers' own tables among `tables` (written as `<name>.csv`)."""
    return {name: t for name, t in tables.items() if name not in ("localization", "table", *VARIANTS)}


def write_run_tables(run_dir: str | Path, out_dir: str | Path | None = None,
                     tables: dict[str, pd.DataFrame] | None = None) -> list[Path]:
    """Write a run's tables (into the run folder unless `out_dir` is given): `table.csv`, each
    scorer's own `<name>.csv` and `table_<variant>.csv/.md/.tex` (paper layout). Returns the
    paths."""
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    tables = tables if tables is not None else run_tables(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [atomic_write(out / "table.csv", lambda tmp: tables["table"].to_csv(tmp, index=False))]
    for name, table in own_tables(tables).items():
        paths.append(atomic_write(out / f"{name}.csv", lambda tmp, t=table: t.to_csv(tmp, index=False)))
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


def check_run(run_dir: str | Path, allow_incomplete: bool = False) -> list[str]:
    """Rebuild a run's tables from its records, rows and metric states and compare them with
    `table.csv`, any `table_<variant>.csv`, and every scorer's own tables on disk; returns the
    differences (empty: they agree). A folder that is not a complete run is one difference."""
    path = Path(run_dir)
    try:
        tables = run_tables(path, allow_incomplete)
    except IncompleteRun as exc:
        return [str(exc)]
    on_disk = path / "table.csv"
    if not on_disk.is_file():
        return [f"{on_disk} is missing"]
    lines = disk_differences(tables["table"], on_disk)
    for variant in VARIANTS:
        file = path / f"table_{variant}.csv"
        if variant in tables and file.is_file():
            lines += disk_differences(tables[variant], file)
    for name, table in own_tables(tables).items():
        file = path / f"{name}.csv"
        lines += disk_differences(table, file) if file.is_file() else [f"{file} is missing"]
    return lines


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
        notes.append(f"{label}: {run.path}, model {model_label(run)}, target {run.setting('target', '?')}.")
        notes += [n for n in tables[variant].attrs.get("notes", ()) if n not in notes]
    combined = pd.concat(blocks, ignore_index=True)
    scores = ordered_columns(combined.drop(columns=["dataset", "filter"]))
    combined = pd.concat([combined[["dataset"]], scores, combined[["filter"]]], axis=1)
    combined.attrs["caption"] = (f"Predicted box-union vs {VARIANTS[variant]}, percent, over the images the "
                                 "filter column names; ABPC over all images; one block of rows per run.")
    combined.attrs["notes"] = notes
    return combined
