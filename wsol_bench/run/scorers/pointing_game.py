"""pointing_game.csv (`measure=[pointing_game]`): the pointing game of Zhang et al. (IJCV 2018;
docs/protocol.md 5.9): a hit when the heatmap's maximum lies within `tolerance` pixels of the
ground-truth boxes of the map's image (`pointing_box`) and of its segmentation mask where the
dataset has masks (`pointing_mask`); the table gives the hit rate in percent. No model pass.

`RegionRows` is the part it shares with the energy-based pointing game: one score per
ground-truth region (boxes, mask), the regions' sizes on every row (an empty region is why a
score is missing), and tables that average each score over the images that have one."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch

import wsol_bench.metrics.pointing as engine_module
from wsol_bench.errors import SettingError, counted
from wsol_bench.metrics.bootstrap import Replicates, bound_names
from wsol_bench.metrics.pointing import pointing_hits, region_pixels
from wsol_bench.report.run_folder import RunFolder
from wsol_bench.report.tables import require_columns
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.scorers.base import MeasureTables, register_scorer
from wsol_bench.run.scorers.measure_rows import MeasureRows
from wsol_bench.run.scorers.perturbation import method_means, per_image_values, ranked_columns, unscored_notes

REGIONS = {"box": "gt_box_pixels", "mask": "gt_mask_pixels"}  # region -> its size column on every row


class RegionRows(MeasureRows):
    """A measure of each heatmap against the ground-truth boxes and, where the dataset has
    them, the masks: `score_prefix`_box and `score_prefix`_mask (NaN without masks), with the
    regions' pixel counts."""

    score_prefix: ClassVar[str] = ""  # the score columns are <prefix>_box and <prefix>_mask (`table_columns` keys)

    def row_columns(self) -> list[str]:
        return [f"{self.score_prefix}_{region}" for region in REGIONS] + list(REGIONS.values())

    def region_scores(self, heat: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """The score [K] of each heatmap against its bool region (NaN for an empty region)."""
        raise NotImplementedError

    def measure(self, model, mb: MethodBatch, keep: torch.Tensor, heat: torch.Tensor, classes: torch.Tensor,
                logits: torch.Tensor) -> list[dict[str, float]]:
        boxes = mb.gt.box_masks[keep]
        columns = {f"{self.score_prefix}_box": self.region_scores(heat, boxes).tolist(),
                   "gt_box_pixels": region_pixels(boxes).tolist()}
        if mb.gt.seg_masks is None:  # no masks: the row says so with NaN (not with 0, an empty mask)
            columns[f"{self.score_prefix}_mask"] = columns["gt_mask_pixels"] = [math.nan] * len(keep)
        else:
            masks = mb.gt.seg_masks[keep]  # the label class's pixels: ignore pixels are not in it
            columns[f"{self.score_prefix}_mask"] = self.region_scores(heat, masks).tolist()
            columns["gt_mask_pixels"] = region_pixels(masks).tolist()
        order = self.row_columns()  # the order of a degenerate map's row: every batch appends the same columns
        return [dict(zip(order, values)) for values in zip(*(columns[c] for c in order))]

    @classmethod
    def tables(cls, run: RunFolder) -> MeasureTables | None:
        """Per method, each region's mean score (times `table_scale`) over the images whose
        region has pixels and whose map is not degenerate, and the number of images of the box
        score; the mask column only where the dataset has masks. Notes name the images without
        a score and why."""
        rows = run.per_image_rows(cls.file)
        if rows is None:
            return None
        source = str(run.path / cls.file)
        require_columns(rows, ["image_id", "method", "degenerate", *REGIONS.values()], source)
        summary = pd.DataFrame(index=pd.Index(list(dict.fromkeys(rows["method"])), name="method"))
        notes = unscored_notes(rows, run.records, cls.file, cls.name)
        per_image = {}
        for region, size_column in REGIONS.items():
            if region == "mask" and rows[size_column].isna().all():
                continue  # a dataset without masks: no mask column
            name = cls.table_columns[f"{cls.score_prefix}_{region}"]
            means = cls.region_means(rows, region, size_column, source, run.replicates)
            for column in (name, *bound_names(name)):
                if column in means.columns:
                    summary[column] = means[column]
            counted = rows[rows[size_column] > 0]  # an image without the region is not scored on it
            per_image |= per_image_values(counted, {f"{cls.score_prefix}_{region}": name}, cls.table_scale)
            if region == "box":
                summary[cls.count_column] = means[cls.count_column].reindex(summary.index).fillna(0).astype(int)
            notes += cls.empty_region_notes(rows, region, size_column)
        summary = summary[[c for c in summary.columns if c != cls.count_column] + [cls.count_column]]
        return MeasureTables(summary=summary, caption=cls.run_caption(run), notes=notes, per_image=per_image,
                             better=ranked_columns(cls.better, {c: n for c, n in cls.table_columns.items()
                                                                if n in per_image}))

    @classmethod
    def region_means(cls, rows: pd.DataFrame, region: str, size_column: str, source: str,
                     replicates: Replicates | None = None) -> pd.DataFrame:
        """`method_means` of one region's score over the rows whose region has pixels (and the
        degenerate rows, which it counts apart); empty when no row has such a region."""
        counted = rows[(rows[size_column] > 0) | (rows["degenerate"] == 1)]
        column = f"{cls.score_prefix}_{region}"
        if counted.empty:
            return pd.DataFrame(columns=[cls.table_columns[column], cls.count_column], dtype=float)
        return method_means(counted, {column: cls.table_columns[column]}, cls.count_column, source,
                            scale=cls.table_scale, replicates=replicates)

    @classmethod
    def run_caption(cls, run: RunFolder) -> str:
        """The caption sentence of the run's tables (its settings may enter it)."""
        return cls.caption

    @classmethod
    def empty_region_notes(cls, rows: pd.DataFrame, region: str, size_column: str) -> list[str]:
        """One note per method with images whose `region` is empty at the evaluation size."""
        empty = rows[(rows["degenerate"] != 1) & (rows[size_column] == 0)].groupby("method", sort=False).size()
        name = cls.table_columns[f"{cls.score_prefix}_{region}"]
        return [f"{method}: {name} leaves out {counted(int(n), 'image')} whose ground-truth {region} "
                f"has no pixel at the evaluation size ({size_column} = 0 in {cls.file})."
                for method, n in empty.items()]


@dataclass(frozen=True)
class PointingGameSettings:
    """tolerance: pixels of the evaluation size (the model input) around the map's maximum."""

    tolerance: float = 15

    def __post_init__(self) -> None:
        value = self.tolerance
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise SettingError(f"measure.pointing_game.params.tolerance must be a number of pixels >= 0 at the "
                               f"evaluation size, got {value!r}; e.g. measure.pointing_game.params.tolerance=15")


@register_scorer("pointing_game")
class PointingGame(RegionRows):
    """A hit when the heatmap's first maximum lies within the tolerance of the region."""

    file = "pointing_game.csv"
    settings_class = PointingGameSettings
    engine = (engine_module, sys.modules[__name__])  # the rows come from the engine and `RegionRows`
    score_prefix = "pointing"
    table_columns: ClassVar[dict[str, str]] = {"pointing_box": "Pointing (box)", "pointing_mask": "Pointing (mask)"}
    count_column = "n_images_pointing_game"
    better: ClassVar[dict[str, str]] = {"pointing_box": "higher", "pointing_mask": "higher"}
    caption = ("Pointing (box), Pointing (mask): pointing game (Zhang et al.), percent of images whose heatmap "
               "maximum (the first in raster order) lies within the tolerance of the ground-truth boxes or "
               "mask, over all images with a non-empty region (n_images_pointing_game).")
    table_scale = 100.0

    def region_scores(self, heat: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        return pointing_hits(heat, regions, self.settings.tolerance)

    @classmethod
    def run_caption(cls, run: RunFolder) -> str:
        """The caption with the run's tolerance (from its config.yaml)."""
        entries = (run.setting("measure") or {}).values()
        params = next((e.get("params") or {} for e in entries if isinstance(e, dict) and e.get("name") == cls.name),
                      {})
        tolerance = params.get("tolerance", PointingGameSettings.tolerance)
        return cls.caption.replace("within the tolerance", f"within {tolerance} pixels")
