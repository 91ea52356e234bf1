"""Transformer Input Sampling (`tis`): the authors' maps (a stored fixture), the formula worked out
independently when every channel is its own mask, the k-means by hand, the model matrix, and
the command on the shipped model (with `vit_cx`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from conftest import make_vit
from test_model_matrix import CONFIGS, SMALL, _model

from wsol_bench.errors import SettingError
from wsol_bench.methods import get_explainer
from wsol_bench.methods.capture import UnsupportedModelError
from wsol_bench.methods.tis import batched_kmeans

DATA = Path(__file__).parent / "data" / "tis"


def _images(count: int, size=(32, 32), seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", ["k16_r05", "k8_r025_075", "k100_capped"])
def test_maps_equal_the_authors_code(case):
    """The authors' TIS (commit and command in data/tis/reference.json) on the same seeded ViT,
    images, targets and k-means start: equal within float noise (measured: at most 3e-8)."""
    params = json.loads((DATA / "reference.json").read_text())["cases"][case]
    params = {k: v for k, v in params.items() if k != "note"}
    reference = np.load(DATA / "reference_maps.npz")
    model = make_vit(7, img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=3, num_classes=5)
    out = get_explainer("tis", model, **params)(torch.from_numpy(reference["images"]),
                                                torch.from_numpy(reference["targets"]))
    torch.testing.assert_close(out.maps, torch.from_numpy(reference[case]), atol=1e-6, rtol=1e-5)


def test_one_mask_per_channel_is_the_formula_written_out():
    """With n_masks >= the channels (depth x width), each channel is its own k-means cluster, so
    the masks are the top half of each channel of the blocks' patch tokens. Written out here:
    the model's blocks, norm and head run on the prefix + kept tokens (tokens removed, not
    blacked out), score = softmax of the target, map = sum score x mask / sum mask."""
    model = make_vit(3, img_size=32, patch_size=8, embed_dim=6, depth=2, num_heads=2, num_classes=4)
    images, targets = _images(2, seed=3), torch.tensor([1, 3])
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(images))
        outputs, x = [], tokens
        for block in model.blocks:
            x = block(x)
            outputs.append(x)
        channels = torch.cat(outputs, -1)[:, 1:].transpose(1, 2)  # [B, 12, 16]
        expected = []
        for b in range(2):
            kept = channels[b].topk(8, dim=-1).indices
            masks = torch.zeros(12, 16).scatter_(1, kept, 1.0)
            scores = []
            for index in kept:
                subset = torch.cat([tokens[b:b + 1, :1], tokens[b:b + 1, 1 + index]], 1)
                logits = model.forward_head(model.norm(model.blocks(subset)))
                scores.append(logits.softmax(-1)[0, targets[b]])
            expected.append(((torch.stack(scores)[:, None] * masks).sum(0) / masks.sum(0)).reshape(4, 4))
    out = get_explainer("tis", model, n_masks=12, batch_size=5)(images, targets)
    torch.testing.assert_close(out.maps, torch.stack(expected), atol=1e-6, rtol=1e-5)


def test_kmeans_by_hand():
    """Points 0, 1, 10, 11 from centroids {0, 1}: {0} {1, 10, 11} -> centroids 0, 22/3 ->
    {0, 1} {10, 11} -> 0.5, 10.5 (then no shift). Points 5, 5, 9, 5 from {5, 5}: ties go to the
    first centroid, the second is left empty and becomes 0 (the authors' k-means), which no
    point is nearer: 6, 0."""
    points = torch.tensor([[[0.0], [1.0], [10.0], [11.0]], [[5.0], [5.0], [9.0], [5.0]]])
    centroids = batched_kmeans(points, torch.tensor([[0, 1], [0, 1]]))
    torch.testing.assert_close(centroids, torch.tensor([[[0.5], [10.5]], [[6.0], [0.0]]]))


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_runs_on_the_model_matrix(key):
    """Grid maps, finite, batched equal to one image at a time, the model's own logits."""
    model = _model(key)
    h, w = model.patch_embed.img_size
    images, targets = _images(3, (h, w), seed=2), torch.tensor([0, 4, 2])
    explainer = get_explainer("tis", model, n_masks=24, batch_size=20)
    out = explainer(images, targets)
    assert out.maps.shape == (3, *model.patch_embed.grid_size) and torch.isfinite(out.maps).all()
    single = torch.cat([explainer(images[i:i + 1], targets[i:i + 1]).maps for i in range(3)])
    torch.testing.assert_close(out.maps, single, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, model(images), rtol=1e-5, atol=1e-5)


def test_class_specific_seeded_and_average_pooled_models_explained():
    """Another target gives another map; another seed another k-means start; a model without
    a class token (average pooling over the kept tokens) is explained."""
    model = make_vit(4, img_size=32, patch_size=8, embed_dim=24, depth=2)
    images = _images(2, seed=4)
    explainer = get_explainer("tis", model, n_masks=16)
    first = explainer(images, torch.tensor([0, 0])).maps
    assert not torch.allclose(first, explainer(images, torch.tensor([3, 3])).maps)
    torch.testing.assert_close(first, explainer(images, torch.tensor([0, 0])).maps, rtol=0, atol=0)
    assert not torch.allclose(first, get_explainer("tis", model, n_masks=16, seed=1)(images, torch.tensor([0, 0])).maps)
    torch.manual_seed(0)
    pooled = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, class_token=False,
                               global_pool="avg", **SMALL).eval()
    maps = get_explainer("tis", pooled, n_masks=16)(images).maps
    assert maps.shape == (2, 4, 4) and torch.isfinite(maps).all()


