"""Rankings across measures (docs/protocol.md 7.3): ranks per measure with their direction,
the median rank and its bootstrap interval, Kendall's tau between measures, checked on hand
cases and on a direct recomputation of every replicate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau

from wsol_bench.errors import SettingError
from wsol_bench.metrics.bootstrap import BootstrapSettings, Replicates
from wsol_bench.report.comparisons import method_replicate_means, wide_values
from wsol_bench.report.rankings import agreement_table, kendall_tau_b, ranking_table, ranks
from wsol_bench.report.replicated import ReplicatedMeasure

METHODS = ["a", "b", "c"]


def _long(values: dict[str, list[float]], ids: list[str]) -> pd.DataFrame:
    """Per-image values (image_id, method, value) of each method."""
    return pd.concat([pd.DataFrame({"image_id": ids, "method": m, "value": v}) for m, v in values.items()],
                     ignore_index=True)


def _wides(per_image: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    return {name: wide_values(values) for name, values in per_image.items()}


def test_ranks_follow_the_direction_share_ties_and_skip_missing():
    assert ranks(np.array([0.2, 0.9, 0.5]), "higher").tolist() == [3, 1, 2]
    assert ranks(np.array([0.2, 0.9, 0.5]), "lower").tolist() == [1, 3, 2]
    assert ranks(np.array([1.0, 1.0, 0.0]), "higher").tolist() == [1.5, 1.5, 3]
    found = ranks(np.array([0.3, np.nan, 0.1]), "higher")
    assert found[0] == 1 and np.isnan(found[1]) and found[2] == 2
    with pytest.raises(SettingError, match="'higher' or 'lower'"):
        ranks(np.array([1.0]), "up")


def test_ranking_table_by_hand():
    """IoU (higher better): a 0.5, b 0.8, c 0.2 -> ranks 2, 1, 3; AUC (lower better): a 0.1,
    b 0.4, c 0.3 -> 1, 3, 2; MaxBoxAccV2 (higher): a 70, b 50, c 60 -> 1, 3, 2. Median ranks:
    a 1, b 3, c 2."""
    ids = ["i0", "i1"]
    per_image = {"IoU": _long({"a": [0.4, 0.6], "b": [0.8, 0.8], "c": [0.1, 0.3]}, ids),
                 "AUC": _long({"a": [0.1, 0.1], "b": [0.3, 0.5], "c": [0.3, 0.3]}, ids)}
    replicated = {"MaxBoxAccV2": ReplicatedMeasure(pd.Series({"a": 70.0, "b": 50.0, "c": 60.0}),
                                                   pd.DataFrame({"a": [70.0], "b": [50.0], "c": [60.0]}),
                                                   pd.Series({"a": 2, "b": 2, "c": 2}))}
    better = {"IoU": "higher", "AUC": "lower", "MaxBoxAccV2": "higher"}
    table = ranking_table(_wides(per_image), replicated, better, METHODS, None, None).set_index("method")
    assert table.loc[["a", "b", "c"], "IoU"].tolist() == [2, 1, 3]
    assert table.loc[["a", "b", "c"], "AUC"].tolist() == [1, 3, 2]
    assert table.loc[["a", "b", "c"], "median rank"].tolist() == [1, 3, 2]
    assert list(table.index) == ["a", "c", "b"]  # best first
    unranked = ranking_table(_wides(per_image), {}, {"AUC": "lower"}, METHODS, None, None)
    assert list(unranked.columns) == ["method", "AUC", "median rank"]  # IoU has no direction: not ranked


def _three_measures(methods: list[str]) -> tuple[list[str], dict[str, pd.DataFrame], dict[str, str]]:
    """30 images' values of three measures whose orderings of `methods` differ."""
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(30)]
    shifts = {"m1": np.linspace(0, 0.6, len(methods)), "m2": np.roll(np.linspace(0, 0.6, len(methods)), 1),
              "m3": np.linspace(0.2, 0, len(methods))}
    per_image = {name: _long({m: rng.normal(shift, 1.0, len(ids)).tolist() for m, shift in zip(methods, found)}, ids)
                 for name, found in shifts.items()}
    return ids, per_image, {"m1": "higher", "m2": "higher", "m3": "lower"}


def _replicate_means(per_image: dict[str, pd.DataFrame], ids: list[str], methods: list[str],
                     weights: np.ndarray) -> dict[str, np.ndarray]:
    """Each measure's per-method means on one resample (image i counted weights[i] times)."""
    out = {}
    for name, values in per_image.items():
        wide = values.pivot(index="image_id", columns="method", values="value").loc[ids, methods]
        out[name] = weights @ wide.to_numpy() / weights.sum()
    return out


