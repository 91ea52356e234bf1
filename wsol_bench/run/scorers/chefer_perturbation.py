"""chefer_perturbation.csv (`faithfulness=chefer_perturbation`): Chefer et al.'s positive and
negative perturbation test (CVPR 2021; docs/protocol.md 5.2) of every method's maps, one row per
image and method with the clean top-1 correctness, the area under each accuracy curve and every
step; the tables give the mean areas in percent (positive: lower is better, negative: higher)."""

from __future__ import annotations

from typing import ClassVar

import torch
from omegaconf import DictConfig

import wsol_bench.metrics.chefer_perturbation as engine_module
from wsol_bench.errors import SettingError
from wsol_bench.metrics.chefer_perturbation import (
    CheferSettings,
    chefer_rows,
    row_columns,
    score_chefer_batch,
)
from wsol_bench.run.scorers.base import RunContext, register_scorer
from wsol_bench.run.scorers.perturbation import (
    PerturbationRows,
    settings_params,
)

FILE = "chefer_perturbation.csv"
NAMES = {"auc_positive": "Pos. Perturbation", "auc_negative": "Neg. Perturbation"}
COUNT = "n_images_perturbation"
CAPTION = ("Pos./Neg. Perturbation: Chefer et al.'s perturbation test, area under the top-1 accuracy curve as "
           "the most (positive, lower is better) or least (negative, higher is better) relevant pixels are "
           "blacked out, percent, mean over all images (n_images_perturbation).")


@register_scorer("chefer_perturbation")
class CheferPerturbation(PerturbationRows):
    """Positive and negative perturbation of the maps of the class they explain: the run's own
    maps (vis_class=predicted, with target=predicted) or the ground-truth class's
    (vis_class=target, the script's --vis-class target)."""

    modes = ("chefer_perturbation",)
    file = FILE
    engine = (engine_module,)
    table_columns, count_column, caption = NAMES, COUNT, CAPTION
    better: ClassVar[dict[str, str]] = {"auc_positive": "lower", "auc_negative": "higher"}

    @classmethod
    def settings_from(cls, node: DictConfig) -> CheferSettings:
        return CheferSettings(**{k: v for k, v in settings_params(node).items() if k != "mode"})

    @classmethod
    def wants_label_maps(cls, cfg: DictConfig) -> bool:
        return cls.asked(cfg) and cfg.faithfulness.vis_class == "target"

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> CheferPerturbation | None:
        if cls.asked(cfg) and cfg.faithfulness.vis_class == "predicted" and cfg.target != "predicted":
            raise SettingError(f"faithfulness.vis_class=predicted scores the maps of the predicted class, and this "
                               f"run's maps explain target={cfg.target}; use target=predicted, or "
                               "faithfulness.vis_class=target")
        return super().from_config(cfg, context)

    def row_columns(self) -> list[str]:
        return row_columns(self.settings)

    def score(self, model: torch.nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, classes: torch.Tensor,
              labels: torch.Tensor, logits: torch.Tensor) -> list[dict[str, float]]:
        """The areas and every step (`wsol_bench.metrics.chefer_perturbation`); top-1 is scored
        against the label, as the script scores it."""
        return chefer_rows(score_chefer_batch(model, images, heatmaps, labels, self.settings, clean_logits=logits),
                           self.settings)
