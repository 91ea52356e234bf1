"""One benchmark run from a resolved configuration: find (or compute) the maps in the map
store, score them, and write records, tables, figures, config and environment to the run
folder. The model is loaded only when some maps are missing or a metric needs it."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from wsol_bench.report.dataset_summary import format_summary, summarize
from wsol_bench.datasets import EvalTransform, build_dataset
from wsol_bench.datasets.base import RESAMPLER
from wsol_bench.report.figures import denormalize, heatmap_gallery, plot_sweep
from wsol_bench.methods import get_explainer
from wsol_bench.models import (SHIPPED_MODELS, ModelLoadError, architecture_data_config, load_model,
                               shipped_weights_path)
from wsol_bench.environment import environment
from wsol_bench.files import write_json
from wsol_bench.report.curves import plot_perturbation_curves
from wsol_bench.metrics.faithfulness import FaithfulnessSettings
from wsol_bench.run.pipeline import LocalizationRecords, explain_dataset, has_masks, score_dataset
from wsol_bench.progress import progress_enabled
from wsol_bench.run.scorers import FaithfulnessScorer, MaskExporter, NoteCounter, SweepScorer
from wsol_bench.run.store import MapStore, file_digest
from wsol_bench.report.run_folder import format_run_tables, run_tables, write_run_tables

log = logging.getLogger("wsol_bench")
MODES = ("run", "summary")


def as_dict(node) -> dict:
    """A config node (or None) as a plain dict of keyword arguments."""
    return {} if node is None else dict(OmegaConf.to_container(node, resolve=True, throw_on_missing=True))


def build_transform(cfg: DictConfig) -> EvalTransform:
    """The model's preprocessing (read from its architecture, no weights needed), with any
    value the config sets taking precedence."""
    dc = architecture_data_config(cfg.model.name, **as_dict(cfg.model.kwargs))
    pre = cfg.preprocess
    size = tuple(pre.input_size) if pre.input_size is not None else tuple(dc.input_size[1:])
    return EvalTransform(size=size, mean=pre.mean if pre.mean is not None else dc.mean,
                         std=pre.std if pre.std is not None else dc.std,
                         interpolation=pre.interpolation or dc.interpolation, resize=pre.get("resize", "squash"),
                         crop_pct=pre.crop_pct if pre.get("crop_pct") is not None else dc.crop_pct)


def model_identity(mcfg: DictConfig, seed: int) -> dict:
    """What determines the model's function: architecture, its options and the weights'
    content (checkpoint or shipped file digest, or the timm pretrained tag)."""
    ident = {"name": mcfg.name, "kwargs": as_dict(mcfg.kwargs)}
    if mcfg.checkpoint is not None:
        path = Path(mcfg.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"model.checkpoint={mcfg.checkpoint} does not exist; pass the path "
                                    "of a .safetensors or .pth file")
        ident["weights"] = f"sha256:{file_digest(path)}"
    elif mcfg.name in SHIPPED_MODELS:
        ident["weights"] = f"sha256:{file_digest(shipped_weights_path(mcfg.name))}"
    elif mcfg.pretrained:
        ident["weights"] = f"timm-pretrained:{mcfg.name}"
    else:
        ident["weights"] = f"random-init:seed={seed}"
    return ident


def store_settings(cfg: DictConfig, transform: EvalTransform, method_key: str, target_policy: str) -> dict:
    """Exactly the settings that determine a method's maps (the map-store key)."""
    m = cfg.method[method_key]
    return {
        "model": model_identity(cfg.model, int(cfg.seed)),
        "dataset": {"name": cfg.dataset.name, "split": cfg.dataset.split, "params": as_dict(cfg.dataset.params)},
        "preprocess": {"size": list(transform.size), "mean": list(transform.mean), "std": list(transform.std),
                       "interpolation": transform.interpolation, "resize": transform.resize,
                       "resampler": RESAMPLER,
                       **({"crop_pct": transform.crop_pct} if transform.resize == "timm" else {})},
        "method": {"name": m.name, "params": as_dict(m.params)},
        "target_policy": target_policy,
    }


