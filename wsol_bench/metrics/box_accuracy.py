"""wsolevaluation's box accuracy (Choe et al., CVPR 2020; docs/protocol.md 4.2): MaxBoxAcc v1
and v2, GT-known and Top-1 Loc, as per-threshold counts that merge by addition.

Box accuracy follows the reference's conventions: ground-truth boxes are inclusive integer
boxes at the evaluation size (`regions.rasterize.wsoleval_gt_boxes`); a predicted box is the
bounding rectangle [x, y, x + w, y + h] clipped to (W - 1, H - 1); IoU counts pixels
inclusively (+1 on each side); a threshold with no region gives the box [0, 0, 0, 0].

Where the boxes come from (`boxes`, see `regions.engine`): "opencv" (the default) is exactly
wsolevaluation's (contours of the uint8 heatmap, holes included, v1 the contour of largest
polygon area); published MaxBoxAcc numbers come from it. "components" is the float variant
(heatmap > t, 8-connected pixel sets without hole boxes, v1 the set with most pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from wsol_bench.errors import SettingError
from wsol_bench.metrics.base import RunMetric
from wsol_bench.regions.components import ThresholdComponents
from wsol_bench.regions.engine import check_source, find_regions
from wsol_bench.regions.thresholds import DEFAULT_THRESHOLDS, threshold_array

IOU_THRESHOLDS = (30, 50, 70)  # percent, as wsolevaluation's --iou_threshold_list
COUNTS = ("correct_v1", "correct_v2", "top1_v1", "top1_v2")
# the columns of a box-accuracy bootstrap contribution (`box_contributions`), in this order
BOX_VALUE_COLUMNS = ("maxboxacc", "maxboxacc_v2", "top1_loc", "gt_known_loc")


@dataclass(frozen=True)
class BoxHits:
    """One batch's box hits: v1 and v2 bool [D, B, T] (image b's best IoU at heatmap threshold t
    reaches IoU threshold d), whether each image's class was predicted, bool [B], and how many
    of the images have no GT box."""

    v1: np.ndarray
    v2: np.ndarray
    correct: np.ndarray
    without_gt_boxes: int


def inclusive_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of inclusive integer boxes [..., 4] (broadcast), area = (x1 - x0 + 1) * (y1 - y0 + 1);
    a pair whose union is not positive (degenerate boxes) has IoU 0, as in the reference."""
    a, b = np.asarray(boxes_a, dtype=np.int64), np.asarray(boxes_b, dtype=np.int64)
    width = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    height = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = width * height
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    positive = union > 0
    return np.where(positive, inter / np.where(positive, union, 1), 0.0)


