"""Threshold grids: the values a heatmap is cut at, checked once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsol_bench.errors import SettingError

# wsolevaluation's grid: numpy.arange(0, 1, 0.01), exactly those float64 values.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(np.arange(0, 1, 0.01).tolist())


def threshold_array(thresholds: Sequence[float], dtype: np.dtype = np.float32) -> np.ndarray:
    """Thresholds as an array in the heatmaps' dtype (the comparison `binarize` makes), after
    checking that they are finite and strictly increasing in that dtype."""
    try:
        values = np.asarray(list(thresholds), dtype=np.float64)
    except (TypeError, ValueError):  # not a list, or an entry that is not a number
        values = np.empty((0, 0))
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
    if not values:
        raise SettingError(f"{setting} is empty; give at least one threshold, e.g. [0.5]")
    bad = [t for t in values if not (np.isfinite(t) and 0.0 <= t <= 1.0)]
    if bad:
        raise SettingError(f"{setting}={values} holds {bad}: thresholds are numbers in [0, 1] (heatmaps are "
                           "normalised to [0, 1])")
    repeated = sorted({t for t in values if values.count(t) > 1})
    if repeated:  # each threshold is a row of every image: a repeat would count the images twice
        raise SettingError(f"{setting}={values} repeats {repeated}; give each threshold once")
    return values
