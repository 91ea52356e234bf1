"""faithfulness.csv and faithfulness_curves.png: pixel-perturbation curves (docs/protocol.md 5)
of every method's ground-truth-class maps, one row per image and method with its AUCs, ABPC
and every step of the curves."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

import wsol_bench.metrics.faithfulness as faithfulness_module
import wsol_bench.metrics.faithfulness_settings as faithfulness_settings_module
from wsol_bench.environment import package_version
from wsol_bench.files import atomic_write, write_json
from wsol_bench.metrics.faithfulness import (
    FaithfulnessSettings,
    constant_baseline_probs,
    faithfulness_rows,
    row_columns,
    score_batch,
)
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.report.curves import plot_perturbation_curves
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.scorers.base import RunContext, Scorer, register_scorer
from wsol_bench.run.store import MapStore, Shard, settings_key

ID_COLUMNS = ["image_id", "dataset", "split", "method", "label", "prediction", "target", "degenerate"]
log = logging.getLogger("wsol_bench")


def faithfulness_digest() -> str:
    """sha256 of the perturbation engine's source: cached rows of an edited engine are not reused."""
    digest = hashlib.sha256()
    for module in (faithfulness_module, faithfulness_settings_module):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def faithfulness_settings(node: DictConfig) -> FaithfulnessSettings:
    """The `faithfulness` config group as settings (FaithfulnessSettings checks the values)."""
    params = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    if isinstance(params.get("baseline"), list):
        params["baseline"] = tuple(params["baseline"])
    return FaithfulnessSettings(**params)


