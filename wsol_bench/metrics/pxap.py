"""Pixel average precision, PxAP (wsolevaluation's MaskEvaluator; docs/protocol.md 4.2):
precision and recall of the heatmap's pixels over the whole dataset, as histograms that merge
by addition."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from wsol_bench.errors import SettingError
from wsol_bench.metrics.base import RunMetric
from wsol_bench.regions.components import heatmaps_as_numpy
from wsol_bench.regions.thresholds import DEFAULT_THRESHOLDS, threshold_array


class PxAP(RunMetric):
    """Pixel average precision (docs/protocol.md 4.2, wsolevaluation's MaskEvaluator), over the dataset.

    Each pixel's heatmap value falls into one bin of the edges [t_0, ..., t_{T-1}, 1.0]
    (a value v counts as predicted positive at edge e when v >= e, compared in float64 as the
    reference's numpy histogram does). Per edge e_j, from 1.0 down to t_0:
    tp_j, fp_j over all accumulated pixels (ignore pixels excluded), precision_j = tp_j / (tp_j
    + fp_j), recall_j = tp_j / (all GT pixels), and

        PxAP = 100 * sum_j precision_j * (recall_j - recall_{j-1}),   recall before e = 1.0 is 0,

    over the edges with tp_j + fp_j > 0."""

    settings_keys = ("thresholds",)

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, **kwargs) -> None:
        super().__init__(**kwargs)
        values = threshold_array(thresholds, np.float64)
        if values[0] < 0 or values[-1] >= 1:
            raise SettingError(f"PxAP thresholds must lie in [0, 1) (1.0 is added as the last edge); got "
                             f"{values[0]} .. {values[-1]}")
        self.thresholds = tuple(float(t) for t in thresholds)
        self.edges = np.append(values, 1.0)
        # bin j = pixels with exactly j edges <= value (j = 0 only for values below t_0)
        for name in ("positive", "negative"):
            self.add_state(name, torch.zeros(len(self.edges) + 1, dtype=torch.int64), dist_reduce_fx="sum",
                           persistent=True)

    def update(self, heatmaps: torch.Tensor, gt_masks: torch.Tensor, valid: torch.Tensor | None = None
               ) -> None:
        """Add a batch: heatmaps [B, H, W] in [0, 1], GT masks bool [B, H, W], and `valid` bool
        [B, H, W] (False on ignore pixels), or None when every pixel counts."""
        self.add_histograms(self.image_histograms(heatmaps, gt_masks, valid))

    def image_histograms(self, heatmaps: torch.Tensor, gt_masks: torch.Tensor, valid: torch.Tensor | None = None
                         ) -> np.ndarray:
        """Each image's pixel histograms (the arguments of `update`), int64 [B, 2, bins]: its GT
        (positive) and other (negative) counted pixels per bin; `add_histograms` sums them."""
        heat = heatmaps_as_numpy(heatmaps)
        if heat.size and (heat.min() < 0 or heat.max() > 1):
            raise SettingError("PxAP needs heatmaps in [0, 1]; normalise them with "
                               "wsol_bench.regions.heatmaps.to_heatmaps")
        target = np.asarray(torch.as_tensor(gt_masks).cpu(), dtype=bool)
        keep = np.ones_like(target) if valid is None else np.asarray(torch.as_tensor(valid).cpu(), dtype=bool)
        if target.shape != heat.shape or keep.shape != heat.shape:
            raise SettingError(f"gt_masks {target.shape} and valid {keep.shape} must match heatmaps "
                               f"{heat.shape}")
        size = len(self.edges) + 1
        bins = np.searchsorted(self.edges, heat.astype(np.float64), side="right")
        # one bincount for the batch: image b's positive pixels in bins [2b*size, (2b+1)*size), negative after
        image = np.arange(len(heat)).reshape(-1, *([1] * (heat.ndim - 1)))
        slot = (2 * image + ~target) * size + bins
        counts = np.bincount(slot[keep], minlength=2 * len(heat) * size)
        return counts.reshape(len(heat), 2, size).astype(np.int64)

    def add_histograms(self, histograms: np.ndarray) -> None:
        """Count one batch's `image_histograms`."""
        totals = np.asarray(histograms, dtype=np.int64).sum(0)
        self.positive += torch.from_numpy(totals[0])
        self.negative += torch.from_numpy(totals[1])
        self._restored = True  # has seen images, though perhaps not through update() (RunMetric.update_called)

    def compute(self) -> dict:
        """{"pxap": percent, "edges", "precision", "recall"}; the curve lists the edges in
        ascending order (t_0 .. 1.0), precision NaN where nothing is predicted."""
        pos, neg = self.positive.numpy(), self.negative.numpy()
        if pos.sum() == 0:
            raise ValueError("PxAP has no ground-truth positive pixel; masks are empty or never updated")
        tp, fp = _predicted_counts(pos), _predicted_counts(neg)
        if not (tp + fp > 0).any():
            raise ValueError("PxAP has no pixel at or above the lowest threshold")
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / (tp + fp)
        return {"pxap": float(pxap_values(pos[None], neg[None])[0]), "edges": self.edges.tolist(),
                "precision": precision.tolist(), "recall": (tp / pos.sum()).tolist()}


def _predicted_counts(histogram: np.ndarray) -> np.ndarray:
    """float64 [..., edges]: the pixels at or above each edge k (bins k+1 and above) of
    histograms [..., bins]."""
    return np.cumsum(histogram[..., ::-1], axis=-1)[..., ::-1][..., 1:].astype(np.float64)


def pxap_values(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """PxAP in percent [R] of summed histograms [R, bins] (one row per bootstrap replicate, or
    the one row of the whole dataset): per edge from the highest down, precision times the
    recall gained, over the edges where something is predicted; NaN for a row without a
    positive pixel or a predicted one."""
    tp, fp = _predicted_counts(np.asarray(positive)), _predicted_counts(np.asarray(negative))
    predicted = tp + fp
    gt = np.asarray(positive).sum(-1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / predicted
        recall = tp / gt[:, None]
    # from the highest edge down; recall starts at 0 (the reference's ">= 2.0" point)
    p_desc, r_desc = precision[:, ::-1], recall[:, ::-1]
    gain = np.diff(np.concatenate([np.zeros((len(gt), 1)), r_desc], axis=1), axis=1)
    used = predicted[:, ::-1] > 0
    values = np.array([(p[u] * g[u]).sum() * 100 for p, g, u in zip(p_desc, gain, used)])
    return np.where((gt > 0) & used.any(1), values, np.nan)
