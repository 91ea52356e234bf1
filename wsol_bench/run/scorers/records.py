"""records.csv: one row per (image, method, threshold) with the image's ids, label,
prediction, flags and AG-CAM pixel scores at the fixed thresholds of `metric.thresholds`
(docs/protocol.md 4.1). The localization tables (`table.csv` and the pixel-score columns of
the paper-layout tables) are aggregations of these rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from wsol_bench.errors import SettingError, agreeing, counted
from wsol_bench.files import CsvRows, csv_text
from wsol_bench.metrics.localization import localization_scores, metric_columns
from wsol_bench.report.run_folder import FILTER_WORDS, VARIANTS, RunFolder
from wsol_bench.report.tables import (
    ALL_DEGENERATE,
    degenerate_methods,
    localization_table,
    localization_values,
)
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.distributed import Ranks
from wsol_bench.run.scorers.base import MeasureTables, RunContext, Scorer, append_rank_rows, register_scorer

ID_COLUMNS = ["image_id", "dataset", "split", "method", "threshold", "label", "prediction", "target",
              "target_source", "class_specific", "correct", "degenerate", "n_gt_boxes", "n_pred_boxes"]


@dataclass(frozen=True)
class RecordRows:
    """The kernel of `LocalizationRecords`: one batch of one method -> its records.csv lines."""

    thresholds: tuple[float, ...]
    box_protocol: str
    columns: tuple[str, ...]
    dataset_name: str
    split: str

    def __call__(self, mb: MethodBatch) -> str:
        # the region engine takes a strictly increasing grid; rows keep the order asked for
        grid = sorted(set(self.thresholds))
        scores, _ = localization_scores(mb.heatmaps, mb.gt, grid, self.box_protocol)
        predictions, targets = mb.predictions.tolist(), mb.targets.tolist()
        degenerate = mb.degenerate.tolist()
        rows = []
        for threshold in self.thresholds:
            level = grid.index(threshold)
            for i, sample in enumerate(mb.samples):
                rows.append({
                    "image_id": sample.image_id, "dataset": self.dataset_name, "split": self.split,
                    "method": mb.method, "threshold": threshold, "label": sample.label,
                    "prediction": predictions[i], "target": targets[i],
                    "target_source": mb.target_source, "class_specific": int(mb.class_specific),
                    "correct": int(predictions[i] == sample.label), "degenerate": int(degenerate[i]),
                    "n_gt_boxes": mb.gt.num_boxes[i], "n_pred_boxes": int(scores["n_pred_boxes"][level, i]),
                    **{column: float(np.float64(scores[column][level, i])) for column in self.columns},
                })
        return csv_text(rows, ID_COLUMNS + list(self.columns))


@register_scorer("records")
class LocalizationRecords(Scorer):
    """Per-image AG-CAM pixel scores at fixed thresholds, appended to records.csv per batch."""

    def __init__(self, path: Path, thresholds: list[float], *, dataset_name: str, split: str,
                 box_protocol: str, has_masks: bool) -> None:
        if not thresholds:
            raise SettingError("metric.thresholds is empty; give at least one threshold, e.g. [0.5]")
        self.thresholds = [float(t) for t in thresholds]
        self.columns = metric_columns(has_masks)
        self.kernel = RecordRows(tuple(self.thresholds), box_protocol, tuple(self.columns), dataset_name, split)
        self.rows = CsvRows(path, ID_COLUMNS + self.columns)

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> LocalizationRecords:
        return cls(context.out_dir / "records.csv", list(cfg.metric.thresholds), dataset_name=context.dataset_name,
                   split=context.split, box_protocol=cfg.metric.box_protocol, has_masks=context.has_masks)

    def add(self, method: str, part: str) -> None:
        self.rows.write_text(part)

    def gather(self, ranks: Ranks, parts: list[Path]) -> None:
        self.close()
        append_rank_rows(ranks, parts, self.rows.path.name)

    def close(self) -> None:
        self.rows.close()

    def compute(self) -> Path:
        return self.rows.path

    def write(self, out_dir: Path) -> list[Path]:
        self.close()
        return [self.rows.path]

    @classmethod
    def tables(cls, run: RunFolder) -> MeasureTables:
        """The localization table (mean AG-CAM scores per method and threshold over the images
        metric.image_filter keeps; `table.csv`'s rows), the caption of its paper-layout columns
        and one note per method with degenerate maps. `attrs["all_degenerate"]` lists the
        methods whose every map is degenerate (no scores in the paper tables)."""
        image_filter = run.setting("metric.image_filter")
        localization = localization_table(run.records, image_filter, str(run.path / "records.csv"),
                                          replicates=run.replicates)
        blank = degenerate_methods(run.records)
        notes = degenerate_notes(run.records, blank)
        localization.attrs.update(all_degenerate=blank, degenerate_notes=notes)
        words = FILTER_WORDS.get(image_filter, image_filter)
        caption = {variant: (f"Pixel Acc to Recall: predicted box-union vs {truth}, percent, mean over {words} "
                             f"(metric.image_filter={image_filter}; n_images).") for variant, truth in VARIANTS.items()}
        per_image = localization_values(run.records, image_filter)
        # IoU alone is ranked: Dice is a function of it per image, and pixel accuracy, precision
        # and recall trade off against each other
        better = {name: "higher" for name in per_image if name.startswith("IoU ")}
        return MeasureTables(localization=localization, caption=caption, notes=notes, per_image=per_image,
                             better=better)


def degenerate_notes(records: pd.DataFrame, all_degenerate: list[str]) -> list[str]:
    """One line per method with degenerate maps (constant or NaN/inf), so they are never
    hidden in an average: how many, and what the table does with them."""
    first = records[records["threshold"] == records["threshold"].iloc[0]]
    counts = first.groupby("method", sort=False)["degenerate"].agg(["sum", "size"])
    notes = []
    for method, (bad, total) in counts.iterrows():
        if method in all_degenerate:
            notes.append(ALL_DEGENERATE.format(method=method))
        elif bad:
            they = agreeing(bad, "it counts as an empty prediction", "they count as empty predictions")
            notes.append(f"{method}: {int(bad):,} of {counted(int(total), 'map')} {agreeing(bad, 'is', 'are')} "
                         f"degenerate (constant or NaN/inf); {they} here (n_degenerate).")
    return notes
