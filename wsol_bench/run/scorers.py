"""Scorers a run feeds batch by batch (`pipeline.score_dataset`) besides the per-image
localization records: loader-change counts, pixel-perturbation faithfulness, and the
threshold sweep with the wsolevaluation metrics."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from wsol_bench.regions.contours import require_cv2
from wsol_bench.report.export import coco_document, predicted_union_masks
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.metrics.faithfulness import (ENGINE_VERSION, FaithfulnessSettings, constant_baseline_probs,
                                             faithfulness_rows, score_batch)
from wsol_bench.metrics.wsoleval import BoxAccuracy, PxAP, wsoleval_gt_boxes
from wsol_bench.run.pipeline import MethodBatch, rows_at
from wsol_bench.run.store import MapStore, settings_key
from wsol_bench.regions.components import SweepResult, sweep_heatmaps, threshold_array

FAITHFULNESS_ID_COLUMNS = ["image_id", "dataset", "split", "method", "label", "prediction", "target"]


class NoteCounter:
    """Counts what loaders changed to make items usable (Sample.notes), once per image."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._method: str | None = None

    def update(self, mb: MethodBatch) -> None:
        if self._method is None:
            self._method = mb.method
        if mb.method == self._method:
            self.counts.update(note for s in mb.samples for note in s.notes)

    def finish(self) -> dict[str, int]:
        return dict(self.counts)


class FaithfulnessScorer:
    """Pixel-perturbation curves (docs/protocol.md 5) of every method's ground-truth-class maps.

    The maps come from `label_stores` (target policy "label"), which may be the run's own
    stores. Per-image rows are cached next to those maps, one CSV per shard and settings, so
    a killed run does not redo finished shards and a re-scoring run costs no model pass.
    """

    def __init__(self, model_fn, label_stores: dict[str, MapStore], settings: FaithfulnessSettings,
                 path: Path, *, dataset_name: str, split: str) -> None:
        self.model_fn, self.stores, self.settings = model_fn, label_stores, settings
        self.path, self.dataset_name, self.split = path, dataset_name, split
        # The chunk size changes speed, not the numbers, so it stays out of the key (as the
        # explanation batch size stays out of the map key).
        self.key_settings = {k: v for k, v in vars(settings).items() if k != "batch_size"}
        self.key = settings_key({"faithfulness": self.key_settings, "engine": ENGINE_VERSION})
        self._rows: dict[tuple[str, int], list[dict]] = {}
        self._cached: dict[tuple[str, int], dict[str, dict]] = {}
        self._shards: dict[tuple[str, int], object] = {}
        self._full_probs: torch.Tensor | None = None
        self.all_rows: list[dict] = []

    def _cache_file(self, method: str, shard_index: int) -> Path:
        return self.stores[method].folder / f"faithfulness_{self.key}" / f"shard_{shard_index:06d}.csv"

    def _cached_rows(self, method: str, shard_index: int) -> dict[str, dict] | None:
        key = (method, shard_index)
        if key not in self._cached:
            file = self._cache_file(method, shard_index)
            self._cached[key] = ({r["image_id"]: r for r in pd.read_csv(file).to_dict("records")}
                                 if file.is_file() else None)
        return self._cached[key]

    def _label_shard(self, mb: MethodBatch):
        key = (mb.method, mb.shard.index)
        if key not in self._shards:
            self._shards = {k: v for k, v in self._shards.items() if k[0] != mb.method}  # one shard per method
            self._shards[key] = self.stores[mb.method].load(mb.shard.index)
        return self._shards[key]

    def update(self, mb: MethodBatch) -> None:
        cached = self._cached_rows(mb.method, mb.shard.index)
        if cached is not None:
            self.all_rows += [cached[s.image_id] for s in mb.samples]
            return
        shard = self._label_shard(mb)
        rows = rows_at(shard, mb.positions)
        heat, _ = to_heatmaps(shard.maps[rows], tuple(mb.images.shape[-2:]))
        model = self.model_fn()
        if self._full_probs is None and not self.settings.blurred:
            self._full_probs = constant_baseline_probs(model, mb.images.shape[1:], self.settings)
        labels = mb.labels
        scores = score_batch(model, mb.images, heat, labels, self.settings, clean_logits=shard.logits[rows],
                             full_removal_probs=self._full_probs)
        logits = shard.logits[rows]
        out = []
        for sample, prediction, label, values in zip(mb.samples, logits.argmax(1).tolist(), labels.tolist(),
                                                     faithfulness_rows(scores)):
            out.append({"image_id": sample.image_id, "dataset": self.dataset_name, "split": self.split,
                        "method": mb.method, "label": label, "prediction": prediction, "target": label,
                        **values})
        self.all_rows += out
        pending = self._rows.setdefault((mb.method, mb.shard.index), [])
        pending += out
        if len(pending) == len(shard.positions):  # the shard is complete: keep it
            self._write_cache(mb.method, mb.shard.index, pending)
            del self._rows[(mb.method, mb.shard.index)]

    def _write_cache(self, method: str, shard_index: int, rows: list[dict]) -> None:
        file = self._cache_file(method, shard_index)
        file.parent.mkdir(parents=True, exist_ok=True)
        settings_file = file.parent / "settings.json"
        if not settings_file.is_file():
            settings_file.write_text(json.dumps(self.key_settings, indent=2, default=str))
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        pd.DataFrame(rows).to_csv(tmp, index=False)
        os.replace(tmp, file)

    def finish(self) -> Path:
        """Write faithfulness.csv (one row per image and method)."""
        frame = pd.DataFrame(self.all_rows)
        curves = [c for c in frame.columns if c not in FAITHFULNESS_ID_COLUMNS]
        frame = frame[FAITHFULNESS_ID_COLUMNS + curves] if len(frame) else frame
        frame.to_csv(self.path, index=False, quoting=csv.QUOTE_MINIMAL)
        return self.path


