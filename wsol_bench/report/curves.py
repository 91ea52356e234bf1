"""The line figures of a run: the mean pixel-perturbation curves per method (MoRF solid, LeRF
dashed; or the deletion / insertion curves) from faithfulness record rows, and the threshold
sweep (sweep.png: the sweep table's mean IoUs and, from the sweep's metric states, box
accuracy and PxAP's precision-recall curve), with one fixed style cycle that tells methods
apart in both."""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from wsol_bench.errors import counted
from wsol_bench.files import save_figure
from wsol_bench.metrics.base import RunMetric
from wsol_bench.metrics.bootstrap import bound_names
from wsol_bench.report.sweep_tables import BOX_STATE, PXAP_STATE

CURVE_COLUMN = re.compile(r"^(morf|lerf|deletion|insertion)_(\d+)$")
LINE_STYLES = {"morf": "-", "lerf": "--", "deletion": "-", "insertion": ":"}
CURVE_LABELS = {"morf": "MoRF", "lerf": "LeRF", "deletion": "deletion", "insertion": "insertion"}
CURVE_MEANINGS = {"morf": "most relevant pixels removed first", "lerf": "least relevant pixels removed first",
                  "deletion": "most relevant pixels removed first", "insertion": "most relevant pixels inserted first"}

# Method styles: 10 colours (matplotlib's tab10) against 7 markers, coprime lengths, so the
# first 70 methods all differ in their (colour, marker) pair; line styles cycle in 4 on top
# where a figure does not use them for something else.
METHOD_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
METHOD_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
METHOD_LINESTYLES = ("-", "--", "-.", ":")


def method_style(index: int) -> dict[str, str]:
    """The colour, marker and line style of the `index`-th method of a figure (its place in
    the run's method order, so a method looks the same in every figure of one run)."""
    return {"color": METHOD_COLOURS[index % len(METHOD_COLOURS)],
            "marker": METHOD_MARKERS[index % len(METHOD_MARKERS)],
            "linestyle": METHOD_LINESTYLES[index % len(METHOD_LINESTYLES)]}


