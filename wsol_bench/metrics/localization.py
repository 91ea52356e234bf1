"""Per-image localization scores of a batch of heatmaps at every threshold of a grid
(docs/protocol.md 3 and 4.1): the predicted box-union of ALL regions against the union of the
ground-truth boxes of the image's class ("box_*") and, where the dataset has masks, against its
segmentation mask ("mask_*", ignore pixels excluded). Fixed thresholds are a grid of T values;
records and sweeps both come from `localization_scores`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from wsol_bench.datasets.base import IGNORE_INDEX, Sample
from wsol_bench.errors import SettingError
from wsol_bench.metrics.pixel import PIXEL_METRICS, scores_from_counts
from wsol_bench.regions.components import ThresholdComponents
from wsol_bench.regions.engine import find_regions
from wsol_bench.regions.rasterize import check_protocol, coverage_levels, ground_truth_box_mask


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
                raise SettingError(f"{s.image_id}: mask {tuple(s.mask.shape)} is not at the evaluation "
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
    """Names of the per-image score columns this module produces (fractions)."""
    cols = [f"box_{m}" for m in PIXEL_METRICS]
    if has_masks:
        cols += [f"mask_{m}" for m in PIXEL_METRICS]
    return cols


def nested_counts(cover: np.ndarray, target: np.ndarray, valid: np.ndarray | None, num_levels: int
                  ) -> dict[str, np.ndarray]:
    """tp, fp, fn, tn as float64 [T, B] of the nested predictions `cover > i` (i = 0..T-1)
    against bool [B, H, W] targets; pixels where `valid` is False count nowhere."""
    batch, height, width = cover.shape
    key = cover.astype(np.int64) + (np.arange(batch) * (num_levels + 1))[:, None, None]
    target = target.astype(bool)
    if valid is None:
        predicted = np.bincount(key.ravel(), minlength=batch * (num_levels + 1))
        total = np.full(batch, height * width, dtype=np.int64)
    else:
        valid = valid.astype(bool)
        target = target & valid
        predicted = np.bincount(key[valid], minlength=batch * (num_levels + 1))
        total = valid.reshape(batch, -1).sum(1)
    hits = np.bincount(key[target], minlength=batch * (num_levels + 1))

    def above(hist: np.ndarray) -> np.ndarray:  # [B, T]: pixels with cover > i
        per_level = hist.reshape(batch, num_levels + 1)
        return np.cumsum(per_level[:, ::-1], axis=1)[:, ::-1][:, 1:]

    tp, pred = above(hits), above(predicted)
    fp = pred - tp
    fn = target.reshape(batch, -1).sum(1)[:, None] - tp
    tn = total[:, None] - tp - fp - fn
    return {k: v.T.astype(np.float64) for k, v in (("tp", tp), ("fp", fp), ("fn", fn), ("tn", tn))}


def region_scores(regions: ThresholdComponents, gt: GroundTruth, protocol: str = "agcam"
                  ) -> dict[str, np.ndarray]:
    """Scores of already found regions: {column: float64 [T, B]} for every `metric_columns`
    column, plus "n_pred_boxes" (int64 [T, B]). `gt` must come from `ground_truth(...,
    protocol)` with the same protocol."""
    check_protocol(protocol)
    expected = (regions.num_images, *regions.size)
    if tuple(gt.box_masks.shape) != expected:
        raise SettingError(f"ground truth masks {tuple(gt.box_masks.shape)} do not match the heatmaps "
                           f"{expected}")
    cover = coverage_levels(regions, protocol)
    levels = len(regions.thresholds)
    scores = _prefixed("box_", nested_counts(cover, gt.box_masks.numpy(), None, levels))
    if gt.seg_masks is not None:
        valid = gt.seg_valid.numpy() if gt.seg_valid is not None else None
        scores.update(_prefixed("mask_", nested_counts(cover, gt.seg_masks.numpy(), valid, levels)))
    scores["n_pred_boxes"] = regions.counts().T
    return scores


def localization_scores(heatmaps: torch.Tensor, gt: GroundTruth, thresholds: Sequence[float],
                        protocol: str = "agcam") -> tuple[dict[str, np.ndarray], ThresholdComponents]:
    """Regions once for every threshold, then their scores (see `region_scores`). The regions
    are returned too, so box-accuracy metrics can score the same batch without labelling again."""
    regions = find_regions(heatmaps, thresholds, "components")
    return region_scores(regions, gt, protocol), regions


def _prefixed(prefix: str, counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    scores = scores_from_counts(counts["tp"], counts["fp"], counts["fn"], counts["tn"])
    return {prefix + k: v for k, v in scores.items()}
