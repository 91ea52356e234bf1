"""Several runs side by side: their paper tables aligned on method (and threshold), the
differences to the first run, and the config keys in which the runs differ."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from wsol_bench.metrics.bootstrap import bound_names, is_bound_column
from wsol_bench.report.table_format import cell_text, interval_text, is_count_column
from wsol_bench.report.tables import COLUMN_ORDER

DEFAULT_TOLERANCE = 0.01  # percentage points: below what two decimals can show


@dataclass
class Comparison:
    """Runs side by side: `values` holds the key columns, then per run its columns
    ("A: IoU", with the run's interval bounds "A: IoU ci_lo", "A: IoU ci_hi" where its table
    has them) and, from the second run on, the difference to the first ("B-A: IoU"); `flags`
    is True where a difference exceeds the tolerance or a value exists in one run only."""

    values: pd.DataFrame
    flags: pd.DataFrame
    keys: list[str]
    labels: list[str]
    diff_columns: list[str]


def run_labels(count: int) -> list[str]:
    """Short labels for runs in a comparison: A, B, C, ..."""
    return [chr(ord("A") + i) if i < 26 else f"R{i + 1}" for i in range(count)]


def compare_tables(views: list[pd.DataFrame], labels: list[str],
                   tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    """Align paper-layout tables on (method[, threshold]) and put their numbers side by side,
    each with the run's own interval bounds where its table has them, with differences to the
    first; rows present in some runs only are kept (and flagged)."""
    views = [v.copy() for v in views]
    if any("threshold" in v.columns for v in views):
        for v in views:
            if "threshold" not in v.columns:  # dropped because it was a single value
                v.insert(1, "threshold", (v.attrs.get("thresholds") or [np.nan])[0])
    keys = ["method"] + (["threshold"] if "threshold" in views[0].columns else [])
    columns = [c for c in COLUMN_ORDER if c not in keys and any(c in v.columns for v in views)]
    # every other numeric column once; the bounds go with their column (`bounded` below)
    columns += list(dict.fromkeys(c for v in views for c in v.columns if c not in keys and c not in columns
                                  and not is_bound_column(c) and pd.api.types.is_numeric_dtype(v[c])))
    rows = pd.concat([v[keys] for v in views]).drop_duplicates()
    index = pd.MultiIndex.from_frame(rows) if len(keys) > 1 else pd.Index(rows["method"], name="method")
    aligned = [v.set_index(keys).reindex(index).reindex(columns=columns).astype(float) for v in views]
    bounded = [{c: v.set_index(keys).reindex(index)[list(bound_names(c))].astype(float) for c in columns
                if set(bound_names(c)) <= set(v.columns)} for v in views]
    values = pd.DataFrame(index=index)
    flags = pd.DataFrame(index=index)
    diff_columns = []
    for i, (label, frame, bounds) in enumerate(zip(labels, aligned, bounded)):
        for column in columns:
            values[f"{label}: {column}"] = frame[column]
            flags[f"{label}: {column}"] = False
            for bound in bound_names(column) if column in bounds else ():
                values[f"{label}: {bound}"] = bounds[column][bound]
        if i == 0:
            continue
        for column in columns:
            name = f"{label}-{labels[0]}: {column}"
            diff = frame[column] - aligned[0][column]
            values[name] = diff
            diff_columns.append(name)
            one_sided = frame[column].isna() != aligned[0][column].isna()
            flags[name] = (diff.abs() > tolerance).fillna(False) | one_sided
    return Comparison(values.reset_index(), flags.reset_index(drop=True), keys, labels, diff_columns)


def comparison_cells(comparison: Comparison, style: str = "text") -> pd.DataFrame:
    """The comparison as display text: a run's value with its interval as "mean ± half-width"
    where the run has one (the bound columns are not shown), differences signed, flagged cells
    marked with `*` (text) or in bold (Markdown)."""
    cells = {}
    frame = comparison.values
    for column in [c for c in frame.columns if not is_bound_column(c)]:
        low, high = bound_names(column)
        lows, highs = (frame[low], frame[high]) if {low, high} <= set(frame.columns) else (None, None)
        texts = []
        for row, value in enumerate(frame[column]):
            text = cell_text(column, value) if lows is None else \
                interval_text(column, value, lows.iloc[row], highs.iloc[row])
            if column in comparison.diff_columns and text != "--":
                text = f"{round(value):+d}" if is_count_column(column) else f"{value:+.2f}"
            if column in comparison.flags and comparison.flags[column].iloc[row]:
                text = f"**{text}**" if style == "markdown" else f"{text}*"
            texts.append(text)
        cells[column] = texts
    return pd.DataFrame(cells, dtype=object)


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested config as {"dotted.key": value}; lists are values."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(configs: list[dict]) -> dict[str, list]:
    """Config keys whose values are not the same in every run: key -> value per run
    ("<absent>" where a run lacks the key)."""
    flats = [flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return {k: [f.get(k, "<absent>") for f in flats] for k in keys
            if any(f.get(k, "<absent>") != flats[0].get(k, "<absent>") for f in flats)}
