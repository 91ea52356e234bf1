"""Tables are aggregations of records, never computed another way.

Localization scores come from the per-image records; every other measure's per-method columns
come from its own scorer (`Scorer.tables`: ABPC from the per-image faithfulness rows,
MaxBoxAccV2 and PxAP from the sweep's states, ...); `paper_table` puts them side by side in the
paper's layout (methods as rows, percent), optionally with published numbers beside ours. Rendering to text, Markdown and LaTeX lives in `wsol_bench.report.table_format`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

from wsol_bench.choices import IMAGE_FILTERS
from wsol_bench.errors import InputFileError, SettingError
from wsol_bench.metrics.bootstrap import Replicates, bound_names, is_bound_column
from wsol_bench.metrics.pixel import PIXEL_METRICS
from wsol_bench.report.paper_numbers import PublishedNumber

FILTERS = IMAGE_FILTERS  # metric.image_filter
PAPER_NAMES = {"pixel_acc": "Pixel Acc", "iou": "IoU", "dice": "Dice", "precision": "Precision",
               "recall": "Recall"}
FAITH_NAMES = {"abpc": "ABPC", "auc_morf": "AUC MoRF", "auc_lerf": "AUC LeRF"}
WSOL_NAMES = {"maxboxacc_v2": "MaxBoxAccV2", "pxap": "PxAP"}
# Column order of every paper-layout table; a table holds the subset its inputs provide.
COLUMN_ORDER = (["method", "threshold", *PAPER_NAMES.values(), "n_images", "n_degenerate", *FAITH_NAMES.values(),
                 "n_images_abpc", *WSOL_NAMES.values(), "n_images_wsol"])
ALL_DEGENERATE = ("{method}: every map is degenerate (constant or NaN/inf): no scores; its maps explain "
                  "nothing")
PUBLISHED_SUFFIX = " (published)"


def require_columns(frame: pd.DataFrame, columns: Iterable[str], source: str) -> None:
    """Raise an `InputFileError` naming `source` and the columns it lacks."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputFileError(f"{source} lacks column(s) {missing}; it has {list(frame.columns)}. "
                             "Was it written by another version of wsol-bench? Re-run the benchmark.")
    if frame.empty:
        raise InputFileError(f"{source} has no rows; re-run the benchmark")


def group_intervals(frame: pd.DataFrame, keys: str | list[str], columns: list[str], replicates: Replicates,
                    scale: float = 1.0) -> pd.DataFrame:
    """The bootstrap interval bounds ("<column> ci_lo", "<column> ci_hi", times `scale`) of the
    mean of each of `columns` per group of `keys`, indexed like `frame.groupby(keys).mean()`;
    the images are resampled by `replicates` (the same draws for every group: paired)."""
    rows, index = [], []
    for key, group in frame.groupby(keys, sort=False):
        lo, hi = replicates.intervals(group["image_id"].astype(str).tolist(), group[columns].to_numpy(float))
        row = {}
        for column, low, high in zip(columns, lo, hi):
            name_lo, name_hi = bound_names(column)
            row[name_lo], row[name_hi] = low * scale, high * scale
        rows.append(row)
        index.append(key)
    names = [n for c in columns for n in bound_names(c)]
    if isinstance(keys, list) and len(keys) > 1:
        return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=keys), columns=names)
    return pd.DataFrame(rows, index=pd.Index(index, name=keys if isinstance(keys, str) else keys[0]), columns=names)


def with_bounds_after(table: pd.DataFrame, bounds: pd.DataFrame) -> pd.DataFrame:
    """`table` with the bound columns of `bounds` joined (on the index), each pair right after
    the column it bounds."""
    joined = table.join(bounds)
    order = []
    for column in table.columns:
        order.append(column)
        order += [b for b in bound_names(column) if b in joined.columns]
    return joined[list(dict.fromkeys(order))]  # a table that has bounds already keeps each once


def localization_table(records: pd.DataFrame, image_filter: str = "correct", source: str = "records",
                       replicates: Replicates | None = None) -> pd.DataFrame:
    """Mean of every per-image metric in percent, per (method, threshold), over the images
    the filter keeps ("correct": correctly classified only, as the paper; "all"), with each
    mean's bootstrap interval when `replicates` are given (docs/protocol.md 7.1). `source`
    names the records in errors (the file they were read from)."""
    if image_filter not in FILTERS:
        raise SettingError(f"unknown image filter {image_filter!r} (metric.image_filter); valid: {FILTERS}")
    require_columns(records, ["method", "threshold", "correct", "degenerate"], source)
    kept = records[records["correct"] == 1] if image_filter == "correct" else records
    metric_cols = [c for c in records.columns if c.split("_", 1)[-1] in PIXEL_METRICS
                   and c.split("_", 1)[0] in ("box", "mask")]
    methods = list(dict.fromkeys(records["method"]))  # keep run order, not alphabetical
    grouped = kept.groupby(["method", "threshold"], sort=False)
    table = grouped[metric_cols].mean() * 100
    table["n_images"] = grouped.size()
    table["n_degenerate"] = grouped["degenerate"].sum()
    totals = records.groupby(["method", "threshold"], sort=False).size()
    table = table.reindex(totals.index)
    table["n_images"] = table["n_images"].fillna(0).astype(int)
    table["n_degenerate"] = table["n_degenerate"].fillna(0).astype(int)
    table["n_total"] = totals
    table["filter"] = image_filter
    if replicates is not None:
        table = with_bounds_after(table, group_intervals(kept, ["method", "threshold"], metric_cols, replicates, 100))
    order = {m: i for i, m in enumerate(methods)}
    return table.sort_index(key=lambda idx: idx.map(order) if idx.name == "method" else idx)


