"""The benchmark loop: one pass over the data, shard by shard, that decodes every image once.

For each batch, every method's maps come from the map store, or, for a shard the store does
not hold yet, from the explainer (for the run's target policy and, when a scorer needs them,
the ground-truth class); the batch then goes to every scorer (`run.scorers`): the model-free
share to the scoring pool (`run.scoring_pool`, worker processes when asked), the rest
(faithfulness) in this process. Each shard explained is stored when it is complete, so a
killed run resumes at the first missing shard and a finished one is re-scored with no model pass.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from wsol_bench.choices import TARGET_POLICIES
from wsol_bench.datasets.base import Batch, Sample, collate_samples
from wsol_bench.errors import SettingError
from wsol_bench.methods.base import Explainer
from wsol_bench.run.batch import BatchJob, BatchTruth, MethodBatch
from wsol_bench.run.scorers.base import Scorer
from wsol_bench.run.scoring_pool import ScoringPool
from wsol_bench.run.store import InvalidShard, MapStore, Shard

log = logging.getLogger("wsol_bench")


def explain_targets(batch: Batch, policy: str) -> torch.Tensor | None:
    """Targets handed to the explainer: the ground-truth labels, or None (predicted class)."""
    if policy not in TARGET_POLICIES:
        raise SettingError(f"unknown target policy {policy!r}; valid: {TARGET_POLICIES}")
    return batch.labels if policy == "label" else None


@dataclass
class PositionedBatch:
    """A batch and the dataset positions of its (non-skipped) samples."""

    batch: Batch
    positions: list[int]

    def pin_memory(self) -> PositionedBatch:
        """Called by the DataLoader with pin_memory=True: page-locked images copy to the GPU
        asynchronously."""
        self.batch.images = self.batch.images.pin_memory()
        return self


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
                    num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches of the items at `positions`, in order, each with its dataset positions."""
    return DataLoader(Subset(_WithPositions(dataset), list(positions)), batch_size=batch_size,
                      shuffle=False, num_workers=num_workers, collate_fn=_collate_positioned,
                      pin_memory=pin_memory)


def shard_batch_plan(shards: Sequence[tuple[int, Sequence[int]]], batch_size: int) -> list[tuple[int, list[int]]]:
    """(shard index, positions) of every batch: each shard's positions in chunks of
    `batch_size`, so no batch spans two shards (a shard's maps never depend on its neighbour)."""
    return [(index, list(positions[k:k + batch_size])) for index, positions in shards
            for k in range(0, len(positions), batch_size)]


def block_batches(dataset: Dataset, shards: Sequence[tuple[int, Sequence[int]]], batch_size: int,
                  num_workers: int = 0, pin_memory: bool = False) -> Iterator[tuple[int, PositionedBatch]]:
    """(shard index, batch) over every position of `shards` in order, from one DataLoader (its
    workers start once and read ahead across shard boundaries)."""
    plan = shard_batch_plan(shards, batch_size)
    if not plan:
        return
    loader = DataLoader(_WithPositions(dataset), batch_sampler=[positions for _, positions in plan],
                        num_workers=num_workers, collate_fn=_collate_positioned, pin_memory=pin_memory)
    for (index, _), pb in zip(plan, loader):
        yield index, pb


@dataclass
class PassReport:
    """What one pass saw: the (image_id, reason) of the items the dataset skipped, how many
    images carry each loader note (Sample.notes), the shards explained per (policy, method),
    and seconds per stage: loading, explaining (and explaining/<method>), scoring_here (and
    scoring_here/<scorer>: the scorers fed in this process), scoring_kernels (and
    scoring_kernels/<scorer>: the model-free kernels, in this process or summed over the scoring
    workers) and scoring_wait (this process in the pool: running the kernels when there are no
    scoring workers, else waiting for them)."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)
    explained: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)


class _ShardParts:
    """The maps, logits and targets of one method explained batch by batch within a shard, and
    whether its explanations said they depend on the target class."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.class_specific: bool | None = None
        self.claimed = False  # whether this process holds the shard's lock (or found it stored)

    def shard(self, index: int, store: MapStore, positions: list[int], ids: list[str], skipped,
              target_source: str) -> Shard:
        """The shard to store. An empty one (every item skipped) takes its map shape and class
        specificity from the store's settings: no explainer is built for it."""
        specific = store.class_specific if self.class_specific is None else self.class_specific
        return Shard(index=index,
                     maps=torch.cat(self.maps) if self.maps else torch.zeros(0, *(store.grid or (0, 0))),
                     logits=torch.cat(self.logits) if self.logits else torch.zeros(0, 0),
                     targets=torch.cat(self.targets) if self.targets else torch.zeros(0, dtype=torch.long),
                     positions=torch.tensor(positions, dtype=torch.long), image_ids=ids, skipped=skipped,
                     target_source=target_source, class_specific=specific)


