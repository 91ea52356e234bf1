"""Localization scores over a whole grid of thresholds in one pass (docs/protocol.md 3, 4.1, 4.2).

The binary maps of one heatmap are nested (heatmap > t only shrinks as t grows), so the
connected components of every threshold come from one pass over the image instead of one
labelling per threshold:

1. Each pixel gets its level q = the number of thresholds strictly below its value; the pixel
   is on at threshold index i exactly when q > i (the same float comparison as `binarize`).
2. Every row at every level splits into runs of on pixels; a run starts where q rises through
   the level and ends where it falls. Runs are read off the row differences of q, so the work
   is proportional to the number of runs, not to thresholds x pixels.
3. Runs of the same level in neighbouring rows that touch (8-connectivity: column ranges
   within one pixel) are joined; the connected components of that graph are the connected
   components of every binary map, with their boxes and pixel counts.

Components are listed per (image, threshold) in raster order of their first pixel (the order of
`skimage.measure.label`), so "the first largest" is well defined.

The box-union masks are nested as well (a component at a higher threshold lies inside one at
a lower threshold, and so does its box), so one integer map per image, the highest threshold
index whose union covers the pixel, gives tp/fp/fn for every threshold by one histogram.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from wsol_bench.regions.boxes import PROTOCOLS
from wsol_bench.metrics.localization import GroundTruth
from wsol_bench.metrics.pixel import EPS

# wsolevaluation's grid: numpy.arange(0, 1, 0.01), exactly those float64 values.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(np.arange(0, 1, 0.01).tolist())


def threshold_array(thresholds: Sequence[float], dtype: np.dtype = np.float32) -> np.ndarray:
    """Thresholds as an array in the heatmaps' dtype (the comparison `binarize` makes), after
    checking that they are finite and strictly increasing in that dtype."""
    values = np.asarray(list(thresholds), dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError("thresholds must be a non-empty list of numbers, e.g. [0.1, 0.5]")
    cast = values.astype(dtype)
    if not np.isfinite(values).all() or (len(cast) > 1 and not (np.diff(cast) > 0).all()):
        raise ValueError(f"thresholds must be finite and strictly increasing (in {np.dtype(dtype).name}); "
                         f"sort them and drop duplicates: got {values.tolist()[:8]}...")
    return cast


@dataclass
class ThresholdComponents:
    """The 8-connected components of `heatmap > t` for every image of a batch and every threshold.

    One entry per component, ordered by (image, threshold index, raster order of its first
    pixel). `boxes` are int64 xyxy with continuous edges, as `components_to_boxes` gives them:
    a component over columns 3..5 has x0 = 3, x1 = 6."""

    thresholds: tuple[float, ...]
    size: tuple[int, int]  # (H, W)
    num_images: int
    image: np.ndarray  # int64 [C]
    level: np.ndarray  # int64 [C], index into `thresholds`
    boxes: np.ndarray  # int64 [C, 4]
    area: np.ndarray  # int64 [C], pixels (float64 contour areas for OpenCV's contours)
    source: str = "components"  # "components" (8-connected pixel sets) or "opencv" (contours)

    def group(self) -> np.ndarray:
        """Flat (image, threshold) index of each component: image * T + level."""
        return self.image * len(self.thresholds) + self.level

    def counts(self) -> np.ndarray:
        """Number of components per image and threshold, int64 [B, T]."""
        size = self.num_images * len(self.thresholds)
        return np.bincount(self.group(), minlength=size).reshape(self.num_images, len(self.thresholds))

    def largest(self) -> np.ndarray:
        """Index of the largest component (largest `area`) of every (image, threshold) that has
        one. Ties go to the first entry: for pixel components, the one whose first pixel comes
        first in raster order."""
        group = self.group()
        best = np.zeros(self.num_images * len(self.thresholds), dtype=self.area.dtype)
        np.maximum.at(best, group, self.area)
        candidates = np.flatnonzero(self.area == best[group])
        first = np.ones(len(candidates), dtype=bool)
        first[1:] = group[candidates[1:]] != group[candidates[:-1]]
        return candidates[first]

    def boxes_at(self, image: int, level: int) -> torch.Tensor:
        """The float xyxy boxes of one image at one threshold index, as `components_to_boxes`."""
        keep = (self.image == image) & (self.level == level)
        return torch.from_numpy(self.boxes[keep]).float().reshape(-1, 4)


def heatmaps_as_numpy(heatmaps: torch.Tensor | np.ndarray) -> np.ndarray:
    """[B, H, W] finite float heatmaps as a numpy array (no copy when already on the CPU)."""
    array = heatmaps.detach().cpu().numpy() if isinstance(heatmaps, torch.Tensor) else np.asarray(heatmaps)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"heatmaps must be a float [B, H, W] array, got {array.dtype} {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError("heatmaps hold NaN or inf; build them with wsol_bench.regions.heatmaps.to_heatmaps, "
                         "which turns degenerate maps into zeros")
    return array


def threshold_components(heatmaps: torch.Tensor | np.ndarray,
                         thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> ThresholdComponents:
    """Connected components (8-connectivity) of `heatmaps > t` for every t, for a [B, H, W] batch."""
    heat = heatmaps_as_numpy(heatmaps)
    thr = threshold_array(thresholds, heat.dtype)
    levels = np.searchsorted(thr, heat, side="left")  # number of thresholds strictly below
    parts = [_image_components(q, len(thr)) for q in levels]
    counts = [len(p[0]) for p in parts]
    columns = [np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, np.int64) for k in range(6)]
    level, x0, y0, x1, y1, area = columns
    return ThresholdComponents(
        thresholds=tuple(float(t) for t in thresholds), size=(heat.shape[1], heat.shape[2]),
        num_images=len(heat), image=np.repeat(np.arange(len(heat)), counts), level=level,
        boxes=np.stack([x0, y0, x1, y1], axis=1).reshape(-1, 4), area=area)


def _level_crossings(cur: np.ndarray, beside: np.ndarray, num_levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels where a run of some level starts (beside = the left neighbour's level) or ends
    (beside = the right neighbour's): one entry per level, as (row * T + level, column),
    sorted by (row, level, column)."""
    height, width = cur.shape
    count = np.maximum(cur - beside, 0).ravel()
    pixel = np.flatnonzero(count)
    count = count[pixel]
    row = pixel // width
    # entries of one pixel: the neighbour's level, then +1, +2, ... up to its own level - 1
    base = row * num_levels + beside.ravel()[pixel] - (np.cumsum(count) - count)
    key = np.repeat(base, count) + np.arange(int(count.sum()))
    column = np.repeat(pixel - row * width, count)
    # a 16-bit key gets numpy's radix sort; the stable sort keeps the columns in order
    small = height * num_levels <= np.iinfo(np.uint16).max
    order = np.argsort(key.astype(np.uint16) if small else key, kind="stable")
    return key[order], column[order]


