"""random_logit.csv (`measure=[random_logit]`): the random-logit test of Sixt et al. (ICML 2020;
Quantus' RandomLogit; docs/protocol.md 5.8): the similarity of each map (of the class the run
explains) to the same method's map of a random other class, drawn per image from (seed, image
id), so a batch draws what one image at a time draws. SSIM by default, as Quantus; Spearman or
top-k intersection on request. A class-specific method scores below 1; a method whose map
ignores the class (rollout, `random`, `center`) gives the same map again: 1. Cost per image and
method: one explanation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from omegaconf import DictConfig

import wsol_bench.metrics.randomisation as engine_module
from wsol_bench.errors import SettingError
from wsol_bench.metrics.randomisation import SIMILARITIES, MapComparison, random_other_classes
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.report.run_folder import RunFolder
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.scorers.base import MeasureTables, RunContext, register_scorer
from wsol_bench.run.scorers.measure_rows import MeasureRows
from wsol_bench.run.scorers.model_randomisation import (
    check_seed,
    check_top_k,
    comparison_tables,
    input_pixels,
)

WHERE = "measure.random_logit.params"


@dataclass(frozen=True)
class RandomLogitSettings:
    """The seed of the other classes, the similarity, and k when it is the top-k intersection."""

    seed: int = 42
    similarity: str = "ssim"
    top_k: int = 1000

    def __post_init__(self) -> None:
        check_seed(self.seed, WHERE)
        if self.similarity not in SIMILARITIES:
            raise SettingError(f"{WHERE}.similarity={self.similarity!r} is not a similarity; valid: "
                               f"{', '.join(SIMILARITIES)}")
        check_top_k(self.top_k, WHERE)


@register_scorer("random_logit")
class RandomLogit(MeasureRows):
    """The similarity of each map to the method's map of a random other class."""

    file = "random_logit.csv"
    settings_class = RandomLogitSettings
    uses_model = True
    engine = (engine_module,)
    table_columns: ClassVar[dict[str, str]] = {f"random_logit_{name}": f"Random logit {label}"
                     for name, label in (("ssim", "SSIM"), ("spearman", "Spearman"), ("topk", "top-k"))}
    count_column = "n_images_random_logit"
    # a map alike for a random other class fails; SSIM, Sixt et al.'s measure, is ranked
    better: ClassVar[dict[str, str]] = {"random_logit_ssim": "lower"}
    caption = ("Random logit: similarity of the map to the method's map of a random other class (1 = the same map), "
               "lower is better, mean over all images (n_images_random_logit).")
    table_scale = 1.0

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> RandomLogit | None:
        scorer = super().from_config(cfg, context)
        if scorer is not None and scorer.settings.similarity == "topk":  # k is checked before any model pass
            check_top_k(scorer.settings.top_k, WHERE, input_pixels(cfg))
        return scorer

    def row_columns(self) -> list[str]:
        return [f"random_logit_{self.settings.similarity}", "other_class", "degenerate_other"]

    def measure(self, model, mb: MethodBatch, keep: torch.Tensor, heat: torch.Tensor, classes: torch.Tensor,
                logits: torch.Tensor) -> list[dict[str, float]]:
        num_classes = logits.shape[1]
        if num_classes < 2:
            raise SettingError(f"measure random_logit needs a model of at least 2 classes, but {mb.method}'s logits "
                               f"have {num_classes}; leave random_logit out of `measure`")
        ids = [mb.samples[i].image_id for i in keep.tolist()]
        others = random_other_classes(classes, num_classes, self.settings.seed, ids)
        explained = self.explainer(mb.method)(mb.images[keep], others, logits=logits)
        maps = explained.maps.detach().float()  # compared where the explainer ran
        other_heat, degenerate = to_heatmaps(maps, tuple(heat.shape[-2:]))
        value = MapComparison(heat.to(maps.device), self.settings.top_k).similarity(self.settings.similarity, other_heat)
        # a degenerate map of the other class is scored as an empty map (MapComparison) and counted
        return [dict(zip(self.row_columns(), row)) for row in zip(value.cpu().tolist(), others.tolist(),
                                                                   degenerate.long().cpu().tolist())]

    @classmethod
    def tables(cls, run: RunFolder) -> MeasureTables | None:
        """The mean similarity per method over the images with a score."""
        rows = run.per_image_rows(cls.file)
        if rows is None:
            return None
        return comparison_tables(cls, run, rows, "degenerate_other", "its map of the other class")