def localization_values(records: pd.DataFrame, image_filter: str = "correct") -> dict[str, pd.DataFrame]:
    """The per-image pixel scores in percent at the records' first threshold, over the images
    the filter keeps, as {"IoU (box, t=0.5)": frame of image_id, method, value}: what the
    paired comparisons between methods resample."""
    kept = records[records["correct"] == 1] if image_filter == "correct" else records
    first = records["threshold"].iloc[0]
    kept = kept[kept["threshold"] == first]
    values = {}
    for column in kept.columns:
        variant, _, metric = column.partition("_")
        if variant in ("box", "mask") and metric in PIXEL_METRICS:
            values[f"{PAPER_NAMES[metric]} ({variant}, t={float(first):g})"] = pd.DataFrame(
                {"image_id": kept["image_id"].astype(str), "method": kept["method"], "value": kept[column] * 100})
    return values


def _attach(view: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
    """Join per-method columns onto the view; methods only in `extra` become rows at the end."""
    joined = view.merge(extra, left_on="method", right_index=True, how="left")
    only_extra = extra.loc[[m for m in extra.index if m not in set(view["method"])]]
    if only_extra.empty:
        return joined
    return pd.concat([joined, only_extra.rename_axis("method").reset_index()], ignore_index=True)


def published_rows(view: pd.DataFrame, published: Sequence[PublishedNumber], variant: str) -> pd.DataFrame:
    """Insert one "<method> (published)" row after each method that has published numbers.
    Localization numbers are box-union scores, so they fill only the box variant's columns."""
    names = {f"{variant}_{m}": PAPER_NAMES[m] for m in PIXEL_METRICS} | FAITH_NAMES
    rows: dict[str, dict] = {}
    for p in published:
        column = names.get(p.metric) if (p.metric in FAITH_NAMES or variant == "box") else None
        if column is None:
            continue
        row = rows.setdefault(p.method, {"method": p.method + PUBLISHED_SUFFIX})
        row[column] = p.value
        if "threshold" in view.columns and p.metric not in FAITH_NAMES:
            row["threshold"] = p.threshold
    if not rows:
        return view
    parts, remaining = [], dict(rows)
    for method, block in view.groupby("method", sort=False):
        parts.append(block)
        if method in remaining:
            parts.append(pd.DataFrame([remaining.pop(method)]))
    parts += [pd.DataFrame([row]) for row in remaining.values()]
    return pd.concat(parts, ignore_index=True)


def ordered_columns(view: pd.DataFrame) -> pd.DataFrame:
    """The view's columns in the paper layout's order (unknown columns last), each column's
    interval bounds right after it."""
    bases = [c for c in view.columns if not is_bound_column(c)]
    known = [c for c in COLUMN_ORDER if c in bases]
    order = []
    for column in known + [c for c in bases if c not in known]:
        order += [column] + [b for b in bound_names(column) if b in view.columns]
    return view[order + [c for c in view.columns if c not in order]]


def paper_table(table: pd.DataFrame, variant: str = "box", *, extras: Sequence[pd.DataFrame] = (),
                published: Sequence[PublishedNumber] = (), all_degenerate: Iterable[str] = ()) -> pd.DataFrame:
    """The paper's layout for one ground-truth variant: methods as rows, the five scores in
    percent, the number of images scored and how many of their maps were degenerate (the
    threshold column only when it varies), then the per-method columns of every other measure
    (`extras`, methods as their index, in the order given: ABPC and the AUCs, MaxBoxAccV2/PxAP,
    ...), and a "<method> (published)" row after each method with published numbers. Methods in
    `all_degenerate` get no scores ("--")."""
    cols = [f"{variant}_{m}" for m in PIXEL_METRICS if f"{variant}_{m}" in table.columns]
    cols = [name for c in cols for name in (c, *bound_names(c)) if name in table.columns]
    counts = ["n_images"] + (["n_degenerate"] if "n_degenerate" in table.columns else [])
    names = {f"{variant}_{m}": PAPER_NAMES[m] for m in PIXEL_METRICS}
    names |= {bound: paper for column, paper in list(names.items())
              for bound, paper in zip(bound_names(column), bound_names(paper))}
    view = table[cols + counts].rename(columns=names)
    view = view.reset_index()
    if view["threshold"].nunique() == 1:
        view = view.drop(columns="threshold")
    for extra in extras:
        view = _attach(view, extra)
    view = blank_degenerate_methods(view, all_degenerate)
    view = published_rows(view, published, variant)
    return ordered_columns(view).reset_index(drop=True)


def blank_degenerate_methods(view: pd.DataFrame, methods: Iterable[str]) -> pd.DataFrame:
    """Scores of methods whose every map is degenerate become missing ("--"): an empty
    prediction's pixel accuracy or precision would otherwise look like a result."""
    blank = view["method"].isin(list(methods))
    if not blank.any():
        return view
    view = view.copy()
    scores = [c for c in view.columns if c not in ("method", "threshold", "filter") and not c.startswith("n_")]
    view[scores] = view[scores].astype(float)
    view.loc[blank, scores] = float("nan")
    return view


def degenerate_methods(records: pd.DataFrame) -> list[str]:
    """Methods whose maps are degenerate for every image of the records."""
    flags = records.groupby("method", sort=False)["degenerate"].all()
    return [m for m, all_bad in flags.items() if all_bad]
