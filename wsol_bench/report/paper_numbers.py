"""Published numbers a user compares a run with, in one place, each with its source.

Only numbers stated in docs/protocol.md section 7 are listed. Keys follow the run's config and the
table columns: dataset name and split (`dataset.name`, `dataset.split`), model name
(`model.name`), method name, and metric (`box_pixel_acc`, `box_iou`, `box_dice`: AG-CAM pixel
scores against the union of ground-truth boxes; `abpc`: pixel-perturbation ABPC), all in
percent. They were measured with the model's published weights (its pretrained tag, or a copy
of their file given as model.checkpoint), so a run of the same architecture with other weights
(model.pretrained=false, or another checkpoint) gets no published row, only a note saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath


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

# model -> how a copy of its published weights is recognised in a model.checkpoint path: the file the
# tag downloads (its name carries the start of its sha256), and the Hugging Face cache folder of its repo
PUBLISHED_WEIGHT_FILES = {
    PAPER_MODEL: ("jx_vit_base_p16_224-80ecf9dd.pth", "models--timm--vit_base_patch16_224.orig_in21k_ft_in1k"),
}

# The protocol the published localization numbers follow (docs/protocol.md 4.1): maps of the predicted
# class, correctly classified images only. A run with other settings is still shown beside
# them, with a note saying what differs.
PAPER_SETTINGS = {"target": "predicted", "metric.image_filter": "correct"}


def has_published_weights(model: str, pretrained: bool | None = True, checkpoint: str | None = None) -> bool:
    """Whether a run's `model` has the weights published numbers are measured with: its
    pretrained tag's (model.pretrained=true and no model.checkpoint), or a checkpoint that is a
    copy of their file (PUBLISHED_WEIGHT_FILES). An old run folder without these settings counts
    as having them."""
    if checkpoint is None:
        return pretrained is not False
    parts = PurePath(str(checkpoint)).parts
    return any(name in parts for name in PUBLISHED_WEIGHT_FILES.get(model, ()))


def published_numbers(dataset: str, split: str, model: str, *, pretrained: bool | None = True,
                      checkpoint: str | None = None) -> list[PublishedNumber]:
    """Every published number measured on `dataset`/`split` with `model` and its published
    weights (empty if none, or when the run's weights are other: `has_published_weights`)."""
    if not has_published_weights(model, pretrained, checkpoint):
        return []
    return [p for p in PUBLISHED if (p.dataset, p.split, p.model) == (dataset, split, model)]


def other_weights_note(dataset: str, split: str, model: str, model_label: str) -> str | None:
    """Why a run of a model with published numbers shows none: they were measured with its
    published weights, and the run's model (`model_label`) has others. None when `model` has no
    published numbers on `dataset`/`split` anyway."""
    if not published_numbers(dataset, split, model):
        return None
    return (f"No published row: the published numbers for {dataset}/{split} with {model} were measured with its "
            f"published pretrained weights, and this run's model is {model_label}; they do not apply to it.")


def published_settings() -> list[tuple[str, str, str]]:
    """The distinct (dataset, split, model) combinations that have published numbers."""
    return list(dict.fromkeys((p.dataset, p.split, p.model) for p in PUBLISHED))
