"""saco.csv (`faithfulness=saco`): SaCo, the Salience-guided Faithfulness Coefficient (Wu et al.,
CVPR 2024; docs/protocol.md 5.4), of every method's maps: K equal subsets of pixels by descending
salience, each replaced by the baseline, and the coefficient of how well the subsets' salience
orders their output drops, in [-1, 1]; one row per image and method with every drop and
salience."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

import wsol_bench.metrics.saco as engine_module
from wsol_bench.errors import SettingError
from wsol_bench.metrics.saco import SacoSettings, saco_row_columns, saco_rows, score_saco_batch
from wsol_bench.report.run_folder import RunFolder
from wsol_bench.run.scorers.base import MeasureTables, RunContext, register_scorer
from wsol_bench.run.scorers.perturbation import (
    PerturbationRows,
    method_means,
    per_image_values,
    settings_params,
    unscored_notes,
)

FILE = "saco.csv"
COUNT = "n_images_saco"
CAPTION = ("SaCo: salience-guided faithfulness coefficient, in [-1, 1] (1: the subsets' salience orders their "
           "output drops exactly; 0: chance), mean over all images with an ordering (n_images_saco).")


@register_scorer("saco")
class Saco(PerturbationRows):
    """SaCo of the run's own maps, scoring the class each map explains (the predicted class,
    as the paper, with target=predicted)."""

    modes = ("saco",)
    file = FILE
    engine = (engine_module,)

    @classmethod
    def settings_from(cls, node: DictConfig) -> SacoSettings:
        return SacoSettings(**{k: v for k, v in settings_params(node).items() if k != "mode"})

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> Saco | None:
        if cls.asked(cfg) and cfg.faithfulness.class_source == "predicted" and cfg.target != "predicted":
            raise SettingError(f"faithfulness.class_source=predicted scores the predicted class, and this run's maps "
                               f"explain target={cfg.target}; use target=predicted, or faithfulness.class_source=target")
        return super().from_config(cfg, context)

    def row_columns(self) -> list[str]:
        return saco_row_columns(self.settings)

    def score(self, model: torch.nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, classes: torch.Tensor,
              labels: torch.Tensor, logits: torch.Tensor) -> list[dict[str, float]]:
        """`wsol_bench.metrics.saco` on the class the maps explain."""
        return saco_rows(score_saco_batch(model, images, heatmaps, classes, self.settings, clean_logits=logits))

    @classmethod
    def tables(cls, run: RunFolder) -> MeasureTables | None:
        """Mean SaCo per method over the images whose map orders its subsets (a map whose
        subsets all have one salience has no SaCo and counts as degenerate)."""
        rows = run.per_image_rows(FILE)
        if rows is None:
            return None
        rows = rows.assign(degenerate=rows["degenerate"].where(rows["saco_degenerate"] != 1, 1))
        summary = method_means(rows, {"saco": "SaCo"}, COUNT, str(run.path / FILE), scale=1.0, replicates=run.replicates)
        return MeasureTables(summary=summary, caption=CAPTION, notes=unscored_notes(rows, run.records, FILE, "SaCo"),
                             per_image=per_image_values(rows, {"saco": "SaCo"}, 1.0), better={"SaCo": "higher"})
