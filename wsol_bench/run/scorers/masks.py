"""masks/<method>.json (`export_masks=true`): the predicted box-union masks at the first
threshold of `metric.thresholds`, and the ground-truth masks, as COCO RLE, encoded batch by
batch so memory stays small."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from wsol_bench.files import atomic_write_text
from wsol_bench.report.export import coco_document, predicted_union_masks
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.distributed import Ranks
from wsol_bench.run.scorers.base import RunContext, Scorer, register_scorer


@dataclass(frozen=True)
class MaskDocuments:
    """The kernel of `MaskExporter`: one batch of one method -> COCO documents of its predicted
    masks (and, for the run's first method, of the ground truth)."""

    threshold: float
    box_protocol: str
    categories: dict[int, str] | None
    gt_method: str

    def __call__(self, mb: MethodBatch) -> dict[str, dict]:
        keys = [s.image_id for s in mb.samples]
        masks = predicted_union_masks(mb.heatmaps, self.threshold, self.box_protocol)
        scores = mb.logits.softmax(1).gather(1, mb.targets[:, None])[:, 0].tolist()
        docs = {mb.method: coco_document(keys, masks, mb.targets.tolist(), scores, self.categories)}
        if mb.method == self.gt_method:
            docs["ground_truth_boxes"] = coco_document(keys, mb.gt.box_masks, mb.labels.tolist(), None,
                                                       self.categories)
            if mb.gt.seg_masks is not None:
                docs["ground_truth_masks"] = coco_document(keys, mb.gt.seg_masks, mb.labels.tolist(), None,
                                                           self.categories)
        return docs


@register_scorer("masks")
class MaskExporter(Scorer):
    """Predicted box-union masks at one threshold (and the ground-truth masks) as COCO RLE
    JSON, one file per method under `folder`, encoded batch by batch so memory stays small."""

    def __init__(self, folder: Path, threshold: float, *, box_protocol: str, class_names=None,
                 gt_method: str = "") -> None:
        self.folder = folder
        categories = dict(enumerate(class_names)) if class_names is not None else None
        self.kernel = MaskDocuments(float(threshold), box_protocol, categories, gt_method)
        self.docs: dict[str, dict] = {}

    def add(self, method: str, part: dict[str, dict]) -> None:
        for name, doc in part.items():
            self._append(name, doc)

    def _append(self, name: str, part: dict) -> None:
        """Append a COCO document's images and annotations, renumbering their ids after those held."""
        doc = self.docs.setdefault(name, {"images": [], "annotations": [], "categories": {}})
        offset = len(doc["images"])
        for image in part["images"]:
            doc["images"].append({**image, "id": image["id"] + offset})
        for ann in part["annotations"]:
            doc["annotations"].append({**ann, "id": ann["id"] + offset, "image_id": ann["image_id"] + offset})
        categories = part["categories"]
        doc["categories"].update(categories if isinstance(categories, dict) else {c["id"]: c for c in categories})

    def gather(self, ranks: Ranks, parts: list[Path]) -> None:
        """Rank 0 appends the other ranks' documents in rank order (the order of the shards)."""
        if not ranks.distributed:
            return
        everyone = ranks.gather(self.docs)
        if ranks.main:
            self.docs = {}
            for docs in everyone:
                for name, doc in docs.items():
                    self._append(name, doc)

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> MaskExporter | None:
        if not cfg.export_masks:
            return None
        return cls(context.out_dir / "masks", float(cfg.metric.thresholds[0]), box_protocol=cfg.metric.box_protocol,
                   class_names=context.class_names, gt_method=context.methods[0] if context.methods else "")

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