def _image_components(q: np.ndarray, num_levels: int) -> list[np.ndarray]:
    """Components of one image's level map q [H, W]: (level, x0, y0, x1, y1, area) arrays,
    sorted by (level, raster order of the first pixel)."""
    height, width = q.shape
    padded = np.zeros((height, width + 2), dtype=np.int64)
    padded[:, 1:-1] = q
    group, start = _level_crossings(padded[:, 1:-1], padded[:, :-2], num_levels)
    _, stop = _level_crossings(padded[:, 1:-1], padded[:, 2:], num_levels)  # inclusive last columns
    runs = len(group)
    if runs == 0:
        return [np.zeros(0, np.int64)] * 6
    # Runs of the next row at the same level whose columns come within one pixel (8-connected):
    # both keys are sorted, so the candidates of each run are one contiguous range.
    stride = width + 2
    run_start = group * stride + start
    run_stop = group * stride + stop + 1
    below = (group + num_levels) * stride
    lo = np.searchsorted(run_stop, below + start, side="left")
    hi = np.searchsorted(run_start, below + stop + 1, side="right")
    degree = np.maximum(hi - lo, 0)
    edges = int(degree.sum())
    neighbours = np.repeat(lo - (np.cumsum(degree) - degree), degree) + np.arange(edges)
    indptr = np.concatenate([[0], np.cumsum(degree)])
    graph = csr_matrix((np.ones(edges, dtype=np.int8), neighbours, indptr), shape=(runs, runs))
    count, label = connected_components(graph, directed=False)

    first = np.full(count, runs, dtype=np.int64)
    np.minimum.at(first, label, np.arange(runs))
    x0 = np.full(count, width, dtype=np.int64)
    np.minimum.at(x0, label, start)
    x1 = np.zeros(count, dtype=np.int64)
    np.maximum.at(x1, label, stop)
    last_group = np.zeros(count, dtype=np.int64)  # one level per component: the last row's group
    np.maximum.at(last_group, label, group)
    area = np.bincount(label, weights=stop - start + 1, minlength=count).astype(np.int64)
    first_row, level = np.divmod(group[first], num_levels)
    # runs are sorted by (row, level, column): per level, the first run holds the first pixel
    order = np.argsort(level * runs + first, kind="stable")
    return [level[order], x0[order], first_row[order], x1[order] + 1,
            last_group[order] // num_levels + 1, area[order]]


@dataclass
class SweepResult:
    """Per-threshold per-image AG-CAM pixel scores: `scores[name]` is [T, B] (fractions), with
    the same names as `score_heatmaps` rows (box_*, mask_*, n_pred_boxes)."""

    thresholds: tuple[float, ...]
    scores: dict[str, np.ndarray]

    @property
    def num_images(self) -> int:
        return int(next(iter(self.scores.values())).shape[1])

    @property
    def metric_names(self) -> list[str]:
        """The score columns (everything but the box count)."""
        return [k for k in self.scores if k != "n_pred_boxes"]

    def rows(self) -> list[list[dict]]:
        """result[t][b] = {metric: value, ..., "n_pred_boxes": int}, as `score_heatmaps` returns."""
        names = self.metric_names
        out = []
        for t in range(len(self.thresholds)):
            rows = []
            for b in range(self.num_images):
                row = {k: float(self.scores[k][t, b]) for k in names}
                row["n_pred_boxes"] = int(self.scores["n_pred_boxes"][t, b])
                rows.append(row)
            out.append(rows)
        return out

    def mean(self, select: torch.Tensor | np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Mean of every column over the selected images (a bool mask [B], e.g. the correctly
        classified ones; all when None), one value per threshold."""
        keep = np.ones(self.num_images, dtype=bool) if select is None else np.asarray(select, dtype=bool)
        if keep.shape != (self.num_images,):
            raise ValueError(f"select must be a bool mask of {self.num_images} images, "
                             f"got shape {keep.shape}")
        if not keep.any():
            raise ValueError("select keeps no image: there is nothing to average")
        return {k: v[:, keep].mean(axis=1) for k, v in self.scores.items()}

    def table(self, select: torch.Tensor | np.ndarray | None = None) -> pd.DataFrame:
        """One row per threshold: the threshold and the mean of every column."""
        return pd.DataFrame({"threshold": list(self.thresholds), **self.mean(select)})

    def best_thresholds(self, select: torch.Tensor | np.ndarray | None = None) -> dict[str, dict[str, float]]:
        """For every metric, the threshold with the highest mean and that mean; ties go to the
        lowest threshold."""
        means = self.mean(select)
        best = {}
        for name in self.metric_names:
            index = int(np.argmax(means[name]))
            best[name] = {"threshold": self.thresholds[index], "value": float(means[name][index])}
        return best

    @classmethod
    def concat(cls, results: Sequence[SweepResult]) -> SweepResult:
        """Join the images of several batches swept over the same thresholds."""
        if not results:
            raise ValueError("no sweep results to join")
        first = results[0]
        for r in results[1:]:
            if r.thresholds != first.thresholds or list(r.scores) != list(first.scores):
                raise ValueError("sweep results differ in thresholds or columns; sweep every batch alike")
        return cls(first.thresholds, {k: np.concatenate([r.scores[k] for r in results], axis=1)
                                      for k in first.scores})


def sweep_pixel_scores(components: ThresholdComponents, gt: GroundTruth, protocol: str = "agcam"
                       ) -> SweepResult:
    """AG-CAM pixel scores (docs/protocol.md 4.1) of the box-union of ALL components at every threshold,
    against the GT box-union and, where present, the GT mask. Equal to `score_heatmaps` at each
    threshold; `gt` must come from `ground_truth(..., protocol)` with the same protocol."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown box protocol {protocol!r}; valid: {PROTOCOLS}")
    expected = (components.num_images, *components.size)
    if tuple(gt.box_masks.shape) != expected:
        raise ValueError(f"ground truth masks {tuple(gt.box_masks.shape)} do not match the heatmaps "
                         f"{expected}")
    cover = coverage_levels(components, protocol)
    num_levels = len(components.thresholds)
    scores = _prefixed("box_", _level_counts(cover, gt.box_masks.numpy(), None, num_levels))
    if gt.seg_masks is not None:
        valid = gt.seg_valid.numpy() if gt.seg_valid is not None else None
        scores.update(_prefixed("mask_", _level_counts(cover, gt.seg_masks.numpy(), valid, num_levels)))
    scores["n_pred_boxes"] = components.counts().T
    return SweepResult(components.thresholds, scores)


def sweep_heatmaps(heatmaps: torch.Tensor, gt: GroundTruth, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                   protocol: str = "agcam") -> tuple[SweepResult, ThresholdComponents]:
    """Components once, then pixel scores at every threshold. The components are returned too,
    so `BoxAccuracy.update_components` can score the same batch without labelling again."""
    components = threshold_components(heatmaps, thresholds)
    return sweep_pixel_scores(components, gt, protocol), components


def coverage_levels(components: ThresholdComponents, protocol: str = "agcam") -> np.ndarray:
    """[B, H, W] unsigned ints: 1 + the highest threshold index whose predicted box-union covers
    the pixel (0: never covered). The union at threshold index i is exactly `coverage > i`."""
    height, width = components.size
    levels = len(components.thresholds)
    # the smallest type that holds T: painting is memory-bound, and low thresholds paint big boxes
    dtype = np.uint8 if levels < 255 else np.uint16 if levels < 65535 else np.int64
    cover = np.zeros((components.num_images, height, width), dtype=dtype)
    extra = 1 if protocol == "agcam" else 0  # the AG-CAM reference fills x..x+w inclusive
    bounds = np.searchsorted(components.image, np.arange(components.num_images + 1)).tolist()
    values = (components.level + 1).tolist()
    boxes = (components.boxes + np.array([0, 0, extra, extra])).tolist()
    for b in range(components.num_images):
        view = cover[b]
        # components are sorted by level within an image: later, higher levels overwrite
        for value, (x0, y0, x1, y1) in zip(values[bounds[b]:bounds[b + 1]], boxes[bounds[b]:bounds[b + 1]]):
            view[y0:y1, x0:x1] = value
    return cover


def _level_counts(cover: np.ndarray, target: np.ndarray, valid: np.ndarray | None, num_levels: int
                  ) -> dict[str, np.ndarray]:
    """tp, fp, fn, tn as float64 [T, B] for the nested predictions `cover > i`."""
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


def _prefixed(prefix: str, counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The docs/protocol.md 4.1 formulas, written exactly as `pixel_scores` evaluates them."""
    tp, fp, fn, tn = counts["tp"], counts["fp"], counts["fn"], counts["tn"]
    total = tp + fp + fn + tn
    scores = {
        "pixel_acc": (tp + tn + EPS) / (total + EPS),
        "iou": (tp + EPS) / (tp + fp + fn + EPS),
        "dice": (2 * tp + EPS) / (2 * tp + fp + fn + EPS),
        "precision": (tp + EPS) / (tp + fp + EPS),
        "recall": (tp + EPS) / (tp + fn + EPS),
    }
    return {prefix + k: v for k, v in scores.items()}
