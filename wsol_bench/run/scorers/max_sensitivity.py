"""max_sensitivity.csv (`measure=[max_sensitivity]`): how far each map moves under small input
noise, the largest relative change over `nr_samples` noisy copies (Yeh et al., NeurIPS 2019;
docs/protocol.md 5.7); lower is more robust. Costs `nr_samples` explanations per image and
method. Also the shared part of `avg_sensitivity` (avg_sensitivity.py): a run selecting both
with the same radius, nr_samples and seed explains the copies once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import pandas as pd
import torch

import wsol_bench.metrics.sensitivity as engine_module
from wsol_bench.errors import SettingError
from wsol_bench.metrics.sensitivity import CopyChanges, copy_changes
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.run.batch import BatchTruth, MethodBatch
from wsol_bench.run.scorers.base import register_scorer
from wsol_bench.run.scorers.measure_rows import MeasureRows


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SensitivitySettings:
    """Noise radius (L-infinity, on the normalised model input), noisy copies per image, the
    noise seed, and copies per explainer call (speed only: not part of the cache key)."""

    radius: float = 0.2
    nr_samples: int = 50
    seed: int = 0
    batch_size: int = 64
    measure = "max_sensitivity"  # the name the refusals give (unannotated: a class constant, not a parameter)

    def __post_init__(self) -> None:
        where = f"measure.{self.measure}.params"
        radius = self.radius
        if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 0:
            raise SettingError(f"{where}.radius={radius!r} must be a finite number > 0 (the half-width of the "
                               "uniform noise on the normalised model input, e.g. 0.2)")
        object.__setattr__(self, "radius", float(radius))  # 1 and 1.0 are one setting (one cache key)
        if not _is_int(self.nr_samples) or self.nr_samples < 1:
            raise SettingError(f"{where}.nr_samples={self.nr_samples!r} must be an integer >= 1 (noisy copies "
                               "per image, e.g. 50)")
        if not _is_int(self.seed) or not -2**63 <= self.seed < 2**63:
            raise SettingError(f"{where}.seed={self.seed!r} must be an integer (64-bit), e.g. 0")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise SettingError(f"{where}.batch_size={self.batch_size!r} must be an integer >= 1 (noisy copies "
                               "per explainer call, e.g. 64)")


@dataclass
class _SharedChanges:
    """The copy changes of the current batch's method batches, by the settings that determine
    them, so the second sensitivity measure of a run reuses the first one's explanations."""

    truth: BatchTruth | None = None
    entries: list[tuple[MethodBatch, tuple[int, ...], tuple, CopyChanges]] = field(default_factory=list)

    def get(self, mb: MethodBatch, keep: tuple[int, ...], key: tuple) -> CopyChanges | None:
        """The changes computed for the images `keep` of `mb` with settings `key`, if any."""
        if self.truth is not mb.truth:  # a new batch: the old entries can never match again
            self.truth, self.entries = mb.truth, []
        # the entry holds `mb` itself, so an identical object is the same batch, never a reused id
        return next((found for batch, kept, settings, found in self.entries
                     if batch is mb and kept == keep and settings == key), None)

    def put(self, mb: MethodBatch, keep: tuple[int, ...], key: tuple, changes: CopyChanges) -> None:
        """Keep `changes` for the other sensitivity measure's turn on this batch."""
        self.entries.append((mb, keep, key, changes))


_SHARED = _SharedChanges()


class SensitivityRows(MeasureRows):
    """One sensitivity measure: explains noisy copies of every kept image with the run's
    explainer of the batch's method, for the class its clean map explains."""

    uses_model = True
    engine = (engine_module,)
    table_scale = 1.0
    score_column: ClassVar[str] = ""

    def row_columns(self) -> list[str]:
        return [self.score_column, "degenerate_copies"]

    def changes(self, mb: MethodBatch, keep: torch.Tensor, heat: torch.Tensor, classes: torch.Tensor
                ) -> CopyChanges:
        """The copy changes of the images `keep` of `mb` (shared with the other sensitivity
        measure of the run when its settings draw the same copies)."""
        settings = self.settings
        key = (settings.radius, settings.nr_samples, settings.seed)
        kept = tuple(keep.tolist())
        found = _SHARED.get(mb, kept, key)
        if found is None:
            explainer = self.explainer(mb.method)
            size = tuple(mb.images.shape[-2:])
            store = self.stores.get(mb.method)
            # the clean map was read from the map store: the copies' maps get its rounding (store.dtype)
            stored = store.round_maps if store is not None else torch.Tensor.float

            def explain(copies: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return to_heatmaps(stored(explainer(copies, targets).maps), size)  # the heatmaps the suite scores

            found = copy_changes(explain, mb.images[keep], heat, classes, [mb.samples[i].image_id for i in kept],
                                 radius=settings.radius, nr_samples=settings.nr_samples, seed=settings.seed,
                                 batch_size=settings.batch_size)
            _SHARED.put(mb, kept, key, found)
        return found

    def values(self, changes: CopyChanges) -> torch.Tensor:
        """[K] the measure's score of each image from its copies' changes."""
        raise NotImplementedError

    def close(self) -> None:
        """Drop the shared copy changes (they hold the last batch's images)."""
        super().close()
        _SHARED.truth, _SHARED.entries = None, []

    def measure(self, model, mb: MethodBatch, keep: torch.Tensor, heat: torch.Tensor, classes: torch.Tensor,
                logits: torch.Tensor) -> list[dict[str, float]]:
        changes = self.changes(mb, keep, heat, classes)
        return [{self.score_column: value, "degenerate_copies": count}
                for value, count in zip(self.values(changes).tolist(), changes.degenerate.tolist())]

    @classmethod
    def row_notes(cls, rows: pd.DataFrame) -> list[str]:
        """Methods some of whose noisy copies had degenerate maps: those copies count as an
        all-zero heatmap (a relative change of 1), said under the tables."""
        if "degenerate_copies" not in rows.columns:
            return []
        counts = rows.groupby("method", sort=False)["degenerate_copies"].sum()
        return [f"{method}: {int(n)} noisy copies had degenerate maps (constant or non-finite); {cls.name} "
                "counts each as an all-zero heatmap, a relative change of 1." for method, n in counts.items() if n > 0]


@register_scorer("max_sensitivity")
class MaxSensitivity(SensitivityRows):
    """The largest relative change of each heatmap over its noisy copies."""

    file = "max_sensitivity.csv"
    settings_class = SensitivitySettings
    score_column = "max_sensitivity"
    table_columns: ClassVar[dict[str, str]] = {"max_sensitivity": "Max-Sensitivity"}
    count_column = "n_images_max_sensitivity"
    better: ClassVar[dict[str, str]] = {"max_sensitivity": "lower"}
    caption = ("Max-Sensitivity: the largest ||e(x + d) - e(x)|| / ||e(x)|| of the heatmap over noisy copies "
               "x + d (d uniform in an L-inf ball on the model input), mean over all images "
               "(n_images_max_sensitivity); lower is more robust.")

    def values(self, changes: CopyChanges) -> torch.Tensor:
        return changes.max_sensitivity()
