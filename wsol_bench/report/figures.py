"""Figures people look at before they trust a number: a heatmap gallery (rows: images;
columns: the input with its ground-truth boxes, then one column per method with the heatmap
overlay and the predicted boxes at a threshold), a two-class gallery (per method, the map
explaining each of an image's two classes) that shows which methods are class-specific, and
the dataset's coverage grid. Every figure carries its own key: a title, a legend for its
marks and a colour bar for its colours. The threshold-sweep curves live with the other line
figures in `wsol_bench.report.curves` (`plot_sweep`, also importable from here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from wsol_bench.files import save_figure
from wsol_bench.regions.engine import find_regions
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.report.curves import plot_sweep

__all__ = ["RowCaption", "class_gallery", "coverage_figure", "denormalize", "heatmap_gallery", "plot_sweep"]

HEAT_CMAP = "jet"
PANEL_IN = 2.2  # inches per gallery panel: 220 px at the 100 dpi of save_figure
COLOURBAR_IN = 1.1  # the strip right of a gallery that holds its colour bar
HEADER_IN = 0.9  # the strip above a gallery that holds its title and legend
GT_COLOUR, PREDICTED_COLOUR = "lime", "white"
CLASS_COLOURS = ("lime", "magenta")  # class A, class B
VERDICT_COLOURS = {True: "darkgreen", False: "red"}


@dataclass(frozen=True)
class RowCaption:
    """What a gallery row says about its image: its id, its labelled class, the class the
    model predicted, and whether the two agree."""

    image_id: str
    label: str
    predicted: str
    correct: bool

    def text(self) -> str:
        """The row's caption, one fact a line."""
        verdict = "correct" if self.correct else "WRONG"
        return f"{self.image_id}\nlabel: {self.label}\npredicted: {self.predicted}\n{verdict} prediction"


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
    ax.imshow(heat.numpy(), cmap=HEAT_CMAP, alpha=0.5, vmin=0, vmax=1)
    _draw_boxes(ax, boxes, colour)
    if degenerate:
        ax.text(2, 12, "degenerate", color="red", fontsize=7)


def _caption_row(ax, caption: str | RowCaption | None) -> None:
    """The row's caption left of its first panel; a RowCaption is coloured by its verdict."""
    if isinstance(caption, RowCaption):
        ax.set_ylabel(caption.text(), fontsize=7, color=VERDICT_COLOURS[caption.correct])
    else:
        ax.set_ylabel(caption or "", fontsize=7)


def _gallery_axes(rows: int, cols: int):
    """A figure of rows x cols image panels, with room above for the title and legend and on
    the right for the colour bar."""
    size = (PANEL_IN * cols + COLOURBAR_IN, PANEL_IN * rows + HEADER_IN)
    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def _box_key(colour: str, label: str) -> Patch:
    return Patch(facecolor="none", edgecolor=colour, lw=1.5, label=label)


