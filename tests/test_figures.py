"""Heatmap gallery (one row per image, input + one column per method) and two-class gallery
(two columns per method): panel counts from the image size, no blank panels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsol_bench.report.figures import class_gallery, denormalize, heatmap_gallery


def test_gallery_has_one_panel_per_image_and_method(tmp_path):
    """3 images x (input + 2 methods) at 2.2 in per panel and 100 dpi: 660 x 660 pixels."""
    gen = torch.Generator().manual_seed(0)
    images = [denormalize(torch.randn(3, 32, 32, generator=gen), (0.5,) * 3, (0.5,) * 3) for _ in range(3)]
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 16.0]])] * 3
    maps = {"peaked": torch.rand(3, 4, 4, generator=gen), "constant": torch.ones(3, 4, 4)}
    path = heatmap_gallery(images, boxes, maps, tmp_path / "g.png")
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape == (660, 660, 3)
    assert picture.std() > 10  # not blank
    # Each panel column differs from its neighbours (input vs overlays).
    cols = np.array_split(picture, 3, axis=1)
    assert not np.allclose(cols[0], cols[1]) and not np.allclose(cols[1], cols[2])


def test_denormalize_inverts_the_normalisation():
    """(x - mean) / std undone exactly, channels last, clamped to [0, 1]."""
    x = torch.rand(3, 5, 7)
    norm = (x - 0.2) / 0.4
    out = denormalize(norm, (0.2,) * 3, (0.4,) * 3)
    assert out.shape == (5, 7, 3)
    torch.testing.assert_close(out, x.permute(1, 2, 0))


def _panels(picture: np.ndarray, rows: int, cols: int) -> list[np.ndarray]:
    return [p for band in np.array_split(picture, rows, axis=0) for p in np.array_split(band, cols, axis=1)]


def test_class_gallery_has_two_panels_per_method_and_none_blank(tmp_path):
    """2 images x (input + 2 methods x 2 classes) at 220 px per panel: 440 x 1100 pixels;
    every panel is drawn, and a class-specific map differs between its A and B panels."""
    gen = torch.Generator().manual_seed(1)
    images = [denormalize(torch.randn(3, 32, 32, generator=gen), (0.5,) * 3, (0.5,) * 3) for _ in range(2)]
    boxes = [(torch.tensor([[2.0, 2.0, 12.0, 12.0]]), torch.tensor([[18.0, 18.0, 30.0, 30.0]]))] * 2
    left = torch.zeros(2, 4, 4)
    left[:, :, :2] = 1
    maps = {"specific": (left, left.flip(-1)), "agnostic": (torch.rand(2, 4, 4, generator=gen),) * 2}
    path = class_gallery(images, boxes, maps, tmp_path / "c.png", [("circle", "star"), ("ring", "cross")])
    picture = np.asarray(Image.open(path).convert("RGB")).astype(float)
    assert picture.shape == (440, 1100, 3)
    panels = _panels(picture, 2, 5)
    assert all(p.std() > 10 for p in panels)
    # Row 0: the specific method's A panel (left half hot) differs from its B panel.
    assert np.abs(panels[1] - panels[2]).mean() > 5


def test_class_gallery_refuses_mismatched_inputs(tmp_path):
    image = [torch.zeros(8, 8, 3)]
    box = [(torch.zeros(0, 4), torch.zeros(0, 4))]
    with pytest.raises(ValueError, match="two map tensors"):
        class_gallery(image, box, {"m": (torch.rand(1, 2, 2),)}, tmp_path / "x.png", [("a", "b")])
    with pytest.raises(ValueError, match="1 images but 1 box pairs and 0 name pairs"):
        class_gallery(image, box, {"m": (torch.rand(1, 2, 2),) * 2}, tmp_path / "x.png", [])


def test_class_gallery_script_runs_end_to_end(tmp_path):
    """scripts/class_gallery.py on the shipped model: 2 two-class images, AG-CAM (class-
    specific) and rollout (class-agnostic): a 2 x 5 panel figure; rollout's maps for A and B
    are identical, AG-CAM's are not."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "class_gallery.py"
    spec = importlib.util.spec_from_file_location("class_gallery_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    captured = {}
    real = module.class_gallery

    def keep_maps(images, boxes, maps, path, names, **kwargs):
        captured.update(maps=maps, names=names)
        return real(images, boxes, maps, path, names, **kwargs)

    module.class_gallery = keep_maps
    path = module.make_class_gallery(tmp_path / "classes.png", num_images=2, methods=["agcam", "rollout"])
    assert np.asarray(Image.open(path)).shape[:2] == (440, 1100)
    agcam, rollout = captured["maps"]["agcam"], captured["maps"]["rollout"]
    assert torch.equal(rollout[0], rollout[1]) and not torch.allclose(agcam[0], agcam[1])
    assert all(a != b for a, b in captured["names"])
