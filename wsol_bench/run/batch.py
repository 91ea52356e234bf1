"""What a scorer sees of one method on one batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wsol_bench.datasets.base import Sample
from wsol_bench.metrics.localization import GroundTruth
from wsol_bench.run.store import Shard


@dataclass
class MethodBatch:
    """Everything a scorer may need about one method on one batch (all on CPU)."""

    method: str
    samples: list[Sample]
    images: torch.Tensor  # normalised model input [B, 3, H, W]
    maps: torch.Tensor  # raw [B, gh, gw]
    heatmaps: torch.Tensor  # [B, H, W] in [0, 1]
    degenerate: torch.Tensor  # bool [B]
    logits: torch.Tensor  # [B, C] of the clean images
    targets: torch.Tensor  # [B], the class each map explains
    gt: GroundTruth
    shard: Shard  # the stored shard the rows come from (target source, class specificity)
    positions: list[int]  # dataset positions of the samples

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([int(s.label) for s in self.samples], dtype=torch.long)
