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
from wsol_bench.metrics.bootstrap import BootstrapSettings, Replicates
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


def test_replicate_states_are_the_per_image_bootstraps_draws_and_merge_exactly(tmp_path):
    """The Poisson counts are those that resample the per-image measures (paired across
    measures); shards summed in any order equal one pass; the file gives them back."""
    ids, heat, boxes, _, correct = _images(count=9, seed=4)
    settings = BootstrapSettings(resamples=RESAMPLES, seed=SEED)
    per_image = Replicates(ids, settings)
    assert (per_image.weights == batch_weights(ids, RESAMPLES, SEED)).all()
    metric = BoxAccuracy(THRESHOLDS, boxes="components")
    contributions = box_contributions(metric.image_hits(heat, boxes, correct), metric.iou_thresholds)
    whole = ReplicateSums(RESAMPLES, SEED, contributions.shape[1])
    whole.update(ids, contributions)
    parts = [ReplicateSums(RESAMPLES, SEED, contributions.shape[1]) for _ in range(2)]
    parts[0].update(ids[5:], contributions[5:])
    parts[1].update(ids[:5], contributions[:5])
    parts[0].merge_state(parts[1])
    assert (parts[0].totals() == whole.totals()).all()
    path = save_replicate_sums(tmp_path / "r.npz", {"agcam": {"box": whole}})
    first = path.read_bytes()
    save_replicate_sums(path, {"agcam": {"box": whole}})
    assert path.read_bytes() == first  # the same states, the same bytes
    back = load_replicate_sums(path)["agcam"]["box"]
    assert (back.totals() == whole.totals()).all() and back.settings() == whole.settings()


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
                 "sweep.thresholds=[0.2,0.4,0.6]", "report.resamples=200", *extra]
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


def test_replicates_of_other_settings_than_the_config_are_refused(interval_run, tmp_path):
    folder = Path(shutil.copytree(interval_run, tmp_path / "copy"))
    config = folder / "config.yaml"
    config.write_text(config.read_text().replace("resamples: 200", "resamples: 300"))
    with pytest.raises(InputFileError, match="report.resamples=300"):
        run_tables(folder, allow_incomplete=True)


def test_no_intervals_keeps_no_replicates(tmp_path):
    folder = _run(tmp_path, "report.ci=null", segmentation=False)
    assert not (folder / "states" / "sweep_replicates.npz").exists()
    assert not any(c.endswith("ci_lo") for c in pd.read_csv(folder / "wsoleval.csv").columns)
