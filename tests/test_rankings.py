"""Rankings across measures (docs/protocol.md 7.3): ranks per measure with their direction,
the median rank and its bootstrap interval, Kendall's tau between measures, checked on hand
cases and on a direct recomputation of every replicate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from wsol_bench.errors import SettingError
from wsol_bench.metrics.bootstrap import BootstrapSettings, Replicates
from wsol_bench.report.comparisons import method_replicate_means, wide_values
from wsol_bench.report.rankings import agreement_table, ranking_table, ranks
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


def test_median_rank_interval_equals_a_direct_recomputation_of_every_replicate():
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(30)]
    per_image = {name: _long({m: rng.normal(shift, 1.0, len(ids)).tolist() for m, shift in zip(METHODS, shifts)}, ids)
                 for name, shifts in (("m1", (0.0, 0.3, 0.6)), ("m2", (0.6, 0.0, 0.3)), ("m3", (0.2, 0.1, 0.0)))}
    better = {"m1": "higher", "m2": "higher", "m3": "lower"}
    settings = BootstrapSettings(resamples=200, seed=3)
    replicates = Replicates(ids, settings)
    wides = _wides(per_image)
    table = ranking_table(wides, {}, better, METHODS, method_replicate_means(wides, replicates), 0.9)
    table = table.set_index("method")
    medians = []
    for r in range(settings.resamples):
        weights = replicates.weights[r].astype(float)
        per_measure = []
        for name, values in per_image.items():
            wide = values.pivot(index="image_id", columns="method", values="value").loc[ids, METHODS]
            means = weights @ wide.to_numpy() / weights.sum()
            per_measure.append(ranks(means, better[name]))
        medians.append(np.median(np.stack(per_measure), axis=0))
    medians = np.array(medians)
    for j, method in enumerate(METHODS):
        lo, hi = np.quantile(medians[:, j], [0.05, 0.95])
        assert table.loc[method, "median rank ci_lo"] == pytest.approx(lo)
        assert table.loc[method, "median rank ci_hi"] == pytest.approx(hi)


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
