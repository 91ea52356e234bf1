"""Figures people look at before they trust a number: a heatmap gallery (rows: images;
columns: the input with its ground-truth boxes, then one column per method with the heatmap
overlay and the predicted boxes at a threshold), and a two-class gallery (per method, the map
explaining each of an image's two classes) that shows which methods are class-specific."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.patches import Rectangle

from wsol_bench.files import save_figure
from wsol_bench.regions.engine import find_regions
from wsol_bench.regions.heatmaps import to_heatmaps


def denormalize(image: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised [3, H, W] -> displayable [H, W, 3] in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image * std_t + mean_t).clamp(0, 1).permute(1, 2, 0)


def _draw_boxes(ax, boxes: torch.Tensor, colour: str) -> None:
    for x0, y0, x1, y1 in boxes.tolist():
        # Continuous pixel edges: pixel x covers [x, x+1), drawn at [x - 0.5, x + 0.5).
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, lw=1.5))


def _overlay(ax, image: torch.Tensor, heat: torch.Tensor, boxes: torch.Tensor, colour: str,
             degenerate: bool) -> None:
    """A heatmap over its image with boxes; a degenerate (constant) map says so."""
    ax.imshow(image.numpy())
    ax.imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    _draw_boxes(ax, boxes, colour)
    if degenerate:
        ax.text(2, 12, "degenerate", color="red", fontsize=7)


def _save(fig, axes, path: Path) -> Path:
    """Panels without ticks, tight layout, written at 100 dpi (2.2 in per panel = 220 px)."""
    for ax in (a for row in axes for a in row):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


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
        regions = find_regions(heat, [threshold])
        for r in range(n):
            _overlay(axes[r][c], images[r], heat[r], regions.boxes_at(r, 0), "white", bool(degenerate[r]))
        axes[0][c].set_title(method, fontsize=9)
    axes[0][0].set_title("input, GT boxes", fontsize=9)
    return _save(fig, axes, path)


CLASS_COLOURS = ("lime", "magenta")  # class A, class B


def class_gallery(images: list[torch.Tensor], boxes_per_class: list[tuple[torch.Tensor, torch.Tensor]],
                  maps_per_method_per_class: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path,
                  class_names: list[tuple[str, str]], *, titles: list[str] | None = None) -> Path:
    """Save a figure showing whether maps follow the explained class, for images holding two
    classes A and B: rows are images ([H, W, 3] in [0, 1]); the first column shows A's
    ground-truth boxes (green) and B's (magenta); then two columns per method, the heatmap
    explaining A and the one explaining B, each with that class's boxes. A class-specific
    method moves with the target; a class-agnostic one draws the same map twice.

    `maps_per_method_per_class[method] = (maps_for_A, maps_for_B)`, raw [N, gh, gw] each;
    `class_names[i] = (name_of_A, name_of_B)` for image i."""
    n = len(images)
    if not (len(boxes_per_class) == len(class_names) == n):
        raise ValueError(f"class_gallery: {n} images but {len(boxes_per_class)} box pairs and "
                         f"{len(class_names)} name pairs; give one of each per image")
    for method, pair in maps_per_method_per_class.items():
        if len(pair) != 2 or any(len(m) < n for m in pair):
            raise ValueError(f"class_gallery: method {method!r} needs two map tensors (class A, class B) "
                             f"with at least {n} maps each")
    cols = 1 + 2 * len(maps_per_method_per_class)
    size = tuple(images[0].shape[:2])
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    for r, image in enumerate(images):
        axes[r][0].imshow(image.numpy())
        for boxes, colour in zip(boxes_per_class[r], CLASS_COLOURS):
            _draw_boxes(axes[r][0], boxes, colour)
        label = f"A={class_names[r][0]}, B={class_names[r][1]}"
        axes[r][0].set_ylabel(f"{titles[r]}\n{label}" if titles else label, fontsize=7)
    for m, (method, pair) in enumerate(maps_per_method_per_class.items()):
        for k, raw in enumerate(pair):
            c = 1 + 2 * m + k
            heat, degenerate = to_heatmaps(raw[:n], size)
            for r in range(n):
                _overlay(axes[r][c], images[r], heat[r], boxes_per_class[r][k], CLASS_COLOURS[k],
                         bool(degenerate[r]))
            axes[0][c].set_title(f"{method}: {'AB'[k]}", fontsize=9)
    axes[0][0].set_title("input, A / B boxes", fontsize=9)
    return _save(fig, axes, path)


def plot_sweep(sweep: pd.DataFrame, path: Path, metrics: tuple[str, ...] = ("box_iou", "mask_iou")) -> Path:
    """Metric-vs-threshold curves of a sweep table (one line per method, one panel per metric
    present), each method's best threshold marked."""
    present = [m for m in metrics if m in sweep.columns]
    if not present:
        raise ValueError(f"sweep table has none of the columns {metrics}")
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], present):
        for method, part in sweep.groupby("method", sort=False):
            values = part[metric] * 100
            (line,) = ax.plot(part["threshold"], values, label=method, lw=1.5)
            best = values.idxmax()
            ax.plot(part.loc[best, "threshold"], values[best], "o", color=line.get_color(), ms=4)
        ax.set_xlabel("threshold")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def coverage_figure(coverage: list[list[float]], path: Path, title: str) -> Path:
    """Save the dataset summary's ground-truth coverage grid as a heatmap: the share of images
    whose ground truth covers each cell, with the central quarter outlined."""
    grid = torch.tensor(coverage)
    n = grid.shape[-1]
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    image = ax.imshow(grid.numpy(), cmap="viridis", vmin=0, extent=(0, 1, 1, 0))
    ax.add_patch(Rectangle((0.25, 0.25), 0.5, 0.5, fill=False, edgecolor="white", linestyle="--", linewidth=1))
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(f"x (image width, {n} cells)", fontsize=7)
    ax.set_ylabel("y (image height)", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("share of images with ground truth", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
