"""Paired comparisons between the methods of one run (docs/protocol.md 7.2): for every measure
that averages per-image scores and every pair of methods, the difference of their means on the
images both scored, its paired bootstrap interval (the same resampled images for both methods,
so what the images share cancels), a bootstrap p-value and Holm's correction over the pairs of
that measure."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from wsol_bench.metrics.bootstrap import Replicates, percentile_interval

COLUMNS = ["measure", "method_a", "method_b", "n_images", "mean_a", "mean_b", "difference", "ci_lo", "ci_hi",
           "p_value", "p_holm", "significant"]


def bootstrap_p_value(replicates: np.ndarray) -> float:
    """Two-sided p-value of "the difference is 0" from its bootstrap replicates: twice the
    smaller share of replicates on either side of 0 (counting ties half), at most 1."""
    finite = replicates[~np.isnan(replicates)]
    if finite.size == 0:
        return math.nan
    below = (finite < 0).mean() + 0.5 * (finite == 0).mean()
    return float(min(1.0, 2 * min(below, 1 - below)))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN): controls the family-wise error rate
    of the family given, here the pairs of one measure."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running, m = 0.0, len(order)
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def wide_values(values: pd.DataFrame) -> pd.DataFrame:
    """Per-image values as images x methods (methods in their order of appearance)."""
    wide = values.pivot_table(index="image_id", columns="method", values="value", aggfunc="first", sort=False)
    return wide.reindex(columns=list(dict.fromkeys(values["method"])))


def pair_rows(measure: str, wide: pd.DataFrame, replicates: Replicates, level: float,
              method_replicates: np.ndarray | None = None) -> list[dict]:
    """The comparison rows of every pair of methods on one measure's per-image values `wide`
    (images x methods), each pair on the images both scored. `method_replicates` [R, M]: the
    methods' replicate means when every method scored every image (computed with the other
    measures on the same images, in one pass), else each pair is resampled on its own images."""
    rows = []
    methods = list(wide.columns)
    for (i, a), (j, b) in itertools.combinations(enumerate(methods), 2):
        both = wide[[a, b]].dropna()
        if both.empty:
            continue
        if method_replicates is not None:
            difference = method_replicates[:, i] - method_replicates[:, j]
        else:
            means = replicates.means(both.index.tolist(), both.to_numpy(float))  # [R, 2], the same draws for both
            difference = means[:, 0] - means[:, 1]
        lo, hi = percentile_interval(difference, level)
        rows.append({"measure": measure, "method_a": a, "method_b": b, "n_images": len(both),
                     "mean_a": float(both[a].mean()), "mean_b": float(both[b].mean()),
                     "difference": float(both[a].mean() - both[b].mean()), "ci_lo": lo, "ci_hi": hi,
                     "p_value": bootstrap_p_value(difference)})
    adjusted = holm([row["p_value"] for row in rows])
    alpha = 1 - level
    for row, p in zip(rows, adjusted):
        row["p_holm"] = p
        row["significant"] = int(not math.isnan(p) and p < alpha)
    return rows


def complete_replicates(wides: dict[str, pd.DataFrame], replicates: Replicates) -> dict[str, np.ndarray]:
    """The methods' replicate means [R, M] of every measure whose methods all scored all its
    images, measures on the same images resampled together in one pass (the costly part at
    50,000 images is reading the replicate counts, so they are read once per image set)."""
    groups: dict[tuple, list[str]] = {}
    for measure, wide in wides.items():
        if len(wide) and not wide.isna().to_numpy().any():
            groups.setdefault(tuple(wide.index), []).append(measure)
    found = {}
    for ids, measures in groups.items():
        stacked = np.concatenate([wides[m].to_numpy(float) for m in measures], axis=1)
        means = replicates.means(list(ids), stacked)
        offset = 0
        for measure in measures:
            width = wides[measure].shape[1]
            found[measure] = means[:, offset:offset + width]
            offset += width
    return found


def paired_comparisons(per_image: dict[str, pd.DataFrame], replicates: Replicates, level: float) -> pd.DataFrame:
    """One row per (measure, pair of methods): both means, their difference (a - b), its paired
    bootstrap interval at `level`, the bootstrap p-value and its Holm adjustment over the pairs
    of that measure, and whether the adjusted p-value is below 1 - level (`significant`)."""
    wides = {measure: wide_values(values) for measure, values in per_image.items()}
    complete = complete_replicates(wides, replicates)
    rows = [row for measure, wide in wides.items()
            for row in pair_rows(measure, wide, replicates, level, complete.get(measure))]
    return pd.DataFrame(rows, columns=COLUMNS)


def significance_matrix(comparisons: pd.DataFrame, measure: str) -> pd.DataFrame:
    """For one measure, methods x methods: "+" where the row's method is significantly higher
    than the column's (Holm-adjusted), "-" where lower, "=" where the interval holds 0."""
    rows = comparisons[comparisons["measure"] == measure]
    methods = list(dict.fromkeys([*rows["method_a"], *rows["method_b"]]))
    matrix = pd.DataFrame("", index=pd.Index(methods, name="method"), columns=methods, dtype=object)
    for row in rows.itertuples():
        mark = "=" if not row.significant else ("+" if row.difference > 0 else "-")
        flipped = {"+": "-", "-": "+", "=": "="}[mark]
        matrix.loc[row.method_a, row.method_b] = mark
        matrix.loc[row.method_b, row.method_a] = flipped
    return matrix
