"""The benchmark loop in two stages.

1. `explain_dataset`: one explainer pass per batch and method, only for the shards the map
   store does not hold yet; each finished shard is written at once, so a killed run resumes
   where it stopped and a finished one costs nothing to re-score.
2. `score_dataset`: stored maps -> heatmaps -> per-image records (one row per image, method
   and threshold, appended per batch) and any dataset-level scorers (wsolevaluation metrics,
   threshold sweeps, faithfulness). No model pass unless a scorer needs one.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from wsol_bench.datasets.base import Batch, Sample, collate_samples
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.metrics.localization import GroundTruth, ground_truth, metric_columns, score_heatmaps
from wsol_bench.methods.base import Explainer
from wsol_bench.run.store import MapStore, Shard

TARGET_POLICIES = ("predicted", "label")
ID_COLUMNS = ["image_id", "dataset", "split", "method", "threshold", "label", "prediction", "target",
              "target_source", "class_specific", "correct", "degenerate", "n_gt_boxes", "n_pred_boxes"]


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


@dataclass
class PositionedBatch:
    """A batch and the dataset positions of its (non-skipped) samples."""

    batch: Batch
    positions: list[int]


def _collate_positioned(items: list[tuple[int, object]]) -> PositionedBatch:
    batch = collate_samples([item for _, item in items])
    positions = [pos for pos, item in items if isinstance(item, Sample)]
    return PositionedBatch(batch, positions)


class _WithPositions(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> tuple[int, object]:
        return position, self.dataset[position]


def iterate_batches(dataset: Dataset, positions: Sequence[int], batch_size: int,
                    num_workers: int) -> DataLoader:
    """Batches of the items at `positions`, in order, each with its dataset positions."""
    return DataLoader(Subset(_WithPositions(dataset), list(positions)), batch_size=batch_size,
                      shuffle=False, num_workers=num_workers, collate_fn=_collate_positioned)


def shard_batches(dataset: Dataset, positions: Sequence[int], batch_size: int, num_workers: int, bar,
                  skipped: list[tuple[str, str]]) -> Iterator[PositionedBatch]:
    """The non-empty batches of one shard's positions; items the dataset skipped are appended
    to `skipped` as (image_id, reason), and every item advances the progress bar."""
    for pb in iterate_batches(dataset, positions, batch_size, num_workers):
        skipped += [(s.image_id, s.reason) for s in pb.batch.skipped]
        bar.update(len(pb.batch) + len(pb.batch.skipped))
        if len(pb.batch):
            yield pb


def explain_dataset(explainers: dict[str, Explainer], stores: dict[str, MapStore], dataset: Dataset, *,
                    target_policy: str = "predicted", batch_size: int = 16, num_workers: int = 0,
                    progress: bool = True) -> dict[str, int]:
    """Compute and store the maps of every shard some method's store lacks. Methods that
    already hold a shard are not run on it. Returns the number of shards computed per method."""
    if target_policy not in TARGET_POLICIES:
        raise ValueError(f"unknown target policy {target_policy!r}; valid: {TARGET_POLICIES}")
    n = len(dataset)
    reference = next(iter(stores.values()))
    todo = sorted({i for s in stores.values() for i in s.missing(n)})
    computed = {m: 0 for m in explainers}
    total = sum(len(reference.shard_positions(i, n)) for i in todo)
    bar = tqdm(total=total, desc="explaining", unit="img", disable=not progress or not todo)
    for shard_index in todo:
        methods = [m for m in explainers if not stores[m].has(shard_index)]
        parts: dict[str, dict[str, list]] = {m: {"maps": [], "logits": [], "targets": []} for m in methods}
        ids, positions, skipped = [], [], []
        for pb in shard_batches(dataset, reference.shard_positions(shard_index, n), batch_size, num_workers,
                                bar, skipped):
            batch = pb.batch
            ids += [s.image_id for s in batch.samples]
            positions += pb.positions
            logits = None  # the first model pass's logits serve the model-free baselines
            for method in methods:
                explanation = explainers[method](batch.images, explain_targets(batch, target_policy),
                                                 logits=logits)
                logits = explanation.logits
                parts[method]["maps"].append(explanation.maps.detach().float().cpu())
                parts[method]["logits"].append(explanation.logits.detach().float().cpu())
                parts[method]["targets"].append(explanation.targets.detach().cpu())
        for method in methods:
            p = parts[method]
            explainer = explainers[method]
            empty_grid = getattr(explainer, "grid", (0, 0))
            stores[method].save(Shard(
                index=shard_index,
                maps=torch.cat(p["maps"]) if p["maps"] else torch.zeros(0, *empty_grid),
                logits=torch.cat(p["logits"]) if p["logits"] else torch.zeros(0, 0),
                targets=torch.cat(p["targets"]) if p["targets"] else torch.zeros(0, dtype=torch.long),
                positions=torch.tensor(positions, dtype=torch.long), image_ids=ids, skipped=skipped,
                target_source="given" if target_policy == "label" else "predicted",
                class_specific=bool(explainer.class_specific)))
            computed[method] += 1
    bar.close()
    return computed


@dataclass
class MethodBatch:
    """Everything a scorer may need about one method on one batch (all on CPU)."""

    method: str
    samples: list[Sample]
    images: torch.Tensor  # normalised model input [B, 3, H, W]
    maps: torch.Tensor  # raw [B, gh, gw]
    heatmaps: torch.Tensor  # [B, H, W] in [0, 1]
    degenerate: torch.Tensor  # bool [B]
    logits: torch.Tensor  # [B, C] of the clean images
    targets: torch.Tensor  # [B], the class each map explains
    gt: GroundTruth
    shard: Shard  # the stored shard the rows come from (target source, class specificity)
    positions: list[int]  # dataset positions of the samples

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([int(s.label) for s in self.samples], dtype=torch.long)


class Scorer(Protocol):
    """A metric fed batch by batch; `finish` writes its output and returns a summary."""

    def update(self, mb: MethodBatch) -> None: ...

    def finish(self) -> object: ...


class LocalizationRecords:
    """Per-image AG-CAM pixel scores at fixed thresholds, appended to records.csv per batch."""

    def __init__(self, path: Path, thresholds: list[float], *, dataset_name: str, split: str,
                 box_protocol: str, has_masks: bool) -> None:
        if not thresholds:
            raise ValueError("metric.thresholds is empty; give at least one threshold, e.g. [0.5]")
        self.thresholds, self.dataset_name, self.split = thresholds, dataset_name, split
        self.box_protocol = box_protocol
        self.writer = RecordWriter(path, ID_COLUMNS + metric_columns(has_masks))

    def update(self, mb: MethodBatch) -> None:
        per_threshold = score_heatmaps(mb.heatmaps, mb.gt, self.thresholds, self.box_protocol)
        predictions, targets = mb.predictions, mb.targets
        rows = []
        for threshold, scores in zip(self.thresholds, per_threshold):
            for i, sample in enumerate(mb.samples):
                rows.append({
                    "image_id": sample.image_id, "dataset": self.dataset_name, "split": self.split,
                    "method": mb.method, "threshold": threshold, "label": sample.label,
                    "prediction": int(predictions[i]), "target": int(targets[i]),
                    "target_source": mb.shard.target_source,
                    "class_specific": int(mb.shard.class_specific),
                    "correct": int(predictions[i] == sample.label),
                    "degenerate": int(mb.degenerate[i]), "n_gt_boxes": mb.gt.num_boxes[i],
                    **scores[i],
                })
        self.writer.write(rows)

    def finish(self) -> Path:
        self.writer.close()
        return self.writer.path


def rows_at(shard: Shard, positions: list[int]) -> torch.Tensor:
    """Row indices of dataset `positions` in a stored shard."""
    where = {int(p): i for i, p in enumerate(shard.positions)}
    missing = [p for p in positions if p not in where]
    if missing:
        raise RuntimeError(f"stored shard {shard.index} lacks dataset positions {missing[:5]}: the "
                           "dataset changed since the maps were stored; delete that cache folder")
    return torch.tensor([where[p] for p in positions], dtype=torch.long)


def has_masks(dataset: Dataset) -> bool:
    """Whether the dataset's items carry segmentation masks (read from its first usable item)."""
    for position in range(len(dataset)):
        item = dataset[position]
        if isinstance(item, Sample):
            return item.mask is not None
    return False


