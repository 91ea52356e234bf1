"""records.csv: one row per (image, method, threshold) with the image's ids, label,
prediction, flags and AG-CAM pixel scores at the fixed thresholds of `metric.thresholds`
(docs/protocol.md 4.1). The tables are aggregations of these rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from wsol_bench.errors import SettingError
from wsol_bench.files import CsvRows, csv_text
from wsol_bench.metrics.localization import localization_scores, metric_columns
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.distributed import Ranks
from wsol_bench.run.scorers.base import RunContext, Scorer, append_rank_rows, register_scorer

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
