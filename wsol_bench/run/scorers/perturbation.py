"""The shared part of every measure that passes perturbed copies of the images through the
model (the `faithfulness` group: ABPC, deletion and insertion, Chefer et al.'s perturbation
test, ROAD, SaCo): one row per image and method, appended to the measure's CSV batch by batch,
and cached per shard next to the maps it scores, so a killed run does not redo finished shards
and a re-scoring run costs no model pass.

A measure subclasses `PerturbationRows` in its own file: the `faithfulness.mode` values it
answers, its CSV, which maps it scores (the ground-truth class's, or the run's own), its
settings, and `score` (the rows of one batch's non-degenerate maps, from its engine in
`wsol_bench.metrics`). A degenerate map (constant or NaN/inf) ranks its pixels by nothing, so it
gets no scores (NaN) and is counted apart in the tables.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from wsol_bench.environment import package_version, precision_key
from wsol_bench.errors import InputFileError, agreeing, counted
from wsol_bench.files import atomic_write, disk_full_refused, write_json
from wsol_bench.metrics.bootstrap import Replicates, bound_names
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.report.run_folder import RunFolder
from wsol_bench.report.tables import group_intervals, require_columns, with_bounds_after
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.distributed import Ranks
from wsol_bench.run.scorers.base import MeasureTables, RunContext, Scorer, append_rank_rows
from wsol_bench.run.store import MapStore, settings_key

ID_COLUMNS = ["image_id", "dataset", "split", "method", "label", "prediction", "target", "degenerate"]
log = logging.getLogger("wsol_bench")


def source_digest(modules: tuple[ModuleType, ...]) -> str:
    """sha256 of the engine's source files: cached rows of an edited engine are not reused."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def settings_params(node: DictConfig) -> dict[str, Any]:
    """The `faithfulness` config group as keyword arguments of a settings class (lists become
    tuples: the settings are frozen and hashable)."""
    params = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}


