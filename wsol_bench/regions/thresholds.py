"""Threshold grids: the values a heatmap is cut at, checked once."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from wsol_bench.errors import SettingError

# wsolevaluation's grid: numpy.arange(0, 1, 0.01), exactly those float64 values.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(np.arange(0, 1, 0.01).tolist())
# The most thresholds one grid may hold: a step of 1e-4 over [0, 1], both ends included. The
# published sweeps use 0.01 (wsolevaluation) and the finest in use 0.001; every threshold costs
# one region pass per image and method and one row per image in the records, while the opencv
# box source cuts a uint8 heatmap (at most 256 distinct cuts) and a float heatmap of 224 x 224
# pixels has at most 50,176 distinct values to tell apart.
MAX_THRESHOLDS = 10_001


def check_threshold_count(count: int, setting: str) -> None:
    """Refuse a grid of more than `MAX_THRESHOLDS` thresholds, naming `setting`."""
    if count > MAX_THRESHOLDS:
        raise SettingError(f"{setting} holds {count:,} thresholds, more than the {MAX_THRESHOLDS:,} a grid may "
                           "hold (a step of 0.0001 over [0, 1]); use a coarser grid")


def threshold_array(thresholds: Sequence[float], dtype: np.dtype = np.float32) -> np.ndarray:
    """Thresholds as an array in the heatmaps' dtype (the comparison `binarize` makes), after
    checking that they are finite and strictly increasing in that dtype."""
    try:
        values = np.asarray(list(thresholds), dtype=np.float64)
    except (TypeError, ValueError):  # not a list, or an entry that is not a number
        values = np.empty((0, 0))
    check_threshold_count(len(values), "the threshold list")
    if values.ndim != 1 or len(values) == 0:
        raise SettingError("thresholds must be a non-empty list of numbers, e.g. [0.1, 0.5]")
    cast = values.astype(dtype)
    if not np.isfinite(values).all() or (len(cast) > 1 and not (np.diff(cast) > 0).all()):
        raise SettingError(f"thresholds must be finite and strictly increasing (in {np.dtype(dtype).name}); "
                           f"sort them and drop duplicates: got {values.tolist()[:8]}...")
    return cast


def check_thresholds(thresholds: Sequence[float], setting: str) -> list[float]:
    """Thresholds of a setting as floats: a non-empty list of finite numbers in [0, 1] (heatmaps
    are normalised to [0, 1]); anything else is a SettingError naming the setting."""
    try:
        values = [float(t) for t in thresholds] if thresholds is not None else []
    except (TypeError, ValueError):  # not a list, or an entry that is not a number
        raise SettingError(f"{setting}={thresholds!r}: thresholds are a list of numbers in [0, 1] (heatmaps "
                           "are normalised to [0, 1])") from None
    check_threshold_count(len(values), setting)
    if not values:
        raise SettingError(f"{setting} is empty; give at least one threshold, e.g. [0.5]")
    bad = [t for t in values if not (np.isfinite(t) and 0.0 <= t <= 1.0)]
    if bad:
        raise SettingError(f"{setting}={values} holds {bad}: thresholds are numbers in [0, 1] (heatmaps are "
                           "normalised to [0, 1])")
    repeated = sorted(t for t, n in Counter(values).items() if n > 1)
    if repeated:  # each threshold is a row of every image: a repeat would count the images twice
        raise SettingError(f"{setting}={values} repeats {repeated}; give each threshold once")
    return values


def threshold_grid(start: float, stop: float, step: float, setting: str = "sweep") -> list[float]:
    """numpy.arange(start, stop, step) as checked thresholds; its length, ceil((stop - start) /
    step) as numpy computes it, is checked first, so a tiny step is refused before any memory
    is taken. `setting` names the node of start, stop and step (e.g. "sweep")."""
    try:
        start, stop, step = float(start), float(stop), float(step)
    except (TypeError, ValueError):  # an entry that is not a number
        raise SettingError(f"{setting}.start/stop/step={start!r}/{stop!r}/{step!r} must be numbers") from None
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise SettingError(f"{setting}.start/stop/step={start}/{stop}/{step} must be finite numbers")
    if step <= 0:
        raise SettingError(f"{setting}.step must be > 0, got {step}")
    count = max(0, math.ceil((stop - start) / step))
    if count > MAX_THRESHOLDS:
        raise SettingError(f"{setting}.step={step} makes {count:,} thresholds from {start} to {stop}, more than "
                           f"the {MAX_THRESHOLDS:,} a grid may hold; use {setting}.step >= "
                           f"{(stop - start) / MAX_THRESHOLDS:.2g} (0.01 is wsolevaluation's grid)")
    grid = np.arange(start, stop, step).tolist()
    return check_thresholds(grid, f"{setting}.start/stop/step (numpy.arange({start}, {stop}, {step}))")
