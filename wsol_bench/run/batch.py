"""What a scorer sees of one method on one batch, and the picklable job that carries one batch
of every method to a scoring worker process."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from wsol_bench.datasets.base import Sample
from wsol_bench.metrics.localization import GroundTruth, ground_truth
from wsol_bench.regions.heatmaps import to_heatmaps


@dataclass
class BatchTruth:
    """The ground truth of one batch at the evaluation size, built on first use and shared by
    the batch's methods (so it is rasterised once per batch, wherever the batch is scored)."""

    samples: list[Sample]
    size: tuple[int, int]  # (H, W) of the model input
    box_protocol: str

    @cached_property
    def gt(self) -> GroundTruth:
        return ground_truth(self.samples, self.size, self.box_protocol)


@dataclass
class MethodBatch:
    """Everything a scorer may need about one method on one batch (all on CPU). Heatmaps and
    ground truth are computed on first use only."""

    method: str
    truth: BatchTruth
    maps: torch.Tensor  # raw [B, gh, gw]
    logits: torch.Tensor  # [B, C] of the clean images
    targets: torch.Tensor  # [B], the class each map explains
    positions: list[int]  # dataset positions of the samples
    shard_index: int
    target_source: str  # "given" (targets handed in) or "predicted"
    class_specific: bool
    images: torch.Tensor | None = None  # normalised model input [B, 3, H, W]; main process only
    label_maps: torch.Tensor | None = None  # the ground-truth class's maps, when a scorer needs them
    label_logits: torch.Tensor | None = None

    @property
    def samples(self) -> list[Sample]:
        return self.truth.samples

    @property
    def gt(self) -> GroundTruth:
        return self.truth.gt

    @cached_property
    def _heat(self) -> tuple[torch.Tensor, torch.Tensor]:
        return to_heatmaps(self.maps, self.truth.size)

    @property
    def heatmaps(self) -> torch.Tensor:
        """[B, H, W] in [0, 1] (docs/protocol.md 3)."""
        return self._heat[0]

    @property
    def degenerate(self) -> torch.Tensor:
        """bool [B]: constant or non-finite maps."""
        return self._heat[1]

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([int(s.label) for s in self.samples], dtype=torch.long)


@dataclass
class BatchJob:
    """One batch of every method, as a scoring worker needs it: no images (the model-free
    scorers never read pixels), the methods in the run's order."""

    truth: BatchTruth
    methods: list[MethodBatch] = field(default_factory=list)

    @classmethod
    def without_pixels(cls, batches: list[MethodBatch]) -> BatchJob:
        """The job of a batch's method batches, their images and label maps left behind."""
        samples = [replace(s, image=torch.empty(0)) for s in batches[0].samples]
        truth = replace(batches[0].truth, samples=samples)
        return cls(truth, [replace(mb, truth=truth, images=None, label_maps=None, label_logits=None)
                           for mb in batches])
