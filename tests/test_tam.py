"""Transition Attention Maps against reference maps computed with the authors' code
(tests/data/tam), the Markov chain worked by hand, the integrated gradient from an independent
forward, the model matrix and refusals (the command test is in tests/test_legrad.py)."""

from __future__ import annotations

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
from wsol_bench.methods.tam import transition_state

DATA = Path(__file__).parent / "data" / "tam"
REFERENCE = json.loads((DATA / "reference.json").read_text())


@pytest.mark.parametrize("key", sorted(REFERENCE["keys"]))
def test_maps_equal_the_authors_code(key):
    """Raw maps equal generate_transition_attention_maps (20 steps) within float32 rounding."""
    model_key, start_layer = REFERENCE["keys"][key]
    spec = REFERENCE["models"][model_key]
    model, images = reference_vit(spec)
    maps = get_explainer("tam", model, start_layer=start_layer)(images, torch.tensor(spec["targets"])).maps
    expected = torch.from_numpy(np.load(DATA / "reference.npz")[key])
    scale = float(expected.abs().max())
    torch.testing.assert_close(maps.flatten(1), expected, atol=1e-6 * scale, rtol=0)


def test_markov_chain_by_hand():
    """Three tokens, two blocks. Last block's class row r = [1/2, 1/4, 1/4]; block 0's
    Abar = [[1, 0, 0], [0, 1/2, 1/2], [1/4, 1/4, 1/2]]: r Abar = [1/2 + 1/16, 1/8 + 1/16,
    1/8 + 1/8] = [9/16, 3/16, 4/16]; with the residual, r (Abar + I) = [17/16, 7/16, 8/16].
    Starting at block 1, only r is left."""
    last = torch.tensor([[[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    first = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.25, 0.25, 0.5]]])
    torch.testing.assert_close(transition_state([first, last]), torch.tensor([[17 / 16, 7 / 16, 8 / 16]]))
    torch.testing.assert_close(transition_state([first, last], start_layer=1), torch.tensor([[0.5, 0.25, 0.25]]))


def test_formula_by_an_independent_forward():
    """steps = 3, path {0, 1/2, 1}: W = mean_h ReLU(mean of dy_c/dA^{L-1}(alpha x))[CLS row];
    map = transition_state(head-mean attentions of x) * W, patch columns; gradients from a
    hand-written forward of the same weights."""
    model = make_vit(6, depth=3)
    images, targets = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6)), torch.tensor([3, 1])
    with torch.no_grad():
        _, attentions, _ = reference_forward(model, images)
    grads = []
    for alpha in (0.0, 0.5, 1.0):
        logits, att, _ = reference_forward(model, images * alpha, detach=False)
        grads.append(torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), att[-1])[0])
    weight = (sum(grads) / 3).clamp(min=0).mean(1)[:, 0]
    state = transition_state([a.mean(1) for a in attentions])
    expected = (state * weight)[:, 1:].reshape(2, 4, 4)
    maps = get_explainer("tam", model, steps=3)(images, targets).maps
    torch.testing.assert_close(maps, expected, atol=1e-9, rtol=1e-5)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_model_matrix_batched_equals_single_and_class_specific(key):
    model = _model(key)
    h, w = model.patch_embed.img_size
    images = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 4, 2])
    explainer = get_explainer("tam", model, steps=4)
    out = explainer(images, targets)
    assert out.maps.shape == (3, *model.patch_embed.grid_size) and torch.isfinite(out.maps).all()
    assert_batched_equals_single(explainer, model, images, targets, atol=1e-9)
    assert not torch.allclose(explainer(images, (targets + 1) % 5).maps, out.maps)
    assert hook_count([a.attn_drop for a in attention_modules(model)]) == 0


def test_model_without_class_token_is_refused():
    with pytest.raises(UnsupportedModelError, match="class token|global_pool"):
        get_explainer("tam", _avg_pooled())


@pytest.mark.parametrize("params", [{"steps": 1}, {"steps": 2.5}, {"steps": True}, {"start_layer": 3}])
def test_bad_settings_are_refused(params):
    with pytest.raises(SettingError, match="tam"):
        get_explainer("tam", make_vit(depth=3), **params)
