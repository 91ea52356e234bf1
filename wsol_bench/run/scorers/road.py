"""road.csv (`faithfulness=road`): ROAD, RemOve And Debias (Rong et al., ICML 2022; docs/protocol.md
5.3), of every method's maps: the pixels above (MoRF) or below (LeRF) each percentile of the map
replaced by noisy linear imputation, as pytorch-grad-cam's ROAD computes it, one row per image and
method; the tables give the mean change of the explained class's probability, in percent."""

from __future__ import annotations

from typing import ClassVar

import pandas as pd
import torch
from omegaconf import DictConfig

import wsol_bench.metrics.grid_solver as solver_module
import wsol_bench.metrics.road as engine_module
import wsol_bench.metrics.road_imputation as imputation_module
import wsol_bench.metrics.road_settings as settings_module
from wsol_bench.metrics.road import RoadSettings, road_columns, road_rows, road_scores
from wsol_bench.run.scorers.base import register_scorer
from wsol_bench.run.scorers.perturbation import (
    PerturbationRows,
    settings_params,
)

FILE = "road.csv"
NAMES = {"road_morf": "ROAD MoRF", "road_lerf": "ROAD LeRF", "road_combined": "ROAD"}
COUNT = "n_images_road"
CAPTION = ("ROAD MoRF, ROAD LeRF: mean change of the explained class's score when the most (MoRF, lower is "
           "better) or least (LeRF, higher is better) relevant pixels are replaced by noisy linear imputation, "
           "over the percentiles; ROAD = (LeRF - MoRF) / 2; percent, mean over all images (n_images_road).")


@register_scorer("road")
class Road(PerturbationRows):
    """ROAD of the run's own maps, scoring the class each map explains."""

    modes = ("road",)
    file = FILE
    engine = (engine_module, settings_module, imputation_module, solver_module)
    table_columns, count_column, caption = NAMES, COUNT, CAPTION
    # the combined score is the difference of the two orders: ranked alone, as ABPC is
    better: ClassVar[dict[str, str]] = {"road_combined": "higher"}

    @classmethod
    def settings_from(cls, node: DictConfig) -> RoadSettings:
        return RoadSettings(**{k: v for k, v in settings_params(node).items() if k != "mode"})

    def row_columns(self) -> list[str]:
        return road_columns(self.settings)

    def score(self, model: torch.nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, classes: torch.Tensor,
              labels: torch.Tensor, logits: torch.Tensor) -> list[dict[str, float]]:
        """`wsol_bench.metrics.road` with every image's noise seeded by faithfulness.seed, as the
        library after torch.manual_seed(seed) on that image alone (batching changes nothing)."""
        return road_rows(road_scores(model, images, heatmaps, classes, self.settings, clean_logits=logits),
                         self.settings)

    @classmethod
    def row_notes(cls, rows: pd.DataFrame) -> list[str]:
        """A note for every method with inputs whose every pixel was removed."""
        removed = rows.groupby("method", sort=False)["road_all_removed"].sum()
        return [f"{m}: {int(n)} ROAD inputs had every pixel removed (ties at a percentile); their scores say "
                "nothing about the map." for m, n in removed.items() if n > 0]
