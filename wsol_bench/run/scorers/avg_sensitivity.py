"""avg_sensitivity.csv (`measure=[avg_sensitivity]`): how far each map moves under small input
noise, the mean relative change over `nr_samples` noisy copies (Yeh et al., NeurIPS 2019;
Bhatt et al., IJCAI 2020; docs/protocol.md 5.7); lower is more robust. Costs `nr_samples`
explanations per image and method, shared with `max_sensitivity` when a run selects both with
the same radius, nr_samples and seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from wsol_bench.metrics.sensitivity import CopyChanges
from wsol_bench.run.scorers.base import register_scorer
from wsol_bench.run.scorers.max_sensitivity import SensitivityRows, SensitivitySettings


@dataclass(frozen=True)
class AvgSensitivitySettings(SensitivitySettings):
    """The settings of max_sensitivity (the same defaults), refused under this measure's name."""

    measure = "avg_sensitivity"


@register_scorer("avg_sensitivity")
class AvgSensitivity(SensitivityRows):
    """The mean relative change of each heatmap over its noisy copies."""

    file = "avg_sensitivity.csv"
    settings_class = AvgSensitivitySettings
    score_column = "avg_sensitivity"
    table_columns: ClassVar[dict[str, str]] = {"avg_sensitivity": "Avg-Sensitivity"}
    count_column = "n_images_avg_sensitivity"
    better: ClassVar[dict[str, str]] = {"avg_sensitivity": "lower"}
    caption = ("Avg-Sensitivity: the mean ||e(x + d) - e(x)|| / ||e(x)|| of the heatmap over noisy copies x + d "
               "(d uniform in an L-inf ball on the model input), mean over all images (n_images_avg_sensitivity); "
               "lower is more robust.")

    def values(self, changes: CopyChanges) -> torch.Tensor:
        return changes.avg_sensitivity()
