"""Sanity baselines (random, center) and the explainer registry."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_vit

import methods
from methods import get_explainer


def _images(n=3, seed=1, size=(32, 32)):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


# -- random ----------------------------------------------------------------------------------
def test_random_is_deterministic_per_seed(tiny_vit):
    """Same seed -> same maps (also from a new explainer); another seed -> different maps."""
    images = _images()
    a = get_explainer("random", tiny_vit, seed=3)(images).maps
    b = get_explainer("random", tiny_vit, seed=3)(images).maps
    c = get_explainer("random", tiny_vit, seed=4)(images).maps
    assert a.shape == (3, 4, 4) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1]), "different images get different maps"


def test_random_batched_equals_one_at_a_time(tiny_vit):
    """An image's random map does not depend on its batch neighbours or position."""
    images = _images(3, seed=2)
    explainer = get_explainer("random", tiny_vit, seed=0)
    batched = explainer(images).maps
    for i in range(3):
        assert torch.equal(batched[i], explainer(images[i:i + 1]).maps[0])
    reordered = explainer(images.flip(0)).maps
    assert torch.equal(reordered, batched.flip(0))


def test_random_values_in_unit_interval(tiny_vit):
    """Random maps lie in [0, 1) and are not constant."""
    maps = get_explainer("random", tiny_vit)(_images(4)).maps
    assert maps.min() >= 0 and maps.max() < 1
    assert maps.std() > 0.1


# -- center ----------------------------------------------------------------------------------
def test_center_peak_at_centre_of_odd_grid():
    """On a 5x5 grid the unique maximum is the centre cell, equal to 1."""
    model = make_vit(img_size=40)
    maps = get_explainer("center", model)(_images(2, size=(40, 40))).maps
    assert maps.shape == (2, 5, 5)
    for m in maps:
        assert int(m.argmax()) == 12
        assert math.isclose(float(m[2, 2]), 1.0, rel_tol=1e-6)
        assert (m.flatten()[torch.arange(25) != 12] < m[2, 2]).all()


def test_center_even_grid_peaks_on_the_four_central_cells(tiny_vit):
    """On a 4x4 grid the four central cells share the maximum."""
    m = get_explainer("center", tiny_vit)(_images(1)).maps[0]
    central = m[1:3, 1:3]
    assert torch.allclose(central, torch.full_like(central, float(m.max())))
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1:3, 1:3] = False
    assert (m[mask] < m.max()).all()


@pytest.mark.parametrize("img_size,grid", [(32, (4, 4)), (40, (5, 5)), ((32, 48), (4, 6))])
def test_center_is_symmetric(img_size, grid):
    """The Gaussian equals its vertical and horizontal flips (square and non-square grids)."""
    model = make_vit(img_size=img_size)
    size = img_size if isinstance(img_size, tuple) else (img_size, img_size)
    m = get_explainer("center", model)(_images(1, size=size)).maps
    assert m.shape == (1, *grid)
    torch.testing.assert_close(m, m.flip(-1), rtol=0, atol=1e-7)
    torch.testing.assert_close(m, m.flip(-2), rtol=0, atol=1e-7)


def test_center_sigma_changes_spread(tiny_vit):
    """A larger sigma raises the corners relative to the centre; the value follows exp(-d^2/2s^2)."""
    images = _images(1)
    narrow = get_explainer("center", tiny_vit, sigma=0.1)(images).maps[0]
    wide = get_explainer("center", tiny_vit, sigma=0.5)(images).maps[0]
    assert float(wide[0, 0]) > float(narrow[0, 0])
    # corner cell centre is 1.5 cells from the centre in each axis on a 4x4 grid
    d2 = 2 * (1.5 / (0.5 * 4)) ** 2
    assert math.isclose(float(wide[0, 0]), math.exp(-0.5 * d2), rel_tol=1e-5)


@pytest.mark.parametrize("sigma", [0.0, -0.25])
def test_center_non_positive_sigma_raises(tiny_vit, sigma):
    """sigma <= 0 raises ValueError."""
    with pytest.raises(ValueError, match="sigma"):
        get_explainer("center", tiny_vit, sigma=sigma)


@pytest.mark.parametrize("name", ["random", "center"])
def test_baselines_report_logits_and_are_class_agnostic(tiny_vit, name):
    """Logits equal model(images); class_specific is False; targets are given or predicted."""
    images = _images()
    out = get_explainer(name, tiny_vit)(images, torch.tensor([4, 0, 2]))
    with torch.no_grad():
        logits = tiny_vit(images)
    torch.testing.assert_close(out.logits, logits)
    assert out.class_specific is False
    assert out.targets.tolist() == [4, 0, 2] and out.target_source == "given"
    other = get_explainer(name, tiny_vit)(images, torch.tensor([1, 1, 1]))
    assert torch.equal(out.maps, other.maps)
    pred = get_explainer(name, tiny_vit)(images)
    assert torch.equal(pred.targets, logits.argmax(1)) and pred.target_source == "predicted"


@pytest.mark.parametrize("name", ["random", "center"])
def test_baselines_validate_targets(tiny_vit, name):
    """A target out of range raises ValueError naming the number of classes."""
    with pytest.raises(ValueError, match="5 classes"):
        get_explainer(name, tiny_vit)(_images(1), torch.tensor([7]))


@pytest.mark.parametrize("name", ["random", "center"])
def test_baselines_work_without_class_token(name):
    """Baselines need no CLS token: an average-pooled model is accepted."""
    model = make_vit(class_token=False, global_pool="avg")
    out = get_explainer(name, model)(_images(2))
    assert out.maps.shape == (2, 4, 4)


@pytest.mark.parametrize("name", ["random", "center"])
def test_baselines_reuse_given_logits_without_a_forward(tiny_vit, name):
    """With logits= the baseline returns those logits and their argmax, and never runs the model."""
    images = _images(2)
    fake = torch.tensor([[0.0, 0.0, 0.0, 9.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    calls = []
    handle = tiny_vit.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        out = get_explainer(name, tiny_vit)(images, logits=fake)
    finally:
        handle.remove()
    assert calls == []
    torch.testing.assert_close(out.logits, fake)
    assert out.targets.tolist() == [3, 0] and out.target_source == "predicted"
    assert torch.equal(out.maps, get_explainer(name, tiny_vit)(images).maps)


# -- registry --------------------------------------------------------------------------------
def test_registry_lists_builtin_methods():
    """available() contains the built-in explainers."""
    names = methods.available()
    assert {"agcam", "rollout", "random", "center"} <= set(names)
    assert names == sorted(names)


def test_unknown_method_lists_valid_names(tiny_vit):
    """An unknown name raises ValueError listing every valid name."""
    with pytest.raises(ValueError) as info:
        get_explainer("nope", tiny_vit)
    message = str(info.value)
    assert "nope" in message
    for name in methods.available():
        assert name in message


@pytest.mark.parametrize("name", ["agcam", "rollout", "random", "center"])
def test_unknown_parameter_raises_type_error(tiny_vit, name):
    """An unknown keyword parameter raises TypeError."""
    with pytest.raises(TypeError):
        get_explainer(name, tiny_vit, no_such_option=1)
