"""Connected components (8-connectivity) of `heatmap > t` for every threshold t at once
(docs/protocol.md 3): the region engine of the AG-CAM scores and of the float variant of the
wsolevaluation boxes.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from wsol_bench.errors import SettingError
from wsol_bench.regions.thresholds import DEFAULT_THRESHOLDS, threshold_array


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
        raise SettingError(f"heatmaps must be a float [B, H, W] array, got {array.dtype} "
                           f"{tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise SettingError("heatmaps hold NaN or inf; build them with "
                           "wsol_bench.regions.heatmaps.to_heatmaps, which turns degenerate maps into zeros")
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
