"""The heatmap gallery of a finished run, redrawn from its map store and its dataset."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wsol_bench.datasets import EvalTransform, build_dataset
from wsol_bench.models import architecture_data_config
from wsol_bench.report.figures import denormalize, heatmap_gallery
from wsol_bench.report.run_folder import RunFolder
from wsol_bench.run.store import MapStore

DEFAULT_GALLERY_IMAGES = 6


class GallerySkipped(Exception):
    """The gallery cannot be redrawn from this run folder (the message says why)."""


def stored_gallery_maps(run: RunFolder, count: int) -> tuple[list[int], list[str], dict[str, torch.Tensor]]:
    """Dataset positions, image ids and raw maps of the first `count` stored items of every
    method, read through the map store that the run's `maps.json` names."""
    index_path = run.path / "maps.json"
    if not index_path.is_file():
        raise GallerySkipped(f"no map store recorded ({index_path} is missing)")
    positions, ids, maps = None, None, {}
    for method, entry in json.loads(index_path.read_text()).items():
        folder = Path(entry["folder"])
        if not (folder / "settings.json").is_file():
            raise GallerySkipped(f"the maps of {method} are no longer in the cache ({folder})")
        store = MapStore(folder.parent, json.loads((folder / "settings.json").read_text()), int(entry["shard_size"]))
        if store.key != entry["key"]:
            raise GallerySkipped(f"the cache folder {folder} no longer holds the key {entry['key']}")
        try:
            shard = store.load(0)
        except (FileNotFoundError, RuntimeError) as exc:
            raise GallerySkipped(str(exc)) from exc
        if positions is None:
            positions, ids = [int(p) for p in shard.positions[:count]], shard.image_ids[:count]
        elif shard.image_ids[:count] != ids:
            raise GallerySkipped(f"the stored maps of {method} cover other images than those of the first method")
        maps[method] = shard.maps[: len(positions)]
    if not maps:
        raise GallerySkipped(f"{index_path} lists no method")
    return positions, ids, maps


def rebuild_gallery(run: RunFolder, path: Path) -> str:
    """Redraw the heatmap gallery from the run's stored maps and its dataset; returns what
    was done or why it was skipped (no stored maps, dataset or model not available here)."""
    count = int(run.setting("gallery_images", DEFAULT_GALLERY_IMAGES) or 0)
    if count == 0:
        return "gallery skipped: the run has gallery_images=0"
    try:
        positions, ids, maps = stored_gallery_maps(run, count)
    except GallerySkipped as exc:
        return f"gallery skipped: {exc}"
    pre = run.setting("preprocess", {}) or {}
    model_cfg = run.setting("model", {}) or {}
    try:
        dc = architecture_data_config(model_cfg["name"], **(model_cfg.get("kwargs") or {}))
        transform = EvalTransform(size=tuple(pre.get("input_size") or dc.input_size[1:]),
                                  mean=pre.get("mean") or dc.mean, std=pre.get("std") or dc.std,
                                  interpolation=pre.get("interpolation") or dc.interpolation)
        dataset = build_dataset(run.setting("dataset.name"), transform=transform,
                                **(run.setting("dataset.params", {}) or {}))
        samples = [dataset[p] for p in positions]
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, IndexError) as exc:
        return f"gallery skipped: the run's dataset or model cannot be rebuilt here ({exc})"
    if [getattr(s, "image_id", None) for s in samples] != list(ids):
        return "gallery skipped: the dataset here yields other images than the stored maps (image ids differ)"
    heatmap_gallery([denormalize(s.image, transform.mean, transform.std) for s in samples],
                    [s.boxes[s.box_labels == s.label] for s in samples], maps, path,
                    threshold=float(run.setting("metric.thresholds", [0.5])[0]), titles=list(ids))
    return f"gallery: {path}"
