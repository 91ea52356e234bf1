"""The shipped synthetic ViT: loads by name, classifies the synthetic val split as stated,
and its explanations localise objects better than the sanity baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from wsol_bench.datasets import EvalTransform, build_dataset, collate_samples
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.faithfulness import score_batch
from wsol_bench.models import data_config, load_model, patch_grid, shipped_weights_path
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.run.scorers.faithfulness import faithfulness_settings

NUM_VAL = 300
BASELINE_ABPC = 4.0  # percent: "within a few points of 0" for maps that ignore the image
REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "quickstart"
REFERENCE_IMAGES = 500
BASELINES_AND_AGCAM = ("agcam", "random", "center")
# 16 val images spread over the reference run's 500 (one batch of the run's batch size)
RECHECKED = [i * REFERENCE_IMAGES // 16 + (7 * i) % (REFERENCE_IMAGES // 16) for i in range(16)]


@pytest.fixture(scope="module")
def model():
    return load_model("wsol_synthetic_vit", pretrained=True)


@pytest.fixture(scope="module")
def val_batches(model):
    dc = data_config(model)
    ds = build_dataset("synthetic", split="val", num_images=NUM_VAL,
                       transform=EvalTransform(dc.input_size[1:], dc.mean, dc.std))
    return [collate_samples([ds[i] for i in range(s, min(s + 50, NUM_VAL))]) for s in range(0, NUM_VAL, 50)]


@pytest.fixture(scope="module")
def val_logits(model, val_batches):
    """The model's logits of each batch (one forward pass, shared by the tests)."""
    with torch.no_grad():
        return [model(b.images) for b in val_batches]


def test_loads_by_name_with_its_preprocessing(model):
    """14x14 grid, 6 classes, mean/std 0.5, eval mode, frozen, fused attention off."""
    assert patch_grid(model) == (14, 14) and model.num_classes == 6
    dc = data_config(model)
    assert dc.input_size == (3, 224, 224) and dc.mean == (0.5, 0.5, 0.5)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_reaches_its_stated_accuracy(val_batches, val_logits):
    """Top-1 on the first 300 synthetic val images matches the figure recorded at training
    (on 1,000 val images) within sampling noise."""
    stated = json.loads(shipped_weights_path("wsol_synthetic_vit").with_suffix(".json").read_text())
    correct = sum(int((logits.argmax(1) == b.labels).sum()) for b, logits in zip(val_batches, val_logits))
    accuracy = correct / NUM_VAL
    assert stated["final_val_acc"] >= 0.97 and stated["val_images"] == 1000
    assert accuracy >= 0.95 and accuracy == pytest.approx(stated["final_val_acc"], abs=0.03)


def test_explainers_point_at_the_objects_better_than_the_baselines(model, val_batches):
    """On correctly classified images, the peak of AG-CAM's heatmap (pointing game) and the
    share of its heat inside the object mask beat the random and center maps."""
    batch = val_batches[0]
    masks = torch.stack([s.mask == s.label + 1 for s in batch.samples])  # [B, 224, 224]
    scores, logits = {}, None
    for name in ("agcam", "rollout", "random", "center"):
        exp = get_explainer(name, model)(batch.images, logits=logits)
        logits = exp.logits
        heat, _ = to_heatmaps(exp.maps, (224, 224))
        correct = exp.logits.argmax(1) == batch.labels
        flat = heat.flatten(1)
        hits = masks.flatten(1).gather(1, flat.argmax(1, keepdim=True))[:, 0]
        energy = (flat * masks.flatten(1)).sum(1) / flat.sum(1).clamp(min=1e-12)
        scores[name] = (float(hits[correct].float().mean()), float(energy[correct].mean()))
    for baseline in ("random", "center"):
        for method in ("agcam", "rollout"):
            assert scores[method][0] > scores[baseline][0] + 0.1, scores
            assert scores[method][1] > scores[baseline][1] + 0.03, scores


