"""The shipped synthetic ViT: loads by name, classifies the synthetic val split as stated,
and its explanations localise objects better than the sanity baselines."""

from __future__ import annotations

import json

import pytest
import torch
from wsol_bench.datasets import EvalTransform, build_dataset, collate_samples
from wsol_bench.methods import get_explainer

from wsol_bench.heatmaps import to_heatmaps
from wsol_bench.localization import ground_truth, score_heatmaps
from wsol_bench.models import data_config, load_model, patch_grid, shipped_weights_path

NUM_VAL = 300


@pytest.fixture(scope="module")
def model():
    return load_model("wsol_synthetic_vit")


@pytest.fixture(scope="module")
def val_batches(model):
    dc = data_config(model)
    ds = build_dataset("synthetic", split="val", num_images=NUM_VAL,
                       transform=EvalTransform(dc.input_size[1:], dc.mean, dc.std))
    return [collate_samples([ds[i] for i in range(s, min(s + 50, NUM_VAL))]) for s in range(0, NUM_VAL, 50)]


def test_loads_by_name_with_its_preprocessing(model):
    """14x14 grid, 6 classes, mean/std 0.5, eval mode, frozen, fused attention off."""
    assert patch_grid(model) == (14, 14) and model.num_classes == 6
    dc = data_config(model)
    assert dc.input_size == (3, 224, 224) and dc.mean == (0.5, 0.5, 0.5)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_reaches_its_stated_accuracy(model, val_batches):
    """Top-1 on the first 300 synthetic val images is >= 95 % and close to the recorded figure."""
    stated = json.loads(shipped_weights_path("wsol_synthetic_vit").with_suffix(".json").read_text())
    with torch.no_grad():
        correct = sum(int((model(b.images).argmax(1) == b.labels).sum()) for b in val_batches)
    accuracy = correct / NUM_VAL
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(stated["best_val_acc"], abs=0.03)


def test_agcam_localises_better_than_the_baselines(model, val_batches):
    """On correctly classified images, AG-CAM's box IoU beats random and center maps."""
    batch = val_batches[0]
    gt = ground_truth(batch.samples, (224, 224))
    iou = {}
    logits = None
    for name in ("agcam", "random", "center"):
        exp = get_explainer(name, model)(batch.images, logits=logits)
        logits = exp.logits
        heat, _ = to_heatmaps(exp.maps, (224, 224))
        rows = score_heatmaps(heat, gt, [0.5])[0]
        correct = (exp.logits.argmax(1) == batch.labels).tolist()
        iou[name] = sum(r["box_iou"] for r, c in zip(rows, correct) if c) / sum(correct)
    assert iou["agcam"] > iou["random"] + 0.1 and iou["agcam"] > iou["center"] + 0.05, iou
