"""model_randomisation.csv (`measure=[model_randomisation]`): the model-parameter randomisation
test of Adebayo et al. (NeurIPS 2018; docs/protocol.md 5.8). Each method's map is explained
again on copies of the model whose layer units (head, blocks, patch embedding) are
re-initialised, top-down and keeping the earlier ones (`order: cascading`) or one at a time
(`independent`, then all at once), and compared with the run's map by Spearman rank
correlation, SSIM and top-k intersection. A method whose map depends on what the model learned
falls towards 0 as more is randomised; one whose map does not (the `random` and `center`
baselines) stays at 1 and fails the check.

Cost per image and method: one explanation per state: L + 2 for a model of L blocks
(cascading), L + 3 (independent), besides the run's own map. The randomised maps are cached in
the map store beside the method's maps, keyed by the method's map key, the randomised units and
the seed, so a re-scoring run (e.g. another `top_k`) explains nothing again."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import timm
import torch
from omegaconf import DictConfig

import wsol_bench.metrics.randomisation as engine_module
from wsol_bench.errors import SettingError, counted
from wsol_bench.metrics.randomisation import (
    FULL,
    ORDERS,
    SIMILARITIES,
    MapComparison,
    RandomisedModels,
    model_units,
    randomisation_states,
)
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.report.run_folder import RunFolder
from wsol_bench.report.tables import require_columns
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.maps import as_dict, build_transform
from wsol_bench.run.scorers.base import MeasureTables, RunContext, register_scorer
from wsol_bench.run.scorers.measure_rows import MeasureRows
from wsol_bench.run.scorers.perturbation import (
    method_means,
    per_image_values,
    ranked_columns,
    source_digest,
    unscored_notes,
)
from wsol_bench.run.store import InvalidShard, MapStore, Shard

log = logging.getLogger("wsol_bench")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_seed(seed, where: str) -> None:
    """Refuse a seed that is no integer in [0, 2**63 - 1)."""
    if not _is_int(seed) or not 0 <= seed < 2**63 - 1:
        raise SettingError(f"{where}.seed={seed!r} must be an integer >= 0 (64-bit), e.g. 42")


def check_top_k(top_k, where: str, pixels: int | None = None) -> None:
    """Refuse a top_k that is no integer in [1, pixels of a heatmap]."""
    if not _is_int(top_k) or top_k < 1:
        raise SettingError(f"{where}.top_k={top_k!r} must be an integer >= 1 (the number of most salient "
                           "pixels compared, e.g. 1000)")
    if pixels is not None and top_k > pixels:
        raise SettingError(f"{where}.top_k={top_k} exceeds the {pixels} pixels of a heatmap at the evaluation "
                           f"size; choose top_k <= {pixels}")


def input_pixels(cfg: DictConfig) -> int:
    """The pixels of a heatmap at the run's evaluation size (the model input)."""
    height, width = build_transform(cfg).size
    return int(height) * int(width)


@dataclass(frozen=True)
class ModelRandomisationSettings:
    """The order of the randomisation, its seed (Quantus' convention: each module is
    re-initialised after `torch.manual_seed(seed + 1)`) and k of the top-k intersection."""

    order: str = "cascading"
    seed: int = 42
    top_k: int = 1000

    def __post_init__(self) -> None:
        where = "measure.model_randomisation.params"
        if self.order not in ORDERS:
            raise SettingError(f"{where}.order={self.order!r} is not an order; valid: {', '.join(ORDERS)}")
        check_seed(self.seed, where)
        check_top_k(self.top_k, where)