def test_more_masks_than_channels_uses_one_mask_per_channel(caplog):
    """k-means cannot make more clusters than its 2 x 24 points: n_masks=500 warns and computes
    what n_masks=48 computes."""
    model = make_vit(5, img_size=32, patch_size=8, embed_dim=24, depth=2)
    images = _images(2, seed=5)
    with caplog.at_level(logging.WARNING, logger="wsol_bench"):
        capped = get_explainer("tis", model, n_masks=500)(images).maps
    assert "n_masks=500 > the 48 embedding channels" in caplog.text
    torch.testing.assert_close(capped, get_explainer("tis", model, n_masks=48)(images).maps, rtol=0, atol=0)


@pytest.mark.parametrize("params, match", [
    ({"n_masks": 0}, "n_masks=0"), ({"batch_size": 2.5}, "batch_size=2.5"),
    ({"tokens_ratio": 0.0}, "tokens_ratio=0.0"), ({"tokens_ratio": [0.5, 1.5]}, r"tokens_ratio=\[0.5, 1.5\]"),
    ({"tokens_ratio": 0.05}, "keeps no token of the model's 16 patches"),
])
def test_bad_settings_are_refused(params, match):
    with pytest.raises(SettingError, match=match):
        get_explainer("tis", make_vit(), **params)


def test_model_without_position_embedding_is_refused():
    """Without a position embedding timm never calls `pos_drop`: there is nowhere to drop tokens."""
    model = make_vit(pos_embed="none")
    with pytest.raises(UnsupportedModelError, match="pos_drop"):
        get_explainer("tis", model, n_masks=8)(_images(1))


def test_tis_and_vit_cx_run_end_to_end_on_the_shipped_model(tmp_path, command):
    """Both methods through the command on the shipped model (4 images, one batch), with few
    masks to stay fast (tis: 16, enough to cover every patch; vit_cx: channels merged below
    cosine distance 0.3, 2 masks): every image recorded, no degenerate map."""
    proc = command("wsol-bench", ["method=[tis,vit_cx]", "method.tis.params.n_masks=16",
                                  "method.vit_cx.params.distance_threshold=0.3", "dataset.params.num_images=4",
                                  "batch_size=4", "progress=false", "gallery_images=0", "metric.image_filter=all",
                                  f"store.root={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = pd.read_csv(tmp_path / "run" / "records.csv")
    assert records.groupby("method")["image_id"].nunique().to_dict() == {"tis": 4, "vit_cx": 4}
    assert records["degenerate"].sum() == 0