def _finish_gallery(fig, axes, path: Path, *, title: str, key: list[Patch], threshold: float | None) -> Path:
    """Panels without ticks; the title and the box legend on top; on the right one colour bar
    for every heatmap, with the threshold marked on it; written at 100 dpi."""
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    width, height = fig.get_size_inches()
    fig.tight_layout(rect=(0, 0, 1 - COLOURBAR_IN / width, 1 - HEADER_IN / height))
    top, bottom = axes[0][-1].get_position().y1, axes[-1][-1].get_position().y0
    bar_axes = fig.add_axes((1 - (COLOURBAR_IN - 0.15) / width, bottom, 0.15 / width, top - bottom))
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=HEAT_CMAP), cax=bar_axes)
    line = "" if threshold is None else f"; white line: threshold {threshold:g}"
    bar.set_label(f"heatmap value, each map scaled to 0-1\n(overlaid at 50 % opacity{line})", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    if threshold is not None:
        bar.ax.axhline(threshold, color="white", lw=2)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    # Predicted boxes are white: the legend sits on grey so that its white box shows.
    fig.legend(handles=key, loc="lower center", bbox_to_anchor=(0.5, 1 - (HEADER_IN - 0.05) / height),
               ncol=len(key), fontsize=8, facecolor="0.45", labelcolor="white", framealpha=1)
    save_figure(fig, path)
    plt.close(fig)
    return path


def heatmap_gallery(images: list[torch.Tensor], gt_boxes: list[torch.Tensor], maps: dict[str, torch.Tensor],
                    path: Path, *, threshold: float = 0.5, titles: list[str | RowCaption] | None = None,
                    title: str | None = None) -> Path:
    """Save a grid figure: rows are images ([H, W, 3] in [0, 1]), the first column shows
    ground-truth boxes (green), then one column per method with its heatmap over the image
    and its predicted boxes (white: regions of heatmap > `threshold`). `maps` holds raw
    [N, gh, gw] maps. `titles` caption the rows: an image id, or a `RowCaption` (id, label,
    predicted class, correct or wrong). A legend names both kinds of box and the threshold; a
    colour bar gives the heatmap's scale."""
    n, cols = len(images), 1 + len(maps)
    size = tuple(images[0].shape[:2])
    fig, axes = _gallery_axes(n, cols)
    for r, image in enumerate(images):
        axes[r][0].imshow(image.numpy())
        _draw_boxes(axes[r][0], gt_boxes[r], GT_COLOUR)
        _caption_row(axes[r][0], titles[r] if titles else None)
    for c, (method, raw) in enumerate(maps.items(), start=1):
        heat, degenerate = to_heatmaps(raw[:n], size)
        regions = find_regions(heat, [threshold])
        for r in range(n):
            _overlay(axes[r][c], images[r], heat[r], regions.boxes_at(r, 0), PREDICTED_COLOUR, bool(degenerate[r]))
        axes[0][c].set_title(method, fontsize=9)
    axes[0][0].set_title("input, GT boxes", fontsize=9)
    key = [_box_key(GT_COLOUR, "ground-truth boxes (labelled class)"),
           _box_key(PREDICTED_COLOUR, f"predicted boxes at threshold {threshold:g} (heatmap > {threshold:g})")]
    return _finish_gallery(fig, axes, path, title=title or "Heatmap of each method over each image",
                           key=key, threshold=threshold)


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
    size = tuple(images[0].shape[:2])
    fig, axes = _gallery_axes(n, 1 + 2 * len(maps_per_method_per_class))
    for r, image in enumerate(images):
        axes[r][0].imshow(image.numpy())
        for boxes, colour in zip(boxes_per_class[r], CLASS_COLOURS):
            _draw_boxes(axes[r][0], boxes, colour)
        label = f"A={class_names[r][0]}, B={class_names[r][1]}"
        _caption_row(axes[r][0], f"{titles[r]}\n{label}" if titles else label)
    for m, (method, pair) in enumerate(maps_per_method_per_class.items()):
        for k, raw in enumerate(pair):
            c = 1 + 2 * m + k
            heat, degenerate = to_heatmaps(raw[:n], size)
            for r in range(n):
                _overlay(axes[r][c], images[r], heat[r], boxes_per_class[r][k], CLASS_COLOURS[k],
                         bool(degenerate[r]))
            axes[0][c].set_title(f"{method}: {'AB'[k]}", fontsize=9)
    axes[0][0].set_title("input, A / B boxes", fontsize=9)
    key = [_box_key(CLASS_COLOURS[0], "ground-truth boxes of class A (map explains A)"),
           _box_key(CLASS_COLOURS[1], "ground-truth boxes of class B (map explains B)")]
    return _finish_gallery(fig, axes, path, threshold=None, key=key,
                           title="Each method's map explaining class A, then class B: a class-specific "
                                 "method's two maps differ")


def coverage_figure(coverage: list[list[float]], path: Path, title: str) -> Path:
    """Save the dataset summary's ground-truth coverage grid as a heatmap: the share of images
    whose ground truth covers each cell, with the central quarter outlined (and named in the
    legend)."""
    grid = torch.tensor(coverage)
    n = grid.shape[-1]
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    image = ax.imshow(grid.numpy(), cmap="viridis", vmin=0, extent=(0, 1, 1, 0))
    ax.add_patch(Rectangle((0.25, 0.25), 0.5, 0.5, fill=False, edgecolor="white", linestyle="--", linewidth=1))
    ax.legend(handles=[Line2D([], [], color="white", linestyle="--", lw=1, label="central quarter")],
              loc="lower right", fontsize=6, facecolor="0.45", labelcolor="white", framealpha=0.8)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(f"x (image width, {n} cells)", fontsize=7)
    ax.set_ylabel("y (image height)", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("share of images with ground truth", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
