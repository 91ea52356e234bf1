"""The region engine: heatmaps -> the regions of `heatmap > t` for every threshold of a grid,
from one of two sources (docs/protocol.md 3 and 4.2). Fixed thresholds are a grid of T values,
so records, sweeps and wsolevaluation metrics all come from here."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wsol_bench.choices import SWEEP_BOXES
from wsol_bench.errors import SettingError
from wsol_bench.regions.components import ThresholdComponents, threshold_components
from wsol_bench.regions.contours import opencv_components
from wsol_bench.regions.thresholds import DEFAULT_THRESHOLDS

# opencv: wsolevaluation's own contours of the uint8 heatmap, holes included. components:
# 8-connected pixel sets of the float heatmap > t (AG-CAM; wsolevaluation's float variant).
SOURCES = SWEEP_BOXES  # sweep.boxes


def check_source(source: str) -> str:
    """`source` if it is a known region source, else a SettingError naming the valid ones."""
    if source not in SOURCES:
        raise SettingError(f"unknown sweep.boxes {source!r}; valid: {', '.join(SOURCES)} (opencv: "
                           "wsolevaluation's exact contours; components: the float 8-connected variant)")
    return source


def find_regions(heatmaps: torch.Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 source: str = "components") -> ThresholdComponents:
    """The regions (boxes and areas) of every [B, H, W] heatmap at every threshold."""
    if check_source(source) == "opencv":
        return opencv_components(heatmaps, thresholds)
    return threshold_components(heatmaps, thresholds)
