"""The tables' bootstrap intervals (docs/protocol.md 7.1): Poisson replicate counts that are a
function of the seed, the image id and the replicate alone; weighted means equal to a direct
resampling; intervals that agree with the multinomial bootstrap; and the intervals in a run's
tables, Markdown and report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from scipy import stats

from wsol_bench.errors import SettingError
from wsol_bench.metrics.bootstrap import (
    BootstrapSettings,
    Replicates,
    image_keys,
    mean_interval,
    percentile_interval,
    replicate_weights,
)
from wsol_bench.run.run_tables import check_run
from wsol_bench.run.runner import run

IDS = [f"img_{i:04d}" for i in range(300)]


def test_an_images_counts_depend_on_the_seed_and_its_id_alone():
    settings = BootstrapSettings(resamples=200, seed=3)
    whole = Replicates(IDS, settings)
    part = Replicates(list(reversed(IDS[100:150])), settings)  # another subset, another order
    for image_id in IDS[100:150]:
        assert np.array_equal(whole.weights[:, whole.columns([image_id])[0]], part.weights[:, part.columns([image_id])[0]])
    other_seed = Replicates(IDS, BootstrapSettings(resamples=200, seed=4))
    assert not np.array_equal(whole.weights, other_seed.weights)
    # the first replicates do not change when more are drawn
    more = replicate_weights(image_keys(IDS, 3), 500)
    assert np.array_equal(more[:200], whole.weights)


def test_counts_follow_poisson_one():
    counts = replicate_weights(image_keys([f"x{i}" for i in range(2000)], 0), 500).ravel()
    assert counts.mean() == pytest.approx(1.0, abs=0.01) and counts.var() == pytest.approx(1.0, abs=0.02)
    observed = np.bincount(counts, minlength=6)[:6] / counts.size
    expected = [math.exp(-1) / math.factorial(k) for k in range(6)]
    assert observed == pytest.approx(expected, abs=0.003)


def test_replicate_means_equal_a_direct_resampling():
    """Each replicate's mean is the plain mean of the images drawn with their counts (an image
    drawn twice counts twice); an unscored image (NaN) is left out of its column only."""
    ids = IDS[:6]
    values = np.array([[0.1, 5.0], [0.4, np.nan], [0.9, 1.0], [0.2, 2.0], [0.7, 3.0], [0.3, 4.0]])
    replicates = Replicates(ids, BootstrapSettings(resamples=50, seed=1))
    means = replicates.means(ids, values)
    for r in range(50):
        counts = replicates.weights[r]
        for c in range(2):
            drawn = [v for v, k in zip(values[:, c], counts) for _ in range(int(k)) if not np.isnan(v)]
            expected = np.mean(drawn) if drawn else np.nan
            np.testing.assert_allclose(means[r, c], expected, rtol=1e-12, equal_nan=True)


def test_intervals_agree_with_the_multinomial_bootstrap():
    """On 400 skewed values the Poisson percentile interval agrees with scipy's multinomial
    percentile bootstrap to a small share of its width, and covers the mean."""
    values = stats.expon.rvs(size=400, random_state=np.random.default_rng(5))
    lo, hi = mean_interval(values, IDS + [f"extra_{i}" for i in range(100)], BootstrapSettings(resamples=4000))
    direct = stats.bootstrap((values,), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95,
                             random_state=np.random.default_rng(0)).confidence_interval
    width = direct.high - direct.low
    assert lo == pytest.approx(direct.low, abs=0.08 * width) and hi == pytest.approx(direct.high, abs=0.08 * width)
    assert lo < values.mean() < hi


def test_percentile_interval_and_settings():
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    assert all(math.isnan(v) for v in percentile_interval(np.array([np.nan, np.nan]), 0.95))
    assert all(math.isnan(v) for v in mean_interval([1.0, 2.0], ["a", "b"], BootstrapSettings(level=None)))
    for bad in ({"level": 1.0}, {"level": 0.0}, {"resamples": 1}):
        with pytest.raises(SettingError, match="report"):
            BootstrapSettings(**bad)


def run_folder(out: Path, *overrides: str) -> Path:
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "dataset.params.num_images=10", "batch_size=5", "gallery_images=0", "progress=false",
            "method=[rollout,random]", "run_name=test", f"store.root={out.parent / 'cache'}", *overrides])
    run(cfg, out)
    return out


def test_a_runs_tables_carry_the_intervals(tmp_path):
    out = run_folder(tmp_path / "run", "measure=[sparseness]", "report.resamples=300", "report.seed=2")
    table = pd.read_csv(out / "table.csv")
    records = pd.read_csv(out / "records.csv")
    replicates = Replicates(records["image_id"].unique(), BootstrapSettings(resamples=300, seed=2))
    for method, row in table.set_index("method").iterrows():
        kept = records[(records["method"] == method) & (records["correct"] == 1)]
        lo, hi = replicates.intervals(kept["image_id"].tolist(), kept[["box_iou"]].to_numpy())
        assert (row["box_iou ci_lo"], row["box_iou ci_hi"]) == pytest.approx((100 * lo[0], 100 * hi[0]))
        assert row["box_iou ci_lo"] <= row["box_iou"] <= row["box_iou ci_hi"]
        assert row["Sparseness ci_lo"] <= row["Sparseness"] <= row["Sparseness ci_hi"]
    markdown = (out / "table_box.md").read_text()
    rollout = table.set_index("method").loc["rollout"]
    half = (rollout["box_iou ci_hi"] - rollout["box_iou ci_lo"]) / 2
    assert f"{rollout['box_iou']:.2f} ± {half:.2f}" in markdown
    assert "95 % bootstrap interval over images (300 Poisson resamples, seed 2" in markdown
    assert check_run(out) == []  # the report rebuilds the same bounds


def test_report_ci_null_gives_means_only(tmp_path):
    out = run_folder(tmp_path / "run", "report.ci=null")
    assert not [c for c in pd.read_csv(out / "table.csv").columns if c.endswith(("ci_lo", "ci_hi"))]
    assert "±" not in (out / "table_box.md").read_text()
    assert "No confidence intervals (report.ci=null)." in (out / "table_box.md").read_text()


def test_images_outside_the_first_set_draw_their_own_counts():
    """A file with an image the records lack still gets that image's own draws, and the other
    images' draws do not move."""
    settings = BootstrapSettings(resamples=100, seed=1)
    few = Replicates(IDS[:10], settings)
    values = np.arange(20, dtype=float)[:, None]
    np.testing.assert_array_equal(few.means(IDS[:20], values), Replicates(IDS[:20], settings).means(IDS[:20], values))
