"""Heatmap gallery: one row per image, input + one column per method, not blank."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from wsol_bench.figures import denormalize, heatmap_gallery


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