def stored_shard(store: MapStore, index: int, num_items: int) -> Shard | None:
    """Shard `index` of `store`, or None when it must be computed: no file, or one that fails
    validation (reported and removed)."""
    if not store.has(index):
        return None
    try:
        return store.load(index, num_items)
    except InvalidShard as exc:
        log.warning("%s; it is recomputed", exc)
        store.shard_path(index).unlink(missing_ok=True)
        return None


@dataclass
class _ShardState:
    """The shard being processed: its stored shards (None where computed now), what is being
    computed, and the ids, positions and skipped items seen so far."""

    index: int
    held: dict[tuple[str, str], Shard | None]
    num_items: int = 0  # of the dataset
    parts: dict[tuple[str, str], _ShardParts] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.parts = {key: _ShardParts() for key, shard in self.held.items() if shard is None}


MapRows = tuple[torch.Tensor, torch.Tensor, torch.Tensor, str, bool]  # maps, logits, targets, source, specific


def _batch_maps(state: _ShardState, stores: dict[str, dict[str, MapStore]], explainer: Callable[[str], Explainer],
                batch: Batch, positions: list[int], ids: list[str], seconds: Counter) -> dict[tuple[str, str], MapRows]:
    """Every (policy, method)'s maps of one batch: the stored rows, or explained now (its time
    added to seconds["explaining/<method>"])."""
    got: dict[tuple[str, str], MapRows] = {}
    for policy, named in stores.items():
        logits = None  # the first model pass's logits serve the model-free baselines
        for m in named:
            shard = state.held[(policy, m)]
            if shard is None and not state.parts[(policy, m)].claimed:
                shard = _claim(state, stores[policy][m], (policy, m), explainer if policy != "label" else None)
            if shard is not None:
                rows = shard.rows_at(positions, ids)
                got[(policy, m)] = (shard.maps[rows], shard.logits[rows], shard.targets[rows],
                                    shard.target_source, shard.class_specific)
                continue
            start = time.perf_counter()
            part = state.parts[(policy, m)]
            predicted = got.get(("predicted", m)) if policy == "label" else None
            if predicted is not None:
                maps, logits_rows, targets = _label_maps_from_predicted(partial(explainer, m), batch, predicted)
                source, specific = "given", predicted[4]
            else:
                explained = explainer(m)(batch.images, explain_targets(batch, policy), logits=logits)
                logits = explained.logits
                maps, logits_rows, targets = explained.maps, explained.logits, explained.targets
                source, specific = explained.target_source, bool(explained.class_specific)
            # the copy waits for the device; maps are scored as the store keeps them
            part.maps.append(stores[policy][m].round_maps(maps.detach().float().cpu()))
            part.logits.append(logits_rows.detach().float().cpu())
            part.targets.append(targets.detach().cpu())
            part.class_specific = specific
            seconds[f"explaining/{m}"] += time.perf_counter() - start
            got[(policy, m)] = (part.maps[-1], part.logits[-1], part.targets[-1], source, specific)
    return got


def _claim(state: _ShardState, store: MapStore, key: tuple[str, str],
           explainer: Callable[[str], Explainer] | None) -> Shard | None:
    """Before the first batch of a shard is explained: build the explainer (so a model that
    cannot load is refused before anything is written), then take the shard's lock. Returns the
    shard when another process stored it meanwhile (it is used, not computed again)."""
    if explainer is not None:
        explainer(key[1])
    state.parts[key].claimed = True
    shard = store.claim(state.index, state.num_items)
    if shard is not None:
        state.held[key] = shard
        del state.parts[key]
    return shard


