"""A whole run with the sweep and faithfulness scorers: their files agree with the fixed-
threshold records and with direct metric calls, and a re-scoring run passes no image through
the model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

from wsol_bench.datasets import build_dataset
from wsol_bench.metrics.faithfulness import FaithfulnessSettings, score_batch
from wsol_bench.models import load_model
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.run.maps import build_transform
from wsol_bench.run.runner import run
from wsol_bench.run.store import MapStore

N = 12


def _cfg(tmp_path, *overrides):
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[
            "method=[agcam,center]", f"dataset.params.num_images={N}", "batch_size=5", "store.shard_size=8",
            "gallery_images=0", "progress=false", f"store.root={tmp_path / 'cache'}", "run_name=test",
            *overrides])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scorers")
    cfg = _cfg(tmp, "sweep=grid", "faithfulness=abpc", "metric.thresholds=[0.3,0.5]")
    run(cfg, tmp / "run")
    return cfg, tmp


def test_sweep_at_a_threshold_equals_the_records_at_it(full_run):
    _, tmp = full_run
    records = pd.read_csv(tmp / "run" / "records.csv")
    sweep = pd.read_csv(tmp / "run" / "sweep.csv")
    assert sorted(sweep["threshold"].round(2).unique()) == [round(t, 2) for t in np.arange(0, 1, 0.01)]
    correct = records[records["correct"] == 1]
    for (method, threshold), part in correct.groupby(["method", "threshold"]):
        row = sweep[(sweep["method"] == method) & np.isclose(sweep["threshold"], threshold)]
        assert len(row) == 1 and int(row["n_images"].iloc[0]) == len(part)
        for metric in ("box_iou", "box_dice", "box_pixel_acc", "mask_iou", "mask_recall"):
            assert row[metric].iloc[0] == pytest.approx(part[metric].mean(), abs=1e-9), (method, threshold, metric)


def test_wsoleval_summary_is_consistent_with_the_sweep(full_run):
    _, tmp = full_run
    wsol = pd.read_csv(tmp / "run" / "wsoleval.csv").set_index("method")
    assert list(wsol.index) == ["agcam", "center"] and (wsol["n_images"] == N).all()
    for method in wsol.index:
        v2 = [wsol.loc[method, f"maxboxacc_v2_iou{d}"] for d in (30, 50, 70)]
        assert wsol.loc[method, "maxboxacc_v2"] == pytest.approx(np.mean(v2))
        assert wsol.loc[method, "top1_loc"] <= wsol.loc[method, "gt_known_loc"] + 1e-9
        assert 0 <= wsol.loc[method, "pxap"] <= 100


def test_faithfulness_rows_equal_a_direct_call_on_ground_truth_maps(full_run):
    cfg, tmp = full_run
    frame = pd.read_csv(tmp / "run" / "faithfulness.csv")
    assert len(frame) == 2 * N and (frame["target"] == frame["label"]).all()
    transform = build_transform(cfg)
    ds = build_dataset("synthetic", transform=transform, split="val", num_images=N)
    model = load_model("wsol_synthetic_vit", pretrained=True)
    from wsol_bench.run.maps import data_fingerprint, store_settings

    settings = store_settings(cfg, transform, "agcam", "label", data=data_fingerprint(ds))
    store = MapStore(cfg.store.root, settings, 8)
    shard = store.load(0)
    images = torch.stack([ds[i].image for i in range(8)])
    labels = torch.tensor([ds[i].label for i in range(8)])
    assert torch.equal(shard.targets, labels)
    heat, _ = to_heatmaps(shard.maps, (224, 224))
    direct = score_batch(model, images, heat, labels, FaithfulnessSettings())
    ours = frame[frame["method"] == "agcam"].head(8)
    np.testing.assert_allclose(ours["abpc"], direct["abpc"].numpy(), atol=1e-6)
    np.testing.assert_allclose(ours["morf_05"], direct["morf"][:, 5].numpy(), atol=1e-6)


def test_rescoring_passes_no_image_through_the_model(full_run, monkeypatch):
    """Same settings, other thresholds and chunk size: every map and faithfulness row comes
    from the cache (the chunk size changes speed, not numbers, so it is not in the key)."""
    _, tmp = full_run
    import wsol_bench.run.maps as maps

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although everything is cached")

    monkeypatch.setattr(maps, "load_model", no_model)
    again = _cfg(tmp, "sweep=grid", "faithfulness=abpc", "metric.thresholds=[0.5]", "faithfulness.batch_size=5")
    run(again, tmp / "again")
    for name in ("faithfulness.csv", "wsoleval.csv", "sweep.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp / "run" / name), pd.read_csv(tmp / "again" / name))
    first = pd.read_csv(tmp / "run" / "records.csv")
    second = pd.read_csv(tmp / "again" / "records.csv")
    pd.testing.assert_frame_equal(first[first["threshold"] == 0.5].reset_index(drop=True), second)


def test_exported_coco_masks_decode_to_the_scored_masks(full_run, tmp_path):
    """export_masks=true: the predicted masks read back from COCO RLE give the records' scores."""
    from wsol_bench.metrics.pixel import pixel_scores
    from wsol_bench.report.export import read_coco_masks

    _, tmp = full_run
    again = _cfg(tmp, "export_masks=true", "metric.thresholds=[0.5]")
    run(again, tmp / "exported")
    folder = tmp / "exported" / "masks"
    assert sorted(p.name for p in folder.glob("*.json")) == ["agcam.json", "center.json",
                                                            "ground_truth_boxes.json", "ground_truth_masks.json"]
    pred = read_coco_masks(folder / "agcam.json")
    gt = {m.image_key: m.mask for m in read_coco_masks(folder / "ground_truth_boxes.json")}
    records = pd.read_csv(tmp / "exported" / "records.csv")
    agcam = records[records["method"] == "agcam"].set_index("image_id")
    assert len(pred) == N
    for m in pred:
        iou = pixel_scores(m.mask[None], gt[m.image_key][None])["iou"][0]
        assert float(iou) == pytest.approx(agcam.loc[m.image_key, "box_iou"], abs=1e-9)