class SweepScorer:
    """Threshold sweep of one run: AG-CAM pixel scores at every threshold of a grid (mean over
    the images `image_filter` keeps -> sweep.csv), and the wsolevaluation metrics MaxBoxAcc
    (v1, v2), GT-known / Top-1 Loc and, with masks, PxAP (docs/protocol.md 4.2; all images ->
    wsoleval.csv). The float components of each image are labelled once for all thresholds and
    feed the AG-CAM sweep (and MaxBoxAcc with boxes="components"); with boxes="opencv" (the
    default) MaxBoxAcc scores wsolevaluation's own OpenCV contours."""

    def __init__(self, thresholds, iou_thresholds, *, box_protocol: str, image_filter: str,
                 sweep_path: Path, wsoleval_path: Path, dataset_name: str, split: str,
                 boxes: str = "opencv") -> None:
        threshold_array(thresholds, np.float64)  # names the problem with a bad grid
        self.thresholds = [float(t) for t in thresholds]
        self.iou_thresholds = tuple(int(d) for d in iou_thresholds)
        self.boxes = boxes
        BoxAccuracy(self.thresholds, self.iou_thresholds, boxes)  # names a bad setting before any work
        if boxes == "opencv":
            require_cv2()  # a missing OpenCV is named now, not after the explanation pass
        self.box_protocol, self.image_filter = box_protocol, image_filter
        self.sweep_path, self.wsoleval_path = sweep_path, wsoleval_path
        self.dataset_name, self.split = dataset_name, split
        self.results: dict[str, list[SweepResult]] = {}
        self.correct: dict[str, list[np.ndarray]] = {}
        self.boxacc: dict[str, BoxAccuracy] = {}
        self.pxap: dict[str, PxAP] = {}

    def update(self, mb: MethodBatch) -> None:
        result, components = sweep_heatmaps(mb.heatmaps, mb.gt, self.thresholds, self.box_protocol)
        correct = (mb.predictions == mb.labels).numpy()
        self.results.setdefault(mb.method, []).append(result)
        self.correct.setdefault(mb.method, []).append(correct)
        size = tuple(mb.heatmaps.shape[-2:])
        gt_boxes = [wsoleval_gt_boxes(s, size) for s in mb.samples]
        acc = self.boxacc.setdefault(mb.method, BoxAccuracy(self.thresholds, self.iou_thresholds, self.boxes))
        # the float variant shares the pixel sweep's components; OpenCV's contours are its own
        regions = components if self.boxes == "components" else acc.regions(mb.heatmaps)
        acc.update_components(regions, gt_boxes, torch.from_numpy(correct))
        if mb.gt.seg_masks is not None:
            self.pxap.setdefault(mb.method, PxAP(self.thresholds)).update(mb.heatmaps, mb.gt.seg_masks,
                                                                          mb.gt.seg_valid)

    def finish(self) -> tuple[Path, Path]:
        """Write sweep.csv (method x threshold) and wsoleval.csv (one row per method)."""
        sweep_frames, summary = [], []
        for method, parts in self.results.items():
            result = SweepResult.concat(parts)
            correct = np.concatenate(self.correct[method])
            keep = correct if self.image_filter == "correct" else np.ones_like(correct, dtype=bool)
            if keep.any():
                table = result.table(keep)
                table.insert(0, "method", method)
                table["n_images"] = int(keep.sum())
                table["filter"] = self.image_filter
                sweep_frames.append(table)
            acc = self.boxacc[method].compute()
            row = {"method": method, "dataset": self.dataset_name, "split": self.split, "boxes": acc["boxes"],
                   "n_images": acc["num_images"], "n_without_gt_boxes": acc["num_without_gt_boxes"],
                   "maxboxacc": acc["maxboxacc"], "maxboxacc_threshold": acc["maxboxacc_threshold"],
                   "maxboxacc_v2": acc["maxboxacc_v2"]}
            for delta in self.iou_thresholds:
                row[f"maxboxacc_v2_iou{delta}"] = acc["maxboxacc_v2_per_iou"][delta]
                row[f"maxboxacc_v2_iou{delta}_threshold"] = acc["maxboxacc_v2_thresholds"][delta]
            row.update({"top1_loc": acc["top1_loc"], "gt_known_loc": acc["gt_known_loc"],
                        "loc_threshold": acc["loc_threshold"],
                        "pxap": self.pxap[method].compute()["pxap"] if method in self.pxap else float("nan")})
            if keep.any():
                for name, best in result.best_thresholds(keep).items():
                    if name.endswith("_iou"):
                        row[f"best_{name}"] = best["value"] * 100
                        row[f"best_{name}_threshold"] = best["threshold"]
            summary.append(row)
        # no image passes the filter (e.g. nothing classified correctly): an empty table with its header
        frame = (pd.concat(sweep_frames, ignore_index=True) if sweep_frames
                 else pd.DataFrame(columns=["method", "threshold", "n_images", "filter"]))
        frame.to_csv(self.sweep_path, index=False)
        pd.DataFrame(summary).to_csv(self.wsoleval_path, index=False)
        return self.sweep_path, self.wsoleval_path