def curve_columns(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Step columns of each curve present in `frame` ({"morf": ["morf_00", ...], ...}), in
    step order."""
    found: dict[str, list[tuple[int, str]]] = {}
    for column in frame.columns:
        match = CURVE_COLUMN.match(str(column))
        if match:
            found.setdefault(match.group(1), []).append((int(match.group(2)), column))
    return {curve: [c for _, c in sorted(cols)] for curve, cols in found.items()}


def _method_label(method: str, rows: pd.DataFrame, curves: list[str]) -> str:
    if "abpc" in rows:
        return f"{method} (ABPC {100 * rows['abpc'].mean():.2f}%)"
    areas = [f"AUC {CURVE_LABELS[c]} {100 * rows[f'auc_{c}'].mean():.2f}%"
             for c in curves if f"auc_{c}" in rows]
    return f"{method} ({', '.join(areas)})" if areas else method


def _checked_curves(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]], int]:
    """The rows to plot (degenerate maps left out), their curve columns and the step count;
    a ValueError names what is missing or inconsistent."""
    if "method" not in frame.columns:
        raise ValueError("faithfulness rows need a 'method' column to plot curves per method")
    if "degenerate" in frame.columns:  # degenerate maps have no curve (NaN), on purpose
        frame = frame[frame["degenerate"] != 1]
    columns = curve_columns(frame)
    if frame.empty or not columns:
        raise ValueError("no faithfulness rows with curve columns (morf_00, lerf_00, ...) to plot")
    steps = {len(cols) for cols in columns.values()}
    if len(steps) != 1 or min(steps) < 2:
        lengths = {k: len(v) for k, v in columns.items()}
        raise ValueError(f"curves have different or too few steps: {lengths}")
    all_steps = [c for cols in columns.values() for c in cols]
    if frame[all_steps].isna().any().any():
        raise ValueError("faithfulness rows hold missing curve values; rerun the scoring, means would "
                         "silently skip them")
    return frame, columns, steps.pop()


def _image_count(frame: pd.DataFrame) -> str:
    """'N images' when every method has N rows, else the range of the counts."""
    counts = frame.groupby("method", sort=False).size()
    low, high = int(counts.min()), int(counts.max())
    return counted(low, "image") if low == high else f"{low} to {high} images"


def plot_perturbation_curves(frame: pd.DataFrame, path: str | Path, *, title: str | None = None) -> Path:
    """Save the mean curve of every method in `frame` (one row per image and method, with a
    `method` column and step columns such as morf_00..morf_10) against the fraction of pixels
    perturbed. Each method has its own colour and marker (`method_style`); the line style says
    which curve it is; the legend gives each method's mean ABPC (or AUCs) in percent."""
    kept, columns, count = _checked_curves(frame)
    dropped = len(frame) - len(kept)
    frame = kept
    fractions = [i / (count - 1) for i in range(count)]
    curves = [c for c in LINE_STYLES if c in columns]

    fig, ax = plt.subplots(figsize=(9.0, 4.6))
    for i, (method, rows) in enumerate(frame.groupby("method", sort=False)):
        style = method_style(i)
        label = _method_label(str(method), rows, curves)
        for curve in curves:  # one legend entry per method, on its first curve
            ax.plot(fractions, rows[columns[curve]].mean().to_numpy(), color=style["color"],
                    linestyle=LINE_STYLES[curve], marker=style["marker"], ms=4, lw=1.4,
                    label=label if curve == curves[0] else None)
    summary = "ABPC = AUC LeRF - AUC MoRF" if "abpc" in frame else "area under each curve"
    method_legend = ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, borderaxespad=0,
                              title=f"method ({summary})", title_fontsize=7)
    ax.add_artist(method_legend)
    ax.legend(handles=[Line2D([], [], color="grey", linestyle=LINE_STYLES[c],
                              label=f"{CURVE_LABELS[c]}: {CURVE_MEANINGS[c]}") for c in curves],
              loc="lower left", bbox_to_anchor=(1.02, 0.0), fontsize=7, borderaxespad=0, title="curve",
              title_fontsize=7)
    removed = [c for c in curves if c != "insertion"]
    ax.set_xlabel("fraction of pixels " + ("removed / inserted" if removed and "insertion" in curves
                                           else "removed" if removed else "inserted"))
    ax.set_ylabel("probability of the target class (mean)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    left_out = f", {counted(dropped, 'degenerate map')} left out" if dropped else ""
    ax.set_title(f"{title or 'Mean pixel-perturbation curves per method'} ({_image_count(frame)}{left_out})",
                 fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    plt.close(fig)
    return path


SWEEP_METRICS = ("box_iou", "mask_iou")  # the sweep table's columns drawn by default
SCORE_NAMES = {"pixel_acc": "pixel accuracy", "iou": "IoU", "dice": "Dice", "precision": "precision",
               "recall": "recall"}
COMPARED_WITH = {"box": "ground-truth boxes", "mask": "ground-truth mask"}
FILTER_WORDS = {"correct": "correctly classified images", "all": "images"}
THRESHOLD_LABEL = "heatmap threshold (normalised map value)"
SWEEP_PANEL_IN = (4.6, 3.6)  # width, height of one sweep panel
LEGEND_CHAR_IN = 0.06  # about the width of a character of the 7 pt legend, in inches (DejaVu Sans)
BAND_ALPHA = 0.15  # a method's interval band: light enough that crossing bands stay readable
BEST_MARK = {"marker": "*", "ms": 11, "markeredgecolor": "black", "markeredgewidth": 0.6, "linestyle": "none"}


def sweep_metric_name(column: str) -> str:
    """A readable name of a sweep table column: "box_iou" -> "box IoU"."""
    kind, _, score = column.partition("_")
    return f"{kind} {SCORE_NAMES.get(score, score.replace('_', ' '))}" if kind in COMPARED_WITH else column


def _iou_panel(ax, sweep: pd.DataFrame, metric: str, styles: dict[str, dict[str, str]]) -> None:
    """One sweep column against the threshold, a line per method, each method's best
    threshold (the highest mean; ties: the lowest threshold) starred, and the mean's bootstrap
    interval shaded where the table has its bounds."""
    low, high = bound_names(metric)
    for method, part in sweep.groupby("method", sort=False):
        style = styles[str(method)]
        values = part[metric] * 100
        if {low, high} <= set(part.columns):
            ax.fill_between(part["threshold"], part[low] * 100, part[high] * 100, color=style["color"],
                            alpha=BAND_ALPHA, lw=0)
        ax.plot(part["threshold"], values, lw=1.4, ms=3.5, markevery=max(1, len(part) // 10), **style)
        best = values.idxmax()
        ax.plot(part.loc[best, "threshold"], values[best], color=style["color"], **BEST_MARK)
    name = sweep_metric_name(metric)
    kind = metric.partition("_")[0]
    ax.set_title(f"{name}: predicted box-union vs {COMPARED_WITH.get(kind, 'ground truth')}", fontsize=9)
    ax.set_xlabel(THRESHOLD_LABEL)
    ax.set_ylabel(f"{name} (%)")


def _box_accuracy_panel(ax, boxes: dict[str, dict], styles: dict[str, dict[str, str]]) -> None:
    """Box accuracy (v2: any predicted box counts) against the threshold, the mean over the IoU
    thresholds; MaxBoxAccV2 takes each IoU threshold at its own best heatmap threshold."""
    for method, acc in boxes.items():
        curves = acc["curves"]
        mean = np.mean([curves["v2"][delta] for delta in curves["v2"]], axis=0)
        ax.plot(curves["thresholds"], mean, lw=1.4, ms=3.5, markevery=max(1, len(mean) // 10), **styles[method])
    first = next(iter(boxes.values()))
    deltas = "/".join(str(d) for d in first["curves"]["v2"])
    ax.set_title(f"box accuracy, all {counted(first['num_images'], 'image')} (MaxBoxAccV2 in the legend:\n"
                 f"mean over IoU {deltas} of each one's best threshold)", fontsize=9)
    ax.set_xlabel(THRESHOLD_LABEL)
    ax.set_ylabel(f"BoxAcc v2, mean over IoU {deltas} (%)")


def _pxap_panel(ax, pixels: dict[str, dict | str], styles: dict[str, dict[str, str]]) -> None:
    """PxAP's precision-recall curve of the pixels of all images, a line per method; a method
    without a curve is named in the panel with the reason."""
    missing = []
    for method, curve in pixels.items():
        if isinstance(curve, str):
            missing.append(f"{method}: {curve}")
            continue
        recall, precision = np.array(curve["recall"]) * 100, np.array(curve["precision"]) * 100
        ax.plot(recall, precision, lw=1.4, ms=3.5, markevery=max(1, len(recall) // 10), **styles[method])
    if missing:
        ax.text(0.02, 0.02, "no curve for " + "; ".join(missing), transform=ax.transAxes, fontsize=6, va="bottom")
    ax.set_title("PxAP: precision-recall of the pixels of all images\n(PxAP in the legend: area under the curve)",
                 fontsize=9)
    ax.set_xlabel("recall (% of ground-truth pixels)")
    ax.set_ylabel("precision (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)


def _wsol_results(states: dict[str, dict[str, RunMetric]]) -> tuple[dict[str, dict], dict[str, dict | str]]:
    """Each method's BoxAccuracy result and its PxAP result (or why it has none); no PxAP
    entries where the sweep has no masks."""
    boxes, pixels = {}, {}
    for method, named in states.items():
        boxes[method] = named[BOX_STATE].compute()
        if PXAP_STATE in named:
            try:
                pixels[method] = named[PXAP_STATE].compute()
            except ValueError as exc:  # no ground-truth pixel, or no pixel above the lowest threshold
                pixels[method] = str(exc)
    return boxes, pixels


def _method_key(method: str, style: dict[str, str], boxes: dict[str, dict], pixels: dict[str, dict | str]
                ) -> Line2D:
    """The legend entry of one method, with its MaxBoxAccV2 and PxAP where the figure has them."""
    values = []
    if method in boxes:
        values.append(f"MaxBoxAccV2 {boxes[method]['maxboxacc_v2']:.1f}")
    if isinstance(pixels.get(method), dict):
        values.append(f"PxAP {pixels[method]['pxap']:.1f}")
    label = f"{method} ({', '.join(values)})" if values else method
    return Line2D([], [], lw=1.4, ms=4, label=label, **style)


def _sweep_subtitle(sweep: pd.DataFrame) -> str:
    """Which images the IoU panels average over."""
    counts = sorted({int(n) for n in sweep["n_images"]})
    count = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    image_filter = str(sweep["filter"].iloc[0]) if "filter" in sweep else "all"
    return (f"IoU panels: mean over {count} {FILTER_WORDS.get(image_filter, 'images')} "
            f"(metric.image_filter={image_filter})")


def plot_sweep(sweep: pd.DataFrame, path: Path, metrics: tuple[str, ...] = SWEEP_METRICS, *,
               states: dict[str, dict[str, RunMetric]] | None = None, title: str | None = None,
               level: float | None = None) -> Path:
    """Save the threshold sweep: a panel per sweep table column of `metrics` present (mean
    score against the heatmap threshold, a line per method, each method's best threshold
    starred) and, given the sweep's metric states (`states`: per method the metrics of
    states/sweep.json), a box-accuracy panel and a PxAP precision-recall panel, with
    MaxBoxAccV2 and PxAP in the legend. Methods keep one style (`method_style`) in every panel.
    Where the table has the bounds of a column, its panel shades each method's bootstrap
    interval (`level` names it in the legend)."""
    present = [m for m in metrics if m in sweep.columns]
    if not present:
        raise ValueError(f"sweep table has none of the columns {metrics}")
    boxes, pixels = _wsol_results(states) if states else ({}, {})
    methods = list(dict.fromkeys([*map(str, sweep["method"]), *boxes]))
    styles = {method: method_style(i) for i, method in enumerate(methods)}
    key = [_method_key(m, styles[m], boxes, pixels) for m in methods]
    key.append(Line2D([], [], color="grey", label="best threshold of each method\n(highest mean IoU)",
                      **BEST_MARK))
    if any(set(bound_names(m)) <= set(sweep.columns) for m in present):
        interval = f"{level:.0%} bootstrap interval" if level is not None else "bootstrap interval"
        key.append(Patch(color="grey", alpha=BAND_ALPHA * 2, label=f"shaded: {interval}\nof the mean over images"))
    # The legend sits right of the panels, in a strip as wide as its longest line needs.
    legend_in = 0.9 + LEGEND_CHAR_IN * max(len(line) for k in key for line in k.get_label().splitlines())
    panels = len(present) + bool(boxes) + bool(pixels)
    cols, rows = min(2, panels), math.ceil(panels / 2)
    width, height = SWEEP_PANEL_IN[0] * cols + legend_in, SWEEP_PANEL_IN[1] * rows + 0.6
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    flat = list(axes.flat)
    for ax, metric in zip(flat, present):
        _iou_panel(ax, sweep, metric, styles)
    if boxes:
        _box_accuracy_panel(flat[len(present)], boxes, styles)
    if pixels:
        _pxap_panel(flat[panels - 1], pixels, styles)
    for ax in flat[panels:]:
        ax.axis("off")  # an odd number of panels leaves one place empty
    for ax in flat[:panels]:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title or 'Threshold sweep: scores at every heatmap threshold'}\n{_sweep_subtitle(sweep)}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - legend_in / width, 1))
    fig.legend(handles=key, loc="center left", bbox_to_anchor=(1 - (legend_in - 0.1) / width, 0.5), fontsize=7,
               title="method", title_fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
    return path
