"""complexity.csv (`measure=[complexity]`): the entropy of every map's fractional contributions
(Bhatt et al., IJCAI 2020; docs/protocol.md 5.6), in nats, lower is simpler; no model pass, no
explanation."""

from __future__ import annotations

from typing import ClassVar

import wsol_bench.metrics.complexity as engine_module
from wsol_bench.metrics.complexity import contribution_entropy
from wsol_bench.run.scorers.base import register_scorer
from wsol_bench.run.scorers.measure_rows import HeatmapStatistic


@register_scorer("complexity")
class Complexity(HeatmapStatistic):
    """The entropy of each heatmap's pixels as fractions of its total."""

    file = "complexity.csv"
    column = "complexity"
    statistic = staticmethod(contribution_entropy)
    engine = (engine_module,)
    table_columns: ClassVar[dict[str, str]] = {"complexity": "Complexity"}
    count_column = "n_images_complexity"
    better: ClassVar[dict[str, str]] = {"complexity": "lower"}
    caption = ("Complexity: entropy (nats) of the heatmap's pixels as fractions of its sum (0: one pixel, ln N: "
               "uniform over N pixels), mean over all images (n_images_complexity).")
    table_scale = 1.0