def test_sanity_baselines_score_chance(model, val_batches, val_logits):
    """On synthetic v3 (no centre prior) the maps that ignore the image are at chance: the peak
    of the centred Gaussian and of the random map lands on an object about as often as objects
    cover the image, and their share of heat inside the objects is about that share too. (On
    v1 the image centre was on an object in a third of the images, at 14 % coverage.)"""
    hits, energy, covered = {"random": [], "center": []}, {"random": [], "center": []}, []
    for batch, logits in zip(val_batches, val_logits):
        masks = torch.stack([s.mask > 0 for s in batch.samples]).flatten(1)
        covered.append(masks.float().mean(1))
        for name, found in hits.items():
            # the batch's logits spare these model-free maps their forward pass
            heat, _ = to_heatmaps(get_explainer(name, model)(batch.images, logits=logits).maps, (224, 224))
            flat = heat.flatten(1)
            found.append(masks.gather(1, flat.argmax(1, keepdim=True))[:, 0].float())
            energy[name].append((flat * masks).sum(1) / flat.sum(1).clamp(min=1e-12))
    chance = float(torch.cat(covered).mean())
    assert 0.05 < chance < 0.11
    for name, found in hits.items():
        assert abs(float(torch.cat(found).mean()) - chance) < 0.06, (name, chance)
        assert abs(float(torch.cat(energy[name]).mean()) - chance) < 0.03, (name, chance)


def test_sanity_baselines_are_not_faithful(model):
    """ABPC (docs/protocol.md 5) on synthetic v3: the maps that ignore the image are within a
    few points of 0 (the centred Gaussian scored 12.5 on v2, whose ground truth lay more in the
    middle), far below AG-CAM's. The means are those of the committed reference run (all 500
    default val images, ground-truth class); its rows are first recomputed with the current code
    for images spread over the 500, so the committed numbers are this code's. Deterministic: the
    model, the images and the maps are fixed."""
    reference = pd.read_csv(REFERENCE / "faithfulness.csv").set_index(["method", "image_id"])
    settings = OmegaConf.load(REFERENCE / "config.yaml")
    assert settings.dataset.params.num_images == REFERENCE_IMAGES and settings.faithfulness.mode == "abpc"
    dc = data_config(model)
    ds = build_dataset("synthetic", transform=EvalTransform(dc.input_size[1:], dc.mean, dc.std),
                       **OmegaConf.to_container(settings.dataset.params))
    faith = faithfulness_settings(settings.faithfulness)
    # the run's batch size: the explainers' float rounding depends on the batch shape (~1e-5)
    batch = collate_samples([ds[i] for i in RECHECKED])
    assert len(RECHECKED) == settings.batch_size
    with torch.no_grad():
        logits = model(batch.images)
    for name in BASELINES_AND_AGCAM:
        explainer = get_explainer(name, model, **OmegaConf.to_container(settings.method[name].params))
        maps = explainer(batch.images, batch.labels).maps
        heat, degenerate = to_heatmaps(maps, (224, 224))
        scores = score_batch(model, batch.images, heat, batch.labels, faith, clean_logits=logits)
        rows = reference.loc[[(name, s.image_id) for s in batch.samples]]
        assert not degenerate.any() and (rows["target"] == batch.labels.numpy()).all()
        for column in ("auc_morf", "auc_lerf", "abpc"):
            expected = rows[column].to_numpy()
            # 1e-4 (0.01 points): float rounding of another CPU's kernels stays far below it
            assert scores[column].numpy() == pytest.approx(expected, abs=1e-4, rel=0), (name, column)
    counts = reference.reset_index().groupby("method")["abpc"].count()
    mean = {name: 100 * reference.loc[name, "abpc"].mean() for name in BASELINES_AND_AGCAM}
    assert all(counts[name] == REFERENCE_IMAGES for name in BASELINES_AND_AGCAM), counts
    assert abs(mean["random"]) < BASELINE_ABPC and abs(mean["center"]) < BASELINE_ABPC, mean
    assert mean["agcam"] > 20 + max(mean["random"], mean["center"]), mean
