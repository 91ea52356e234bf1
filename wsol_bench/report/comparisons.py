"""Paired comparisons between the methods of one run (docs/protocol.md 7.2): for every measure
and every pair of methods, the difference of their means on the images both scored (of their
values, for a dataset-level measure), its paired bootstrap interval (the same resampled images
for both methods, so what the images share cancels), a bootstrap p-value and Holm's
correction over the pairs of that measure."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from wsol_bench.metrics.bootstrap import Replicates, percentile_interval
from wsol_bench.report.replicated import ReplicatedMeasure

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
    """Per-image values as images x methods (images and methods in their order of appearance;
    a repeated (image, method) keeps its first value; an image no method scored is left out)."""
    image_codes, images = pd.factorize(values["image_id"].astype(str))
    method_codes, methods = pd.factorize(values["method"])
    table = np.full((len(images), len(methods)), np.nan)
    # assigned last to first, so the first of a repeated pair is the one that stays
    table[image_codes[::-1], method_codes[::-1]] = values["value"].to_numpy(float)[::-1]
    wide = pd.DataFrame(table, index=pd.Index(images, name="image_id"), columns=pd.Index(methods, name="method"))
    return wide[wide.notna().any(axis=1).to_numpy()]


def pair_rows(measure: str, wide: pd.DataFrame, replicates: Replicates, level: float,
              method_replicates: np.ndarray | None = None,
              pair_means: dict[tuple[str, str], np.ndarray] | None = None) -> list[dict]:
    """The comparison rows of every pair of methods on one measure's per-image values `wide`
    (images x methods), each pair on the images both scored. `method_replicates` [R, M]: each
    method's replicate means over the images it scored (`method_replicate_means`), used for
    the pairs of methods that scored the same images; `pair_means`: the replicate means [R, 2]
    of the other pairs over the images both scored (`pair_replicate_means`). A pair found in
    neither is resampled on its own."""
    rows = []
    methods = list(wide.columns)
    scored = wide.notna()
    for (i, a), (j, b) in itertools.combinations(enumerate(methods), 2):
        both = wide[[a, b]].dropna()
        if both.empty:
            continue
        if pair_means is not None and (a, b) in pair_means:
            difference = pair_means[(a, b)][:, 0] - pair_means[(a, b)][:, 1]
        elif method_replicates is not None and scored[a].equals(scored[b]):
            difference = method_replicates[:, i] - method_replicates[:, j]
        else:
            means = replicates.means(both.index.tolist(), both.to_numpy(float))  # [R, 2], the same draws for both
            difference = means[:, 0] - means[:, 1]
        lo, hi = percentile_interval(difference, level)
        rows.append({"measure": measure, "method_a": a, "method_b": b, "n_images": len(both),
                     "mean_a": float(both[a].mean()), "mean_b": float(both[b].mean()),
                     "difference": float(both[a].mean() - both[b].mean()), "ci_lo": lo, "ci_hi": hi,
                     "p_value": bootstrap_p_value(difference)})
    return with_holm(rows, level)


def _by_images(wides: dict[str, pd.DataFrame]) -> dict[tuple, list[str]]:
    """The measures grouped by the images they hold (resampled together: the costly part at
    50,000 images is reading the replicate counts, so they are read once per image set)."""
    groups: dict[tuple, list[str]] = {}
    for measure, wide in wides.items():
        if len(wide):
            groups.setdefault(tuple(wide.index), []).append(measure)
    return groups


def method_replicate_means(wides: dict[str, pd.DataFrame], replicates: Replicates) -> dict[str, np.ndarray]:
    """Each measure's methods' replicate means [R, M], each method over the images it scored
    (NaN: not scored), the measures on the same images in one pass."""
    found = {}
    for ids, measures in _by_images(wides).items():
        means = replicates.means(list(ids), np.concatenate([wides[m].to_numpy(float) for m in measures], axis=1))
        offset = 0
        for measure in measures:
            width = wides[measure].shape[1]
            found[measure] = means[:, offset:offset + width]
            offset += width
    return found


def pair_replicate_means(wides: dict[str, pd.DataFrame], replicates: Replicates
                         ) -> dict[str, dict[tuple[str, str], np.ndarray]]:
    """For the pairs of methods that scored different images (a degenerate map, a skipped
    image): both methods' replicate means [R, 2] over the images both scored, every such pair
    of the measures on the same images in one pass. Pairs that scored the same images are
    not here: their methods' own replicate means are the pair's."""
    found: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    for ids, measures in _by_images(wides).items():
        columns, keys = [], []
        for measure in measures:
            wide = wides[measure]
            scored = wide.notna()
            for a, b in itertools.combinations(wide.columns, 2):
                both = scored[a] & scored[b]
                if both.any() and not scored[a].equals(scored[b]):
                    columns += [wide[a].where(both).to_numpy(float), wide[b].where(both).to_numpy(float)]
                    keys.append((measure, a, b))
        if keys:
            means = replicates.means(list(ids), np.column_stack(columns))
            for k, (measure, a, b) in enumerate(keys):
                found.setdefault(measure, {})[(a, b)] = means[:, 2 * k:2 * k + 2]
    return found


def replicated_pair_rows(measure: str, replicated: ReplicatedMeasure, level: float) -> list[dict]:
    """The comparison rows of every pair of methods on one dataset-level measure: the
    difference of their values and its interval from the difference of their replicates
    (replicate r of both is the same resample of the images: paired)."""
    rows = []
    methods = [m for m in replicated.values.index if m in replicated.replicates.columns]
    for a, b in itertools.combinations(methods, 2):
        value_a, value_b = float(replicated.values[a]), float(replicated.values[b])
        if math.isnan(value_a) or math.isnan(value_b):
            continue
        difference = replicated.replicates[a].to_numpy(float) - replicated.replicates[b].to_numpy(float)
        lo, hi = percentile_interval(difference, level)
        rows.append({"measure": measure, "method_a": a, "method_b": b,
                     "n_images": int(min(replicated.images[a], replicated.images[b])), "mean_a": value_a,
                     "mean_b": value_b, "difference": value_a - value_b, "ci_lo": lo, "ci_hi": hi,
                     "p_value": bootstrap_p_value(difference)})
    return with_holm(rows, level)


def with_holm(rows: list[dict], level: float) -> list[dict]:
    """The rows of one measure with their Holm-adjusted p-values (`p_holm`) and whether each is
    below 1 - level (`significant`)."""
    adjusted = holm([row["p_value"] for row in rows])
    for row, p in zip(rows, adjusted):
        row["p_holm"] = p
        row["significant"] = int(not math.isnan(p) and p < 1 - level)
    return rows


def paired_comparisons(per_image: dict[str, pd.DataFrame], replicates: Replicates, level: float,
                       replicated: dict[str, ReplicatedMeasure] | None = None, *,
                       wides: dict[str, pd.DataFrame] | None = None,
                       method_means: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """One row per (measure, pair of methods): both means (a dataset-level measure's values),
    their difference (a - b), its paired bootstrap interval at `level`, the bootstrap p-value
    and its Holm adjustment over the pairs of that measure, and whether the adjusted p-value is
    below 1 - level (`significant`). Per-image measures are resampled from `per_image`
    (`wides` and `method_means`: their `wide_values` and `method_replicate_means`, when the
    caller has them already); dataset-level ones (`replicated`) come with their replicates."""
    wides = {measure: wide_values(values) for measure, values in per_image.items()} if wides is None else wides
    method_means = method_replicate_means(wides, replicates) if method_means is None else method_means
    pairs = pair_replicate_means(wides, replicates)
    rows = [row for measure, wide in wides.items()
            for row in pair_rows(measure, wide, replicates, level, method_means.get(measure), pairs.get(measure))]
    rows += [row for measure, found in (replicated or {}).items()
             for row in replicated_pair_rows(measure, found, level)]
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
