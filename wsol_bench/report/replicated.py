"""Dataset-level measures with bootstrap replicates (MaxBoxAcc, PxAP, the segmentation totals;
docs/protocol.md 7.1): each method's value, its replicates from the run's replicate states
(`metrics.replicate_sums`), and the interval bounds the tables show."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wsol_bench.errors import InputFileError
from wsol_bench.metrics.bootstrap import BootstrapSettings, bound_names, percentile_interval
from wsol_bench.metrics.replicate_sums import ReplicateSums


@dataclass
class ReplicatedMeasure:
    """One dataset-level table column: per method its value, its bootstrap replicates (rows:
    replicates, columns: methods) and the number of images it was measured on."""

    values: pd.Series
    replicates: pd.DataFrame
    images: pd.Series


def check_replicate_settings(sums: dict[str, dict[str, ReplicateSums]], settings: BootstrapSettings,
                             path: Path, resamples_key: str = "report.resamples") -> None:
    """The replicate states must be drawn as the run's settings say (`resamples_key`,
    `report.seed`): replicate r of every measure is then the same resample of the images."""
    for method, named in sums.items():
        for name, metric in named.items():
            if (metric.resamples, metric.seed) != (settings.resamples, settings.seed):
                raise InputFileError(f"{path}: {method}/{name} holds {metric.resamples} replicates of seed "
                                     f"{metric.seed}, but the run's config.yaml says {resamples_key}="
                                     f"{settings.resamples}, report.seed={settings.seed}; restore config.yaml, "
                                     "or rerun the benchmark into this folder")


def replicate_columns(sums: dict[str, dict[str, ReplicateSums]], name: str,
                      values: Callable[[np.ndarray], dict[str, np.ndarray]]) -> dict[str, pd.DataFrame]:
    """{value column: replicates x methods} of the measure `name` of every method that has it,
    `values` turning the summed contributions [R, width] into each column's replicates [R]."""
    per_method = {method: values(named[name].totals()) for method, named in sums.items() if name in named}
    columns = next(iter(per_method.values()), {})
    return {column: pd.DataFrame({method: found[column] for method, found in per_method.items()})
            for column in columns}


def interval_bounds(replicates: dict[str, pd.DataFrame], level: float) -> pd.DataFrame:
    """The percentile interval bounds per method (the index) of each column's replicates, as
    columns "<column> ci_lo", "<column> ci_hi"."""
    bounds = {}
    for column, frame in replicates.items():
        low, high = bound_names(column)
        found = {method: percentile_interval(frame[method].to_numpy(float), level) for method in frame.columns}
        bounds[low] = pd.Series({m: b[0] for m, b in found.items()}, dtype=float)
        bounds[high] = pd.Series({m: b[1] for m, b in found.items()}, dtype=float)
    return pd.DataFrame(bounds).rename_axis("method")
