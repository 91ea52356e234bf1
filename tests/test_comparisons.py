"""Paired comparisons between methods (docs/protocol.md 7.2): the paired bootstrap interval of a
difference, its p-value, Holm's adjustment, the significance matrix, and compare.csv of a run."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module

from wsol_bench.metrics.bootstrap import BootstrapSettings, Replicates
from wsol_bench.report.comparisons import (
    bootstrap_p_value,
    holm,
    pair_rows,
    paired_comparisons,
    significance_matrix,
    wide_values,
)
from wsol_bench.run.run_tables import check_run
from wsol_bench.run.runner import run

IDS = [f"img_{i:03d}" for i in range(200)]


def long_frame(values: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame({"image_id": IDS[:len(v)], "method": m, "value": v}) for m, v in values.items()])


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04: 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 1 x 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, math.nan, 0.9]) == pytest.approx([1.0, math.nan, 1.0], nan_ok=True)


def test_bootstrap_p_value():
    assert bootstrap_p_value(np.array([0.1, 0.2, 0.3])) == 0.0
    assert bootstrap_p_value(np.array([-1.0, 1.0])) == 1.0
    assert bootstrap_p_value(np.zeros(5)) == 1.0  # ties count half on each side
    assert bootstrap_p_value(np.array([-1.0, 1.0, 2.0, 3.0])) == 0.5


def test_pairing_cancels_what_the_images_share():
    """b = a + 0.5 on every image, images spread over [0, 100]: the methods' own intervals
    overlap widely, but the paired difference is exactly -0.5 in every replicate."""
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 100, len(IDS))
    values = long_frame({"a": a, "b": a + 0.5, "c": a.copy()})
    replicates = Replicates(IDS, BootstrapSettings(resamples=500))
    table = paired_comparisons({"score": values}, replicates, 0.95).set_index(["method_a", "method_b"])
    ab = table.loc[("a", "b")]
    assert ab["difference"] == pytest.approx(-0.5) and ab["n_images"] == len(IDS)
    assert (ab["ci_lo"], ab["ci_hi"]) == pytest.approx((-0.5, -0.5)) and ab["significant"] == 1
    own_a, own_b = (replicates.intervals(IDS, v[:, None]) for v in (a, a + 0.5))
    assert own_a[1][0] > own_b[0][0]  # the unpaired intervals overlap
    ac = table.loc[("a", "c")]
    assert ac["difference"] == 0 and ac["p_value"] == 1.0 and ac["significant"] == 0
    matrix = significance_matrix(table.reset_index(), "score")
    assert matrix.loc["a", "b"] == "-" and matrix.loc["b", "a"] == "+" and matrix.loc["a", "c"] == "="


def test_pairs_use_the_images_both_methods_scored():
    a = np.arange(10, dtype=float)
    b = a + 1
    b[:4] = np.nan  # b did not score four images
    values = long_frame({"a": a, "b": b})
    table = paired_comparisons({"score": values}, Replicates(IDS[:10], BootstrapSettings(resamples=50)), 0.9)
    row = table.iloc[0]
    assert row["n_images"] == 6 and row["mean_a"] == pytest.approx(a[4:].mean()) and row["difference"] == -1


def test_a_run_writes_compare_csv(tmp_path):
    out = tmp_path / "run"
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "dataset.params.num_images=12", "batch_size=6", "gallery_images=0", "progress=false",
            "method=[rollout,random,center]", "run_name=test", f"store.root={tmp_path / 'cache'}",
            "measure=[sparseness]", "report.resamples=200"])
    run(cfg, out)
    compare = pd.read_csv(out / "compare.csv")
    measures = set(compare["measure"])
    assert {"IoU (box, t=0.5)", "Dice (mask, t=0.5)", "Sparseness"} <= measures
    assert len(compare) == 3 * len(measures)  # three pairs of three methods per measure
    sparse = compare[compare["measure"] == "Sparseness"].set_index(["method_a", "method_b"])
    rows = pd.read_csv(out / "sparseness.csv").pivot(index="image_id", columns="method", values="sparseness")
    assert sparse.loc[("rollout", "random"), "difference"] == pytest.approx((rows["rollout"] - rows["random"]).mean())
    assert (compare["ci_lo"] <= compare["difference"] + 1e-9).all() and (compare["difference"] <= compare["ci_hi"] + 1e-9).all()
    assert check_run(out) == []


def test_measures_resampled_together_equal_each_pair_resampled_alone():
    rng = np.random.default_rng(1)
    values = long_frame({m: rng.normal(size=len(IDS)) for m in ("a", "b", "c")})
    replicates = Replicates(IDS, BootstrapSettings(resamples=300))
    together = paired_comparisons({"x": values, "y": values.assign(value=values["value"] ** 2)}, replicates, 0.95)
    wide = wide_values(values)
    alone = pd.DataFrame(pair_rows("x", wide, replicates, 0.95))
    pd.testing.assert_frame_equal(together[together["measure"] == "x"].reset_index(drop=True), alone[together.columns],
                                  rtol=1e-12, atol=1e-12)