class PerturbationRows(Scorer):
    """Base of the measures that score perturbed images with the model, in the main process."""

    modes: ClassVar[tuple[str, ...]] = ()  # the faithfulness.mode values this measure answers
    file: ClassVar[str] = ""  # its per-image CSV in the run folder
    label_maps: ClassVar[bool] = False  # True: the ground-truth class's maps; False: the run's own (`target`)
    engine: ClassVar[tuple[ModuleType, ...]] = ()  # the modules whose source is part of the cache key
    # the tables: score column -> table column (averaged per method, in percent), the count column
    # and the caption sentence (`tables`)
    table_columns: ClassVar[dict[str, str]] = {}
    count_column: ClassVar[str] = ""
    caption: ClassVar[str] = ""
    table_scale: ClassVar[float] = 100.0  # the table shows the mean times this (percent for rates and AUCs)
    # score column -> "higher" or "lower": which way is better, for the columns the rankings use
    # (one per property the measure scores; a column absent here is shown, not ranked)
    better: ClassVar[dict[str, str]] = {}

    def __init__(self, model_fn, stores: dict[str, MapStore], settings, path: Path, *, dataset_name: str,
                 split: str, precision: dict | None = None) -> None:
        self.model_fn, self.stores, self.settings = model_fn, stores, settings
        self.path, self.dataset_name, self.split = path, dataset_name, split
        # The chunk size changes speed, not the numbers, so it stays out of the key (as the
        # explanation batch size stays out of the map key); TF32 (`precision`) changes them.
        self.key_settings = {**{k: v for k, v in vars(settings).items() if k != "batch_size"}, **(precision or {})}
        # the package version and the engine's source: rows of an edited engine are recomputed
        self.key = settings_key({self.cache_name(): self.key_settings,
                                 "code": {"wsol_bench": package_version(), "metric": source_digest(self.engine)}})
        self._pending: dict[tuple[str, int], list[dict]] = {}
        self._cached: dict[tuple[str, int], dict[str, dict] | None] = {}
        self._seen: dict[tuple[str, int], int] = {}  # images of (method, shard) fed so far
        self._columns: list[str] | None = None  # the CSV header, once written
        self.needs_label_maps = self.label_maps  # the pass hands this scorer the ground-truth class's maps
        self.path.unlink(missing_ok=True)

    @classmethod
    def cache_name(cls) -> str:
        """The name of this measure's rows in the cache key and folder."""
        return cls.name

    @classmethod
    def asked(cls, cfg: DictConfig) -> bool:
        """Whether the run's configuration selects this measure."""
        return bool(cfg.get("faithfulness")) and cfg.faithfulness.get("mode") in cls.modes

    @classmethod
    def wants_label_maps(cls, cfg: DictConfig) -> bool:
        """Whether a run with `cfg` must explain the ground-truth class for this measure."""
        return cls.asked(cfg) and cls.label_maps

    @classmethod
    def settings_from(cls, node: DictConfig):
        """The measure's settings from the `faithfulness` group (checked by their class)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> PerturbationRows | None:
        if not cls.asked(cfg):
            return None
        settings = cls.settings_from(cfg.faithfulness)  # a bad setting fails before any model pass
        label = cls.wants_label_maps(cfg)
        scorer = cls(context.model, context.label_stores if label else context.target_stores, settings,
                     context.out_dir / cls.file, dataset_name=context.dataset_name, split=context.split,
                     precision=precision_key(str(cfg.device), bool(cfg.tf32)))
        scorer.needs_label_maps = label
        return scorer

    def score(self, model: torch.nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, classes: torch.Tensor,
              labels: torch.Tensor, logits: torch.Tensor) -> list[dict[str, float]]:
        """The score row of each image (every map non-degenerate): `classes` are the classes the
        maps explain, `labels` the dataset's labels, `logits` the clean images' logits."""
        raise NotImplementedError

    def row_columns(self) -> list[str]:
        """The score columns of a row (what a degenerate map's row holds as NaN)."""
        raise NotImplementedError

    def _cache_file(self, method: str, shard_index: int) -> Path:
        return self.stores[method].folder / f"{self.cache_name()}_{self.key}" / f"shard_{shard_index:06d}.csv"

    def _cached_rows(self, method: str, shard_index: int) -> dict[str, dict] | None:
        key = (method, shard_index)
        if key not in self._cached:
            file = self._cache_file(method, shard_index)
            self._cached = {k: v for k, v in self._cached.items() if k[0] != method}  # one shard per method
            self._cached[key] = self._read_cache(file) if file.is_file() else None
        return self._cached[key]

    def _read_cache(self, file: Path) -> dict[str, dict] | None:
        """The cached rows of one shard by image id; an unreadable file is reported and dropped
        (its rows are recomputed)."""
        try:
            frame = pd.read_csv(file)
            if "image_id" not in frame.columns or frame["image_id"].duplicated().any():
                raise ValueError("no unique image_id column")
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            log.warning("%s cache %s is unreadable (%s); its rows are recomputed", self.name, file, exc)
            file.unlink(missing_ok=True)
            return None
        return {str(r["image_id"]): r for r in frame.to_dict("records")}

    def update(self, mb: MethodBatch) -> None:
        key = (mb.method, mb.shard_index)
        self._seen[key] = self._seen.get(key, 0) + len(mb.samples)
        cached = self._cached_rows(mb.method, mb.shard_index)
        if cached is not None and all(s.image_id in cached for s in mb.samples):
            self._append([cached[s.image_id] for s in mb.samples])
            return
        if cached is not None:  # rows of other images: stale, recompute the shard
            log.warning("%s cache %s holds other images; its rows are recomputed", self.name,
                        self._cache_file(mb.method, mb.shard_index))
            self._cache_file(mb.method, mb.shard_index).unlink(missing_ok=True)
            self._cached[(mb.method, mb.shard_index)] = None
        maps, classes, logits = ((mb.label_maps, mb.labels, mb.label_logits) if self.needs_label_maps
                                 else (mb.maps, mb.targets, mb.logits))
        if maps is None or mb.images is None:
            raise ValueError(f"{self.name} needs the batch's images and maps")
        heat, degenerate = to_heatmaps(maps, tuple(mb.images.shape[-2:]))
        values = self._rows(mb, heat, degenerate, classes, logits)
        out = [{"image_id": sample.image_id, "dataset": self.dataset_name, "split": self.split,
                "method": mb.method, "label": label, "prediction": prediction, "target": target,
                "degenerate": int(flag), **row}
               for sample, prediction, label, target, flag, row in zip(
                   mb.samples, logits.argmax(1).tolist(), mb.labels.tolist(), classes.tolist(), degenerate.tolist(),
                   values)]
        self._append(out)
        self._pending.setdefault((mb.method, mb.shard_index), []).extend(out)

    def _rows(self, mb: MethodBatch, heat: torch.Tensor, degenerate: torch.Tensor, classes: torch.Tensor,
              logits: torch.Tensor) -> list[dict[str, float]]:
        """The score row of every image of `mb` (its `heat`maps, the `classes` they explain, the
        clean `logits`); a degenerate map gets no scores (NaN)."""
        rows = [dict.fromkeys(self.row_columns(), float("nan")) for _ in range(len(heat))]
        keep = (~degenerate).nonzero()[:, 0]
        if len(keep):
            scored = self.scored(mb, keep, heat[keep], classes[keep], logits[keep])
            for index, row in zip(keep.tolist(), scored):
                rows[index] = row
        return rows

    def scored(self, mb: MethodBatch, keep: torch.Tensor, heat: torch.Tensor, classes: torch.Tensor,
               logits: torch.Tensor) -> list[dict[str, float]]:
        """The rows of the images `keep` of `mb` (their non-degenerate `heat`maps, `classes` and
        `logits`): `score` with the model."""
        return self.score(self.model_fn(), mb.images[keep], heat, classes, mb.labels[keep], logits)

    def end_shard(self, shard_index: int) -> None:
        """Cache the rows of a shard all of whose images were computed in this run."""
        for (method, index), rows in list(self._pending.items()):
            if index == shard_index:
                if len(rows) == self._seen.get((method, index), -1):
                    self._write_cache(method, index, rows)
                del self._pending[(method, index)]
        self._seen = {k: v for k, v in self._seen.items() if k[1] != shard_index}

    def _append(self, rows: list[dict]) -> None:
        """Append rows in the columns of the file's header (the first batch's): rows whose keys
        come in another order (a degenerate map's, a cached shard's) stay aligned."""
        frame = pd.DataFrame(rows)
        if self._columns is None:
            self._columns = ID_COLUMNS + [c for c in frame.columns if c not in ID_COLUMNS]
        extra = [c for c in frame.columns if c not in self._columns]
        if extra:  # a scorer whose rows change their columns mid-run: a bug, never dropped silently
            raise RuntimeError(f"{self.name}: rows with columns {extra} that {self.path.name}'s header lacks")
        with disk_full_refused(self.path):
            frame.reindex(columns=self._columns).to_csv(self.path, mode="a", header=not self.path.exists(),
                                                        index=False)

    def _write_cache(self, method: str, shard_index: int, rows: list[dict]) -> None:
        file = self._cache_file(method, shard_index)
        file.parent.mkdir(parents=True, exist_ok=True)
        settings_file = file.parent / "settings.json"
        if not settings_file.is_file():
            write_json(settings_file, self.key_settings)
        atomic_write(file, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))

    def gather(self, ranks: Ranks, parts: list[Path]) -> None:
        append_rank_rows(ranks, parts, self.path.name)

    def compute(self) -> pd.DataFrame:
        """Every row written so far (one per image and method)."""
        return pd.read_csv(self.path)

    def write(self, out_dir: Path) -> list[Path]:
        """The per-image CSV is complete (the header alone when no image reached the scorer)."""
        if not self.path.exists():
            pd.DataFrame(columns=ID_COLUMNS + self.row_columns()).to_csv(self.path, index=False)
        return [self.path]

    @classmethod
    def tables(cls, run: RunFolder) -> MeasureTables | None:
        """The mean of each of `table_columns` per method over the images with a score (times
        `table_scale`), and a note for every method whose rows miss images or whose maps are
        degenerate."""
        rows = run.per_image_rows(cls.file)
        if rows is None:
            return None
        names = {column: name for column, name in cls.table_columns.items() if column in rows.columns}
        notes = unscored_notes(rows, run.records, cls.file, cls.name) + cls.row_notes(rows)
        return MeasureTables(summary=method_means(rows, names, cls.count_column, str(run.path / cls.file),
                                                  scale=cls.table_scale, replicates=run.replicates),
                             caption=cls.caption, notes=notes,
                             per_image=per_image_values(rows, names, cls.table_scale),
                             better=ranked_columns(cls.better, names))

    @classmethod
    def row_notes(cls, rows: pd.DataFrame) -> list[str]:
        """Notes of the measure's own on its per-image rows (none by default)."""
        return []


