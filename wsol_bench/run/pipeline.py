"""The benchmark loop in two stages.

1. `explain_dataset`: one explainer pass per batch and method, only for the shards the map
   store does not hold yet; each finished shard is written at once, so a killed run resumes
   where it stopped and a finished one costs nothing to re-score.
2. `score_dataset`: stored maps -> heatmaps and ground truth -> every scorer of the run
   (`run.scorers`: per-image records, sweeps, wsolevaluation metrics, faithfulness), batch by
   batch. No model pass unless a scorer needs one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from wsol_bench.datasets.base import Batch, Sample, collate_samples
from wsol_bench.methods.base import Explainer
from wsol_bench.metrics.localization import ground_truth
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.scorers.base import Scorer
from wsol_bench.run.store import MapStore, Shard

TARGET_POLICIES = ("predicted", "label")


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


def has_masks(dataset: Dataset) -> bool:
    """Whether the dataset's items carry segmentation masks (read from its first usable item)."""
    for position in range(len(dataset)):
        item = dataset[position]
        if isinstance(item, Sample):
            return item.mask is not None
    return False


def score_dataset(stores: dict[str, MapStore], dataset: Dataset, scorers: Sequence[Scorer], *,
                  box_protocol: str = "agcam", batch_size: int = 16, num_workers: int = 0,
                  progress: bool = True) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Feed every stored map, batch by batch with its ground truth, to every scorer. Returns
    the (image_id, reason) of the items the dataset skipped, and how many images carry each
    note of what the loader changed (Sample.notes)."""
    n = len(dataset)
    reference = next(iter(stores.values()))
    skipped: list[tuple[str, str]] = []
    notes: Counter[str] = Counter()
    bar = tqdm(total=n, desc="scoring", unit="img", disable=not progress)
    for shard_index in range(reference.num_shards(n)):
        shards = {m: s.load(shard_index, n) for m, s in stores.items()}
        for pb in shard_batches(dataset, reference.shard_positions(shard_index, n), batch_size, num_workers,
                                bar, skipped):
            batch = pb.batch
            notes.update(note for s in batch.samples for note in s.notes)
            size = tuple(batch.images.shape[-2:])
            gt = ground_truth(batch.samples, size, box_protocol)
            ids = [s.image_id for s in batch.samples]
            for method, shard in shards.items():
                rows = shard.rows_at(pb.positions, ids)
                maps = shard.maps[rows]
                heat, degenerate = to_heatmaps(maps, size)
                mb = MethodBatch(method=method, samples=batch.samples, images=batch.images, maps=maps,
                                 heatmaps=heat, degenerate=degenerate, logits=shard.logits[rows],
                                 targets=shard.targets[rows], gt=gt, shard=shard,
                                 positions=pb.positions)
                for scorer in scorers:
                    scorer.update(mb)
    bar.close()
    return skipped, dict(notes)
