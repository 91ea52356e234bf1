"""wsolevaluation metrics (Choe et al., CVPR 2020; docs/protocol.md section 4.2): MaxBoxAcc
(v1 and v2), GT-known and Top-1 Loc, and PxAP, accumulated as mergeable per-threshold counts.

Box accuracy follows the reference's conventions: ground-truth boxes are inclusive integer
boxes rescaled to the evaluation size with int(v * new / orig) (multiplication first, as
wsolevaluation's resize_bbox); a predicted box is the bounding rectangle [x, y, x + w, y + h]
(one pixel beyond the region on the right and bottom, the reference's cv2.boundingRect
reading) clipped to W - 1, H - 1; IoU counts pixels inclusively (+1 on each side); a threshold
with no region gives the box [0, 0, 0, 0].

Where the boxes come from (`boxes`):
- "opencv" (the default): exactly wsolevaluation's, see `wsol_bench.regions.contours`: contours of the
  uint8 heatmap thresholded at int(t * max), holes included (RETR_TREE), v1 the contour of
  largest polygon area. Published MaxBoxAcc numbers come from these.
- "components": a float variant, not the reference: `heatmap > t` on the float heatmap,
  8-connected pixel sets without hole boxes, v1 the set with most pixels (ties: first pixel in
  raster order). It moves MaxBoxAccV2 by a fraction of a point and shares its components with
  the AG-CAM pixel sweep.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from wsol_bench.regions.contours import opencv_components
from wsol_bench.datasets.base import Sample
from wsol_bench.regions.components import (
    DEFAULT_THRESHOLDS,
    ThresholdComponents,
    heatmaps_as_numpy,
    threshold_array,
    threshold_components,
)

IOU_THRESHOLDS = (30, 50, 70)  # percent, as wsolevaluation's --iou_threshold_list
BOX_SOURCES = ("opencv", "components")  # wsolevaluation's contours | the float 8-connected variant


def wsoleval_gt_boxes(sample: Sample, size: tuple[int, int]) -> torch.Tensor:
    """Ground-truth boxes of the sample's label class as inclusive integers at the evaluation
    `size` = (H, W), int64 [K, 4], rescaled from the on-disk image as wsolevaluation does:
    int(v * new / orig) on the inclusive corners (multiplication first)."""
    height, width = size
    orig_w, orig_h = sample.orig_size
    own = sample.orig_boxes[sample.box_labels == sample.label]
    boxes = []
    for x0, y0, x1, y1 in own.double().tolist():
        # continuous edges -> inclusive last pixel (x1 - 1), the convention of ground_truth_box_mask
        boxes.append([int(x0 * width / orig_w), int(y0 * height / orig_h),
                      int((x1 - 1) * width / orig_w), int((y1 - 1) * height / orig_h)])
    return torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4)


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


class BoxAccuracy:
    """MaxBoxAcc v1 (largest component) and v2 (all components), GT-known and Top-1 Loc.

    State: per IoU threshold delta and heatmap threshold t, the number of images whose best IoU
    is >= delta (and, for Top-1, whose class is also correct). Counts add, so shards merge."""

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 iou_thresholds: Sequence[int] = IOU_THRESHOLDS, boxes: str = "opencv") -> None:
        threshold_array(thresholds)
        if boxes not in BOX_SOURCES:
            raise ValueError(f"unknown sweep.boxes {boxes!r}; valid: {', '.join(BOX_SOURCES)} (opencv: "
                             "wsolevaluation's exact contours; components: the float 8-connected variant)")
        self.boxes = boxes
        self.thresholds = tuple(float(t) for t in thresholds)
        self.iou_thresholds = tuple(int(d) for d in iou_thresholds)
        if 50 not in self.iou_thresholds or len(set(self.iou_thresholds)) != len(self.iou_thresholds):
            raise ValueError(f"iou_thresholds {self.iou_thresholds} must be distinct percentages that "
                             "include 50 (MaxBoxAcc v1, GT-known and Top-1 Loc use IoU 50), "
                             "e.g. (30, 50, 70)")
        self.reset()

    def reset(self) -> None:
        """Forget every image."""
        shape = (len(self.iou_thresholds), len(self.thresholds))
        self.num_images = 0
        self.num_without_gt_boxes = 0
        self.correct_v1 = torch.zeros(shape, dtype=torch.int64)
        self.correct_v2 = torch.zeros(shape, dtype=torch.int64)
        self.top1_v1 = torch.zeros(shape, dtype=torch.int64)
        self.top1_v2 = torch.zeros(shape, dtype=torch.int64)

    def update(self, heatmaps: torch.Tensor, gt_boxes: Sequence[torch.Tensor], correct: torch.Tensor
               ) -> dict[str, np.ndarray]:
        """Add a batch: heatmaps [B, H, W], per image its inclusive GT boxes [K, 4] (see
        `wsoleval_gt_boxes`), and whether its class was predicted correctly, bool [B]."""
        return self.update_components(self.regions(heatmaps), gt_boxes, correct)

    def regions(self, heatmaps: torch.Tensor) -> ThresholdComponents:
        """The boxes of every heatmap at every threshold, from `self.boxes`'s source."""
        if self.boxes == "opencv":
            return opencv_components(heatmaps, self.thresholds)
        return threshold_components(heatmaps, self.thresholds)

    def update_components(self, components: ThresholdComponents, gt_boxes: Sequence[torch.Tensor],
                          correct: torch.Tensor) -> dict[str, np.ndarray]:
        """`update` from components already computed (e.g. by a sweep). Returns the best IoU per
        image and threshold, {"iou_v1": [B, T], "iou_v2": [B, T]} (float64)."""
        if components.thresholds != self.thresholds:
            raise ValueError("the components were computed over other thresholds than this BoxAccuracy's")
        if components.source != self.boxes:
            raise ValueError(f"these regions come from {components.source!r} but this BoxAccuracy scores "
                             f"boxes={self.boxes!r}; build them with BoxAccuracy.regions")
        batch, levels = components.num_images, len(self.thresholds)
        correct = np.asarray(torch.as_tensor(correct).cpu(), dtype=bool).reshape(-1)
        if len(gt_boxes) != batch or correct.shape != (batch,):
            raise ValueError(f"{batch} heatmaps need {batch} GT box lists and {batch} correct flags, "
                             f"got {len(gt_boxes)} and {correct.shape[0]}")
        gt, has_gt = _padded_boxes(gt_boxes, batch)
        height, width = components.size
        pred = components.boxes.copy()
        pred[:, 2] = np.minimum(pred[:, 2], width - 1)  # x + w, clipped as the reference does
        pred[:, 3] = np.minimum(pred[:, 3], height - 1)
        per_component = _best_iou(pred[:, None, :], gt[components.image], has_gt[components.image])
        # An (image, threshold) without components is scored with the box [0, 0, 0, 0].
        empty = np.repeat(_best_iou(np.zeros((batch, 1, 4), np.int64), gt, has_gt)[:, None], levels, axis=1)
        has_any = components.counts() > 0
        iou_v2 = np.full((batch, levels), -np.inf)
        np.maximum.at(iou_v2, (components.image, components.level), per_component)
        iou_v2 = np.where(has_any, iou_v2, empty)
        iou_v1 = empty.copy()
        largest = components.largest()
        iou_v1[components.image[largest], components.level[largest]] = per_component[largest]

        for d, delta in enumerate(self.iou_thresholds):
            for iou, hits, top1 in ((iou_v1, self.correct_v1, self.top1_v1),
                                    (iou_v2, self.correct_v2, self.top1_v2)):
                ok = iou >= delta / 100
                hits[d] += torch.from_numpy(ok.sum(0))
                top1[d] += torch.from_numpy((ok & correct[:, None]).sum(0))
        self.num_images += batch
        self.num_without_gt_boxes += int((~has_gt.any(1)).sum())
        return {"iou_v1": iou_v1, "iou_v2": iou_v2}

    def merge(self, other: BoxAccuracy) -> BoxAccuracy:
        """Add another accumulator's counts (same thresholds) into this one; returns self."""
        if (other.thresholds, other.iou_thresholds, other.boxes) != (self.thresholds, self.iou_thresholds,
                                                                      self.boxes):
            raise ValueError("cannot merge BoxAccuracy states with different thresholds, IoU thresholds or "
                             "box sources")
        self.num_images += other.num_images
        self.num_without_gt_boxes += other.num_without_gt_boxes
        for name in ("correct_v1", "correct_v2", "top1_v1", "top1_v2"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def state_dict(self) -> dict:
        """Plain lists, ints and tensors: safe for torch.save / torch.load(weights_only=True)."""
        return {"thresholds": list(self.thresholds), "iou_thresholds": list(self.iou_thresholds),
                "boxes": self.boxes, "num_images": self.num_images, "num_without_gt_boxes": self.num_without_gt_boxes,
                "correct_v1": self.correct_v1.clone(), "correct_v2": self.correct_v2.clone(),
                "top1_v1": self.top1_v1.clone(), "top1_v2": self.top1_v2.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Replace the state with a saved one (thresholds must match this accumulator's)."""
        saved = (tuple(state["thresholds"]), tuple(state["iou_thresholds"]), state.get("boxes", "components"))
        if saved != (self.thresholds, self.iou_thresholds, self.boxes):
            raise ValueError("saved BoxAccuracy state has other thresholds or box source; build BoxAccuracy "
                             "with the saved ones")
        self.num_images = int(state["num_images"])
        self.num_without_gt_boxes = int(state["num_without_gt_boxes"])
        for name in ("correct_v1", "correct_v2", "top1_v1", "top1_v2"):
            setattr(self, name, state[name].clone().to(torch.int64))

    def compute(self) -> dict:
        """Percentages. `maxboxacc`: v1 at IoU 50, best threshold. `maxboxacc_v2`: mean over the
        IoU thresholds of v2, each at its own best threshold. `gt_known_loc` and `top1_loc`: at
        `loc_threshold`, the v1 IoU-50 best threshold. Ties between thresholds go to the lowest."""
        if self.num_images == 0:
            raise ValueError("BoxAccuracy has no images; call update() first")
        # count * 100 / n, in the reference's order, so percentages agree to the last bit
        v1 = self.correct_v1.double().numpy() * 100.0 / self.num_images
        v2 = self.correct_v2.double().numpy() * 100.0 / self.num_images
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
            "top1_loc": float(self.top1_v1[d50, loc_index]) * 100.0 / self.num_images,
            "loc_threshold": thresholds[loc_index],
            "num_images": self.num_images,
            "num_without_gt_boxes": self.num_without_gt_boxes,
            "curves": {"thresholds": thresholds,
                       "v1": {delta: v1[d].tolist() for d, delta in enumerate(self.iou_thresholds)},
                       "v2": {delta: v2[d].tolist() for d, delta in enumerate(self.iou_thresholds)}},
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


class PxAP:
    """Pixel average precision (docs/protocol.md 4.2, wsolevaluation's MaskEvaluator), over the dataset.

    Each pixel's heatmap value falls into one bin of the edges [t_0, ..., t_{T-1}, 1.0]
    (a value v counts as predicted positive at edge e when v >= e, compared in float64 as the
    reference's numpy histogram does). Per edge e_j, from 1.0 down to t_0:
    tp_j, fp_j over all accumulated pixels (ignore pixels excluded), precision_j = tp_j / (tp_j
    + fp_j), recall_j = tp_j / (all GT pixels), and

        PxAP = 100 * sum_j precision_j * (recall_j - recall_{j-1}),   recall before e = 1.0 is 0,

    over the edges with tp_j + fp_j > 0."""

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> None:
        values = threshold_array(thresholds, np.float64)
        if values[0] < 0 or values[-1] >= 1:
            raise ValueError(f"PxAP thresholds must lie in [0, 1) (1.0 is added as the last edge); got "
                             f"{values[0]} .. {values[-1]}")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.edges = np.append(values, 1.0)
        self.reset()

    def reset(self) -> None:
        """Forget every pixel."""
        # bin j = pixels with exactly j edges <= value (j = 0 only for values below t_0)
        self.positive = torch.zeros(len(self.edges) + 1, dtype=torch.int64)
        self.negative = torch.zeros(len(self.edges) + 1, dtype=torch.int64)

    def update(self, heatmaps: torch.Tensor, gt_masks: torch.Tensor, valid: torch.Tensor | None = None
               ) -> None:
        """Add a batch: heatmaps [B, H, W] in [0, 1], GT masks bool [B, H, W], and `valid` bool
        [B, H, W] (False on ignore pixels), or None when every pixel counts."""
        heat = heatmaps_as_numpy(heatmaps)
        if heat.size and (heat.min() < 0 or heat.max() > 1):
            raise ValueError("PxAP needs heatmaps in [0, 1]; normalise them with "
                             "wsol_bench.regions.heatmaps.to_heatmaps")
        target = np.asarray(torch.as_tensor(gt_masks).cpu(), dtype=bool)
        keep = np.ones_like(target) if valid is None else np.asarray(torch.as_tensor(valid).cpu(), dtype=bool)
        if target.shape != heat.shape or keep.shape != heat.shape:
            raise ValueError(f"gt_masks {target.shape} and valid {keep.shape} must match heatmaps "
                             f"{heat.shape}")
        bins = np.searchsorted(self.edges, heat.astype(np.float64), side="right")
        size = len(self.edges) + 1
        self.positive += torch.from_numpy(np.bincount(bins[target & keep], minlength=size))
        self.negative += torch.from_numpy(np.bincount(bins[~target & keep], minlength=size))

    def merge(self, other: PxAP) -> PxAP:
        """Add another accumulator's histograms (same thresholds); returns self."""
        if other.thresholds != self.thresholds:
            raise ValueError("cannot merge PxAP states with different thresholds")
        self.positive = self.positive + other.positive
        self.negative = self.negative + other.negative
        return self

    def state_dict(self) -> dict:
        """Plain lists and tensors: safe for torch.save / torch.load(weights_only=True)."""
        return {"thresholds": list(self.thresholds), "positive": self.positive.clone(),
                "negative": self.negative.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Replace the state with a saved one (thresholds must match)."""
        if tuple(state["thresholds"]) != self.thresholds:
            raise ValueError("saved PxAP state has other thresholds; build PxAP with the saved ones")
        self.positive = state["positive"].clone().to(torch.int64)
        self.negative = state["negative"].clone().to(torch.int64)

    def compute(self) -> dict:
        """{"pxap": percent, "edges", "precision", "recall"}; the curve lists the edges in
        ascending order (t_0 .. 1.0), precision NaN where nothing is predicted."""
        pos, neg = self.positive.numpy(), self.negative.numpy()
        if pos.sum() == 0:
            raise ValueError("PxAP has no ground-truth positive pixel; masks are empty or never updated")
        # predicted positive at edge k (value >= edges[k]): bins k+1 and above
        tp = np.cumsum(pos[::-1])[::-1][1:].astype(np.float64)
        fp = np.cumsum(neg[::-1])[::-1][1:].astype(np.float64)
        predicted = tp + fp
        if not (predicted > 0).any():
            raise ValueError("PxAP has no pixel at or above the lowest threshold")
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / predicted
        recall = tp / pos.sum()
        # from the highest edge down; recall starts at 0 (the reference's ">= 2.0" point)
        p_desc, r_desc = precision[::-1], recall[::-1]
        gain = np.diff(np.concatenate([[0.0], r_desc]))
        used = predicted[::-1] > 0
        return {"pxap": float((p_desc[used] * gain[used]).sum() * 100), "edges": self.edges.tolist(),
                "precision": precision.tolist(), "recall": recall.tolist()}
