"""One benchmark run from a resolved configuration: find (or compute) the maps in the map
store, feed them to every scorer the configuration asks for, and write records, tables,
figures, config and environment to the run folder. The model is loaded only when some maps
are missing or a scorer needs it."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from wsol_bench.config.methods import check_method_entries, check_method_params
from wsol_bench.datasets import build_dataset
from wsol_bench.environment import check_device, environment
from wsol_bench.files import atomic_write_text, write_json
from wsol_bench.progress import progress_enabled
from wsol_bench.regions.thresholds import check_thresholds
from wsol_bench.report.dataset_summary import format_summary, summarize
from wsol_bench.report.run_folder import format_run_tables, run_tables, write_run_tables
from wsol_bench.run.folder import staged_run
from wsol_bench.run.gallery import write_gallery
from wsol_bench.run.maps import LazyModel, as_dict, build_transform, ensure_maps
from wsol_bench.run.pipeline import has_masks, score_dataset
from wsol_bench.run.scorers import RunContext, build_scorers

log = logging.getLogger("wsol_bench")
MODES = ("run", "summary")


def summarize_dataset(cfg: DictConfig, dataset, out_dir: Path) -> dict:
    """mode=summary: counts of images, boxes, classes and skipped items (with reasons) of the
    configured dataset, printed and written to summary.json; no model, no maps."""
    summary = summarize(dataset, check_images=bool(cfg.check_images), num_workers=int(cfg.num_workers))
    write_json(out_dir / "summary.json", summary)
    print(f"{cfg.dataset.name}/{cfg.dataset.split}")
    print(format_summary(summary))
    return summary


def run(cfg: DictConfig, out_dir: Path) -> pd.DataFrame | dict:
    """Run the benchmark described by `cfg` into `out_dir`; returns the table (or the dataset
    summary with mode=summary). The outputs appear in `out_dir` only when the run is complete
    (run.json last); a failed run leaves the previous outputs there untouched."""
    torch.manual_seed(int(cfg.seed))
    summary: dict = {}
    with staged_run(out_dir, summary) as stage:
        result = run_into(cfg, stage, summary)
    if cfg.mode == "summary":  # it printed its summary already
        return result
    print()
    print(format_run_tables(result))
    print(f"\nrun folder: {out_dir}")
    return result["localization"]


def run_into(cfg: DictConfig, out_dir: Path, summary: dict) -> dict:
    """The run itself, writing into `out_dir` (the staging folder); returns its tables (or the
    dataset summary), and puts the record counts per method into `summary` (run.json)."""
    check_device(cfg.device)
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}; valid: {', '.join(MODES)}")
    progress = progress_enabled(cfg.progress)  # a bad value fails here, not after the explanation pass
    check_counts(cfg)
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json(out_dir / "environment.json", environment(cfg.device))
    if cfg.mode == "run":
        check_thresholds(cfg.metric.thresholds, "metric.thresholds")
        if not cfg.method:
            raise ValueError("no method selected; e.g. method=[agcam,rollout]")
        check_method_entries(cfg.method)
        for m in cfg.method.values():  # a misspelt parameter fails now, not when its maps are missing
            check_method_params(m.name, as_dict(m.get("params")))

    transform = build_transform(cfg)
    dcfg = cfg.dataset
    dataset = build_dataset(dcfg.name, transform=transform, **as_dict(dcfg.params))
    if cfg.mode == "summary":
        return summarize_dataset(cfg, dataset, out_dir)
    model = LazyModel(cfg, getattr(dataset, "num_classes", None))
    log.info("model %s on %s, dataset %s/%s (%d images), methods %s", cfg.model.name, cfg.device,
             dcfg.name, dcfg.split, len(dataset), ", ".join(cfg.method))

    label_stores: dict = {}

    def ground_truth_class_stores() -> dict:
        # the maps of the ground-truth class (faithfulness), computed at most once per run
        if not label_stores:
            label_stores.update(stores if cfg.target == "label" else
                                ensure_maps(cfg, dataset, transform, model, "label", progress))
        return label_stores

    context = RunContext(out_dir=out_dir, dataset=dataset, dataset_name=dcfg.name, split=dcfg.split,
                         has_masks=has_masks(dataset), class_names=getattr(dataset, "class_names", None),
                         model=model.get, label_stores=ground_truth_class_stores)
    scorers = build_scorers(cfg, context)  # settings are checked here, before any model pass
    stores = ensure_maps(cfg, dataset, transform, model, cfg.target, progress)
    write_json(out_dir / "maps.json", {m: {"folder": str(s.folder.resolve()), "key": s.key,
                                           "shard_size": s.shard_size, "num_items": len(dataset)}
                                       for m, s in stores.items()})
    for scorer in scorers:
        scorer.prepare()
    try:
        skipped, notes = score_dataset(stores, dataset, scorers, box_protocol=cfg.metric.box_protocol,
                                       batch_size=int(cfg.batch_size), num_workers=int(cfg.num_workers),
                                       progress=progress)
    finally:
        for scorer in scorers:
            scorer.close()
    for scorer in scorers:
        scorer.write(out_dir)
    index_skipped = [(s.image_id, s.reason) for s in getattr(dataset, "skipped", [])]
    write_data_report(out_dir, index_skipped + skipped, notes, len(dataset))

    if int(cfg.gallery_images) > 0:
        write_gallery(cfg, dataset, transform, stores, out_dir / "gallery.png")

    tables = run_tables(out_dir, allow_incomplete=True)  # its own staging folder: run.json comes last
    for line in tables["localization"].attrs.get("degenerate_notes", []):
        log.warning("%s", line)
    write_run_tables(out_dir, tables=tables)
    summary["records_per_method"] = {str(m): int(n) for m, n in
                                     tables["localization"].groupby(level="method", sort=False)["n_total"].sum().items()}
    return tables


def check_counts(cfg: DictConfig) -> None:
    """Counts the typed config cannot bound: a ValueError naming the setting and its range."""
    for key, low in (("batch_size", 1), ("num_workers", 0), ("gallery_images", 0), ("store.shard_size", 1)):
        value = OmegaConf.select(cfg, key)
        if value is not None and int(value) < low:
            raise ValueError(f"{key}={value} must be at least {low}")


def write_data_report(out_dir: Path, skipped: list[tuple[str, str]], notes: dict[str, int], total: int) -> None:
    """skipped.csv (every item not scored, with its reason) and data.json (counts), and a log
    line when anything was skipped or changed, so it is never silent."""
    pd.DataFrame(skipped, columns=["image_id", "reason"]).to_csv(out_dir / "skipped.csv", index=False)
    reasons = Counter(reason for _, reason in skipped)
    write_json(out_dir / "data.json", {"items": total, "skipped": len(skipped),
                                       "skipped_by_reason": dict(reasons), "notes": notes})
    if skipped:
        log.warning("%d of %d items skipped (%s); see skipped.csv", len(skipped), total,
                    "; ".join(f"{r}: {n}" for r, n in reasons.most_common()))
    if notes:
        log.warning("loader changes: %s; see data.json", "; ".join(f"{k}: {v}" for k, v in notes.items()))