def method_means(rows: pd.DataFrame, names: dict[str, str], count: str, source: str, scale: float = 100.0,
                 replicates: Replicates | None = None) -> pd.DataFrame:
    """Per method (the index, in the rows' order): the mean of each score column in `names` over
    the images with a score (a degenerate map has none), times `scale` (percent), renamed as `names` says,
    with its bootstrap interval bounds when `replicates` are given, and the number of those
    images as `count`. A file that repeats an (image, method) pair, or a non-degenerate row
    without its scores, is an InputFileError naming `source`."""
    require_columns(rows, ["image_id", "method", "degenerate", *names], source)
    repeated = rows.duplicated(["image_id", "method"], keep=False)
    if repeated.any():
        example = rows.loc[repeated, ["image_id", "method"]].iloc[0].tolist()
        raise InputFileError(f"{source}: {int(repeated.sum())} rows repeat an (image_id, method) pair, e.g. "
                             f"{example}; it must hold one row per image and method")
    unscored = rows[list(names)].isna().any(axis=1) & (rows["degenerate"] != 1)
    if unscored.any():
        bad = rows.loc[unscored, "image_id"].tolist()
        raise InputFileError(f"{source}: missing scores for {len(bad)} rows (e.g. {bad[:3]}); rerun the benchmark "
                             "into this folder")
    grouped = rows.groupby("method", sort=False)
    summary = grouped[list(names)].mean().mul(scale)
    if replicates is not None:
        summary = with_bounds_after(summary, group_intervals(rows, "method", list(names), replicates, scale))
    summary = summary.rename(columns={bound: renamed for column, name in names.items()
                                      for bound, renamed in zip((column, *bound_names(column)),
                                                                (name, *bound_names(name)))})
    summary[count] = grouped[next(iter(names))].count()
    return summary


