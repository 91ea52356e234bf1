"""masks/<method>.json (`export_masks=true`): the predicted box-union masks at the first
threshold of `metric.thresholds`, and the ground-truth masks, as COCO RLE, encoded batch by
batch so memory stays small."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from wsol_bench.files import atomic_write_text
from wsol_bench.report.export import coco_document, predicted_union_masks
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.scorers.base import RunContext, Scorer, register_scorer


@register_scorer("masks")
class MaskExporter(Scorer):
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

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> MaskExporter | None:
        if not cfg.export_masks:
            return None
        return cls(context.out_dir / "masks", float(cfg.metric.thresholds[0]), box_protocol=cfg.metric.box_protocol,
                   class_names=context.class_names)

    def compute(self) -> dict[str, dict]:
        """{name: COCO document} per method and for the ground truth."""
        return {name: {**doc, "categories": sorted(doc["categories"].values(), key=lambda c: c["id"])}
                for name, doc in self.docs.items()}

    def write(self, out_dir: Path) -> list[Path]:
        """Write <folder>/<method>.json (score = the softmax probability of the map's target)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, doc in self.compute().items():
            paths.append(atomic_write_text(self.folder / f"{name}.json", json.dumps(doc)))
        return paths
