"""sweep.csv and wsoleval.csv, built from the metric states a run folder keeps
(`states/sweep.json`): the run writes them this way, and `wsol-bench-report` rebuilds them the
same way from the folder alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from wsol_bench.errors import InputFileError
from wsol_bench.metrics.base import RunMetric, load_states
from wsol_bench.metrics.bootstrap import (
    bound_names,
    is_bound_column,
    percentile_interval,
    percentile_intervals,
)
from wsol_bench.metrics.box_accuracy import BoxAccuracy
from wsol_bench.metrics.pxap import PxAP
from wsol_bench.metrics.sweep import SweepMeans, curve_replicate_means

SWEEP_STATE = "sweep"  # the names of the metrics of one method in the state file
BOX_STATE = "box_accuracy"
PXAP_STATE = "pxap"
# name -> (class, whether every method has it): PxAP only where the dataset has masks
SWEEP_METRICS = {SWEEP_STATE: (SweepMeans, True), BOX_STATE: (BoxAccuracy, True), PXAP_STATE: (PxAP, False)}


def read_sweep_states(path: str | Path) -> dict[str, dict[str, RunMetric]]:
    """The metric states of a sweep (states/sweep.json), each state checked as it is read
    (`load_states`), and every method holding the metrics of a sweep, of their classes, at the
    same thresholds; otherwise an InputFileError naming the file."""
    states = load_states(path)
    for method, named in states.items():
        problem = _sweep_problem(named)
        if problem is not None:
            raise InputFileError(f"metric state file {path}: method {method} {problem}; rerun the benchmark into "
                                 "this folder to write it again")
    return states


def _sweep_problem(named: dict[str, RunMetric]) -> str | None:
    """What keeps one method's metrics from being a sweep's, or None."""
    for name, (cls, required) in SWEEP_METRICS.items():
        if name not in named and required:
            return f"has no {name} metric"
        if name in named and not isinstance(named[name], cls):
            return f"holds a {type(named[name]).__name__} as {name}, expected {cls.__name__}"
    unknown = sorted(set(named) - set(SWEEP_METRICS))
    if unknown:
        return f"holds metrics {unknown} a sweep does not write"
    grids = {name: metric.thresholds for name, metric in named.items()}
    if len(set(grids.values())) > 1:
        return f"has metrics at different thresholds ({', '.join(f'{n}: {len(t)}' for n, t in grids.items())})"
    return None


def sweep_table(states: dict[str, dict[str, RunMetric]], image_filter: str) -> pd.DataFrame:
    """One row per (method, threshold): the mean of every AG-CAM score over the images that
    `image_filter` keeps, with `n_images` and `filter` (methods that keep no image have no rows;
    no rows at all gives the header alone)."""
    frames = []
    for method, named in states.items():
        table = named[SWEEP_STATE].compute()[image_filter]
        if len(table):
            table = table.copy()
            table.insert(0, "method", method)
            table["filter"] = image_filter
            frames.append(table)
    if not frames:
        return pd.DataFrame(columns=["method", "threshold", "n_images", "filter"])
    return pd.concat(frames, ignore_index=True)


def curve_means(totals: dict[str, np.ndarray], states: dict[str, dict[str, RunMetric]]
                ) -> dict[str, dict[str, np.ndarray]]:
    """{method: {sweep table column: replicate means [R, T]}} from each method's summed curve
    contributions [R, width] (`metrics.sweep.curve_contributions`), at its sweep's thresholds."""
    out = {}
    for method, summed in totals.items():
        sweep = states[method][SWEEP_STATE]
        out[method] = curve_replicate_means(summed, sweep.columns, len(sweep.thresholds))
    return out