def ranked_columns(better: dict[str, str], names: dict[str, str]) -> dict[str, str]:
    """{table column: "higher" or "lower"} of the score columns of `better` that `names` shows."""
    return {names[column]: way for column, way in better.items() if column in names}


def per_image_values(rows: pd.DataFrame, names: dict[str, str], scale: float = 100.0) -> dict[str, pd.DataFrame]:
    """{table column: its per-image scores (image_id, method, value, in the table's units)} of
    the score columns `names` of per-image rows (a degenerate map's row: NaN, not scored)."""
    scored = rows["degenerate"] != 1 if "degenerate" in rows.columns else pd.Series(True, index=rows.index)
    return {name: pd.DataFrame({"image_id": rows["image_id"].astype(str), "method": rows["method"],
                                "value": rows[column].where(scored) * scale})
            for column, name in names.items() if column in rows.columns}


def unscored_notes(rows: pd.DataFrame, records: pd.DataFrame, file: str, measure: str) -> list[str]:
    """Rows that do not cover every image of a method, and methods with degenerate maps (no
    scores), are reported under the tables, not hidden."""
    totals = records.groupby("method", sort=False)["image_id"].nunique()
    counts = rows.groupby("method", sort=False)["image_id"].nunique()
    notes = [f"{file} covers {int(counts.get(m, 0)):,} of {counted(int(n), 'image')} for {m}."
             for m, n in totals.items() if int(counts.get(m, 0)) != int(n)]
    bad = rows[rows["degenerate"] == 1].groupby("method", sort=False).size()
    notes += [f"{m}: {measure} averages {int(counts[m]) - int(n):,} of {counted(int(counts[m]), 'image')}; "
              f"{counted(int(n), 'map')} {agreeing(n, 'is', 'are')} degenerate and "
              f"{agreeing(n, 'has', 'have')} no score."
              for m, n in bad.items()]
    return notes
