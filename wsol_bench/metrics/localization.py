"""Per-image localization scores of a batch of heatmaps (docs/protocol.md 3 and 4.1).

For each threshold: binary map -> one box per connected component (all components) ->
box-union mask -> AG-CAM pixel scores against the union of the ground-truth boxes of the
image's class ("box_*" columns) and, where the dataset has masks, against its segmentation
mask ("mask_*" columns, ignore pixels excluded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wsol_bench.regions.boxes import components_to_boxes, ground_truth_box_mask, predicted_box_mask
from wsol_bench.datasets.base import IGNORE_INDEX, Sample
from wsol_bench.regions.heatmaps import binarize
from wsol_bench.metrics.pixel import PIXEL_METRICS, pixel_scores


@dataclass
class GroundTruth:
    """Ground-truth masks of a batch at the evaluation size, built once per batch."""

    box_masks: torch.Tensor  # bool [B, H, W]
    seg_masks: torch.Tensor | None  # bool [B, H, W], the label's class
    seg_valid: torch.Tensor | None  # bool [B, H, W], False on ignore pixels
    num_boxes: list[int]


def ground_truth(samples: list[Sample], size: tuple[int, int], protocol: str = "agcam") -> GroundTruth:
    """Union of the label-class GT boxes (and the label-class segmentation) per sample."""
    box_masks, seg, valid, counts = [], [], [], []
    has_masks = all(s.mask is not None for s in samples)
    for s in samples:
        own = s.orig_boxes[s.box_labels == s.label]
        counts.append(len(own))
        box_masks.append(ground_truth_box_mask(own, s.orig_size, size, protocol))
        if has_masks:
            if tuple(s.mask.shape) != tuple(size):
                raise ValueError(f"{s.image_id}: mask {tuple(s.mask.shape)} is not at the evaluation "
                                 f"size {tuple(size)}; apply the dataset transform first")
            seg.append(s.mask == s.label + 1)
            valid.append(s.mask != IGNORE_INDEX)
    return GroundTruth(
        box_masks=torch.stack(box_masks),
        seg_masks=torch.stack(seg) if has_masks else None,
        seg_valid=torch.stack(valid) if has_masks else None,
        num_boxes=counts,
    )


def metric_columns(has_masks: bool) -> list[str]:
    """Names of the per-image metric columns this module produces."""
    cols = [f"box_{m}" for m in PIXEL_METRICS]
    if has_masks:
        cols += [f"mask_{m}" for m in PIXEL_METRICS]
    return cols


def score_heatmaps(heatmaps: torch.Tensor, gt: GroundTruth, thresholds: list[float],
                   protocol: str = "agcam") -> list[list[dict]]:
    """Scores per threshold per image: result[t][b] is a dict of metric -> value (fractions)
    plus `n_pred_boxes`."""
    size = tuple(heatmaps.shape[-2:])
    out = []
    for threshold in thresholds:
        binary = binarize(heatmaps, threshold).cpu()
        boxes = [components_to_boxes(b) for b in binary]
        pred = torch.stack([predicted_box_mask(b, size, protocol) for b in boxes])
        scores = {f"box_{k}": v for k, v in pixel_scores(pred, gt.box_masks).items()}
        if gt.seg_masks is not None:
            scores.update({f"mask_{k}": v for k, v in pixel_scores(pred, gt.seg_masks, gt.seg_valid).items()})
        rows = []
        for i in range(len(heatmaps)):
            row = {k: float(v[i]) for k, v in scores.items()}
            row["n_pred_boxes"] = len(boxes[i])
            rows.append(row)
        out.append(rows)
    return out
