"""Where a map points (docs/protocol.md 5.9): the pointing game of Zhang et al. (IJCV 2018), a
hit when the map's maximum lies within a tolerance of the ground-truth region, and the
energy-based pointing game of Wang et al. (Score-CAM, CVPR-W 2020), the share of the map's sum
that lies inside the region. Both read heatmaps at the evaluation size against bool regions of
the same size, batched over images, on any device.

An image whose region holds no pixel at the evaluation size (every box of its class cropped
away, a mask of ignore pixels only) has no score (NaN): it can neither be hit nor missed."""

from __future__ import annotations

import math

import torch


def max_points(heatmaps: torch.Tensor) -> torch.Tensor:
    """The point [B, 2] (row, column) of each map [B, H, W]: its first maximum in raster order
    (row by row, left to right), as the authors' evaluation takes np.argmax of the map. One
    point per map even when the maximum ties (a bilinearly upsampled border patch ties 8 pixels
    per side): the protocol extracts one maximum point, it does not test every tied pixel."""
    width = heatmaps.shape[-1]
    first = heatmaps.flatten(1).argmax(1)  # torch returns the first maximal index
    return torch.stack([first // width, first % width], dim=1)


def region_pixels(regions: torch.Tensor) -> torch.Tensor:
    """The number of pixels [B] (int64) of each bool region [B, H, W]."""
    return regions.flatten(1).sum(1)


def pointing_hits(heatmaps: torch.Tensor, regions: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Pointing game [B] (float64): 1 where some pixel of the region lies within `tolerance`
    pixels (Euclidean, inclusive: d <= tolerance) of the map's point (`max_points`), else 0;
    NaN where the region is empty. Tolerance 0 asks for the point itself to lie on the region."""
    points = max_points(heatmaps)
    height, width = heatmaps.shape[-2:]
    rows = torch.arange(height, device=heatmaps.device)
    cols = torch.arange(width, device=heatmaps.device)
    # squared distances are integers, so d^2 <= t^2 exactly when d^2 <= floor(t^2): an integer test
    dy2 = (rows[None, :] - points[:, :1]).square().int()  # [B, H]
    dx2 = (cols[None, :] - points[:, 1:]).square().int()  # [B, W]
    # capped at the image's squared diagonal: a huge tolerance reaches every pixel (t * t may be inf)
    reach = math.floor(min(float(tolerance) * float(tolerance), (height - 1) ** 2 + (width - 1) ** 2))
    near = dy2[:, :, None] + dx2[:, None, :] <= reach
    hits = (near & regions.bool()).flatten(1).any(1).double()
    return torch.where(region_pixels(regions) > 0, hits, torch.nan)


def energy_shares(heatmaps: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing game [B] (float64): sum of the map inside the region / sum of the
    whole map, in [0, 1]; NaN where the region is empty (or the map sums to zero, which a
    non-degenerate heatmap never does). Sums in float64: a 224 x 224 map has 50,176 terms."""
    values = heatmaps.flatten(1).double()
    inside = torch.where(regions.flatten(1).bool(), values, 0.0).sum(1)
    total = values.sum(1)
    return torch.where((region_pixels(regions) > 0) & (total > 0), inside / total, torch.nan)
