"""ViT-CX (`vit_cx`): the authors' maps (a stored fixture), the causal score and density
correction written out without noise, the merging by hand, the model matrix. The command on
the shipped model runs in tests/test_tis.py (one run for both sampling methods)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import assert_batched_equals_single, make_vit
from test_model_matrix import CONFIGS, SMALL, _model

from wsol_bench.errors import SettingError
from wsol_bench.methods import get_explainer
from wsol_bench.methods.capture import UnsupportedModelError
from wsol_bench.methods.vit_cx import merge_labels

DATA = Path(__file__).parent / "data" / "vit_cx"


def _images(count: int, size=(32, 32), seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", ["square_t01", "wide_t015"])
def test_maps_equal_the_authors_code(case):
    """The authors' ViT_CX (commit, command and shims in data/vit_cx/reference.json) on the
    same seeded ViT, images, targets and noise: equal within float noise (measured: at most
    1.5e-8 on maps of about 0.04), with the same number of masks after the merging."""
    setting = json.loads((DATA / "reference.json").read_text())["cases"][case]
    reference = np.load(DATA / "reference_maps.npz")
    model = make_vit(setting["seed"], img_size=tuple(setting["img_size"]), patch_size=8, embed_dim=24, depth=2,
                     num_heads=3, num_classes=5)
    explainer = get_explainer("vit_cx", model, distance_threshold=setting["distance_threshold"], batch_size=7)
    images = torch.from_numpy(reference[f"{case}_images"])
    channels = explainer._record(images)[1]
    counts = [len(grids) for grids in explainer._merged_grids(channels, tuple(images.shape[-2:]))]
    assert counts == reference[f"{case}_masks"].tolist() == setting["masks"]
    out = explainer(images, torch.from_numpy(reference[f"{case}_targets"]))
    torch.testing.assert_close(out.maps, torch.from_numpy(reference[f"{case}_maps"]), atol=1e-7, rtol=1e-5)


def test_unmerged_noise_free_map_is_the_formula_written_out():
    """distance_threshold 0 (no merge: one mask per channel of blocks[-1].norm1) and noise_std
    0: M_i = min-max of channel i upsampled bilinearly to the input, s_i = p(x M_i) - p(x) +
    p(x), map = (1/N) sum_i s_i M_i / sum_j M_j, p the target's softmax probability."""
    model = make_vit(8, img_size=(32, 48), patch_size=8, embed_dim=6, depth=2, num_heads=2, num_classes=4)
    images, targets = _images(2, (32, 48), seed=8), torch.tensor([2, 0])
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(images))
        x = model.blocks[0](x)
        tokens = model.blocks[1].norm1(x)[:, 1:]  # [B, 24, 6]
        grids = tokens.transpose(1, 2).reshape(2, 6, 4, 6)
        up = F.interpolate(grids, size=(32, 48), mode="bilinear", align_corners=False)
        low, high = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        masks = (up - low) / (high - low)  # [B, 6, 32, 48]
        expected = []
        for b in range(2):
            clean = model(images[b:b + 1]).softmax(-1)[0, targets[b]]
            masked = model(images[b] * masks[b][:, None]).softmax(-1)[:, targets[b]]
            weights = masked - clean + clean
            expected.append((weights[:, None, None] * masks[b]).sum(0) / masks[b].sum(0) / 6)
    out = get_explainer("vit_cx", model, distance_threshold=0.0, noise_std=0.0, batch_size=4)(images, targets)
    assert out.maps.shape == (2, 32, 48)
    torch.testing.assert_close(out.maps, torch.stack(expected), atol=1e-7, rtol=1e-5)