class LazyModel:
    """Loads the model on first use only: a run whose maps are all cached never reads weights."""

    def __init__(self, cfg: DictConfig, num_classes: int | None) -> None:
        self.cfg, self.num_classes, self._model = cfg, num_classes, None

    def get(self) -> torch.nn.Module:
        if self._model is None:
            mcfg = self.cfg.model
            torch.manual_seed(int(self.cfg.seed))  # random-init models are a function of the seed
            self._model = load_model(mcfg.name, pretrained=bool(mcfg.pretrained), checkpoint=mcfg.checkpoint,
                                     device=self.cfg.device, **as_dict(mcfg.kwargs))
            classes = getattr(self._model, "num_classes", None)
            if classes is not None and self.num_classes is not None and classes != self.num_classes:
                raise ModelLoadError(f"model {mcfg.name} predicts {classes} classes but dataset "
                                     f"{self.cfg.dataset.name} has {self.num_classes}; load a checkpoint "
                                     "trained on it (model.checkpoint=...)")
        return self._model


def ensure_maps(cfg: DictConfig, dataset, transform: EvalTransform, model: LazyModel,
                target_policy: str, progress: bool) -> dict[str, MapStore]:
    """The map stores of every configured method for `target_policy`, computing the missing
    shards (and only those) with the model."""
    if not cfg.method:
        raise ValueError("no method selected; e.g. method=[agcam,rollout]")
    stores = {key: MapStore(cfg.store.root, store_settings(cfg, transform, key, target_policy),
                            int(cfg.store.shard_size)) for key in cfg.method}
    missing = {key for key, s in stores.items() if s.missing(len(dataset))}
    if missing:
        explainers = {key: get_explainer(cfg.method[key].name, model.get(), **as_dict(cfg.method[key].params))
                      for key in stores if key in missing}
        log.info("explaining with %s (target %s); cache %s", ", ".join(explainers), target_policy, cfg.store.root)
        explain_dataset(explainers, {k: stores[k] for k in explainers}, dataset, target_policy=target_policy,
                        batch_size=int(cfg.batch_size), num_workers=int(cfg.num_workers),
                        progress=progress)
    else:
        log.info("all maps found in the cache %s (target %s); no model pass", cfg.store.root, target_policy)
    return stores


def sweep_thresholds(node: DictConfig) -> list[float]:
    """The sweep's threshold grid: an explicit list, or numpy.arange(start, stop, step) (the
    wsolevaluation grid by default: 0.00, 0.01, ..., 0.99)."""
    if node.get("thresholds") is not None:
        return [float(t) for t in node.thresholds]
    if float(node.step) <= 0:
        raise ValueError(f"sweep.step must be > 0, got {node.step}")
    return [float(t) for t in np.arange(float(node.start), float(node.stop), float(node.step))]