def score_dataset(stores: dict[str, MapStore], dataset: Dataset, scorers: Sequence[Scorer], *,
                  box_protocol: str = "agcam", batch_size: int = 16, num_workers: int = 0,
                  progress: bool = True) -> list[tuple[str, str]]:
    """Feed every stored map, batch by batch with its ground truth, to every scorer. Returns
    the (image_id, reason) of the items the dataset skipped."""
    n = len(dataset)
    reference = next(iter(stores.values()))
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=n, desc="scoring", unit="img", disable=not progress)
    for shard_index in range(reference.num_shards(n)):
        shards = {m: s.load(shard_index) for m, s in stores.items()}
        for pb in shard_batches(dataset, reference.shard_positions(shard_index, n), batch_size, num_workers,
                                bar, skipped):
            batch = pb.batch
            size = tuple(batch.images.shape[-2:])
            gt = ground_truth(batch.samples, size, box_protocol)
            for method, shard in shards.items():
                rows = rows_at(shard, pb.positions)
                maps = shard.maps[rows]
                heat, degenerate = to_heatmaps(maps, size)
                mb = MethodBatch(method=method, samples=batch.samples, images=batch.images, maps=maps,
                                 heatmaps=heat, degenerate=degenerate, logits=shard.logits[rows],
                                 targets=shard.targets[rows], gt=gt, shard=shard,
                                 positions=pb.positions)
                for scorer in scorers:
                    scorer.update(mb)
    bar.close()
    return skipped


def run_localization(explainers: dict[str, Explainer], dataset: Dataset, *, records_path: Path,
                     thresholds: list[float], dataset_name: str, split: str, store_root: Path,
                     store_settings: dict | None = None, target_policy: str = "predicted",
                     batch_size: int = 16, num_workers: int = 0, box_protocol: str = "agcam",
                     shard_size: int = 256, progress: bool = True) -> dict[str, MapStore]:
    """Explain (what the store lacks) and score every image with every method, writing one
    record per (image, method, threshold) to `records_path`. Returns the stores."""
    if not thresholds:
        raise ValueError("metric.thresholds is empty; give at least one threshold, e.g. [0.5]")
    base = dict(store_settings or {}, target_policy=target_policy)
    stores = {m: MapStore(store_root, {**base, "method": m}, shard_size) for m in explainers}
    explain_dataset(explainers, stores, dataset, target_policy=target_policy, batch_size=batch_size,
                    num_workers=num_workers, progress=progress)
    records = LocalizationRecords(records_path, thresholds, dataset_name=dataset_name, split=split,
                                  box_protocol=box_protocol, has_masks=has_masks(dataset))
    try:
        score_dataset(stores, dataset, [records], box_protocol=box_protocol, batch_size=batch_size,
                      num_workers=num_workers, progress=progress)
    finally:
        records.finish()
    return stores
