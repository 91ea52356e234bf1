"""Tables are aggregations of records, never computed another way."""

from __future__ import annotations

import pandas as pd

from wsol_bench.metrics.pixel import PIXEL_METRICS

FILTERS = ("correct", "all")
PAPER_NAMES = {"pixel_acc": "Pixel Acc", "iou": "IoU", "dice": "Dice", "precision": "Precision",
               "recall": "Recall"}


def localization_table(records: pd.DataFrame, image_filter: str = "correct") -> pd.DataFrame:
    """Mean of every per-image metric in percent, per (method, threshold), over the images
    the filter keeps ("correct": correctly classified only, as the paper; "all")."""
    if image_filter not in FILTERS:
        raise ValueError(f"unknown image filter {image_filter!r}; valid: {FILTERS}")
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
    order = {m: i for i, m in enumerate(methods)}
    return table.sort_index(key=lambda idx: idx.map(order) if idx.name == "method" else idx)


def paper_table(table: pd.DataFrame, variant: str = "box") -> pd.DataFrame:
    """The paper's layout for one ground-truth variant: methods as rows, the five scores in
    percent, then the number of images scored (the threshold column only when it varies)."""
    cols = [f"{variant}_{m}" for m in PIXEL_METRICS if f"{variant}_{m}" in table.columns]
    view = table[cols + ["n_images"]].rename(columns={f"{variant}_{m}": PAPER_NAMES[m] for m in PIXEL_METRICS})
    view = view.reset_index()
    if view["threshold"].nunique() == 1:
        view = view.drop(columns="threshold")
    return view


def format_table(table: pd.DataFrame, variant: str = "box") -> str:
    """`paper_table` as aligned text with two decimals, for the terminal."""
    return paper_table(table, variant).to_string(index=False, float_format=lambda v: f"{v:.2f}")


def write_tables(table: pd.DataFrame, folder, stem: str = "table") -> list:
    """Write the paper-layout table of each ground-truth variant as Markdown and LaTeX
    (`<stem>_<variant>.md`, `.tex`); returns the paths."""
    from pathlib import Path

    folder = Path(folder)
    paths = []
    for variant in ("box", "mask"):
        if f"{variant}_iou" not in table.columns:
            continue
        view = paper_table(table, variant)
        md = folder / f"{stem}_{variant}.md"
        md.write_text(view.to_markdown(index=False, floatfmt=".2f") + "\n")
        tex = folder / f"{stem}_{variant}.tex"
        styler = view.style.hide(axis="index").format(precision=2)
        tex.write_text(styler.to_latex(hrules=True, column_format="l" + "r" * (view.shape[1] - 1)))
        paths += [md, tex]
    return paths