def faithfulness_settings(node: DictConfig) -> FaithfulnessSettings:
    """The `faithfulness` config group as settings; unknown keys name themselves."""
    params = as_dict(node)
    known = {f.name for f in fields(FaithfulnessSettings)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown faithfulness setting(s) {unknown}; valid: {sorted(known)}")
    if isinstance(params.get("baseline"), list):
        params["baseline"] = tuple(params["baseline"])
    return FaithfulnessSettings(**params)


def write_gallery(cfg: DictConfig, dataset, transform: EvalTransform, stores: dict[str, MapStore],
                  path: Path) -> None:
    """The first `gallery_images` usable images with every method's stored map."""
    count = min(int(cfg.gallery_images), len(dataset))
    first = {m: s.load(0) for m, s in stores.items()}
    positions = [int(p) for p in next(iter(first.values())).positions[:count]]
    samples = [dataset[p] for p in positions]
    maps = {m: shard.maps[:len(positions)] for m, shard in first.items()}
    heatmap_gallery([denormalize(s.image, transform.mean, transform.std) for s in samples],
                    [s.boxes[s.box_labels == s.label] for s in samples], maps, path,
                    threshold=float(cfg.metric.thresholds[0]), titles=[s.image_id for s in samples])


def summarize_dataset(cfg: DictConfig, dataset, out_dir: Path) -> dict:
    """mode=summary: counts of images, boxes, classes and skipped items (with reasons) of the
    configured dataset, printed and written to summary.json; no model, no maps."""
    summary = summarize(dataset, check_images=bool(cfg.check_images), num_workers=int(cfg.num_workers))
    write_json(out_dir / "summary.json", summary)
    print(f"{cfg.dataset.name}/{cfg.dataset.split}")
    print(format_summary(summary))
    return summary


def run(cfg: DictConfig, out_dir: Path) -> pd.DataFrame | dict:
    """Run the benchmark described by `cfg`, writing into `out_dir`; returns the table (or
    the dataset summary with mode=summary)."""
    torch.manual_seed(int(cfg.seed))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_json(out_dir / "environment.json", environment(cfg.device))
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}; valid: {', '.join(MODES)}")
    progress = progress_enabled(cfg.progress)  # a bad value fails here, not after the explanation pass

    transform = build_transform(cfg)
    dcfg = cfg.dataset
    dataset = build_dataset(dcfg.name, transform=transform, **as_dict(dcfg.params))
    if cfg.mode == "summary":
        return summarize_dataset(cfg, dataset, out_dir)
    model = LazyModel(cfg, getattr(dataset, "num_classes", None))
    log.info("model %s on %s, dataset %s/%s (%d images), methods %s", cfg.model.name, cfg.device,
             dcfg.name, dcfg.split, len(dataset), ", ".join(cfg.method))

    sweep = None
    if cfg.get("sweep"):  # built before the model pass, so a bad sweep setting costs no explaining
        sweep = SweepScorer(sweep_thresholds(cfg.sweep), cfg.sweep.iou_thresholds,
                            box_protocol=cfg.metric.box_protocol, image_filter=cfg.metric.image_filter,
                            sweep_path=out_dir / "sweep.csv", wsoleval_path=out_dir / "wsoleval.csv",
                            dataset_name=dcfg.name, split=dcfg.split, boxes=cfg.sweep.get("boxes", "opencv"))
    stores = ensure_maps(cfg, dataset, transform, model, cfg.target, progress)
    write_json(out_dir / "maps.json", {m: {"folder": str(s.folder.resolve()), "key": s.key,
                                           "shard_size": s.shard_size, "num_items": len(dataset)}
                                       for m, s in stores.items()})
    thresholds = [float(t) for t in cfg.metric.thresholds]
    records = LocalizationRecords(out_dir / "records.csv", thresholds, dataset_name=dcfg.name, split=dcfg.split,
                                  box_protocol=cfg.metric.box_protocol, has_masks=has_masks(dataset))
    notes = NoteCounter()
    scorers = [records, notes]
    faithfulness = None
    if cfg.get("faithfulness"):
        label_stores = stores if cfg.target == "label" else \
            ensure_maps(cfg, dataset, transform, model, "label", progress)
        faithfulness = FaithfulnessScorer(model.get, label_stores, faithfulness_settings(cfg.faithfulness),
                                          out_dir / "faithfulness.csv", dataset_name=dcfg.name, split=dcfg.split)
        scorers.append(faithfulness)
    exporter = None
    if cfg.export_masks:
        exporter = MaskExporter(out_dir / "masks", thresholds[0], box_protocol=cfg.metric.box_protocol,
                                class_names=getattr(dataset, "class_names", None))
        scorers.append(exporter)
    if sweep is not None:
        scorers.append(sweep)
    try:
        skipped = score_dataset(stores, dataset, scorers, box_protocol=cfg.metric.box_protocol,
                                batch_size=int(cfg.batch_size), num_workers=int(cfg.num_workers),
                                progress=progress)
    finally:
        records.finish()
    if exporter is not None:
        exporter.finish()
    if sweep is not None:
        sweep_csv, _ = sweep.finish()
        sweep_table = pd.read_csv(sweep_csv)
        if len(sweep_table):
            plot_sweep(sweep_table, out_dir / "sweep.png")
        else:
            log.warning("sweep: no image passes metric.image_filter=%s; sweep.csv is empty (try "
                        "metric.image_filter=all)", cfg.metric.image_filter)
    if faithfulness is not None:
        frame = pd.read_csv(faithfulness.finish())
        plot_perturbation_curves(frame, out_dir / "faithfulness_curves.png")
    index_skipped = [(s.image_id, s.reason) for s in getattr(dataset, "skipped", [])]
    write_data_report(out_dir, index_skipped + skipped, notes.finish(), len(dataset))

    if int(cfg.gallery_images) > 0:
        write_gallery(cfg, dataset, transform, stores, out_dir / "gallery.png")

    tables = run_tables(out_dir)
    write_run_tables(out_dir, tables=tables)
    print()
    print(format_run_tables(tables))
    print(f"\nrun folder: {out_dir}")
    return tables["localization"]


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
