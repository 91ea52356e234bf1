"""One benchmark run from a resolved configuration: one pass over the data that finds (or
computes) every method's maps and feeds them to every scorer the configuration asks for, then
records, tables, figures, config and environment in the run folder. The model is loaded only
when some maps are missing or a scorer needs it. Under torchrun every rank takes a block of
shards; rank 0 gathers and writes."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from wsol_bench.config.checks import check_settings
from wsol_bench.config.methods import check_method_params
from wsol_bench.datasets import build_dataset
from wsol_bench.datasets.base import skipped_summary
from wsol_bench.environment import available_cores, check_device, environment, set_tf32
from wsol_bench.errors import SettingError, counted
from wsol_bench.files import atomic_write_text, write_json
from wsol_bench.models.loading import weights_label
from wsol_bench.progress import progress_enabled
from wsol_bench.report.dataset_summary import format_summary, summarize
from wsol_bench.report.figures import coverage_figure
from wsol_bench.report.html_report import REPORT_FILE, write_html_report
from wsol_bench.report.run_folder import read_run
from wsol_bench.run.distributed import ONE_PROCESS, Ranks, join
from wsol_bench.run.folder import staged_run
from wsol_bench.run.gallery import write_gallery
from wsol_bench.run.maps import (
    Explainers,
    LazyModel,
    as_dict,
    build_transform,
    check_pass_memory,
    log_missing,
    map_stores,
)
from wsol_bench.run.pipeline import has_masks, process_dataset
from wsol_bench.run.run_tables import format_run_tables, run_tables, write_run_tables
from wsol_bench.run.scorers import RunContext, build_scorers, needs_label_maps

log = logging.getLogger("wsol_bench")
RANKS_FOLDER = "ranks"  # inside rank 0's staging folder: the other ranks' outputs until merged


def summarize_dataset(cfg: DictConfig, dataset, out_dir: Path) -> dict:
    """mode=summary: counts of images, boxes, classes and skipped items (with reasons) of the
    configured dataset, printed and written to summary.json, and the ground-truth coverage map
    (coverage.png) when the images were loaded; no model, no maps."""
    summary = summarize(dataset, check_images=bool(cfg.check_images), num_workers=int(cfg.num_workers or 0))
    write_json(out_dir / "summary.json", summary)
    if "coverage" in summary:
        share = summary["coverage"]["centre_quarter_share"]
        coverage_figure(summary["coverage"]["grid"], out_dir / "coverage.png",
                        f"{cfg.dataset.name}/{cfg.dataset.split}: ground-truth coverage\n"
                        f"({summary['images']:,} images; central quarter {share:.0%})")
    print(f"{cfg.dataset.name}/{cfg.dataset.split}")
    print(format_summary(summary))
    return summary


def summary_outputs(out_dir: Path, summary: dict) -> str:
    """Where mode=summary wrote its files, as the lines that end its output."""
    lines = [f"run folder: {out_dir}", f"summary: {out_dir / 'summary.json'}"]
    if "coverage" in summary:
        lines.append(f"coverage map: {out_dir / 'coverage.png'}")
    return "\n".join(lines)


def run(cfg: DictConfig, out_dir: Path) -> pd.DataFrame | dict | None:
    """Run the benchmark described by `cfg` into `out_dir`; returns the table (or the dataset
    summary with mode=summary; None on the ranks other than 0 of a data-parallel run). The
    outputs appear in `out_dir` only when the run is complete (run.json last); a failed run
    leaves the previous outputs there untouched."""
    torch.manual_seed(int(cfg.seed))
    check_device(cfg.device)
    ranks = join(str(cfg.device))
    set_tf32(bool(cfg.tf32))
    summary: dict = {}
    if not ranks.main:  # writes into a folder of rank 0's staging folder, which rank 0 merges
        stage = Path(ranks.broadcast(None))
        run_into(cfg, stage / RANKS_FOLDER / str(ranks.rank), summary, ranks, stage)
        return None
    with staged_run(out_dir, summary) as stage:
        ranks.broadcast(str(stage))
        result = run_into(cfg, stage, summary, ranks, stage)
    if cfg.mode == "summary":  # it printed its summary already
        print()
        print(summary_outputs(out_dir, result))
        return result
    print()
    print(format_run_tables(result))
    print(f"\nrun folder: {out_dir}")
    print(f"report: {out_dir / REPORT_FILE}")
    return result["localization"]


def run_into(cfg: DictConfig, out_dir: Path, summary: dict, ranks: Ranks = ONE_PROCESS,
             stage: Path | None = None) -> dict | None:
    """The run itself, this rank writing into `out_dir` (rank 0: the staging folder `stage`;
    rank r: stage/ranks/r); returns rank 0's tables (or the dataset summary), and puts the
    record counts per method and the seconds per stage into `summary` (run.json)."""
    check_settings(cfg)  # the command checked these already; a caller of this function may not have
    progress = progress_enabled(cfg.progress) and ranks.main
    if cfg.mode == "run":
        for m in cfg.method.values():  # a misspelt parameter fails now, not when its maps are missing
            check_method_params(m.name, as_dict(m.get("params")))
    out_dir.mkdir(parents=True, exist_ok=True)
    if ranks.main:
        atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        write_json(out_dir / "environment.json", {**environment(cfg.device), "ranks": ranks.world})

    transform = build_transform(cfg)
    if cfg.mode == "run":
        check_pass_memory(cfg, transform)
    dcfg = cfg.dataset
    dataset = build_dataset(dcfg.name, transform=transform, **as_dict(dcfg.params))
    if cfg.mode == "summary":
        return summarize_dataset(cfg, dataset, out_dir) if ranks.main else None
    check_label_needs(cfg, dataset)
    model = LazyModel(cfg, getattr(dataset, "num_classes", None))
    if ranks.main:
        label = weights_label(cfg.model.name, pretrained=cfg.model.pretrained, checkpoint=cfg.model.checkpoint)
        log.info("model %s on %s, dataset %s/%s (%s), methods %s%s", label, cfg.device, dcfg.name, dcfg.split,
                 counted(len(dataset), "image"), ", ".join(cfg.method),
                 f", {ranks.world} ranks" if ranks.distributed else "")

    policies = [cfg.target] + (["label"] if needs_label_maps(cfg) and cfg.target != "label" else [])
    stores = map_stores(cfg, dataset, transform, policies)
    label_stores = stores.get("label", {})
    parts = [stage or out_dir] + [(stage or out_dir) / RANKS_FOLDER / str(r) for r in range(1, ranks.world)]
    explainers = Explainers(cfg, model)
    context = RunContext(out_dir=out_dir, dataset=dataset, dataset_name=dcfg.name, split=dcfg.split,
                         has_masks=has_masks(dataset), class_names=getattr(dataset, "class_names", None),
                         model=model.get, label_stores=label_stores, methods=list(cfg.method), ranks=ranks,
                         target_stores=stores[cfg.target], explainers=explainers)
    scorers = build_scorers(cfg, context)  # settings are checked here, before any model pass
    reference = next(iter(stores[cfg.target].values()))
    block = ranks.block(reference.num_shards(len(dataset)))
    missing = log_missing(stores, block, cfg.store.root)
    loader_workers, scoring_workers = resolve_workers(cfg, ranks, maps_missing=missing > 0)
    started = time.perf_counter()
    try:
        report = process_dataset(stores, dataset, scorers, explainer=explainers, target_policy=cfg.target,
                                 shards=block, box_protocol=cfg.metric.box_protocol, batch_size=int(cfg.batch_size),
                                 num_workers=loader_workers, scoring_workers=scoring_workers,
                                 pin_memory=torch.device(cfg.device).type == "cuda", progress=progress)
    finally:
        for scorer in scorers:
            scorer.close()
    reports = ranks.gather(report)
    ranks.barrier()  # every rank's files are closed before rank 0 reads them
    pass_seconds = time.perf_counter() - started  # the slowest rank's pass, as rank 0 waited for it
    for scorer in scorers:
        scorer.gather(ranks, parts)
    if not ranks.main:
        return None
    shutil.rmtree(out_dir / RANKS_FOLDER, ignore_errors=True)
    write_json(out_dir / "maps.json", {m: {"folder": str(s.folder.resolve()), "key": s.key,
                                           "shard_size": s.shard_size, "num_items": len(dataset)}
                                       for m, s in stores[cfg.target].items()})
    for scorer in scorers:
        scorer.write(out_dir)
    index_skipped = [(s.image_id, s.reason) for s in getattr(dataset, "skipped", [])]
    notes = sum((r.notes for r in reports), Counter())
    write_data_report(out_dir, index_skipped + [item for r in reports for item in r.skipped], dict(notes),
                      len(dataset) + len(index_skipped))  # every item the index went through

    if int(cfg.gallery_images) > 0:
        write_gallery(cfg, dataset, transform, stores[cfg.target], out_dir / "gallery.png")

    folder = read_run(out_dir, allow_incomplete=True)  # its own staging folder: run.json comes last
    tables = run_tables(folder)
    for line in tables["localization"].attrs.get("degenerate_notes", []):
        log.warning("%s", line)
    write_run_tables(out_dir, tables=tables)
    write_html_report(folder, tables, out_dir)
    summary["records_per_method"] = {str(m): int(n) for m, n in
                                     tables["localization"].groupby(level="method", sort=False)["n_total"].sum().items()}
    summary["ranks"] = ranks.world
    summary["workers"] = {"loader": loader_workers, "scoring": scoring_workers}
    summary["pass_seconds"] = round(pass_seconds, 3)
    summary["seconds"] = {stage_name: round(sum(r.seconds[stage_name] for r in reports), 3)
                          for stage_name in sorted({k for r in reports for k in r.seconds})}
    summary["shards_explained"] = {f"{policy}/{m}": sum(r.explained[(policy, m)] for r in reports)
                                   for policy, named in stores.items() for m in named}
    return tables


def resolve_workers(cfg: DictConfig, ranks: Ranks, *, maps_missing: bool) -> tuple[int, int]:
    """(DataLoader workers, scoring workers) of this rank: the configured numbers, or for null
    what the device's share of this machine's cores allows. On a GPU the main process mostly
    waits for the device, so the cores decode images and score; on a CPU the model's own
    threads need the cores while maps are being explained, so scoring stays in the main process
    then (and takes every core but one when all maps are stored)."""
    cores = max(1, available_cores() // max(1, _local_world()))
    on_gpu = torch.device(cfg.device).type == "cuda"
    loader = cfg.num_workers
    if loader is None:
        loader = min(8, max(1, cores // 2)) if on_gpu else 0
    scoring = cfg.scoring_workers
    if scoring is None:
        scoring = max(0, cores - int(loader) - 1) if on_gpu or not maps_missing else 0
    return int(loader), int(scoring)


def _local_world() -> int:
    """Ranks on this machine (torchrun and submitit set LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)


