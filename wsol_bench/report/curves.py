"""Figure of the mean pixel-perturbation curves per method (MoRF solid, LeRF dashed; or the
deletion / insertion curves), built from faithfulness record rows."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.lines import Line2D

from wsol_bench.files import save_figure

CURVE_COLUMN = re.compile(r"^(morf|lerf|deletion|insertion)_(\d+)$")
LINE_STYLES = {"morf": "-", "lerf": "--", "deletion": "-", "insertion": ":"}
CURVE_LABELS = {"morf": "MoRF", "lerf": "LeRF", "deletion": "deletion", "insertion": "insertion"}


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


def plot_perturbation_curves(frame: pd.DataFrame, path: str | Path, *, title: str | None = None) -> Path:
    """Save the mean curve of every method in `frame` (one row per image and method, with a
    `method` column and step columns such as morf_00..morf_10) against the fraction of pixels
    perturbed; the legend gives each method's mean ABPC (or AUCs) in percent."""
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
    count = steps.pop()
    fractions = [i / (count - 1) for i in range(count)]
    curves = [c for c in LINE_STYLES if c in columns]

    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, rows) in enumerate(frame.groupby("method", sort=False)):
        colour = colours[i % len(colours)]
        label = _method_label(str(method), rows, curves)
        for curve in curves:  # one legend entry per method, on its first curve
            ax.plot(fractions, rows[columns[curve]].mean().to_numpy(), LINE_STYLES[curve], color=colour,
                    marker=".", label=label if curve == curves[0] else None)
    method_legend = ax.legend(loc="upper right", fontsize=8)
    ax.add_artist(method_legend)
    ax.legend(handles=[Line2D([], [], color="grey", linestyle=LINE_STYLES[c], label=CURVE_LABELS[c])
                       for c in curves], loc="lower left", fontsize=8)
    removed = [c for c in curves if c != "insertion"]
    ax.set_xlabel("fraction of pixels " + ("removed / inserted" if removed and "insertion" in curves
                                           else "removed" if removed else "inserted"))
    ax.set_ylabel("probability of the target class")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_title(title or "Mean perturbation curves", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    plt.close(fig)
    return path
