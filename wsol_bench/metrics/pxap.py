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
        heat = heatmaps_as_numpy(heatmaps)
        if heat.size and (heat.min() < 0 or heat.max() > 1):
            raise SettingError("PxAP needs heatmaps in [0, 1]; normalise them with "
                               "wsol_bench.regions.heatmaps.to_heatmaps")
        target = np.asarray(torch.as_tensor(gt_masks).cpu(), dtype=bool)
        keep = np.ones_like(target) if valid is None else np.asarray(torch.as_tensor(valid).cpu(), dtype=bool)
        if target.shape != heat.shape or keep.shape != heat.shape:
            raise SettingError(f"gt_masks {target.shape} and valid {keep.shape} must match heatmaps "
                               f"{heat.shape}")
        bins = np.searchsorted(self.edges, heat.astype(np.float64), side="right")
        size = len(self.edges) + 1
        self.positive += torch.from_numpy(np.bincount(bins[target & keep], minlength=size))
        self.negative += torch.from_numpy(np.bincount(bins[~target & keep], minlength=size))

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