def check_label_needs(cfg: DictConfig, dataset) -> None:
    """Refuse, before any work, what a dataset without class labels (`has_labels = False`, e.g.
    imagenet_segmentation) cannot give: maps of the label's class (target=label, faithfulness)
    and the correctly classified images (metric.image_filter=correct)."""
    if getattr(dataset, "has_labels", True):
        return
    asked = [setting for setting, needed in (("target=label", cfg.target == "label"),
                                             (f"faithfulness={cfg.faithfulness.mode if cfg.faithfulness else ''}",
                                              bool(cfg.faithfulness)),
                                             ("metric.image_filter=correct", cfg.metric.image_filter == "correct"))
             if needed]
    if asked:
        raise SettingError(f"dataset {cfg.dataset.name} has no class labels, so {', '.join(asked)} cannot be "
                         "computed; use target=predicted, no faithfulness, metric.image_filter=all")


def write_data_report(out_dir: Path, skipped: list[tuple[str, str]], notes: dict[str, int], total: int) -> None:
    """skipped.csv (every item not scored, with its reason) and data.json (counts: `items` is every
    item the run went through, those the dataset's index skipped included), and a log line when
    anything was skipped or changed, so it is never silent."""
    pd.DataFrame(skipped, columns=["image_id", "reason"]).to_csv(out_dir / "skipped.csv", index=False)
    reasons = Counter(reason for _, reason in skipped)
    write_json(out_dir / "data.json", {"items": total, "skipped": len(skipped),
                                       "skipped_by_reason": dict(reasons), "notes": notes})
    if skipped:
        log.warning("%s", skipped_summary([reason for _, reason in skipped], total))
    if notes:
        log.warning("loader changes: %s; see data.json", "; ".join(f"{k}: {v}" for k, v in notes.items()))