class StateMaps:
    """One method's maps on one randomised model, cached shard by shard in a map store beside the
    method's own maps: a batch's maps are read from the stored shard, or explained and kept
    until the shard ends, then stored when this run explained every image of it."""

    def __init__(self, store: MapStore) -> None:
        self.store = store
        self._shard: tuple[int, Shard | None] | None = None  # the stored shard last read
        self._parts: dict[int, list[tuple[list[int], list[str], torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def lookup(self, mb: MethodBatch) -> torch.Tensor | None:
        """The stored maps of the batch's images, or None (not stored, or stored for other images)."""
        if self._shard is None or self._shard[0] != mb.shard_index:
            self._shard = (mb.shard_index, self._load(mb.shard_index))
        shard = self._shard[1]
        if shard is None:
            return None
        try:
            return shard.maps[shard.rows_at(mb.positions, [s.image_id for s in mb.samples])]
        except InvalidShard as exc:
            log.warning("%s; they are explained again", exc)
            return None

    def _load(self, index: int) -> Shard | None:
        if not self.store.has(index):
            return None
        try:
            return self.store.load(index)
        except InvalidShard as exc:  # damaged or of another setting: recomputed, then stored over it
            log.warning("%s; it is recomputed", exc)
            return None

    def keep(self, mb: MethodBatch, maps: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Keep a batch's explained maps for the shard file; returns them as the store keeps them
        (so this run scores exactly what a re-scoring run reads back)."""
        maps = self.store.round_maps(maps)
        self._parts.setdefault(mb.shard_index, []).append(
            (list(mb.positions), [s.image_id for s in mb.samples], maps, logits.float(), mb.targets))
        return maps

    def finish(self, index: int, seen: int) -> None:
        """Shard `index` is over: store its maps when they cover all `seen` images of it."""
        parts = self._parts.pop(index, [])
        if not parts or sum(len(p[0]) for p in parts) != seen:
            return  # some images came from the rows cache or had a degenerate map: nothing to store
        positions, ids, maps, logits, targets = zip(*parts)
        self.store.save(Shard(index=index, maps=torch.cat(maps), logits=torch.cat(logits), targets=torch.cat(targets),
                              positions=torch.tensor([p for part in positions for p in part], dtype=torch.long),
                              image_ids=[i for part in ids for i in part], skipped=[], target_source="given",
                              class_specific=self.store.class_specific))


def comparison_tables(cls: type[MeasureRows], run: RunFolder, rows: pd.DataFrame, flag: str, what: str
                      ) -> MeasureTables:
    """The mean of each of `cls.table_columns` per method over its `rows` (of `cls.file` in
    `run`), and notes: rows missing, the run's maps degenerate, and the images whose
    comparison map was degenerate (`flag` = 1), scored as an empty map."""
    source = str(run.path / cls.file)
    require_columns(rows, ["image_id", "method", "degenerate", flag], source)
    names = {column: name for column, name in cls.table_columns.items() if column in rows.columns}
    summary = method_means(rows, names, cls.count_column, source, scale=cls.table_scale, replicates=run.replicates)
    notes = unscored_notes(rows, run.records, cls.file, cls.name)
    notes += [f"{method}: {what} is degenerate (constant or NaN/inf) for {counted(int(count), 'image')}; "
              f"{cls.name} scores it as an empty map (Spearman and top-k 0)."
              for method, count in rows[rows[flag] == 1].groupby("method", sort=False).size().items()]
    return MeasureTables(summary=summary, caption=cls.caption, notes=notes,
                         per_image=per_image_values(rows, names, cls.table_scale),
                         better=ranked_columns(cls.better, names))


@register_scorer("model_randomisation")
class ModelRandomisation(MeasureRows):
    """Spearman, SSIM and top-k intersection of each map with its maps on randomised models."""

    file = "model_randomisation.csv"
    settings_class = ModelRandomisationSettings
    uses_model = True
    engine = (engine_module,)
    table_columns: ClassVar[dict[str, str]] = {"spearman": "MPRT Spearman", "ssim": "MPRT SSIM", "topk": "MPRT top-k"}
    count_column = "n_images_model_randomisation"
    # a map that stays alike under a randomised model fails; Spearman, Adebayo et al.'s headline, is ranked
    better: ClassVar[dict[str, str]] = {"spearman": "lower"}
    caption = ("MPRT Spearman, SSIM, top-k: similarity of the map to the map on the fully randomised model "
               "(model_randomisation_states.csv: each state), 1 = unchanged, lower is better, mean over all images "
               "(n_images_model_randomisation).")
    table_scale = 1.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.states: list[tuple[str, tuple[str, ...]]] = []  # (state, randomised units), set by from_config
        self._models: RandomisedModels | None = None  # built on the first batch that needs a randomised map
        self._explainers: dict[str, object] = {}  # method -> its explainer on the working copy
        self._caches: dict[tuple[str, tuple[str, ...]], StateMaps] = {}

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> ModelRandomisation | None:
        scorer = super().from_config(cfg, context)
        if scorer is not None:  # the model's units and k are checked before any model pass
            check_top_k(scorer.settings.top_k, "measure.model_randomisation.params", input_pixels(cfg))
            with torch.device("meta"):  # the architecture only: no weights are read
                architecture = timm.create_model(cfg.model.name, pretrained=False, **as_dict(cfg.model.kwargs))
            scorer.states = randomisation_states(model_units(architecture), scorer.settings.order)
        return scorer

    def row_columns(self) -> list[str]:
        per_state = [f"{name}_{state}" for state, _ in self.states if state != FULL for name in SIMILARITIES]
        return [*per_state, *SIMILARITIES, "degenerate_states", "degenerate_random"]

    def measure(self, model, mb: MethodBatch, keep: torch.Tensor, heat: torch.Tensor, classes: torch.Tensor,
                logits: torch.Tensor) -> list[dict[str, float]]:
        size, last = tuple(heat.shape[-2:]), self.states[-1][0]
        device = next(model.parameters()).device  # the comparisons run where the model does
        comparison = MapComparison(heat.to(device), self.settings.top_k)
        columns: dict[str, torch.Tensor] = {"degenerate_states": torch.zeros(len(keep), dtype=torch.long)}
        for state, randomised in self.states:
            random_heat, degenerate = to_heatmaps(self.state_maps(model, mb, randomised)[keep].to(device), size)
            degenerate = degenerate.cpu()
            columns["degenerate_states"] += degenerate
            for name in SIMILARITIES:  # a degenerate map's heatmap is empty (MapComparison)
                value = comparison.similarity(name, random_heat).cpu()
                if state != FULL:
                    columns[f"{name}_{state}"] = value
                if state == last:  # the fully randomised model: the table's columns
                    columns[name] = value
            if state == last:
                columns["degenerate_random"] = degenerate.long()
        order = self.row_columns()
        return [dict(zip(order, values)) for values in zip(*(columns[c].tolist() for c in order))]

    def state_maps(self, model: torch.nn.Module, mb: MethodBatch, randomised: tuple[str, ...]) -> torch.Tensor:
        """Raw maps [B, ...] of every image of `mb` on the model with units `randomised`
        re-initialised, for the classes the run's maps explain: stored, or explained now."""
        cache = self._cache(mb.method, randomised)
        maps = cache.lookup(mb)
        if maps is not None:
            return maps
        if self._models is None:  # drawn once per run, on the first batch that needs a randomised map
            self._models = RandomisedModels(model, self.settings.seed)
        working = self._models.model_with(randomised)
        if mb.method not in self._explainers:
            self._explainers[mb.method] = self.explainer_on(working, mb.method)
        explained = self._explainers[mb.method](mb.images, mb.targets, logits=mb.logits)
        return cache.keep(mb, explained.maps.detach().float().cpu(), explained.logits.detach().cpu())

    def _cache(self, method: str, randomised: tuple[str, ...]) -> StateMaps:
        """The map cache of `method` on the model with `randomised` units: the method's map key
        plus the randomised units (not the order: the same model serves both orders), the seed
        and the re-initialisation code."""
        key = (method, randomised)
        if key not in self._caches:
            own = self.stores[method]
            settings = {**own.settings, "maps_of": own.key,
                        "randomisation": {"randomised": list(randomised), "seed": self.settings.seed,
                                          "code": source_digest(self.engine)}}
            self._caches[key] = StateMaps(MapStore(own.folder.parent, settings, own.shard_size, grid=own.grid,
                                                   dtype=str(own.map_dtype).removeprefix("torch."),
                                                   class_specific=own.class_specific))
        return self._caches[key]

    def end_shard(self, shard_index: int) -> None:
        """Store the randomised maps of a shard this run explained whole, then the rows."""
        for (method, _), cache in self._caches.items():
            cache.finish(shard_index, self._seen.get((method, shard_index), -1))
        super().end_shard(shard_index)

    @classmethod
    def tables(cls, run: RunFolder) -> MeasureTables | None:
        """The fully randomised state's mean similarities per method, and every state's in
        `model_randomisation_states` (the curve of Adebayo et al.'s figures)."""
        rows = run.per_image_rows(cls.file)
        if rows is None:
            return None
        found = comparison_tables(cls, run, rows, "degenerate_random", "its map on the fully randomised model")
        per_state = [c for c in rows.columns if any(c.startswith(f"{name}_") for name in SIMILARITIES)]
        found.files["model_randomisation_states"] = rows.groupby("method", sort=False)[per_state].mean().reset_index()
        return found
