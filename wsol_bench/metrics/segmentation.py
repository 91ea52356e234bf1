"""Chefer et al.'s segmentation scores (CVPR 2021, imagenet_seg_eval.py; docs/protocol.md 4.4):
the heatmap thresholded at its own mean is a two-class (background, foreground) segmentation,
scored by pixel accuracy and IoU per class over the whole dataset, and the heatmap itself by the
average precision of a two-channel score map, averaged over images.

Per-image functions are pure; `CheferSegmentation` keeps the dataset totals as sums (pixel
counts, and the per-image APs as exact fixed-point chunks), so shards and ranks merge exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from wsol_bench.errors import SettingError
from wsol_bench.metrics.base import RunMetric
from wsol_bench.metrics.exact_sum import CHUNKS, exact_mean, fixed_point_chunks, totals_exceed

CLASSES = ("background", "foreground")
CONTRIBUTION_WIDTH = 7 + CHUNKS  # the columns of `segmentation_contributions`
# the reference's guard against an empty denominator, np.spacing(1) in float64
EPS = float(np.spacing(np.float64(1.0)))


def mean_threshold_prediction(heatmap: np.ndarray, degenerate: bool = False) -> np.ndarray:
    """bool [H, W]: the pixels above the heatmap's mean (foreground). A degenerate map (constant
    or non-finite; the reference's min-max gives NaN there, and every comparison with NaN is
    False) predicts no foreground."""
    if degenerate:
        return np.zeros(heatmap.shape, dtype=bool)
    values = np.asarray(heatmap, dtype=np.float64)
    return values > values.mean()


def two_channel_scores(heatmap: np.ndarray, degenerate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(background scores, foreground scores) float32 [H, W]: 1 - heatmap and the heatmap, in
    float32 as the reference; both all zero for a degenerate map (the reference's NaN -> 0)."""
    heat = np.asarray(heatmap, dtype=np.float32)
    if degenerate:
        zero = np.zeros(heat.shape, dtype=np.float32)
        return zero, zero
    return np.float32(1.0) - heat, heat


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of `scores` ranking the `positive` samples first, as scikit-learn's
    `average_precision_score` computes it: thresholds at every distinct score, from the highest
    down; AP = sum over them of (R_k - R_{k-1}) P_k with R_{-1} = 0, tied scores forming one
    threshold. No positive sample gives 0.0 (scikit-learn warns and returns 0; the reference
    turns NaN into 0 too)."""
    positive = np.asarray(positive, dtype=bool).ravel()
    scores = np.asarray(scores).ravel()
    if positive.shape != scores.shape:
        raise SettingError(f"average_precision: {positive.shape} labels for {scores.shape} scores")
    if not positive.any():
        return 0.0
    order = np.argsort(scores, kind="mergesort")[::-1]
    ranked, hits = scores[order], positive[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]
    tp = np.cumsum(hits, dtype=np.float64)[last_of_each]
    predicted = last_of_each + 1.0
    precision = tp / predicted
    recall = tp / tp[-1]
    # scikit-learn's own arithmetic: the curve reversed, recall ending at 0, precision at 1
    recall_desc = np.r_[recall[::-1], 0.0]
    precision_desc = np.r_[precision[::-1], 1.0]
    return float(-np.sum(np.diff(recall_desc) * precision_desc[:-1]))


def image_segmentation_counts(heatmap: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None,
                              degenerate: bool = False) -> dict:
    """One image's counts and AP (docs/protocol.md 4.4): heatmap [H, W] in [0, 1], gt bool
    [H, W] (foreground), valid bool [H, W] or None (False: a pixel counted nowhere).

    Returns {"correct", "labelled": ints, "intersection", "union": int64 [2] (background,
    foreground), "ap": float}: correct = pixels whose predicted class is their labelled class,
    labelled = counted pixels; per class c, intersection = pixels predicted c and labelled c,
    union = predicted c + labelled c - intersection; ap = `average_precision` of the two-channel
    scores (1 - heatmap for background, heatmap for foreground) against the one-hot mask, both
    channels' pixels pooled into one ranking, as the reference's `get_ap_scores`."""
    gt = np.asarray(gt, dtype=bool)
    keep = np.ones_like(gt) if valid is None else np.asarray(valid, dtype=bool)
    if gt.shape != np.shape(heatmap) or keep.shape != gt.shape:
        raise SettingError(f"mask {gt.shape} and valid {keep.shape} must match the heatmap "
                           f"{np.shape(heatmap)}")
    pred = mean_threshold_prediction(heatmap, degenerate)
    fg, bg = gt & keep, ~gt & keep
    pred_fg, pred_bg = pred & keep, ~pred & keep
    inter = np.array([(pred_bg & bg).sum(), (pred_fg & fg).sum()], dtype=np.int64)
    union = np.array([pred_bg.sum() + bg.sum(), pred_fg.sum() + fg.sum()], dtype=np.int64) - inter
    back, fore = two_channel_scores(heatmap, degenerate)
    ap = average_precision(np.r_[bg[keep], fg[keep]], np.r_[back[keep], fore[keep]])
    return {"correct": int(inter.sum()), "labelled": int(keep.sum()), "intersection": inter, "union": union,
            "ap": ap}


def batch_counts(heatmaps: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None,
                 degenerate: torch.Tensor | None = None) -> list[dict]:
    """`image_segmentation_counts` of each image of a batch: heatmaps [B, H, W] in [0, 1], gt
    and valid bool [B, H, W] (valid None: every pixel counts), degenerate bool [B] or None."""
    heat = heatmaps.detach().cpu().numpy()
    masks = torch.as_tensor(gt).cpu().numpy()
    keep = None if valid is None else torch.as_tensor(valid).cpu().numpy()
    flags = [False] * len(heat) if degenerate is None else [bool(d) for d in degenerate]
    return [image_segmentation_counts(heat[i], masks[i], None if keep is None else keep[i], flags[i])
            for i in range(len(heat))]


def segmentation_summary(correct: int, labelled: int, intersection, union, ap_mean: float, images: int) -> dict:
    """The dataset's scores from its totals, as the reference reduces them (fractions):
    pixel_accuracy = correct / (eps + labelled); IoU_c = intersection_c / (eps + union_c);
    mIoU = mean over the 2 classes; mAP = the mean of the per-image APs."""
    iou = np.asarray(intersection, dtype=np.float64) / (EPS + np.asarray(union, dtype=np.float64))
    return {"pixel_accuracy": float(np.float64(correct) / (EPS + np.float64(labelled))),
            "mIoU": float(iou.mean()), "mAP": float(ap_mean),
            "iou_background": float(iou[0]), "iou_foreground": float(iou[1]), "images": int(images)}


class CheferSegmentation(RunMetric):
    """Dataset totals of `image_segmentation_counts`: pixel counts, intersections and unions per
    class, the exact sum of the APs (halved, as fixed-point chunks) and the number of images (and
    of degenerate maps). Sum states only."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name, size in (("correct", 1), ("labelled", 1), ("intersection", 2), ("union", 2),
                           ("ap_chunks", CHUNKS), ("images", 1), ("degenerate", 1)):
            self.add_state(name, torch.zeros(size, dtype=torch.int64), dist_reduce_fx="sum", persistent=True)

    def update_counts(self, counts: dict, degenerate: bool = False) -> None:
        """Add one image's `image_segmentation_counts`."""
        self.correct += counts["correct"]
        self.labelled += counts["labelled"]
        self.intersection += torch.from_numpy(np.asarray(counts["intersection"], dtype=np.int64))
        self.union += torch.from_numpy(np.asarray(counts["union"], dtype=np.int64))
        # AP / 2: scikit-learn's sum can exceed 1 by a rounding (1 + 4e-16), and the exact sums take
        # [0, 1]; halving and doubling a float are exact
        self.ap_chunks += torch.from_numpy(fixed_point_chunks(np.ldexp(np.float64(counts["ap"]), -1)))
        self.images += 1
        self.degenerate += int(bool(degenerate))
        self._restored = True  # has seen images, though not through update() (RunMetric.update_called)

    def update(self, heatmaps: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None,
               degenerate: torch.Tensor | None = None) -> None:
        """Add a batch (see `batch_counts`)."""
        flags = [False] * len(heatmaps) if degenerate is None else [bool(d) for d in degenerate]
        for counts, flag in zip(batch_counts(heatmaps, gt, valid, degenerate), flags):
            self.update_counts(counts, flag)

    def state_problem(self) -> str | None:
        """More correct pixels than labelled ones, an intersection above its union, more
        degenerate maps than images, or an AP sum above one per image."""
        images = int(self.images)
        if int(self.correct) > int(self.labelled):
            return f"correct {int(self.correct)} is more than labelled {int(self.labelled)} pixels"
        if bool((self.intersection > self.union).any()):
            return f"an intersection {self.intersection.tolist()} is larger than its union {self.union.tolist()}"
        if int(self.degenerate) > images:
            return f"degenerate {int(self.degenerate)} is more than images {images}"
        # the chunks hold the halved APs; an AP may pass 1 by a rounding (4e-16), which one image's
        # worth of slack covers for any realistic count
        if bool(totals_exceed(2 * self.ap_chunks.numpy(), images + 1)):
            return f"the APs sum to more than its {images} images can give (each AP is at most 1)"
        return None

    def compute(self) -> dict:
        """`segmentation_summary` of the totals, plus the number of degenerate maps."""
        images = int(self.images)
        return {**segmentation_summary(int(self.correct), int(self.labelled), self.intersection.numpy(),
                                       self.union.numpy(), 2 * exact_mean(self.ap_chunks.tolist(), images), images),
                "n_degenerate": int(self.degenerate)}


