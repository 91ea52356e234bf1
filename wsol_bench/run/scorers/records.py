"""records.csv: one row per (image, method, threshold) with the image's ids, label,
prediction, flags and AG-CAM pixel scores at the fixed thresholds of `metric.thresholds`
(docs/protocol.md 4.1). The tables are aggregations of these rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from wsol_bench.files import CsvRows
from wsol_bench.metrics.localization import localization_scores, metric_columns
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.scorers.base import RunContext, Scorer, register_scorer

ID_COLUMNS = ["image_id", "dataset", "split", "method", "threshold", "label", "prediction", "target",
              "target_source", "class_specific", "correct", "degenerate", "n_gt_boxes", "n_pred_boxes"]


@register_scorer("records")
class LocalizationRecords(Scorer):
    """Per-image AG-CAM pixel scores at fixed thresholds, appended to records.csv per batch."""

    def __init__(self, path: Path, thresholds: list[float], *, dataset_name: str, split: str,
                 box_protocol: str, has_masks: bool) -> None:
        if not thresholds:
            raise ValueError("metric.thresholds is empty; give at least one threshold, e.g. [0.5]")
        self.thresholds, self.dataset_name, self.split = [float(t) for t in thresholds], dataset_name, split
        # the region engine takes a strictly increasing grid; rows keep the order asked for
        self.grid = sorted(set(self.thresholds))
        self.box_protocol = box_protocol
        self.columns = metric_columns(has_masks)
        self.rows = CsvRows(path, ID_COLUMNS + self.columns)

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> LocalizationRecords:
        return cls(context.out_dir / "records.csv", list(cfg.metric.thresholds), dataset_name=context.dataset_name,
                   split=context.split, box_protocol=cfg.metric.box_protocol, has_masks=context.has_masks)

    def update(self, mb: MethodBatch) -> None:
        scores, _ = localization_scores(mb.heatmaps, mb.gt, self.grid, self.box_protocol)
        predictions, targets = mb.predictions.tolist(), mb.targets.tolist()
        rows = []
        for threshold in self.thresholds:
            level = self.grid.index(threshold)
            for i, sample in enumerate(mb.samples):
                rows.append({
                    "image_id": sample.image_id, "dataset": self.dataset_name, "split": self.split,
                    "method": mb.method, "threshold": threshold, "label": sample.label,
                    "prediction": predictions[i], "target": targets[i],
                    "target_source": mb.shard.target_source, "class_specific": int(mb.shard.class_specific),
                    "correct": int(predictions[i] == sample.label), "degenerate": int(mb.degenerate[i]),
                    "n_gt_boxes": mb.gt.num_boxes[i], "n_pred_boxes": int(scores["n_pred_boxes"][level, i]),
                    **{column: float(np.float64(scores[column][level, i])) for column in self.columns},
                })
        self.rows.write(rows)

    def close(self) -> None:
        self.rows.close()

    def compute(self) -> Path:
        return self.rows.path

    def write(self, out_dir: Path) -> list[Path]:
        self.close()
        return [self.rows.path]
