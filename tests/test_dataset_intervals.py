"""Bootstrap intervals of the dataset-level measures (MaxBoxAcc, PxAP, the segmentation totals;
docs/protocol.md 7.1): each replicate equals the measure computed directly on the resampled
dataset (every image repeated as often as its Poisson count says), the replicate states merge
exactly across shards, survive their file, and reach the tables and the comparisons."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

from wsol_bench.errors import InputFileError
from wsol_bench.metrics.bootstrap import (
    BootstrapSettings,
    Replicates,
    percentile_interval,
    percentile_intervals,
)
from wsol_bench.metrics.box_accuracy import BoxAccuracy, box_contributions, box_values
from wsol_bench.metrics.pxap import PxAP, pxap_values
from wsol_bench.metrics.replicate_sums import (
    ReplicateSums,
    batch_weights,
    load_replicate_sums,
    save_replicate_sums,
    weighted_sums,
)
from wsol_bench.metrics.segmentation import (
    CheferSegmentation,
    batch_counts,
    segmentation_contributions,
    segmentation_values,
)
from wsol_bench.metrics.sweep import CURVE_BITS, curve_columns, curve_contributions, curve_replicate_means
from wsol_bench.run.run_tables import check_run, run_tables

THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
RESAMPLES, SEED = 25, 7


def _images(count: int = 7, size: int = 12, seed: int = 0):
    """Random heatmaps in [0, 1] with blobs, inclusive GT boxes, masks and correct flags."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    heat = []
    for _ in range(count):
        cy, cx = rng.uniform(2, size - 2, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(4, 20))
        heat.append(np.clip(blob + rng.uniform(0, 0.3, (size, size)), 0, 1))
    heat = torch.tensor(np.stack(heat), dtype=torch.float32)
    boxes = []
    for _ in range(count):
        x0, y0 = rng.integers(0, size // 2, 2)
        boxes.append(torch.tensor([[x0, y0, x0 + rng.integers(2, size // 2), y0 + rng.integers(2, size // 2)]]))
    masks = torch.from_numpy(rng.uniform(size=(count, size, size)) < 0.3)
    correct = torch.from_numpy(rng.uniform(size=count) < 0.6)
    ids = [f"n0{i:04d}.JPEG" for i in range(count)]
    return ids, heat, boxes, masks, correct


def _resampled(weights: np.ndarray) -> np.ndarray:
    """The image indices of one replicate: image i repeated weights[i] times."""
    return np.repeat(np.arange(len(weights)), weights.astype(int))


def test_each_box_accuracy_replicate_equals_the_measure_on_the_resampled_images():
    ids, heat, boxes, _, correct = _images()
    metric = BoxAccuracy(THRESHOLDS, boxes="components")
    contributions = box_contributions(metric.image_hits(heat, boxes, correct), metric.iou_thresholds)
    sums = ReplicateSums(RESAMPLES, SEED, contributions.shape[1])
    sums.update(ids, contributions)
    values = box_values(sums.totals(), metric.iou_thresholds)
    weights = batch_weights(ids, RESAMPLES, SEED)
    assert len({tuple(w) for w in weights}) > 5  # the replicates differ
    for r in range(RESAMPLES):
        keep = _resampled(weights[r])
        if len(keep) == 0:
            assert np.isnan(values["maxboxacc"][r])
            continue
        direct = BoxAccuracy(THRESHOLDS, boxes="components")
        direct.update(heat[keep], [boxes[i] for i in keep], correct[keep])
        expected = direct.compute()
        for name in ("maxboxacc", "maxboxacc_v2", "top1_loc", "gt_known_loc"):
            assert values[name][r] == expected[name], (r, name)
        for delta, value in expected["maxboxacc_v2_per_iou"].items():
            assert values[f"maxboxacc_v2_iou{delta}"][r] == value


def test_unit_weights_give_the_datasets_own_box_accuracy_and_pxap():
    """Summed contributions with every image once are the plain totals: the same numbers as
    the metrics' own compute, to the bit."""
    _, heat, boxes, masks, correct = _images(seed=1)
    metric = BoxAccuracy(THRESHOLDS, boxes="components")
    hits = metric.image_hits(heat, boxes, correct)
    metric.add_hits(hits)
    totals = box_contributions(hits, metric.iou_thresholds).sum(0, keepdims=True)
    values = box_values(totals, metric.iou_thresholds)
    expected = metric.compute()
    assert values["maxboxacc_v2"][0] == expected["maxboxacc_v2"]
    assert values["top1_loc"][0] == expected["top1_loc"]
    pxap = PxAP(THRESHOLDS)
    histograms = pxap.image_histograms(heat, masks)
    pxap.update(heat, masks)
    summed = histograms.sum(0)
    assert pxap_values(summed[None, 0], summed[None, 1])[0] == pxap.compute()["pxap"]


def test_each_pxap_replicate_equals_pxap_on_the_resampled_images():
    ids, heat, _, masks, _ = _images(seed=2)
    valid = torch.ones_like(masks)
    valid[:, 0] = False  # an ignore row
    histograms = PxAP(THRESHOLDS).image_histograms(heat, masks, valid)
    sums = ReplicateSums(RESAMPLES, SEED, histograms[0].size)
    sums.update(ids, histograms.reshape(len(ids), -1))
    values = pxap_values(*np.split(sums.totals(), 2, axis=1))
    weights = batch_weights(ids, RESAMPLES, SEED)
    for r in range(RESAMPLES):
        keep = _resampled(weights[r])
        if len(keep) == 0:
            continue
        direct = PxAP(THRESHOLDS)
        direct.update(heat[keep], masks[keep], valid[keep])
        assert values[r] == direct.compute()["pxap"], r


def test_each_segmentation_replicate_equals_the_scores_on_the_resampled_images():
    ids, heat, _, masks, _ = _images(seed=3)
    degenerate = torch.zeros(len(ids), dtype=torch.bool)
    degenerate[2] = True
    contributions = segmentation_contributions(batch_counts(heat, masks, None, degenerate))
    sums = ReplicateSums(RESAMPLES, SEED, contributions.shape[1])
    sums.update(ids, contributions)
    values = segmentation_values(sums.totals())
    weights = batch_weights(ids, RESAMPLES, SEED)
    for r in range(RESAMPLES):
        keep = _resampled(weights[r])
        if len(keep) == 0:
            continue
        direct = CheferSegmentation()
        direct.update(heat[keep], masks[keep], None, degenerate[keep])
        expected = direct.compute()
        for name in ("pixel_accuracy", "mIoU", "mAP", "iou_background", "iou_foreground"):
            assert values[name][r] == 100 * expected[name], (r, name)


def _sums_merge_exactly(ids: list[str], contributions: np.ndarray, split: int) -> ReplicateSums:
    """The replicate sums of all images in one pass, checked equal to two shards (the second
    half first) merged."""
    whole = ReplicateSums(RESAMPLES, SEED, contributions.shape[1])
    whole.update(ids, contributions)
    parts = [ReplicateSums(RESAMPLES, SEED, contributions.shape[1]) for _ in range(2)]
    parts[0].update(ids[split:], contributions[split:])
    parts[1].update(ids[:split], contributions[:split])
    parts[0].merge_state(parts[1])
    assert (parts[0].totals() == whole.totals()).all()
    return whole


def test_replicate_states_are_the_per_image_bootstraps_draws_and_merge_exactly(tmp_path):
    """The Poisson counts are those that resample the per-image measures (paired across
    measures); shards summed in any order equal one pass; the file gives them back."""
    ids, heat, boxes, _, correct = _images(count=9, seed=4)
    settings = BootstrapSettings(resamples=RESAMPLES, seed=SEED)
    per_image = Replicates(ids, settings)
    assert (per_image.weights == batch_weights(ids, RESAMPLES, SEED)).all()
    metric = BoxAccuracy(THRESHOLDS, boxes="components")
    contributions = box_contributions(metric.image_hits(heat, boxes, correct), metric.iou_thresholds)
    whole = _sums_merge_exactly(ids, contributions, split=5)
    path = save_replicate_sums(tmp_path / "r.npz", {"agcam": {"box": whole}})
    first = path.read_bytes()
    save_replicate_sums(path, {"agcam": {"box": whole}})
    assert path.read_bytes() == first  # the same states, the same bytes
    back = load_replicate_sums(path)["agcam"]["box"]
    assert (back.totals() == whole.totals()).all() and back.settings() == whole.settings()


def _curve_scores(count: int, levels: int, seed: int = 5) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
    """Scores of two columns at `levels` thresholds ({column: [T, B]}, as `region_scores`), box
    counts, and which images the filter keeps."""
    rng = np.random.default_rng(seed)
    scores = {"box_iou": rng.uniform(size=(levels, count)), "box_dice": rng.uniform(size=(levels, count)) ** 3,
              "n_pred_boxes": rng.integers(0, 5, size=(levels, count))}
    scores["box_iou"][0, 0] = 1.0  # the ends of [0, 1] round exactly
    scores["box_iou"][1, 0] = 0.0
    keep = rng.uniform(size=count) < 0.7
    return [f"img_{i}.png" for i in range(count)], scores, keep


def test_each_curve_replicate_equals_the_mean_on_the_resampled_images():
    """Replicate r of a sweep.csv cell is the cell's mean over the images the filter keeps,
    each repeated as often as its Poisson count says: exactly for the box counts, to the 2^-24
    rounding of the scores for the score columns; shards merge to the same sums."""
    ids, scores, keep = _curve_scores(count=11, levels=4)
    columns = ["box_iou", "box_dice"]
    contributions = curve_contributions(scores, keep, columns)
    assert (contributions[~keep] == 0).all() and contributions.dtype == np.int64
    whole = _sums_merge_exactly(ids, contributions, split=6)
    means = curve_replicate_means(whole.totals(), columns, 4)
    assert list(means) == curve_columns(columns) == ["box_iou", "box_dice", "n_pred_boxes"]
    weights = batch_weights(ids, RESAMPLES, SEED)
    for r in range(RESAMPLES):
        chosen = _resampled(weights[r] * keep)
        for column, replicate in means.items():
            if len(chosen) == 0:
                assert np.isnan(replicate[r]).all()
                continue
            direct = scores[column][:, chosen].mean(axis=1)
            tolerance = 0 if column == "n_pred_boxes" else 2.0 ** -(CURVE_BITS + 1) + 1e-15
            assert np.abs(replicate[r] - direct).max() <= tolerance, (r, column)
    with pytest.raises(ValueError, match="do not fit 5 thresholds"):
        curve_replicate_means(whole.totals(), columns, 5)


def test_vectorised_percentile_intervals_equal_the_one_column_ones():
    rng = np.random.default_rng(3)
    replicates = rng.normal(size=(60, 4, 3))
    replicates[rng.uniform(size=replicates.shape) < 0.2] = np.nan
    replicates[:, 0, 0] = np.nan  # a cell no replicate reaches
    lo, hi = percentile_intervals(replicates, 0.9)
    for index in np.ndindex(4, 3):
        expected = percentile_interval(replicates[(slice(None), *index)], 0.9)
        assert np.array_equal([lo[index], hi[index]], expected, equal_nan=True), index


def test_weighted_sums_are_exact_beyond_float_precision():
    weights = np.array([[3, 5]], dtype=np.uint8)
    big = np.array([[2**51 + 1], [2**50 + 3]], dtype=np.int64)
    assert weighted_sums(weights, big)[0, 0] == 3 * (2**51 + 1) + 5 * (2**50 + 3)


def test_a_damaged_replicate_file_is_named(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an archive")
    with pytest.raises(InputFileError, match="bad.npz"):
        load_replicate_sums(bad)
    metric = ReplicateSums(4, 0, 3)
    path = save_replicate_sums(tmp_path / "ok.npz", {"m": {"box": metric}})
    with np.load(path) as archive:
        index = str(archive["index"])
    np.savez(tmp_path / "wrong.npz", index=np.array(index), a0=np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(InputFileError, match=r"m/box holds int64 \[4, 2\], expected integers \[4, 3\]"):
        load_replicate_sums(tmp_path / "wrong.npz")


def _run(root: Path, *extra: str, segmentation: bool = True) -> Path:
    from wsol_bench.run.runner import run

    overrides = ["method=[agcam,center]", "dataset.params.num_images=8", "batch_size=4", "gallery_images=0",
                 "progress=false", "run_name=test", f"store.root={root / 'cache'}", "sweep=grid",
                 "sweep.thresholds=[0.2,0.4,0.5,0.6]", "report.resamples=300", *extra]
    overrides += ["segmentation=chefer"] if segmentation else []
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run(cfg, root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def interval_run(tmp_path_factory) -> Path:
    """A real run with the sweep and the segmentation scores, intervals on."""
    return _run(tmp_path_factory.mktemp("intervals"))


def test_dataset_level_columns_get_intervals_in_every_table(interval_run):
    wsoleval = pd.read_csv(interval_run / "wsoleval.csv")
    for column in ("maxboxacc", "maxboxacc_v2", "maxboxacc_v2_iou70", "top1_loc", "gt_known_loc", "pxap"):
        lo, hi = wsoleval[f"{column} ci_lo"], wsoleval[f"{column} ci_hi"]
        assert (lo <= hi).all() and lo.notna().all(), column
    segmentation = pd.read_csv(interval_run / "segmentation.csv")
    assert (segmentation["mIoU ci_lo"] <= segmentation["mIoU ci_hi"]).all()
    table = pd.read_csv(interval_run / "table.csv")
    for column in ("MaxBoxAccV2", "PxAP", "Seg Pixel Acc", "Seg mIoU", "Seg mAP"):
        assert {f"{column} ci_lo", f"{column} ci_hi"} <= set(table.columns), column
    assert "±" in (interval_run / "table_box.md").read_text().split("MaxBoxAccV2", 1)[1].split("\n")[2]
    compare = pd.read_csv(interval_run / "compare.csv")
    assert {"MaxBoxAccV2", "PxAP", "Seg mIoU"} <= set(compare["measure"])
    row = compare[compare["measure"] == "MaxBoxAccV2"].iloc[0]
    values = wsoleval.set_index("method")["maxboxacc_v2"]
    assert row["difference"] == pytest.approx(values[row["method_a"]] - values[row["method_b"]])
    ranking = pd.read_csv(interval_run / "ranking.csv")
    assert {"MaxBoxAccV2", "PxAP", "Seg mIoU", "median rank ci_lo", "median rank ci_hi"} <= set(ranking.columns)
    assert sorted(ranking["method"]) == ["agcam", "center"]
    assert check_run(interval_run) == []


def test_every_sweep_cell_gets_the_interval_of_its_per_image_bootstrap(interval_run):
    """sweep.csv's bounds, from the curve's replicate sums, equal the bootstrap of the per-image
    rows of records.csv (the run's metric threshold 0.5 is on the sweep's grid) over the same
    first sweep.resamples replicates: two independent paths, to the 2^-24 rounding."""
    sweep = pd.read_csv(interval_run / "sweep.csv")
    records = pd.read_csv(interval_run / "records.csv")
    score_columns = [c for c in sweep.columns if c.startswith(("box_", "mask_")) and not c.endswith("ci_hi")
                     and not c.endswith("ci_lo")]
    assert len(score_columns) == 10
    for column in [*score_columns, "n_pred_boxes"]:
        lo, hi = sweep[f"{column} ci_lo"], sweep[f"{column} ci_hi"]
        assert lo.notna().all() and (lo <= hi).all(), column
    assert list(sweep.columns[2:5]) == ["box_pixel_acc", "box_pixel_acc ci_lo", "box_pixel_acc ci_hi"]
    replicates = Replicates(records["image_id"].astype(str).unique().tolist(), BootstrapSettings(0.95, 200, 0))
    for method in ("agcam", "center"):
        kept = records[(records["method"] == method) & (records["correct"] == 1) & (records["threshold"] == 0.5)]
        row = sweep[(sweep["method"] == method) & np.isclose(sweep["threshold"], 0.5)].iloc[0]
        lo, hi = replicates.intervals(kept["image_id"].astype(str).tolist(), kept[score_columns].to_numpy())
        assert np.abs(lo - row[[f"{c} ci_lo" for c in score_columns]].to_numpy(float)).max() < 1e-7, method
        assert np.abs(hi - row[[f"{c} ci_hi" for c in score_columns]].to_numpy(float)).max() < 1e-7, method
    wsoleval = pd.read_csv(interval_run / "wsoleval.csv").set_index("method")
    for column in ("best_box_iou", "best_mask_iou"):
        assert (wsoleval[f"{column} ci_lo"] <= wsoleval[f"{column} ci_hi"]).all()
        # the best of each replicate's curve is at least that replicate's value at the best threshold
        best = sweep.loc[sweep.groupby("method")["box_iou"].idxmax()].set_index("method")
        assert (wsoleval["best_box_iou ci_lo"] >= best["box_iou ci_lo"] * 100 - 1e-9).all()


def test_curve_replicates_of_other_settings_are_refused(interval_run, tmp_path):
    folder = Path(shutil.copytree(interval_run, tmp_path / "copy"))
    config = folder / "config.yaml"
    text = config.read_text()
    assert text.count("resamples: 200") == 1  # sweep.resamples, the default
    config.write_text(text.replace("resamples: 200", "resamples: 100"))
    with pytest.raises(InputFileError, match=r"sweep_curve_replicates.npz: agcam/curve holds 200 replicates .*"
                                             r"sweep.resamples=100"):
        run_tables(folder, allow_incomplete=True)
    config.write_text(text.replace("resamples: 200", "resamples: 0"))
    with pytest.raises(InputFileError, match="holds curve replicates, but the run's config.yaml says "
                                             "sweep.resamples=0"):
        run_tables(folder, allow_incomplete=True)


def test_replicates_of_other_settings_than_the_config_are_refused(interval_run, tmp_path):
    folder = Path(shutil.copytree(interval_run, tmp_path / "copy"))
    config = folder / "config.yaml"
    config.write_text(config.read_text().replace("resamples: 300", "resamples: 400"))
    with pytest.raises(InputFileError, match="report.resamples=400"):
        run_tables(folder, allow_incomplete=True)


def test_no_intervals_keeps_no_replicates(tmp_path):
    folder = _run(tmp_path, "report.ci=null", segmentation=False)
    assert not (folder / "states" / "sweep_replicates.npz").exists()
    assert not (folder / "states" / "sweep_curve_replicates.npz").exists()
    assert not any(c.endswith("ci_lo") for c in pd.read_csv(folder / "wsoleval.csv").columns)
    assert not any(c.endswith("ci_lo") for c in pd.read_csv(folder / "sweep.csv").columns)


def test_sweep_resamples_zero_keeps_the_tables_intervals_but_not_the_curves(tmp_path):
    folder = _run(tmp_path, "sweep.resamples=0", segmentation=False)
    assert (folder / "states" / "sweep_replicates.npz").exists()
    assert not (folder / "states" / "sweep_curve_replicates.npz").exists()
    wsoleval = pd.read_csv(folder / "wsoleval.csv")
    assert "maxboxacc_v2 ci_lo" in wsoleval and "best_box_iou ci_lo" not in wsoleval
    assert not any(c.endswith("ci_lo") for c in pd.read_csv(folder / "sweep.csv").columns)


@pytest.mark.parametrize("value", [1, -3])
def test_a_bad_sweep_resamples_is_refused_before_any_work(tmp_path, value):
    from wsol_bench.errors import SettingError

    with pytest.raises(SettingError, match=f"sweep.resamples={value} must be 0 .* or at least 2"):
        _run(tmp_path, f"sweep.resamples={value}", segmentation=False)
