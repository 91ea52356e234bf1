"""The benchmark loop: dataset -> batches -> one explainer pass per batch and method ->
heatmaps -> per-image records, with raw maps kept for re-scoring.

Records are appended to the run's CSV after every batch, so a crash loses no finished batch.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from wsol_bench.datasets.base import Batch, collate_samples
from wsol_bench.heatmaps import to_heatmaps
from wsol_bench.localization import ground_truth, metric_columns, score_heatmaps
from wsol_bench.methods.base import Explainer

TARGET_POLICIES = ("predicted", "label")
ID_COLUMNS = ["image_id", "dataset", "split", "method", "threshold", "label", "prediction", "target",
              "target_source", "class_specific", "correct", "degenerate", "n_gt_boxes", "n_pred_boxes"]


@dataclass
class MapStore:
    """Raw explanations of a run, per method, in dataset order."""

    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    logits: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    targets: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    image_ids: list[str] = field(default_factory=list)

    def add(self, method: str, maps: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.maps.setdefault(method, []).append(maps.cpu())
        self.logits.setdefault(method, []).append(logits.float().cpu())
        self.targets.setdefault(method, []).append(targets.cpu())

    def save(self, folder: Path) -> None:
        """One file per method: maps [N, gh, gw], logits [N, C], targets [N], image ids."""
        folder.mkdir(parents=True, exist_ok=True)
        for method in self.maps:
            payload = {"maps": torch.cat(self.maps[method]), "logits": torch.cat(self.logits[method]),
                       "targets": torch.cat(self.targets[method]), "image_ids": list(self.image_ids)}
            tmp = folder / f".{method}.pt.tmp"
            torch.save(payload, tmp)
            tmp.replace(folder / f"{method}.pt")


class RecordWriter:
    """Append-only CSV of per-image records with a fixed header."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.columns = path, columns
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=columns)
        self._writer.writeheader()

    def write(self, rows: Iterable[dict]) -> None:
        self._writer.writerows(rows)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def explain_targets(batch: Batch, policy: str) -> torch.Tensor | None:
    """Targets handed to the explainer: the ground-truth labels, or None (predicted class)."""
    if policy not in TARGET_POLICIES:
        raise ValueError(f"unknown target policy {policy!r}; valid: {TARGET_POLICIES}")
    return batch.labels if policy == "label" else None


def run_localization(explainers: dict[str, Explainer], dataset: Dataset, *, records_path: Path,
                     thresholds: list[float], dataset_name: str, split: str,
                     target_policy: str = "predicted", batch_size: int = 16, num_workers: int = 0,
                     box_protocol: str = "agcam", progress: bool = True) -> MapStore:
    """Explain every image with every method once and write one record per
    (image, method, threshold) to `records_path`. Returns the raw maps."""
    if not thresholds:
        raise ValueError("metric.thresholds is empty; give at least one threshold, e.g. [0.5]")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_samples)
    first = dataset[0]
    has_masks = first.mask is not None
    writer = RecordWriter(records_path, ID_COLUMNS + metric_columns(has_masks))
    store = MapStore()
    try:
        bar = tqdm(loader, desc="explaining", unit="batch", disable=not progress)
        for batch in bar:
            size = tuple(batch.images.shape[-2:])
            gt = ground_truth(batch.samples, size, box_protocol)
            store.image_ids.extend(s.image_id for s in batch.samples)
            logits = None  # the first model pass's logits serve the model-free baselines
            for method, explainer in explainers.items():
                explanation = explainer(batch.images, explain_targets(batch, target_policy), logits=logits)
                logits = explanation.logits
                store.add(method, explanation.maps, explanation.logits, explanation.targets)
                heat, degenerate = to_heatmaps(explanation.maps, size)
                predictions = explanation.logits.argmax(1).cpu()
                targets = explanation.targets.cpu()
                per_threshold = score_heatmaps(heat, gt, thresholds, box_protocol)
                rows = []
                for threshold, scores in zip(thresholds, per_threshold):
                    for i, sample in enumerate(batch.samples):
                        rows.append({
                            "image_id": sample.image_id, "dataset": dataset_name, "split": split,
                            "method": method, "threshold": threshold, "label": sample.label,
                            "prediction": int(predictions[i]), "target": int(targets[i]),
                            "target_source": explanation.target_source,
                            "class_specific": int(explanation.class_specific),
                            "correct": int(predictions[i] == sample.label),
                            "degenerate": int(degenerate[i]), "n_gt_boxes": gt.num_boxes[i],
                            **scores[i],
                        })
                writer.write(rows)
    finally:
        writer.close()
    return store