def test_rank_intervals_equal_a_direct_recomputation_of_every_replicate():
    """Each measure's rank and the median rank get the percentile interval of their values
    in the replicates, every replicate recomputed here from the resampled means."""
    ids, per_image, better = _three_measures(METHODS)
    settings = BootstrapSettings(resamples=200, seed=3)
    replicates = Replicates(ids, settings)
    wides = _wides(per_image)
    table = ranking_table(wides, {}, better, METHODS, method_replicate_means(wides, replicates), 0.9)
    table = table.set_index("method")
    assert list(table.columns[:3]) == ["m1", "m1 ci_lo", "m1 ci_hi"]
    per_measure = {name: [] for name in per_image}
    for r in range(settings.resamples):
        for name, means in _replicate_means(per_image, ids, METHODS, replicates.weights[r].astype(float)).items():
            per_measure[name].append(ranks(means, better[name]))
    found = {name: np.array(rows) for name, rows in per_measure.items()}
    found["median rank"] = np.median(np.stack(list(found.values())), axis=0)
    for column, rows in found.items():
        for j, method in enumerate(METHODS):
            lo, hi = np.quantile(rows[:, j], [0.05, 0.95])
            assert table.loc[method, f"{column} ci_lo"] == pytest.approx(lo), (column, method)
            assert table.loc[method, f"{column} ci_hi"] == pytest.approx(hi), (column, method)


def test_kendall_tau_interval_equals_scipys_tau_on_every_replicate():
    methods = ["a", "b", "c", "d", "e"]
    ids, per_image, better = _three_measures(methods)
    settings = BootstrapSettings(resamples=150, seed=1)
    replicates = Replicates(ids, settings)
    wides = _wides(per_image)
    table = agreement_table(wides, {}, better, methods, method_replicate_means(wides, replicates), 0.9)
    assert list(table.columns) == ["measure_a", "measure_b", "kendall_tau", "kendall_tau ci_lo", "kendall_tau ci_hi",
                                   "n_methods"]
    taus = {pair: [] for pair in (("m1", "m2"), ("m1", "m3"), ("m2", "m3"))}
    for r in range(settings.resamples):
        means = _replicate_means(per_image, ids, methods, replicates.weights[r].astype(float))
        oriented = {name: v if better[name] == "higher" else -v for name, v in means.items()}
        for a, b in taus:
            taus[(a, b)].append(kendalltau(oriented[a], oriented[b]).statistic)
    for row in table.itertuples(index=False):
        lo, hi = np.quantile(taus[(row.measure_a, row.measure_b)], [0.05, 0.95])
        assert (row[3], row[4]) == pytest.approx((lo, hi)), (row.measure_a, row.measure_b)
    assert "kendall_tau ci_lo" not in agreement_table(wides, {}, better, methods)  # no replicates, no bounds


def test_vectorised_tau_b_equals_scipy_with_ties_and_missing_values():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 4, size=(300, 6)).astype(float)
    y = rng.integers(0, 4, size=(300, 6)).astype(float)
    x[rng.uniform(size=x.shape) < 0.15] = np.nan
    found = kendall_tau_b(x, y)
    for r in range(len(x)):
        both = ~np.isnan(x[r]) & ~np.isnan(y[r])
        if both.sum() >= 3 and np.ptp(x[r][both]) > 0 and np.ptp(y[r][both]) > 0:
            assert found[r] == pytest.approx(kendalltau(x[r][both], y[r][both]).statistic, abs=1e-12), r
        else:
            assert np.isnan(found[r]), r


def test_kendall_tau_between_measures_by_hand():
    """Orders a > b > c and a > c > b: 2 concordant pairs, 1 discordant -> tau = 1/3; a
    lower-is-better measure is turned around first."""
    ids = ["i0"]
    per_image = {"x": _long({"a": [3.0], "b": [2.0], "c": [1.0]}, ids),
                 "y": _long({"a": [3.0], "b": [1.0], "c": [2.0]}, ids),
                 "z": _long({"a": [1.0], "b": [2.0], "c": [3.0]}, ids)}
    table = agreement_table(_wides(per_image), {}, {"x": "higher", "y": "higher", "z": "lower"}, METHODS)
    tau = {(row.measure_a, row.measure_b): row.kendall_tau for row in table.itertuples()}
    assert tau[("x", "y")] == pytest.approx(1 / 3)
    assert tau[("x", "z")] == pytest.approx(1.0)
    assert (table["n_methods"] == 3).all()


def test_a_measure_without_images_is_ranked_nowhere():
    """A measure whose images are all filtered out (no image correctly classified) has no
    values and no replicates: its ranks are missing, the others still rank the methods."""
    ids = ["i0", "i1", "i2"]
    per_image = {"IoU": _long({"a": [0.5] * 3, "b": [0.2] * 3, "c": [0.9] * 3}, ids),
                 "empty": pd.DataFrame({"image_id": pd.Series([], dtype=str), "method": pd.Series([], dtype=str),
                                        "value": pd.Series([], dtype=float)})}
    wides = _wides(per_image)
    replicates = Replicates(ids, BootstrapSettings(resamples=20))
    table = ranking_table(wides, {}, {"IoU": "higher", "empty": "higher"}, METHODS,
                          method_replicate_means(wides, replicates), 0.95).set_index("method")
    assert table["empty"].isna().all()
    assert table.loc[["c", "a", "b"], "median rank"].tolist() == [1, 2, 3]