def with_curve_bounds(table: pd.DataFrame, means: dict[str, dict[str, np.ndarray]], level: float) -> pd.DataFrame:
    """sweep.csv's table with the percentile interval of every cell of the methods in `means`
    (`curve_means`) as "<column> ci_lo/hi" columns, each pair right after its column (NaN for a
    method without replicates)."""
    table = table.copy()
    columns = list(dict.fromkeys(c for found in means.values() for c in found))
    for column in columns:
        for bound in bound_names(column):
            table[bound] = np.nan
    for method, found in means.items():
        rows = np.flatnonzero(table["method"].to_numpy() == method)
        for column, replicates in found.items():
            if len(rows) != replicates.shape[1]:
                continue  # the filter kept no image of this method: it has no rows
            lo, hi = percentile_intervals(replicates, level)
            table.loc[table.index[rows], bound_names(column)[0]] = lo
            table.loc[table.index[rows], bound_names(column)[1]] = hi
    order = []
    for column in table.columns:
        if is_bound_column(column):
            continue
        order += [column, *(b for b in bound_names(column) if b in table.columns)]
    return table[order]


def best_iou_bounds(means: dict[str, dict[str, np.ndarray]], level: float) -> pd.DataFrame:
    """Per method (the index), the interval of each best mean IoU of wsoleval.csv (percent):
    the percentile interval of the replicates' highest mean over the thresholds, as columns
    "best_<column> ci_lo/hi"."""
    rows = {}
    for method, found in means.items():
        row = {}
        for column in (c for c in found if c.endswith("_iou")):
            best = found[column].max(axis=1) * 100  # NaN where a replicate drew no kept image
            row.update(zip(bound_names(f"best_{column}"), percentile_interval(best, level)))
        rows[method] = row
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("method")


def best_thresholds(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """For every IoU column of one method's sweep table, its highest mean (percent) and the
    threshold where it is reached (ties: the lowest threshold)."""
    best = {}
    for name in [c for c in table.columns if c.endswith("_iou")]:
        index = int(table[name].to_numpy().argmax())
        best[name] = {"threshold": float(table["threshold"].iloc[index]), "value": float(table[name].iloc[index]) * 100}
    return best


def wsoleval_table(states: dict[str, dict[str, RunMetric]], image_filter: str, *, dataset: str,
                   split: str) -> pd.DataFrame:
    """One row per method: MaxBoxAcc, MaxBoxAccV2 (and per IoU), Top-1 and GT-known Loc with
    their thresholds, PxAP (NaN without masks), and the best threshold of each sweep IoU."""
    rows = []
    for method, named in states.items():
        acc = named[BOX_STATE].compute()
        row = {"method": method, "dataset": dataset, "split": split, "boxes": acc["boxes"],
               "n_images": acc["num_images"], "n_without_gt_boxes": acc["num_without_gt_boxes"],
               "maxboxacc": acc["maxboxacc"], "maxboxacc_threshold": acc["maxboxacc_threshold"],
               "maxboxacc_v2": acc["maxboxacc_v2"]}
        for delta in acc["maxboxacc_v2_per_iou"]:
            row[f"maxboxacc_v2_iou{delta}"] = acc["maxboxacc_v2_per_iou"][delta]
            row[f"maxboxacc_v2_iou{delta}_threshold"] = acc["maxboxacc_v2_thresholds"][delta]
        row.update({"top1_loc": acc["top1_loc"], "gt_known_loc": acc["gt_known_loc"],
                    "loc_threshold": acc["loc_threshold"], "pxap": pxap_value(named.get(PXAP_STATE))})
        sweep = named[SWEEP_STATE].compute()[image_filter]
        if len(sweep):
            for name, best in best_thresholds(sweep).items():
                row[f"best_{name}"] = best["value"]
                row[f"best_{name}_threshold"] = best["threshold"]
        rows.append(row)
    return pd.DataFrame(rows)


def pxap_value(metric: RunMetric | None) -> float:
    """PxAP in percent; NaN without masks, or when no pixel reaches the lowest threshold (every
    map degenerate): there is no precision-recall curve to integrate."""
    if metric is None:
        return float("nan")
    try:
        return metric.compute()["pxap"]
    except ValueError:
        return float("nan")