@register_scorer("faithfulness")
class FaithfulnessScorer(Scorer):
    """Pixel-perturbation curves of every method's ground-truth-class maps.

    The maps come from `label_stores()` (target policy "label"; called in `prepare`), which may
    be the run's own stores. Per-image rows are cached next to those maps, one CSV per shard and settings, so
    a killed run does not redo finished shards and a re-scoring run costs no model pass.
    Rows are appended to faithfulness.csv batch by batch, so memory does not grow with the
    dataset.
    """

    def __init__(self, model_fn, label_stores: Callable[[], dict[str, MapStore]], settings: FaithfulnessSettings,
                 path: Path, *, dataset_name: str, split: str) -> None:
        self.model_fn, self.label_stores, self.settings = model_fn, label_stores, settings
        self.stores: dict[str, MapStore] = {}
        self.path, self.dataset_name, self.split = path, dataset_name, split
        # The chunk size changes speed, not the numbers, so it stays out of the key (as the
        # explanation batch size stays out of the map key).
        self.key_settings = {k: v for k, v in vars(settings).items() if k != "batch_size"}
        # the package version and the engine's source: rows of an edited engine are recomputed
        self.key = settings_key({"faithfulness": self.key_settings,
                                 "code": {"wsol_bench": package_version(), "metric": faithfulness_digest()}})
        self._pending: dict[tuple[str, int], list[dict]] = {}
        self._cached: dict[tuple[str, int], dict[str, dict] | None] = {}
        self._shards: dict[tuple[str, int], Shard] = {}
        self._full_probs: torch.Tensor | None = None
        self.path.unlink(missing_ok=True)

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> FaithfulnessScorer | None:
        if not cfg.faithfulness:
            return None
        settings = faithfulness_settings(cfg.faithfulness)  # a bad setting fails before any model pass
        return cls(context.model, context.label_stores, settings, context.out_dir / "faithfulness.csv",
                   dataset_name=context.dataset_name, split=context.split)

    def prepare(self) -> None:
        """The ground-truth-class maps of every method (explained now where the cache lacks them)."""
        self.stores = self.label_stores()

    def _cache_file(self, method: str, shard_index: int) -> Path:
        return self.stores[method].folder / f"faithfulness_{self.key}" / f"shard_{shard_index:06d}.csv"

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
            log.warning("faithfulness cache %s is unreadable (%s); its rows are recomputed", file, exc)
            file.unlink(missing_ok=True)
            return None
        return {str(r["image_id"]): r for r in frame.to_dict("records")}

    def _label_shard(self, mb: MethodBatch) -> Shard:
        key = (mb.method, mb.shard.index)
        if key not in self._shards:
            self._shards = {k: v for k, v in self._shards.items() if k[0] != mb.method}  # one shard per method
            self._shards[key] = self.stores[mb.method].load(mb.shard.index)
        return self._shards[key]

    def update(self, mb: MethodBatch) -> None:
        cached = self._cached_rows(mb.method, mb.shard.index)
        if cached is not None and all(s.image_id in cached for s in mb.samples):
            self._append([cached[s.image_id] for s in mb.samples])
            return
        if cached is not None:  # rows of other images: stale, recompute the shard
            log.warning("faithfulness cache %s holds other images; its rows are recomputed",
                        self._cache_file(mb.method, mb.shard.index))
            self._cache_file(mb.method, mb.shard.index).unlink(missing_ok=True)
            self._cached[(mb.method, mb.shard.index)] = None
        shard = self._label_shard(mb)
        rows = shard.rows_at(mb.positions, [s.image_id for s in mb.samples])
        heat, degenerate = to_heatmaps(shard.maps[rows], tuple(mb.images.shape[-2:]))
        labels, logits = mb.labels, shard.logits[rows]
        values = self._curves(mb.images, heat, degenerate, labels, logits)
        out = [{"image_id": sample.image_id, "dataset": self.dataset_name, "split": self.split,
                "method": mb.method, "label": label, "prediction": prediction, "target": label,
                "degenerate": int(flag), **row}
               for sample, prediction, label, flag, row in zip(mb.samples, logits.argmax(1).tolist(), labels.tolist(),
                                                              degenerate.tolist(), values)]
        self._append(out)
        pending = self._pending.setdefault((mb.method, mb.shard.index), [])
        pending += out
        if len(pending) == len(shard.positions):  # the shard is complete: keep it
            self._write_cache(mb.method, mb.shard.index, pending)
            del self._pending[(mb.method, mb.shard.index)]

    def _curves(self, images: torch.Tensor, heat: torch.Tensor, degenerate: torch.Tensor, labels: torch.Tensor,
                logits: torch.Tensor) -> list[dict[str, float]]:
        """The score row of every image; a degenerate map (constant or NaN/inf) ranks its pixels by
        nothing, so it gets no curve (NaN) instead of one ordered by pixel index."""
        rows = [dict.fromkeys(row_columns(self.settings), float("nan")) for _ in range(len(images))]
        keep = (~degenerate).nonzero()[:, 0]
        if len(keep):
            model = self.model_fn()
            if self._full_probs is None and not self.settings.blurred:
                self._full_probs = constant_baseline_probs(model, images.shape[1:], self.settings)
            scores = score_batch(model, images[keep], heat[keep], labels[keep], self.settings,
                                 clean_logits=logits[keep], full_removal_probs=self._full_probs)
            for index, row in zip(keep.tolist(), faithfulness_rows(scores)):
                rows[index] = row
        return rows

    def _append(self, rows: list[dict]) -> None:
        frame = pd.DataFrame(rows)
        curves = [c for c in frame.columns if c not in ID_COLUMNS]
        frame[ID_COLUMNS + curves].to_csv(self.path, mode="a", header=not self.path.exists(), index=False)

    def _write_cache(self, method: str, shard_index: int, rows: list[dict]) -> None:
        file = self._cache_file(method, shard_index)
        file.parent.mkdir(parents=True, exist_ok=True)
        settings_file = file.parent / "settings.json"
        if not settings_file.is_file():
            write_json(settings_file, self.key_settings)
        atomic_write(file, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))

    def compute(self) -> pd.DataFrame:
        """Every row written so far (one per image and method)."""
        return pd.read_csv(self.path)

    def write(self, out_dir: Path) -> list[Path]:
        """faithfulness.csv is complete; draw the mean curves per method beside it."""
        figure = out_dir / "faithfulness_curves.png"
        if not self.path.exists():  # no image reached the scorer: the header alone
            pd.DataFrame(columns=ID_COLUMNS).to_csv(self.path, index=False)
        rows = self.compute()
        if not (rows["degenerate"] == 0).any():
            log.warning("faithfulness: no image has a non-degenerate map; faithfulness_curves.png is not drawn")
            return [self.path]
        plot_perturbation_curves(rows, figure)
        return [self.path, figure]
