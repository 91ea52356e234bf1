"""Figures people look at before they trust a number: a heatmap gallery (rows: images;
columns: the input with its ground-truth boxes, then one column per method with the heatmap
overlay and the predicted boxes at a threshold)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

from wsol_bench.boxes import components_to_boxes
from wsol_bench.heatmaps import binarize, to_heatmaps


def denormalize(image: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised [3, H, W] -> displayable [H, W, 3] in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image * std_t + mean_t).clamp(0, 1).permute(1, 2, 0)


def _draw_boxes(ax, boxes: torch.Tensor, colour: str) -> None:
    for x0, y0, x1, y1 in boxes.tolist():
        # Continuous pixel edges: pixel x covers [x, x+1), drawn at [x - 0.5, x + 0.5).
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, lw=1.5))


def heatmap_gallery(images: list[torch.Tensor], gt_boxes: list[torch.Tensor], maps: dict[str, torch.Tensor],
                    path: Path, *, threshold: float = 0.5, titles: list[str] | None = None) -> Path:
    """Save a grid figure: rows are images ([H, W, 3] in [0, 1]), the first column shows
    ground-truth boxes (green), then one column per method with its heatmap over the image
    and its predicted boxes (white) at `threshold`. `maps` holds raw [N, gh, gw] maps."""
    n, cols = len(images), 1 + len(maps)
    size = tuple(images[0].shape[:2])
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    for r, image in enumerate(images):
        axes[r][0].imshow(image.numpy())
        _draw_boxes(axes[r][0], gt_boxes[r], "lime")
        axes[r][0].set_ylabel(titles[r] if titles else "", fontsize=7)
    for c, (method, raw) in enumerate(maps.items(), start=1):
        heat, degenerate = to_heatmaps(raw[:n], size)
        for r in range(n):
            ax = axes[r][c]
            ax.imshow(images[r].numpy())
            ax.imshow(heat[r].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            _draw_boxes(ax, components_to_boxes(binarize(heat[r], threshold)), "white")
            if degenerate[r]:
                ax.text(2, 12, "degenerate", color="red", fontsize=7)
        axes[0][c].set_title(method, fontsize=9)
    axes[0][0].set_title("input, GT boxes", fontsize=9)
    for ax in (a for row in axes for a in row):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
