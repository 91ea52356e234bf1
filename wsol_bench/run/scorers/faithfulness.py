"""faithfulness.csv and faithfulness_curves.png: pixel-perturbation curves (docs/protocol.md 5)
of every method's ground-truth-class maps, one row per image and method with its AUCs, ABPC
and every step of the curves."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

import wsol_bench.metrics.faithfulness as faithfulness_module
import wsol_bench.metrics.faithfulness_settings as faithfulness_settings_module
from wsol_bench.environment import package_version, precision_key
from wsol_bench.errors import InputFileError
from wsol_bench.files import atomic_write, disk_full_refused, write_json
from wsol_bench.metrics.faithfulness import (
    FaithfulnessSettings,
    constant_baseline_probs,
    faithfulness_rows,
    row_columns,
    score_batch,
)
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.report.curves import plot_perturbation_curves
from wsol_bench.report.run_folder import RunFolder
from wsol_bench.report.tables import FAITH_NAMES, require_columns
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.distributed import Ranks
from wsol_bench.run.scorers.base import MeasureTables, RunContext, Scorer, append_rank_rows, register_scorer
from wsol_bench.run.store import MapStore, settings_key

ID_COLUMNS = ["image_id", "dataset", "split", "method", "label", "prediction", "target", "degenerate"]
FILE = "faithfulness.csv"
ABPC_TOLERANCE = 1e-6  # abpc must equal auc_lerf - auc_morf up to float rounding
CAPTION = ("ABPC, AUC MoRF, AUC LeRF: pixel perturbation of the ground-truth class, percent, mean over all "
           "images (n_images_abpc).")
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

    The maps arrive with each batch (`MethodBatch.label_maps`: target policy "label", which may
    be the run's own maps). Per-image rows are cached next to those maps in their stores, one
    CSV per shard and settings, so a killed run does not redo finished shards and a re-scoring
    run costs no model pass. Rows are appended to faithfulness.csv batch by batch, so memory
    does not grow with the dataset.
    """

    needs_label_maps = True

    def __init__(self, model_fn, label_stores: dict[str, MapStore], settings: FaithfulnessSettings,
                 path: Path, *, dataset_name: str, split: str, precision: dict | None = None) -> None:
        self.model_fn, self.stores, self.settings = model_fn, label_stores, settings
        self.path, self.dataset_name, self.split = path, dataset_name, split
        # The chunk size changes speed, not the numbers, so it stays out of the key (as the
        # explanation batch size stays out of the map key); TF32 (`precision`) changes them.
        self.key_settings = {**{k: v for k, v in vars(settings).items() if k != "batch_size"}, **(precision or {})}
        # the package version and the engine's source: rows of an edited engine are recomputed
        self.key = settings_key({"faithfulness": self.key_settings,
                                 "code": {"wsol_bench": package_version(), "metric": faithfulness_digest()}})
        self._pending: dict[tuple[str, int], list[dict]] = {}
        self._cached: dict[tuple[str, int], dict[str, dict] | None] = {}
        self._seen: dict[tuple[str, int], int] = {}  # images of (method, shard) fed so far
        self._full_probs: torch.Tensor | None = None
        self.path.unlink(missing_ok=True)

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> FaithfulnessScorer | None:
        if not cfg.faithfulness:
            return None
        settings = faithfulness_settings(cfg.faithfulness)  # a bad setting fails before any model pass
        return cls(context.model, context.label_stores, settings, context.out_dir / FILE,
                   dataset_name=context.dataset_name, split=context.split,
                   precision=precision_key(str(cfg.device), bool(cfg.tf32)))

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

    def update(self, mb: MethodBatch) -> None:
        key = (mb.method, mb.shard_index)
        self._seen[key] = self._seen.get(key, 0) + len(mb.samples)
        cached = self._cached_rows(mb.method, mb.shard_index)
        if cached is not None and all(s.image_id in cached for s in mb.samples):
            self._append([cached[s.image_id] for s in mb.samples])
            return
        if cached is not None:  # rows of other images: stale, recompute the shard
            log.warning("faithfulness cache %s holds other images; its rows are recomputed",
                        self._cache_file(mb.method, mb.shard_index))
            self._cache_file(mb.method, mb.shard_index).unlink(missing_ok=True)
            self._cached[(mb.method, mb.shard_index)] = None
        if mb.label_maps is None or mb.images is None:
            raise ValueError("faithfulness needs the batch's images and ground-truth-class maps")
        heat, degenerate = to_heatmaps(mb.label_maps, tuple(mb.images.shape[-2:]))
        labels, logits = mb.labels, mb.label_logits
        values = self._curves(mb.images, heat, degenerate, labels, logits)
        out = [{"image_id": sample.image_id, "dataset": self.dataset_name, "split": self.split,
                "method": mb.method, "label": label, "prediction": prediction, "target": label,
                "degenerate": int(flag), **row}
               for sample, prediction, label, flag, row in zip(mb.samples, logits.argmax(1).tolist(), labels.tolist(),
                                                              degenerate.tolist(), values)]
        self._append(out)
        self._pending.setdefault((mb.method, mb.shard_index), []).extend(out)

    def end_shard(self, shard_index: int) -> None:
        """Cache the rows of a shard all of whose images were computed in this run."""
        for (method, index), rows in list(self._pending.items()):
            if index == shard_index:
                if len(rows) == self._seen.get((method, index), -1):
                    self._write_cache(method, index, rows)
                del self._pending[(method, index)]
        self._seen = {k: v for k, v in self._seen.items() if k[1] != shard_index}

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
        with disk_full_refused(self.path):
            frame[ID_COLUMNS + curves].to_csv(self.path, mode="a", header=not self.path.exists(), index=False)

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

    @classmethod
    def tables(cls, run: RunFolder) -> MeasureTables | None:
        """Mean ABPC and AUCs per method (`faithfulness_summary`), and a note for every method
        whose rows do not cover its images or whose ground-truth-class maps are degenerate."""
        rows = run.per_image_rows(FILE)
        if rows is None:
            return None
        return MeasureTables(summary=faithfulness_summary(rows, str(run.path / FILE)), caption=CAPTION,
                             notes=coverage_notes(rows, run.records))