def test_merging_is_complete_linkage_below_the_threshold():
    """a-b 0.05, b-c 0.08, a-c 0.2, d far: complete linkage merges a and b (0.05), then {a, b}
    and c are 0.2 apart (single linkage would take 0.08): [0, 0, 1, 2]. A distance equal to the
    threshold is not merged (scikit-learn's rule). Labels follow the first member."""
    distance = np.array([[0, 0.05, 0.2, 1], [0.05, 0, 0.08, 1], [0.2, 0.08, 0, 1], [1, 1, 1, 0]])
    assert merge_labels(distance, 0.1).tolist() == [0, 0, 1, 2]
    assert merge_labels(distance, 0.2).tolist() == [0, 0, 1, 2]
    assert merge_labels(distance, 0.21).tolist() == [0, 0, 0, 1]
    assert merge_labels(distance, 0.05).tolist() == [0, 1, 2, 3]
    assert merge_labels(distance[[3, 0, 1, 2]][:, [3, 0, 1, 2]], 0.1).tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_runs_on_the_model_matrix(key):
    """Pixel maps at the input size, finite, batched equal to one image at a time (the noise
    is drawn per image), the model's own logits."""
    model = _model(key)
    h, w = model.patch_embed.img_size
    images, targets = _images(3, (h, w), seed=2), torch.tensor([0, 4, 2])
    explainer = get_explainer("vit_cx", model, batch_size=16)
    out = explainer(images, targets)
    assert out.maps.shape == (3, h, w) and torch.isfinite(out.maps).all()
    assert_batched_equals_single(explainer, model, images, targets, rtol=1e-5)


def test_class_specific_seeded_and_average_pooled_models_explained():
    """Another target gives another map; another seed other noise; the same call the same map;
    a model without a class token is explained (the masks perturb pixels)."""
    model = make_vit(9, img_size=32, patch_size=8)
    images = _images(2, seed=9)
    explainer = get_explainer("vit_cx", model)
    first = explainer(images, torch.tensor([0, 0])).maps
    assert not torch.allclose(first, explainer(images, torch.tensor([3, 3])).maps)
    torch.testing.assert_close(first, explainer(images, torch.tensor([0, 0])).maps, rtol=0, atol=0)
    assert not torch.allclose(first, get_explainer("vit_cx", model, seed=1)(images, torch.tensor([0, 0])).maps)
    torch.manual_seed(0)
    pooled = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, class_token=False,
                               global_pool="avg", **SMALL).eval()
    maps = get_explainer("vit_cx", pooled)(images).maps
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all()


def test_constant_channels_make_no_mask():
    """A channel of norm1 with weight 0 is its bias at every patch: no spatial information (the
    authors' code would turn its 0/0 mask into a NaN map). It is left out: D - 1 masks
    without merging, and a finite map."""
    model = make_vit(10, img_size=32, patch_size=8)
    model.blocks[-1].norm1.weight[5] = 0.0
    explainer = get_explainer("vit_cx", model, distance_threshold=0.0)
    images = _images(2, seed=10)
    counts = [len(grids) for grids in explainer._merged_grids(explainer._record(images)[1], (32, 32))]
    assert counts == [23, 23]
    assert torch.isfinite(explainer(images).maps).all()


@pytest.mark.parametrize("params, error, match", [
    ({"distance_threshold": -0.1}, SettingError, "distance_threshold=-0.1"),
    ({"noise_std": "high"}, SettingError, "noise_std=.high."),
    ({"noise_std": float("inf")}, SettingError, "noise_std=inf"),
    ({"batch_size": 0}, SettingError, "batch_size=0"),
    ({"target_layer": "blocks.9.norm1"}, UnsupportedModelError, "has 3 entries"),
])
def test_bad_settings_are_refused(params, error, match):
    with pytest.raises(error, match=match):
        get_explainer("vit_cx", make_vit(), **params)


def test_a_layer_without_tokens_is_refused():
    """The patch convolution gives [B, D, gh, gw], not tokens: refused naming the setting."""
    with pytest.raises(UnsupportedModelError, match="target_layer"):
        get_explainer("vit_cx", make_vit(), target_layer="patch_embed.proj")(_images(1))