def best_ious(regions: ThresholdComponents, gt_boxes: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """The best IoU of each image at each threshold over its GT boxes (inclusive [K, 4] each):
    {"iou_v1": [B, T] of the largest region's box, "iou_v2": [B, T] of any region's box}."""
    batch, levels = regions.num_images, len(regions.thresholds)
    if len(gt_boxes) != batch:
        raise SettingError(f"{batch} heatmaps need {batch} GT box lists, got {len(gt_boxes)}")
    gt, has_gt = _padded_boxes(gt_boxes, batch)
    height, width = regions.size
    pred = regions.boxes.copy()
    pred[:, 2] = np.minimum(pred[:, 2], width - 1)  # x + w, clipped as the reference does
    pred[:, 3] = np.minimum(pred[:, 3], height - 1)
    per_region = _best_iou(pred[:, None, :], gt[regions.image], has_gt[regions.image])
    # An (image, threshold) without regions is scored with the box [0, 0, 0, 0].
    empty = np.repeat(_best_iou(np.zeros((batch, 1, 4), np.int64), gt, has_gt)[:, None], levels, axis=1)
    has_any = regions.counts() > 0
    iou_v2 = np.full((batch, levels), -np.inf)
    np.maximum.at(iou_v2, (regions.image, regions.level), per_region)
    iou_v2 = np.where(has_any, iou_v2, empty)
    iou_v1 = empty.copy()
    largest = regions.largest()
    iou_v1[regions.image[largest], regions.level[largest]] = per_region[largest]
    return {"iou_v1": iou_v1, "iou_v2": iou_v2}


class BoxAccuracy(RunMetric):
    """MaxBoxAcc v1 (largest region) and v2 (all regions), GT-known and Top-1 Loc.

    State: per IoU threshold delta and heatmap threshold t, the number of images whose best IoU
    is >= delta (and, for Top-1, whose class is also correct)."""

    settings_keys = ("thresholds", "iou_thresholds", "boxes")

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 iou_thresholds: Sequence[int] = IOU_THRESHOLDS, boxes: str = "opencv", **kwargs) -> None:
        super().__init__(**kwargs)
        threshold_array(thresholds)
        self.boxes = check_source(boxes)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.iou_thresholds = tuple(int(d) for d in iou_thresholds)
        if 50 not in self.iou_thresholds or len(set(self.iou_thresholds)) != len(self.iou_thresholds):
            raise SettingError(f"iou_thresholds {self.iou_thresholds} must be distinct percentages that "
                               "include 50 (MaxBoxAcc v1, GT-known and Top-1 Loc use IoU 50), e.g. "
                               "(30, 50, 70)")
        shape = (len(self.iou_thresholds), len(self.thresholds))
        for name in COUNTS:
            self.add_state(name, torch.zeros(shape, dtype=torch.int64), dist_reduce_fx="sum", persistent=True)
        self.add_state("num_images", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum", persistent=True)
        self.add_state("num_without_gt_boxes", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum",
                       persistent=True)

    def regions(self, heatmaps: torch.Tensor) -> ThresholdComponents:
        """The regions of [B, H, W] heatmaps at this metric's thresholds, from its box source."""
        return find_regions(heatmaps, self.thresholds, self.boxes)

    def update(self, heatmaps: torch.Tensor | ThresholdComponents, gt_boxes: Sequence[torch.Tensor],
               correct: torch.Tensor) -> None:
        """Add a batch: heatmaps [B, H, W] (or their regions from `regions`), per image its
        inclusive GT boxes [K, 4] (`wsoleval_gt_boxes`), and whether its class was predicted
        correctly, bool [B]."""
        self.add_hits(self.image_hits(heatmaps, gt_boxes, correct))

    def image_hits(self, heatmaps: torch.Tensor | ThresholdComponents, gt_boxes: Sequence[torch.Tensor],
                   correct: torch.Tensor) -> BoxHits:
        """Each image's hits (the arguments of `update`), before they are counted: what
        `add_hits` sums, and what `box_contributions` turns into bootstrap contributions."""
        regions = heatmaps if isinstance(heatmaps, ThresholdComponents) else self.regions(heatmaps)
        if regions.thresholds != self.thresholds:
            raise SettingError("the regions were found at other thresholds than this BoxAccuracy's")
        if regions.source != self.boxes:
            raise SettingError(f"these regions come from {regions.source!r} but this BoxAccuracy scores "
                               f"boxes={self.boxes!r}; build them with BoxAccuracy.regions")
        correct = np.asarray(torch.as_tensor(correct).cpu(), dtype=bool).reshape(-1)
        if correct.shape != (regions.num_images,):
            raise SettingError(f"{regions.num_images} heatmaps need {regions.num_images} correct flags, "
                               f"got {correct.shape[0]}")
        ious = best_ious(regions, gt_boxes)
        hits = {version: np.stack([ious[f"iou_{version}"] >= delta / 100 for delta in self.iou_thresholds])
                for version in ("v1", "v2")}
        without = sum(len(torch.as_tensor(g).reshape(-1, 4)) == 0 for g in gt_boxes)
        return BoxHits(v1=hits["v1"], v2=hits["v2"], correct=correct, without_gt_boxes=int(without))

    def add_hits(self, hits: BoxHits) -> None:
        """Count one batch's `image_hits`."""
        for version in ("v1", "v2"):
            ok = getattr(hits, version)
            getattr(self, f"correct_{version}").add_(torch.from_numpy(ok.sum(1)))
            getattr(self, f"top1_{version}").add_(torch.from_numpy((ok & hits.correct[None, :, None]).sum(1)))
        self.num_images += len(hits.correct)
        self.num_without_gt_boxes += hits.without_gt_boxes
        self._restored = True  # has seen images, though perhaps not through update() (RunMetric.update_called)

    def state_problem(self) -> str | None:
        """No image, more correct images than images, more Top-1 than GT-known correct ones, or
        more images without GT boxes than images."""
        count = int(self.num_images)
        if count == 0:
            return "num_images is 0 (a run scores at least one image)"
        if int(self.num_without_gt_boxes) > count:
            return f"num_without_gt_boxes {int(self.num_without_gt_boxes)} is more than num_images {count}"
        for version in ("v1", "v2"):
            correct, top1 = getattr(self, f"correct_{version}"), getattr(self, f"top1_{version}")
            if int(correct.max()) > count:
                return f"correct_{version} counts {int(correct.max())} of {count} images"
            if bool((top1 > correct).any()):
                return f"top1_{version} counts more images than correct_{version} (Top-1 Loc needs the box right)"
        return None

    def compute(self) -> dict:
        """Percentages. `maxboxacc`: v1 at IoU 50, best threshold. `maxboxacc_v2`: mean over the
        IoU thresholds of v2, each at its own best threshold. `gt_known_loc` and `top1_loc`: at
        `loc_threshold`, the v1 IoU-50 best threshold. Ties between thresholds go to the lowest."""
        count = int(self.num_images)
        if count == 0:
            raise ValueError("BoxAccuracy has no images; call update() first")
        # count * 100 / n, in the reference's order, so percentages agree to the last bit
        v1 = self.correct_v1.double().numpy() * 100.0 / count
        v2 = self.correct_v2.double().numpy() * 100.0 / count
        best_v1, best_v2 = v1.argmax(1), v2.argmax(1)
        d50 = self.iou_thresholds.index(50)
        loc_index = int(best_v1[d50])
        thresholds = list(self.thresholds)
        deltas = list(enumerate(self.iou_thresholds))
        return {
            "boxes": self.boxes,
            "maxboxacc": float(v1[d50, loc_index]),
            "maxboxacc_threshold": thresholds[loc_index],
            "maxboxacc_v2": float(np.mean([v2[d, best_v2[d]] for d in range(len(self.iou_thresholds))])),
            "maxboxacc_v2_per_iou": {delta: float(v2[d, best_v2[d]]) for d, delta in deltas},
            "maxboxacc_v2_thresholds": {delta: thresholds[best_v2[d]] for d, delta in deltas},
            "maxboxacc_v1_per_iou": {delta: float(v1[d, best_v1[d]]) for d, delta in deltas},
            "maxboxacc_v1_thresholds": {delta: thresholds[best_v1[d]] for d, delta in deltas},
            "gt_known_loc": float(v1[d50, loc_index]),
            "top1_loc": float(self.top1_v1[d50, loc_index]) * 100.0 / count,
            "loc_threshold": thresholds[loc_index],
            "num_images": count,
            "num_without_gt_boxes": int(self.num_without_gt_boxes),
            "curves": {"thresholds": thresholds,
                       "v1": {delta: v1[d].tolist() for d, delta in deltas},
                       "v2": {delta: v2[d].tolist() for d, delta in deltas}},
        }


def _padded_boxes(gt_boxes: Sequence[torch.Tensor], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """GT boxes as int64 [B, Kmax, 4] with a validity mask [B, Kmax]."""
    arrays = [np.asarray(torch.as_tensor(g).cpu(), dtype=np.int64).reshape(-1, 4) for g in gt_boxes]
    most = max([len(a) for a in arrays] + [1])
    padded = np.zeros((batch, most, 4), dtype=np.int64)
    valid = np.zeros((batch, most), dtype=bool)
    for i, a in enumerate(arrays):
        padded[i, :len(a)] = a
        valid[i, :len(a)] = True
    return padded, valid


def _best_iou(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Max IoU of each predicted box [N, 1, 4] over its GT boxes [N, K, 4]; 0 without GT boxes."""
    return np.where(valid, inclusive_iou(pred, gt), 0.0).max(axis=1)


def box_contributions(hits: BoxHits, iou_thresholds: Sequence[int]) -> np.ndarray:
    """Each image's contribution to the counts the box-accuracy values are made of, int32
    [B, 1 + 2T + D*T]: 1 (the image), its v1 hits at IoU 50 [T], the same where its class was
    predicted (Top-1) [T], its v2 hits at every IoU threshold [D*T]. Weighted sums of them are
    a bootstrap replicate's counts (`box_values`)."""
    d50 = list(iou_thresholds).index(50)
    v1 = hits.v1[d50]
    parts = [np.ones((len(hits.correct), 1), dtype=bool), v1, v1 & hits.correct[:, None],
             hits.v2.transpose(1, 0, 2).reshape(len(hits.correct), -1)]
    return np.concatenate(parts, axis=1).astype(np.int32)


def box_values(totals: np.ndarray, iou_thresholds: Sequence[int]) -> dict[str, np.ndarray]:
    """The box-accuracy values, percent [R] each, of summed `box_contributions` [R, width]
    (one row per bootstrap replicate): MaxBoxAcc, MaxBoxAccV2, GT-known and Top-1 Loc as
    `BoxAccuracy.compute` reduces its counts (ties to the lowest threshold), and
    "maxboxacc_v2_iou<delta>" per IoU threshold; NaN where a replicate holds no image."""
    totals = np.asarray(totals, dtype=np.float64)
    deltas = list(iou_thresholds)
    levels = (totals.shape[1] - 1) // (2 + len(deltas))
    count = totals[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        # count * 100 / n, in `compute`'s order, so the unweighted totals give its numbers to the bit
        v1 = totals[:, 1:1 + levels] * 100.0 / count[:, None]
        top1 = totals[:, 1 + levels:1 + 2 * levels] * 100.0 / count[:, None]
        v2 = totals[:, 1 + 2 * levels:].reshape(len(totals), len(deltas), levels) * 100.0 / count[:, None, None]
    rows = np.arange(len(totals))
    loc = v1.argmax(1)
    best_v2 = v2.max(2)  # [R, D]
    values = {"maxboxacc": v1[rows, loc], "maxboxacc_v2": np.array([np.mean(r) for r in best_v2]),
              "top1_loc": top1[rows, loc], "gt_known_loc": v1[rows, loc]}
    values |= {f"maxboxacc_v2_iou{delta}": best_v2[:, d] for d, delta in enumerate(deltas)}
    return {name: np.where(count > 0, value, np.nan) for name, value in values.items()}
