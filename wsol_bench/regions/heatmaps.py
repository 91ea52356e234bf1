"""Raw patch-grid maps -> heatmaps at the evaluation size (docs/protocol.md 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_heatmaps(maps: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsample [B, gh, gw] maps bilinearly (align_corners=False) to `size` = (H, W), THEN
    min-max normalise each image to [0, 1]. Maps already of `size` (pixel-resolution methods)
    are not resampled.

    Returns (heatmaps [B, H, W] float32, degenerate [B] bool). A map that is constant or
    holds any non-finite value is degenerate: its heatmap is all zeros, never NaN.
    """
    maps = maps.float()
    finite = torch.isfinite(maps).flatten(1).all(1)
    safe = torch.where(finite[:, None, None], maps, torch.zeros_like(maps))
    if tuple(safe.shape[-2:]) == tuple(size):
        up = safe
    else:
        up = F.interpolate(safe[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    up = up.double()  # float64: the range of an extreme (but finite) map cannot overflow
    flat = up.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    degenerate = ~finite | ~(hi > lo)
    span = torch.where(degenerate, torch.ones_like(hi), hi - lo)
    heat = (up - lo[:, None, None]) / span[:, None, None]
    heat = torch.where(degenerate[:, None, None], torch.zeros_like(heat), heat)
    return heat.float(), degenerate


def binarize(heatmaps: torch.Tensor, threshold: float) -> torch.Tensor:
    """heatmap > threshold (strictly greater, as the AG-CAM and wsolevaluation code do)."""
    return heatmaps > threshold


def explained_heatmaps(explainer, images: torch.Tensor, targets: torch.Tensor, chunk: int = 16
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`explainer`'s heatmaps [N, H, W] of `images` [N, 3, H, W] for `targets`, `chunk` images
    per call, with their degenerate flags [N] and the logits [N, K] of the explanation pass (a
    benchmark's inputs: the maps a run would score, and the clean logits it reuses)."""
    maps, logits = [], []
    for start in range(0, len(images), chunk):
        explanation = explainer(images[start:start + chunk], targets[start:start + chunk])
        maps.append(explanation.maps)
        logits.append(explanation.logits)
    heatmaps, degenerate = to_heatmaps(torch.cat(maps), tuple(images.shape[2:]))
    return heatmaps, degenerate, torch.cat(logits)
