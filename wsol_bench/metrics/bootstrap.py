"""Bootstrap confidence intervals over images (docs/protocol.md 7.1), mergeable across shards
and ranks.

The Poisson bootstrap: in replicate r, image i counts w_ri ~ Poisson(1) times, instead of the
multinomial counts of drawing N images with replacement (the two agree as N grows, and the
Poisson counts of one image do not depend on the others). Each w_ri is a function of the seed,
the image id and r alone (a counter-based generator: splitmix64 of a hash of the id and r,
inverted through the Poisson CDF), so every method, shard, rank and rebuild of a run draws the
same replicates for an image: intervals of a data-parallel run equal a one-process run's, and
the methods' replicates are paired (the same resampled images), which the paired comparisons
need.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from wsol_bench.errors import SettingError

CI_LO, CI_HI = " ci_lo", " ci_hi"  # a table column's interval bounds are the columns "<column> ci_lo/hi"
POISSON_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(30)])  # P(K <= k), K ~ Poisson(1)
CHUNK = 4096  # images per slice of the replicate matrix (bounds memory at 50,000 images)


@dataclass(frozen=True)
class BootstrapSettings:
    """`report.ci` (the level; None: no intervals), `report.resamples`, `report.seed`."""

    level: float | None = 0.95
    resamples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.level is not None and not 0 < self.level < 1:
            raise SettingError(f"report.ci={self.level} must lie in (0, 1), e.g. 0.95; or null for no intervals")
        if self.resamples < 2:
            raise SettingError(f"report.resamples={self.resamples} must be at least 2 (1000 is usual)")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (wrapping arithmetic is its definition)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def image_keys(image_ids: Sequence[str], seed: int) -> np.ndarray:
    """uint64 key per image: the first 8 bytes of blake2b(seed, id)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}\0{i}".encode(), digest_size=8).digest(), "little")
                     for i in image_ids], dtype=np.uint64)


def replicate_weights(keys: np.ndarray, resamples: int) -> np.ndarray:
    """Poisson(1) counts [resamples, N] (uint8) of the images with `keys`, replicate r of image
    i a function of (keys[i], r) alone."""
    with np.errstate(over="ignore"):
        counter = np.arange(resamples, dtype=np.uint64)[:, None] * np.uint64(0xD1B54A32D192ED03)
        bits = _splitmix64(keys[None, :] ^ counter)
    uniform = (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # 53 random bits in [0, 1)
    return np.searchsorted(POISSON_CDF, uniform, side="right").astype(np.uint8)


class Replicates:
    """The bootstrap replicates of one set of images: their Poisson counts, drawn once and
    shared by every method and column scored on (a subset of) those images."""

    def __init__(self, image_ids: Sequence[str], settings: BootstrapSettings) -> None:
        self.settings = settings
        self.ids = pd.Index(pd.unique(np.asarray([str(i) for i in image_ids], dtype=object)))  # column j's image
        keys = image_keys(list(self.ids), settings.seed)
        self.weights = np.empty((settings.resamples, len(self.ids)), dtype=np.uint8)  # [R, N]
        for start in range(0, len(self.ids), CHUNK):  # in slices: the 64-bit draws of all images at once are 8x this
            self.weights[:, start:start + CHUNK] = replicate_weights(keys[start:start + CHUNK], settings.resamples)

    def columns(self, image_ids: Sequence[str]) -> np.ndarray:
        """The weight columns of `image_ids`, drawing the counts of images not seen yet (they
        depend on the id alone, so adding them changes no other image's draws)."""
        wanted = pd.Index(np.asarray([str(i) for i in image_ids], dtype=object))
        found = self.ids.get_indexer(wanted)
        if (found < 0).any():
            new = pd.Index(pd.unique(np.asarray(wanted[found < 0], dtype=object)))
            self.weights = np.concatenate(
                [self.weights, replicate_weights(image_keys(list(new), self.settings.seed), self.settings.resamples)],
                axis=1)
            self.ids = self.ids.append(new)
            found = self.ids.get_indexer(wanted)
        return found.astype(np.int64)

    def means(self, image_ids: Sequence[str], values: np.ndarray) -> np.ndarray:
        """Replicate means [R, C] of per-image `values` [n, C] of the images `image_ids` (each
        once; NaN: not scored, left out of its column); NaN where a replicate drew none."""
        values = np.asarray(values, dtype=np.float64).reshape(len(image_ids), -1)
        columns = self.columns(image_ids)
        scored = ~np.isnan(values)
        filled = np.where(scored, values, 0.0)
        sums = np.zeros((self.settings.resamples, values.shape[1]))
        counts = np.zeros_like(sums)
        for start in range(0, len(columns), CHUNK):
            part = slice(start, start + CHUNK)
            weights = self.weights[:, columns[part]].astype(np.float64)
            sums += weights @ filled[part]
            counts += weights @ scored[part]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / counts, np.nan)

    def intervals(self, image_ids: Sequence[str], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds [C] of the percentile interval of each column's mean."""
        replicates = self.means(image_ids, values)
        bounds = [percentile_interval(replicates[:, c], self.settings.level) for c in range(replicates.shape[1])]
        return np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])


def percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of `replicates` (NaN replicates left out; NaN when none is left)."""
    finite = replicates[~np.isnan(replicates)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    lo, hi = np.quantile(finite, [tail, 1 - tail])
    return float(lo), float(hi)


def percentile_intervals(replicates: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """`percentile_interval` of every column of `replicates` [R, ...] at once: the lower and
    upper bounds [...] (NaN replicates left out; NaN where a column has none left)."""
    replicates = np.asarray(replicates, dtype=np.float64)
    tail = (1 - level) / 2
    empty = np.isnan(replicates).all(axis=0)
    filled = np.where(empty, 0.0, replicates)  # nanquantile warns on an all-NaN column
    lo, hi = np.nanquantile(filled, [tail, 1 - tail], axis=0)
    return np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)


def bound_names(column: str) -> tuple[str, str]:
    """The names of the bound columns of table column `column`."""
    return f"{column}{CI_LO}", f"{column}{CI_HI}"


def is_bound_column(column: str) -> bool:
    """Whether `column` holds an interval bound of another column."""
    return str(column).endswith((CI_LO, CI_HI))


def mean_interval(values: Sequence[float], image_ids: Sequence[str], settings: BootstrapSettings
                  ) -> tuple[float, float]:
    """The bootstrap interval of the mean of per-image `values` (NaN: not scored), one value
    per image of `image_ids`; NaN bounds when intervals are off or nothing is scored."""
    if settings.level is None:
        return math.nan, math.nan
    lo, hi = Replicates(image_ids, settings).intervals(image_ids, np.asarray(values, dtype=np.float64)[:, None])
    return float(lo[0]), float(hi[0])
