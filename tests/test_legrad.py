"""LeGrad against reference maps computed with the authors' reduction (tests/data/legrad), a
logit-lens property that pins each layer's score, an independent last-layer computation, the
model matrix, refusals and the command."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_batched_equals_single, make_vit, reference_vit
from test_agcam import reference_forward
from test_model_matrix import CONFIGS, _avg_pooled, _model

from wsol_bench.errors import SettingError
from wsol_bench.methods import get_explainer
from wsol_bench.methods.capture import UnsupportedModelError, attention_modules, hook_count

DATA = Path(__file__).parent / "data" / "legrad"
REFERENCE = json.loads((DATA / "reference.json").read_text())


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - low) / (high - low)).reshape(maps.shape)


def _reference_case(model_key: str):
    spec = REFERENCE["models"][model_key]
    model, images = reference_vit(spec)
    return model, images, torch.tensor(spec["targets"])


@pytest.mark.parametrize("key", sorted(REFERENCE["keys"]))
def test_maps_equal_the_authors_reduction(key):
    """The raw sums over layers, and after min-max, equal those of the authors' reduction
    (adapted to a timm classifier, see reference.json) within float32 rounding."""
    model_key, start_layer, layer_minmax = REFERENCE["keys"][key]
    model, images, targets = _reference_case(model_key)
    maps = get_explainer("legrad", model, start_layer=start_layer, layer_minmax=layer_minmax)(images, targets).maps
    raw, scaled = torch.from_numpy(np.load(DATA / "reference.npz")[key])
    torch.testing.assert_close(maps, raw, atol=1e-6 * float(raw.abs().max()), rtol=0)
    torch.testing.assert_close(_minmax(maps), scaled, atol=1e-6, rtol=0)


def _truncated(model: torch.nn.Module, depth: int) -> torch.nn.Module:
    short = copy.deepcopy(model)
    short.blocks = short.blocks[:depth]
    return short


def test_each_layer_term_is_the_last_layer_term_of_the_model_cut_after_that_block():
    """The logit lens: block l's score is the class logit of the model with every later block
    removed, so the map is the sum over l of the last-layer-only map of that shorter model."""
    model = make_vit(3, depth=3)
    images, targets = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 4])
    full = get_explainer("legrad", model)(images, targets).maps
    parts = [get_explainer("legrad", _truncated(model, depth), start_layer=depth - 1)(images, targets).maps
             for depth in (1, 2, 3)]
    torch.testing.assert_close(full, sum(parts), atol=1e-7, rtol=1e-5)
    assert all(p.abs().sum() > 0 for p in parts)


def test_last_layer_term_by_an_independent_forward():
    """start_layer = L-1: ReLU(dy_c/dA^{L-1}) averaged over heads and every query row, patch
    columns, with the gradient from a hand-written forward of the same weights."""
    model = make_vit(4, depth=2)
    images, targets = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)), torch.tensor([0, 2, 4])
    logits, attentions, _ = reference_forward(model, images, detach=False)
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), attentions[-1])
    expected = grad.clamp(min=0).mean((1, 2))[:, 1:].reshape(3, 4, 4)
    out = get_explainer("legrad", model, start_layer=1)(images, targets)
    torch.testing.assert_close(out.maps, expected, atol=1e-8, rtol=1e-5)
    torch.testing.assert_close(out.logits, logits.detach(), atol=1e-5, rtol=1e-5)


def test_layer_minmax_scales_every_layer_to_one():
    """With layer_minmax each block adds a map spanning [0, 1]: the sum stays within [0, L]."""
    model = make_vit(5, depth=3)
    maps = get_explainer("legrad", model, layer_minmax=True)(torch.randn(2, 3, 32, 32)).maps
    assert float(maps.min()) >= 0 and float(maps.max()) <= 3 + 1e-6 and float(maps.max()) > 1


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_model_matrix_batched_equals_single_and_class_specific(key):
    model = _model(key)
    h, w = model.patch_embed.img_size
    images = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 4, 2])
    explainer = get_explainer("legrad", model)
    out = explainer(images, targets)
    assert out.maps.shape == (3, *model.patch_embed.grid_size) and torch.isfinite(out.maps).all()
    assert_batched_equals_single(explainer, model, images, targets, atol=1e-7)
    assert not torch.allclose(explainer(images, (targets + 1) % 5).maps, out.maps)
    assert hook_count(model.blocks) == 0 and hook_count([a.attn_drop for a in attention_modules(model)]) == 0


def test_average_pooled_model_is_explained_through_its_own_pooling():
    """No class token needed: the lens pools as the model does (mean over the patch tokens)."""
    model = _avg_pooled()
    out = get_explainer("legrad", model)(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert out.maps.shape == (2, 4, 4) and torch.isfinite(out.maps).all() and out.maps.sum() > 0


@pytest.mark.parametrize("params, error", [({"start_layer": 3}, SettingError), ({"start_layer": -1}, SettingError),
                                           ({"layer_minmax": "yes"}, SettingError)])
def test_bad_settings_are_refused(params, error):
    with pytest.raises(error, match="legrad"):
        get_explainer("legrad", make_vit(depth=3), **params)


def test_model_whose_lens_is_not_its_output_is_refused():
    """A forward that changes the logits after the head makes every block's score wrong."""
    model = make_vit(depth=2)
    plain = model.forward
    model.forward = lambda x: plain(x) * 2.0
    with pytest.raises(UnsupportedModelError, match="logit lens"):
        get_explainer("legrad", model)(torch.randn(1, 3, 32, 32))
    assert hook_count(model.blocks) == 0


def test_legrad_and_tam_run_through_the_command_on_the_shipped_model(tmp_path, command):
    import pandas as pd

    proc = command("wsol-bench", ["method=[legrad,tam]", "method.tam.params.steps=3", "dataset.params.num_images=4",
                                  "batch_size=4", "gallery_images=0", "progress=false", "metric.image_filter=all",
                                  f"store.root={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = pd.read_csv(tmp_path / "run" / "records.csv")
    assert sorted(set(records["method"])) == ["legrad", "tam"]
    assert (records.groupby("method")["image_id"].nunique() == 4).all() and (records["degenerate"] == 0).all()
    assert sorted(pd.read_csv(tmp_path / "run" / "table.csv")["method"]) == ["legrad", "tam"]
