"""gallery.png: the first images of a run with every method's heatmap and boxes, drawn at the
end of a run and redrawn later from the run's map store and dataset (`wsol-bench-report`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from wsol_bench.datasets import EvalTransform, Sample, build_dataset
from wsol_bench.errors import counted
from wsol_bench.report.figures import RowCaption, denormalize, heatmap_gallery
from wsol_bench.report.run_folder import RunFolder
from wsol_bench.run.maps import as_dict, build_transform
from wsol_bench.run.store import InvalidShard, MapStore

DEFAULT_GALLERY_IMAGES = 6
TARGET_WORDS = {"predicted": "the predicted class", "label": "the labelled class"}  # config `target`


def class_name(index: int, class_names) -> str:
    """The dataset's name of class `index`, or "class <index>" where it has none."""
    names = list(class_names or ())
    return str(names[index]) if 0 <= index < len(names) else f"class {index}"


def row_captions(samples: list[Sample], predictions: list[int], class_names) -> list[RowCaption]:
    """Per sample: its id, its labelled class, the model's predicted class, and whether they
    agree (the records' `correct` flag: prediction == label)."""
    return [RowCaption(s.image_id, class_name(int(s.label), class_names), class_name(int(p), class_names),
                       int(p) == int(s.label)) for s, p in zip(samples, predictions)]


def gallery_title(count: int, target: str, threshold: float) -> str:
    """What the gallery shows, which class its maps explain and where its threshold comes from."""
    explained = TARGET_WORDS.get(target, f"target={target}")
    return (f"First {counted(count, 'image')}: each map explains {explained} (target={target}); "
            f"predicted boxes at the run's first threshold, metric.thresholds[0] = {threshold:g}")


def draw_gallery(samples: list[Sample], maps: dict[str, torch.Tensor], transform: EvalTransform, path: Path,
                 threshold: float, *, predictions: list[int], class_names, target: str) -> None:
    """Each sample with its label-class boxes and its class, predicted class and verdict, then
    each method's heatmap and predicted boxes; `predictions` are the model's classes of the
    samples, `class_names` the dataset's (None: class numbers), `target` the run's policy."""
    heatmap_gallery([denormalize(s.image, transform.mean, transform.std) for s in samples],
                    [s.boxes[s.box_labels == s.label] for s in samples], maps, path, threshold=threshold,
                    titles=row_captions(samples, predictions, class_names),
                    title=gallery_title(len(samples), target, threshold))


def write_gallery(cfg: DictConfig, dataset, transform: EvalTransform, stores: dict[str, MapStore],
                  path: Path) -> None:
    """The first `gallery_images` usable images of a run with every method's stored map."""
    count = min(int(cfg.gallery_images), len(dataset))
    first = {m: s.load(0) for m, s in stores.items()}
    reference = next(iter(first.values()))
    positions = [int(p) for p in reference.positions[:count]]
    maps = {m: shard.maps[:len(positions)] for m, shard in first.items()}
    # The stored logits are the model's on the clean images, the same for every method.
    predictions = reference.logits[:len(positions)].argmax(1).tolist()
    draw_gallery([dataset[p] for p in positions], maps, transform, path, float(cfg.metric.thresholds[0]),
                 predictions=predictions, class_names=getattr(dataset, "class_names", None), target=str(cfg.target))


class GallerySkipped(Exception):
    """The gallery cannot be redrawn from this run folder (the message says why)."""


def stored_gallery_maps(run: RunFolder, count: int
                        ) -> tuple[list[int], list[str], dict[str, torch.Tensor], list[int]]:
    """Dataset positions, image ids and raw maps of the first `count` stored items of every
    method, and the model's predicted classes of those items, read through the map store that
    the run's `maps.json` names."""
    index_path = run.path / "maps.json"
    if not index_path.is_file():
        raise GallerySkipped(f"no map store recorded ({index_path} is missing)")
    positions, ids, maps, predictions = None, None, {}, []
    for method, entry in json.loads(index_path.read_text()).items():
        folder = Path(entry["folder"])
        if not (folder / "settings.json").is_file():
            raise GallerySkipped(f"the maps of {method} are no longer in the cache ({folder})")
        settings = json.loads((folder / "settings.json").read_text())
        store = MapStore(folder.parent, settings, int(entry["shard_size"]), dtype=settings.get("map_dtype", "float32"))
        if store.key != entry["key"]:
            raise GallerySkipped(f"the cache folder {folder} no longer holds the key {entry['key']}")
        try:
            shard = store.load(0)
        except InvalidShard as exc:
            raise GallerySkipped(str(exc)) from exc
        if positions is None:
            positions, ids = [int(p) for p in shard.positions[:count]], shard.image_ids[:count]
            predictions = shard.logits[: len(positions)].argmax(1).tolist()
        elif shard.image_ids[:count] != ids:
            raise GallerySkipped(f"the stored maps of {method} cover other images than those of the first method")
        maps[method] = shard.maps[: len(positions)]
    if not maps:
        raise GallerySkipped(f"{index_path} lists no method")
    return positions, ids, maps, predictions


def rebuild_gallery(run: RunFolder, path: Path) -> str:
    """Redraw the heatmap gallery from the run's stored maps and its dataset; returns what
    was done or why it was skipped (no stored maps, dataset or model not available here)."""
    count = int(run.setting("gallery_images", DEFAULT_GALLERY_IMAGES) or 0)
    if count == 0:
        return "gallery skipped: the run has gallery_images=0"
    try:
        positions, ids, maps, predictions = stored_gallery_maps(run, count)
    except GallerySkipped as exc:
        return f"gallery skipped: {exc}"
    try:
        cfg = OmegaConf.create(run.config)
        transform = build_transform(cfg)
        dataset = build_dataset(cfg.dataset.name, transform=transform, **as_dict(cfg.dataset.get("params")))
        samples = [dataset[p] for p in positions]
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, IndexError, AttributeError) as exc:
        return f"gallery skipped: the run's dataset or model cannot be rebuilt here ({exc})"
    if [getattr(s, "image_id", None) for s in samples] != list(ids):
        return "gallery skipped: the dataset here yields other images than the stored maps (image ids differ)"
    draw_gallery(samples, maps, transform, path, float(run.setting("metric.thresholds", [0.5])[0]),
                 predictions=predictions, class_names=getattr(dataset, "class_names", None),
                 target=str(run.setting("target", "predicted")))
    return f"gallery: {path}"