def _label_maps_from_predicted(explainer: Callable[[], Explainer], batch: Batch, predicted: MapRows
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's ground-truth-class maps, logits and targets from its predicted-class maps: a map
    of a method that is not class-specific, or of an image whose predicted class is its label,
    is the same map; only the other images are explained (for the label), as one smaller batch."""
    maps, logits, targets, _, specific = predicted
    labels = batch.labels.to(targets.device)
    maps, logits = maps.clone(), logits.clone()
    need = (targets != labels).nonzero()[:, 0] if specific else torch.zeros(0, dtype=torch.long)
    if len(need):
        explained = explainer()(batch.images[need], labels[need])  # built only when an image needs it
        maps[need] = explained.maps.detach().float().cpu()
        logits[need] = explained.logits.detach().float().cpu()
    return maps, logits, labels.clone()


def _finish_shard(state: _ShardState, stores: dict[str, dict[str, MapStore]], here: Sequence[Scorer],
                  report: PassReport) -> None:
    """Tell the main-process scorers the shard is complete and store what was explained (a
    shard whose items were all skipped too, without building an explainer)."""
    for scorer in here:
        scorer.end_shard(state.index)
    for (policy, m), part in state.parts.items():
        store = stores[policy][m]
        store.save(part.shard(state.index, store, state.positions, state.ids, state.skipped,
                              "given" if policy == "label" else "predicted"))
        report.explained[(policy, m)] += 1
    report.skipped += state.skipped


def process_dataset(stores: dict[str, dict[str, MapStore]], dataset: Dataset, scorers: Sequence[Scorer], *,
                    explainer: Callable[[str], Explainer], target_policy: str = "predicted",
                    shards: Sequence[int] | None = None, box_protocol: str = "agcam", batch_size: int = 16,
                    num_workers: int = 0, scoring_workers: int = 0, pin_memory: bool = False,
                    progress: bool = True) -> PassReport:
    """Explain what the stores lack and score every image of `shards` (default: all).

    stores: {target policy: {method: store}}, the run's `target_policy` first, then "label"
    when a scorer needs the ground-truth class's maps. explainer(method): the method's explainer,
    built on first call (only when some shard is missing). Scorers with a kernel run it in
    `scoring_workers` processes (0: here); the others take each batch here.
    """
    if target_policy not in TARGET_POLICIES:
        raise SettingError(f"unknown target policy {target_policy!r}; valid: {TARGET_POLICIES}")
    unknown = set(stores) - set(TARGET_POLICIES)
    if unknown or target_policy not in stores:
        raise ValueError(f"stores must be keyed by target policy {TARGET_POLICIES}, got {sorted(stores)}")
    n = len(dataset)
    methods = list(stores[target_policy])
    reference = stores[target_policy][methods[0]]
    shard_list = list(range(reference.num_shards(n)) if shards is None else shards)
    labels_needed = "label" in stores and any(getattr(s, "needs_label_maps", False) for s in scorers)
    here = [s for s in scorers if s.kernel is None]
    report = PassReport()
    bar = tqdm(total=sum(len(reference.shard_positions(i, n)) for i in shard_list), desc="images", unit="img",
               disable=not progress)
    clock = time.perf_counter
    with ScoringPool(scorers, scoring_workers) as pool, _claims_released(stores):
        state: _ShardState | None = None
        batches = block_batches(dataset, [(i, reference.shard_positions(i, n)) for i in shard_list], batch_size,
                                num_workers, pin_memory)
        while True:
            start = clock()
            index, pb = next(batches, (None, None))
            report.seconds["loading"] += clock() - start
            if state is not None and index != state.index:  # the shard is complete
                _finish_shard(state, stores, here, report)
                state = None
            if pb is None:
                break
            if state is None:
                state = _ShardState(index, {(policy, m): stored_shard(store, index, n)
                                            for policy, named in stores.items() for m, store in named.items()},
                                    num_items=n)
            batch = pb.batch
            state.skipped += [(s.image_id, s.reason) for s in batch.skipped]
            bar.update(len(batch) + len(batch.skipped))
            if not len(batch):
                continue
            batch_ids = [s.image_id for s in batch.samples]
            state.ids += batch_ids
            state.positions += pb.positions
            report.notes.update(note for s in batch.samples for note in s.notes)
            start = clock()
            got = _batch_maps(state, stores, explainer, batch, pb.positions, batch_ids, report.seconds)
            report.seconds["explaining"] += clock() - start
            truth = BatchTruth(batch.samples, tuple(batch.images.shape[-2:]), box_protocol)
            method_batches = []
            for m in methods:
                maps, logits, targets, source, specific = got[(target_policy, m)]
                label = got[("label", m)] if labels_needed else None
                method_batches.append(MethodBatch(
                    method=m, truth=truth, maps=maps, logits=logits, targets=targets, positions=pb.positions,
                    shard_index=index, target_source=source, class_specific=specific, images=batch.images,
                    label_maps=label[0] if label else None, label_logits=label[1] if label else None))
            start = clock()
            pool.submit(BatchJob.without_pixels(method_batches))
            report.seconds["scoring_wait"] += clock() - start
            start = clock()
            for scorer in here:
                scorer_start = clock()
                for mb in method_batches:
                    scorer.update(mb)
                report.seconds[f"scoring_here/{scorer.name}"] += clock() - scorer_start
            report.seconds["scoring_here"] += clock() - start
        start = clock()
        pool.drain()
        report.seconds["scoring_wait"] += clock() - start
        for name, spent in pool.kernel_seconds.items():
            report.seconds[f"scoring_kernels/{name}"] += spent
        report.seconds["scoring_kernels"] += sum(pool.kernel_seconds.values())
    bar.close()
    return report


@contextmanager
def _claims_released(stores: dict[str, dict[str, MapStore]]) -> Iterator[None]:
    """Release, when the pass ends (an error or an interrupt included), the shard locks taken
    for shards that were not stored."""
    try:
        yield
    finally:
        for named in stores.values():
            for store in named.values():
                store.release_claims()


def has_masks(dataset: Dataset) -> bool:
    """Whether the dataset's items carry segmentation masks (read from its first usable item)."""
    for position in range(len(dataset)):
        item = dataset[position]
        if isinstance(item, Sample):
            return item.mask is not None
    return False
