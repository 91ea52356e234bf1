"""energy_pointing_game.csv (`measure=[energy_pointing_game]`): the energy-based pointing game of
Wang et al. (Score-CAM, CVPR-W 2020; docs/protocol.md 5.9): the share of the heatmap's sum that
lies inside the ground-truth boxes of its image (`energy_box`) and inside its segmentation mask
where the dataset has masks (`energy_mask`); the table gives the share in percent. The whole
map's sum is the denominator: a mask's ignore pixels are outside it, not left out. No model
pass."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

import wsol_bench.metrics.pointing as engine_module
import wsol_bench.run.scorers.pointing_game as region_rows_module
from wsol_bench.metrics.pointing import energy_shares
from wsol_bench.run.scorers.base import register_scorer
from wsol_bench.run.scorers.pointing_game import RegionRows


@dataclass(frozen=True)
class EnergyPointingGameSettings:
    """The energy-based pointing game has no settings: it reads the heatmap at the evaluation size."""


@register_scorer("energy_pointing_game")
class EnergyPointingGame(RegionRows):
    """The share of each heatmap's energy inside the region."""

    file = "energy_pointing_game.csv"
    settings_class = EnergyPointingGameSettings
    # the rows come from the engine, `RegionRows` and this file
    engine = (engine_module, region_rows_module, sys.modules[__name__])
    score_prefix = "energy"
    table_columns: ClassVar[dict[str, str]] = {"energy_box": "Energy PG (box)", "energy_mask": "Energy PG (mask)"}
    count_column = "n_images_energy_pointing_game"
    better: ClassVar[dict[str, str]] = {"energy_box": "higher", "energy_mask": "higher"}
    caption = ("Energy PG (box), Energy PG (mask): energy-based pointing game (Wang et al.), percent of the "
               "heatmap's sum inside the ground-truth boxes or mask, mean over all images with a non-empty "
               "region (n_images_energy_pointing_game).")
    table_scale = 100.0

    def region_scores(self, heat: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        return energy_shares(heat, regions)
