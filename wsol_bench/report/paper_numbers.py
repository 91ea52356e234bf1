"""Published numbers a user compares a run with, in one place, each with its source.

Only numbers stated in docs/protocol.md section 7 are listed. Keys follow the run's config and the
table columns: dataset name and split (`dataset.name`, `dataset.split`), model name
(`model.name`), method name, and metric (`box_pixel_acc`, `box_iou`, `box_dice`: AG-CAM pixel
scores against the union of ground-truth boxes; `abpc`: pixel-perturbation ABPC), all in
percent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedNumber:
    """One number from a paper, under the conditions it was measured in."""

    dataset: str
    split: str
    model: str
    method: str
    metric: str
    value: float  # percent
    source: str
    threshold: float = 0.5  # the heatmap threshold the localization numbers use


AGCAM_PAPER = "Leem & Seo, AAAI 2024 (arXiv 2402.04563), Table 1/2 (ImageNet table)"
PAPER_MODEL = "vit_base_patch16_224.orig_in21k_ft_in1k"

PUBLISHED: tuple[PublishedNumber, ...] = (
    PublishedNumber("imagenet", "val", PAPER_MODEL, "agcam", "box_pixel_acc", 73.41, AGCAM_PAPER),
    PublishedNumber("imagenet", "val", PAPER_MODEL, "agcam", "box_iou", 52.12, AGCAM_PAPER),
    PublishedNumber("imagenet", "val", PAPER_MODEL, "agcam", "box_dice", 65.15, AGCAM_PAPER),
    PublishedNumber("imagenet", "val", PAPER_MODEL, "agcam", "abpc", 36.91, AGCAM_PAPER),
)

# The protocol the published localization numbers follow (docs/protocol.md 4.1): maps of the predicted
# class, correctly classified images only. A run with other settings is still shown beside
# them, with a note saying what differs.
PAPER_SETTINGS = {"target": "predicted", "metric.image_filter": "correct"}


def published_numbers(dataset: str, split: str, model: str) -> list[PublishedNumber]:
    """Every published number measured on `dataset`/`split` with `model` (empty if none)."""
    return [p for p in PUBLISHED if (p.dataset, p.split, p.model) == (dataset, split, model)]


def published_settings() -> list[tuple[str, str, str]]:
    """The distinct (dataset, split, model) combinations that have published numbers."""
    return list(dict.fromkeys((p.dataset, p.split, p.model) for p in PUBLISHED))