def faithfulness_summary(faithfulness: pd.DataFrame, source: str = FILE) -> pd.DataFrame:
    """Per method: mean ABPC, AUC MoRF and AUC LeRF over ALL its images (docs/protocol.md 5: no
    correctness filter), in percent, and the number of images (`n_images_abpc`)."""
    require_columns(faithfulness, ["image_id", "method", *FAITH_NAMES], source)
    duplicated = faithfulness.duplicated(["image_id", "method"], keep=False)
    if duplicated.any():
        example = faithfulness.loc[duplicated, ["image_id", "method"]].iloc[0].tolist()
        raise InputFileError(f"{source}: {int(duplicated.sum())} rows repeat an (image_id, method) pair, "
                             f"e.g. {example}; it must hold one row per image and method")
    scores = faithfulness[list(FAITH_NAMES)]
    degenerate = faithfulness["degenerate"] == 1 if "degenerate" in faithfulness else False
    unscored = scores.isna().any(axis=1) & ~degenerate  # a degenerate map has no curve, on purpose
    if unscored.any():
        bad = faithfulness.loc[unscored, "image_id"].tolist()
        raise InputFileError(f"{source}: missing scores for {len(bad)} rows (e.g. {bad[:3]}); "
                             "re-run the faithfulness evaluation for those images")
    gap = (faithfulness["abpc"] - (faithfulness["auc_lerf"] - faithfulness["auc_morf"])).abs()
    if (gap > ABPC_TOLERANCE).any():
        bad = faithfulness.loc[gap > ABPC_TOLERANCE, "image_id"].tolist()
        raise InputFileError(f"{source}: abpc != auc_lerf - auc_morf for {len(bad)} rows (e.g. {bad[:3]}); "
                             "the file is inconsistent (docs/protocol.md 5)")
    grouped = faithfulness.groupby("method", sort=False)
    summary = grouped[list(FAITH_NAMES)].mean().mul(100).rename(columns=FAITH_NAMES)
    summary["n_images_abpc"] = grouped["abpc"].count()  # the images with a score (degenerate maps have none)
    return summary


def coverage_notes(faithfulness: pd.DataFrame, records: pd.DataFrame) -> list[str]:
    """Faithfulness rows that do not cover every image of a method are reported, not hidden."""
    totals = records.groupby("method", sort=False)["image_id"].nunique()
    counts = faithfulness.groupby("method", sort=False)["image_id"].nunique()
    notes = [f"{FILE} covers {int(counts.get(m, 0))} of {int(n)} images for {m}."
             for m, n in totals.items() if int(counts.get(m, 0)) != int(n)]
    if "degenerate" in faithfulness.columns:
        bad = faithfulness[faithfulness["degenerate"] == 1].groupby("method", sort=False).size()
        notes += [f"{m}: ABPC averages {int(counts[m]) - int(n)} of {int(counts[m])} images; {int(n)} "
                  "ground-truth-class maps are degenerate and have no curve." for m, n in bad.items()]
    return notes
