"""The AG-CAM pixel scores averaged over images at every threshold of a grid (sweep.csv;
docs/protocol.md 4.3), as exact sums: the mean of each score per threshold, over all images
and over the correctly classified ones (the two values of `metric.image_filter`), equal for
any sharding of the run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from wsol_bench.errors import SettingError
from wsol_bench.metrics.base import RunMetric
from wsol_bench.metrics.exact_sum import CHUNKS, MAX_VALUES, exact_mean, fixed_point_chunks, totals_exceed
from wsol_bench.regions.thresholds import threshold_array

FILTERS = ("all", "correct")  # the image subsets a sweep keeps sums for (metric.image_filter)


class SweepMeans(RunMetric):
    """Per threshold: exact sums of every score column (fractions in [0, 1]) and of the box
    counts, and the number of images, for all images and for the correctly classified ones."""

    settings_keys = ("thresholds", "columns")

    def __init__(self, thresholds: Sequence[float], columns: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        threshold_array(thresholds, np.float64)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.columns = tuple(columns)
        if not all(isinstance(c, str) for c in self.columns):
            raise SettingError(f"SweepMeans columns are score names (strings), got {list(self.columns)[:8]}")
        levels = len(self.thresholds)
        self.add_state("sums", torch.zeros(len(FILTERS), len(self.columns), levels, CHUNKS, dtype=torch.int64),
                       dist_reduce_fx="sum", persistent=True)
        self.add_state("boxes", torch.zeros(len(FILTERS), levels, dtype=torch.int64), dist_reduce_fx="sum",
                       persistent=True)
        self.add_state("images", torch.zeros(len(FILTERS), dtype=torch.int64), dist_reduce_fx="sum",
                       persistent=True)

    def update(self, scores: dict[str, np.ndarray], correct: torch.Tensor | np.ndarray) -> None:
        """Add a batch: `scores` as `metrics.localization.region_scores` gives them ({column:
        [T, B]} and "n_pred_boxes"), `correct` bool [B]."""
        correct = np.asarray(torch.as_tensor(correct).cpu(), dtype=bool).reshape(-1)
        for f, keep in enumerate((np.ones_like(correct), correct)):
            if int(self.images[f]) + int(keep.sum()) > MAX_VALUES:
                raise SettingError(f"a sweep holds at most {MAX_VALUES} images per process; split the run")
            for c, column in enumerate(self.columns):
                self.sums[f, c] += torch.from_numpy(fixed_point_chunks(scores[column][:, keep]).sum(1))
            self.boxes[f] += torch.from_numpy(np.asarray(scores["n_pred_boxes"])[:, keep].sum(1).astype(np.int64))
            self.images[f] += int(keep.sum())

    def state_problem(self) -> str | None:
        """More correctly classified images than images, or a score sum above the number of
        images (every score is in [0, 1])."""
        images = self.images.numpy()
        if images[1] > images[0]:
            return f"images counts {images[1]} correctly classified images but only {images[0]} images"
        over = totals_exceed(self.sums.numpy(), images[:, None, None])
        if over.any():
            f, c, t = (int(i[0]) for i in np.nonzero(over))
            return (f"the sum of {self.columns[c]} at threshold {self.thresholds[t]} is larger than its "
                    f"{images[f]} images ({FILTERS[f]}) can give (each score is in [0, 1])")
        return None

    def compute(self) -> dict[str, pd.DataFrame]:
        """{filter: table}: one row per threshold with the mean of every column and of
        n_pred_boxes, and n_images (an empty table where the filter keeps no image)."""
        out = {}
        for f, name in enumerate(FILTERS):
            count = int(self.images[f])
            if count == 0:
                out[name] = pd.DataFrame(columns=["threshold", *self.columns, "n_pred_boxes", "n_images"])
                continue
            table = {"threshold": list(self.thresholds)}
            for c, column in enumerate(self.columns):
                table[column] = [exact_mean(self.sums[f, c, t].tolist(), count) for t in range(len(self.thresholds))]
            table["n_pred_boxes"] = [int(b) / count for b in self.boxes[f].tolist()]
            frame = pd.DataFrame(table)
            frame["n_images"] = count
            out[name] = frame
        return out


# Bootstrap replicates of the curve (docs/protocol.md 7.1). Each image adds, per replicate, its
# Poisson count times its contribution vector: [kept by the image filter (0/1), every score column
# at every threshold in units of 2^-CURVE_BITS, its box count at every threshold]. Integer
# contributions make the replicate sums exact (`metrics.replicate_sums`): a data-parallel run's
# curve intervals equal a one-process run's. Rounding a score to 2^-24 moves a replicate mean by at
# most 2^-25 (3e-8), far below the interval's own resampling noise.
CURVE_BITS = 24
CURVE_COUNT = "n_pred_boxes"  # the one curve column that is a count, summed as it is


def curve_columns(columns: Sequence[str]) -> list[str]:
    """The sweep table columns the curve replicates cover, in contribution order."""
    return [*columns, CURVE_COUNT]


def curve_width(levels: int, columns: Sequence[str]) -> int:
    """The length of one image's curve contribution vector at `levels` thresholds."""
    return 1 + levels * len(curve_columns(columns))


def curve_contributions(scores: dict[str, np.ndarray], keep: np.ndarray, columns: Sequence[str]) -> np.ndarray:
    """int64 [B, width]: each image's curve contribution (see above) from `scores` as
    `metrics.localization.region_scores` gives them ({column: [T, B]} and n_pred_boxes), all
    zero for an image the image filter leaves out (`keep` false)."""
    keep = np.asarray(keep, dtype=bool).reshape(-1)
    parts = [keep[:, None].astype(np.int64)]
    for column in columns:
        values = np.asarray(scores[column], dtype=np.float64).T  # [B, T]
        parts.append(np.rint(np.ldexp(values, CURVE_BITS)).astype(np.int64))  # ldexp: exact scaling
    parts.append(np.asarray(scores[CURVE_COUNT]).T.astype(np.int64))
    out = np.concatenate(parts, axis=1)
    out[~keep] = 0
    return out


def curve_replicate_means(totals: np.ndarray, columns: Sequence[str], levels: int) -> dict[str, np.ndarray]:
    """{sweep table column: float64 [R, T]}: each replicate's mean of the column at every
    threshold over the images the filter keeps, from the summed contributions [R, width]; NaN
    where a replicate drew none of them."""
    totals = np.asarray(totals)
    if totals.ndim != 2 or totals.shape[1] != curve_width(levels, columns):
        raise ValueError(f"curve replicate sums {list(totals.shape)} do not fit {levels} thresholds of "
                         f"{len(curve_columns(columns))} columns")
    count = totals[:, :1].astype(np.float64)
    out = {}
    for c, column in enumerate(curve_columns(columns)):
        block = totals[:, 1 + c * levels:1 + (c + 1) * levels].astype(np.float64)
        unit = 1.0 if column == CURVE_COUNT else 2.0 ** -CURVE_BITS
        with np.errstate(invalid="ignore", divide="ignore"):
            out[column] = np.where(count > 0, block * unit / count, np.nan)
    return out