class MaskExporter:
    """Predicted box-union masks at one threshold (and the ground-truth masks) as COCO RLE
    JSON, one file per method under `folder`, encoded batch by batch so memory stays small."""

    def __init__(self, folder: Path, threshold: float, *, box_protocol: str, class_names=None) -> None:
        self.folder, self.threshold, self.box_protocol = folder, float(threshold), box_protocol
        self.categories = dict(enumerate(class_names)) if class_names is not None else None
        self.docs: dict[str, dict] = {}
        self._gt_method: str | None = None

    def _add(self, name: str, keys, masks, categories, scores=None) -> None:
        part = coco_document(keys, masks, categories, scores, self.categories)
        doc = self.docs.setdefault(name, {"images": [], "annotations": [], "categories": {}})
        offset = len(doc["images"])
        for image in part["images"]:
            doc["images"].append({**image, "id": image["id"] + offset})
        for ann in part["annotations"]:
            doc["annotations"].append({**ann, "id": ann["id"] + offset, "image_id": ann["image_id"] + offset})
        doc["categories"].update({c["id"]: c for c in part["categories"]})

    def update(self, mb: MethodBatch) -> None:
        keys = [s.image_id for s in mb.samples]
        masks = predicted_union_masks(mb.heatmaps, self.threshold, self.box_protocol)
        self._add(mb.method, keys, masks, mb.targets.tolist(), mb.logits.softmax(1).gather(
            1, mb.targets[:, None])[:, 0].tolist())
        if self._gt_method is None:
            self._gt_method = mb.method
        if mb.method == self._gt_method:
            self._add("ground_truth_boxes", keys, mb.gt.box_masks, mb.labels.tolist())
            if mb.gt.seg_masks is not None:
                self._add("ground_truth_masks", keys, mb.gt.seg_masks, mb.labels.tolist())

    def finish(self) -> list[Path]:
        """Write <folder>/<method>.json (score = the softmax probability of the map's target)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, doc in self.docs.items():
            doc = {**doc, "categories": sorted(doc["categories"].values(), key=lambda c: c["id"])}
            path = self.folder / f"{name}.json"
            path.write_text(json.dumps(doc))
            paths.append(path)
        return paths
