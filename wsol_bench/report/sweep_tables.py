"""sweep.csv and wsoleval.csv, built from the metric states a run folder keeps
(`states/sweep.json`): the run writes them this way, and `wsol-bench-report` rebuilds them the
same way from the folder alone."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from wsol_bench.errors import InputFileError
from wsol_bench.metrics.base import RunMetric, load_states
from wsol_bench.metrics.box_accuracy import BoxAccuracy
from wsol_bench.metrics.pxap import PxAP
from wsol_bench.metrics.sweep import SweepMeans

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