def segmentation_contributions(counts: list[dict]) -> np.ndarray:
    """Each image's contribution to the segmentation totals, int64 [B, 7 + CHUNKS]: 1 (the
    image), correct, labelled, the intersections and unions (background, foreground) and the
    fixed-point chunks of AP / 2, from its `image_segmentation_counts`. Weighted sums of them
    are a bootstrap replicate's totals (`segmentation_values`)."""
    rows = [[1, c["correct"], c["labelled"], *np.asarray(c["intersection"]).tolist(),
             *np.asarray(c["union"]).tolist(), *fixed_point_chunks(np.ldexp(np.float64(c["ap"]), -1)).tolist()]
            for c in counts]
    return np.array(rows, dtype=np.int64).reshape(len(counts), CONTRIBUTION_WIDTH)


def segmentation_values(totals: np.ndarray) -> dict[str, np.ndarray]:
    """The segmentation scores in percent [R] of summed `segmentation_contributions`
    [R, width] (one row per bootstrap replicate), reduced as `segmentation_summary` reduces the
    dataset's totals; NaN where a replicate holds no image."""
    values = {name: [] for name in ("pixel_accuracy", "mIoU", "mAP", "iou_background", "iou_foreground")}
    for row in np.asarray(totals, dtype=np.int64):
        images = int(row[0])
        if images == 0:
            for column in values.values():
                column.append(float("nan"))
            continue
        summary = segmentation_summary(int(row[1]), int(row[2]), row[3:5], row[5:7],
                                       2 * exact_mean(row[7:].tolist(), images), images)
        for name, column in values.items():
            column.append(100 * summary[name])
    return {name: np.array(column) for name, column in values.items()}
