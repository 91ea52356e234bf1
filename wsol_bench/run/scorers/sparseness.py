"""sparseness.csv (`measure=[sparseness]`): the Gini index of every map (Chalasani et al., ICML
2020; docs/protocol.md 5.6), in [0, 1), higher is sparser; no model pass, no explanation."""

from __future__ import annotations

from typing import ClassVar

import wsol_bench.metrics.complexity as engine_module
from wsol_bench.metrics.complexity import gini_index
from wsol_bench.run.scorers.base import register_scorer
from wsol_bench.run.scorers.measure_rows import HeatmapStatistic


@register_scorer("sparseness")
class Sparseness(HeatmapStatistic):
    """The Gini index of each heatmap's pixels."""

    file = "sparseness.csv"
    column = "sparseness"
    statistic = staticmethod(gini_index)
    engine = (engine_module,)
    table_columns: ClassVar[dict[str, str]] = {"sparseness": "Sparseness"}
    count_column = "n_images_sparseness"
    better: ClassVar[dict[str, str]] = {"sparseness": "higher"}
    caption = ("Sparseness: Gini index of the heatmap's pixels (0: uniform, near 1: one pixel), mean over all "
               "images (n_images_sparseness).")
    table_scale = 1.0
