"""Rankings across measures (docs/protocol.md 7.3): each method's rank on every ranked measure,
its median rank over them (as LATEC aggregates), each with its bootstrap interval, and how far
the measures agree on the order of the methods (Kendall's tau, with its interval).

A measure is ranked when its scorer says which way is better (`MeasureTables.better`). The
bootstrap replicate r of every measure is the same resample of the images (per-image measures
resampled by `Replicates`, dataset-level ones from their replicate states), so the ranks of
replicate r are those a rerun on that resample would give, and their median's spread is the
ranking's own uncertainty.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, rankdata

from wsol_bench.errors import SettingError
from wsol_bench.metrics.bootstrap import bound_names, percentile_interval, percentile_intervals
from wsol_bench.report.replicated import ReplicatedMeasure

MEDIAN_RANK = "median rank"
AGREEMENT_COLUMNS = ["measure_a", "measure_b", "kendall_tau", "n_methods"]


def ranks(values: np.ndarray, better: str) -> np.ndarray:
    """Ranks of the methods' `values` [..., M] along the last axis, 1 the best (`better`:
    "higher" or "lower"), ties sharing their average rank; NaN values are not ranked (NaN)."""
    if better not in ("higher", "lower"):
        raise SettingError(f"a measure is better 'higher' or 'lower', not {better!r}")
    values = np.asarray(values, dtype=np.float64)
    signed = -values if better == "higher" else values
    return rankdata(signed, axis=-1, method="average", nan_policy="omit")


def measure_values(wides: dict[str, pd.DataFrame], replicated: dict[str, ReplicatedMeasure],
                   better: dict[str, str], methods: list[str], method_means: dict[str, np.ndarray] | None
                   ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """{ranked measure: (values [M], replicate values [R, M] or None)} in the order of `methods`
    (NaN where a method has no value): per-image measures (`wides`: images x methods) as the
    mean over each method's scored images, with `method_means` (`method_replicate_means`) as
    their replicates; dataset-level ones as their scorer computed them."""
    found = {}
    for measure, wide in wides.items():
        if measure not in better:
            continue
        values = wide.mean().reindex(methods).to_numpy(float)
        reps = None
        if method_means is not None and measure in method_means:  # a measure without images has none
            reps = pd.DataFrame(method_means[measure], columns=wide.columns).reindex(columns=methods).to_numpy(float)
        found[measure] = (values, reps)
    for measure, given in replicated.items():
        if measure in better:
            values = given.values.reindex(methods).to_numpy(float)
            reps = given.replicates.reindex(columns=methods).to_numpy(float) if method_means is not None else None
            found[measure] = (values, reps)
    return found


def ranking_table(wides: dict[str, pd.DataFrame], replicated: dict[str, ReplicatedMeasure],
                  better: dict[str, str], methods: list[str], method_means: dict[str, np.ndarray] | None,
                  level: float | None) -> pd.DataFrame:
    """One row per method, best first: its rank on every ranked measure (1 the best), its median
    rank over them and, with replicates (`method_means`, and the dataset-level measures' own),
    the bootstrap interval of each rank and of the median rank ("<column> ci_lo", "<column>
    ci_hi", right after the column). Empty without a ranked measure."""
    found = measure_values(wides, replicated, better, methods, method_means)
    if not found:
        return pd.DataFrame(columns=["method", MEDIAN_RANK])
    table = pd.DataFrame({measure: ranks(values, better[measure]) for measure, (values, _) in found.items()},
                         index=pd.Index(methods, name="method"))
    table[MEDIAN_RANK] = _nanmedian(table.to_numpy(float))
    resamples = next((reps.shape[0] for _, reps in found.values() if reps is not None), None)
    if resamples is not None and level is not None:
        missing = np.full((resamples, len(methods)), np.nan)  # a measure without replicates ranks nobody
        replicate_ranks = np.stack([ranks(missing if reps is None else reps, better[m])
                                    for m, (_, reps) in found.items()])  # [K, R, M]
        medians = _nanmedian(np.moveaxis(replicate_ranks, 0, -1))  # [R, M]
        bounds = {}
        for k, measure in enumerate(found):
            bounds[measure] = percentile_intervals(replicate_ranks[k], level)
        bounds[MEDIAN_RANK] = percentile_intervals(medians, level)
        for column in list(table.columns):
            low, high = bound_names(column)
            at = table.columns.get_loc(column) + 1
            table.insert(at, low, bounds[column][0])
            table.insert(at + 1, high, bounds[column][1])
    order = table[MEDIAN_RANK].to_numpy(float)
    return table.iloc[np.argsort(np.where(np.isnan(order), np.inf, order), kind="stable")].reset_index()


def _nanmedian(values: np.ndarray) -> np.ndarray:
    """The median along the last axis, NaN left out; NaN where nothing is left (no warning)."""
    values = np.asarray(values, dtype=np.float64)
    has_any = ~np.isnan(values).all(axis=-1)
    filled = np.where(has_any[..., None], values, 0.0)
    return np.where(has_any, np.nanmedian(filled, axis=-1), np.nan)


def agreement_table(wides: dict[str, pd.DataFrame], replicated: dict[str, ReplicatedMeasure],
                    better: dict[str, str], methods: list[str], method_means: dict[str, np.ndarray] | None = None,
                    level: float | None = None) -> pd.DataFrame:
    """Kendall's tau-b between the method orderings of every pair of ranked measures (both
    oriented so that better is higher: 1 = the same order, -1 = reversed), over the methods
    both measured; NaN with fewer than 3 such methods or a measure that ties them all. With
    replicates (`method_means`, the dataset-level measures' own) and a `level`, the bootstrap
    interval of each tau ("kendall_tau ci_lo", "kendall_tau ci_hi"): tau-b of every replicate's
    two orderings (a replicate where tau is undefined is left out)."""
    found = measure_values(wides, replicated, better, methods, method_means)
    sign = {m: 1.0 if better[m] == "higher" else -1.0 for m in found}
    oriented = {m: sign[m] * values for m, (values, _) in found.items()}
    intervals = level is not None and method_means is not None
    rows = []
    for a, b in itertools.combinations(oriented, 2):
        both = ~np.isnan(oriented[a]) & ~np.isnan(oriented[b])
        tau = math.nan
        if both.sum() >= 3 and np.ptp(oriented[a][both]) > 0 and np.ptp(oriented[b][both]) > 0:
            tau = float(kendalltau(oriented[a][both], oriented[b][both]).statistic)
        row = {"measure_a": a, "measure_b": b, "kendall_tau": tau}
        if intervals:
            reps_a, reps_b = found[a][1], found[b][1]
            replicate_taus = np.full(1, math.nan) if reps_a is None or reps_b is None else \
                kendall_tau_b(sign[a] * reps_a, sign[b] * reps_b)
            row.update(zip(bound_names("kendall_tau"), percentile_interval(replicate_taus, level)))
        rows.append({**row, "n_methods": int(both.sum())})
    columns = AGREEMENT_COLUMNS if not intervals else \
        [*AGREEMENT_COLUMNS[:3], *bound_names("kendall_tau"), *AGREEMENT_COLUMNS[3:]]
    return pd.DataFrame(rows, columns=columns)


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of every row pair of `x` and `y` [R, M] (as scipy's `kendalltau`), over
    the columns where both are not NaN: (concordant - discordant) / sqrt((pairs not tied in x)
    x (pairs not tied in y)); NaN for a row with fewer than 3 such columns or one side all
    tied. Vectorised over the rows: a run's 1,000 replicates at once."""
    x, y = np.atleast_2d(np.asarray(x, dtype=np.float64)), np.atleast_2d(np.asarray(y, dtype=np.float64))
    i, j = np.triu_indices(x.shape[1], k=1)
    valid = ~(np.isnan(x) | np.isnan(y))
    pair = valid[:, i] & valid[:, j]
    with np.errstate(invalid="ignore"):
        sx = np.where(pair, np.sign(x[:, i] - x[:, j]), 0.0)
        sy = np.where(pair, np.sign(y[:, i] - y[:, j]), 0.0)
        denominator = np.sqrt((sx != 0).sum(1) * (sy != 0).sum(1))
        tau = (sx * sy).sum(1) / denominator
    defined = (valid.sum(1) >= 3) & (denominator > 0)
    return np.where(defined, tau, math.nan)
