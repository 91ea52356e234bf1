"""One benchmark run from a resolved configuration: build model, dataset and explainers,
explain and score, write records, maps, tables, config and environment to the run folder."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from wsol_bench.datasets import EvalTransform, build_dataset
from wsol_bench.figures import denormalize, heatmap_gallery
from wsol_bench.methods import get_explainer
from wsol_bench.models import ModelLoadError, data_config, load_model
from wsol_bench.outputs import environment, write_json
from wsol_bench.pipeline import run_localization
from wsol_bench.tables import format_table, localization_table, write_tables

log = logging.getLogger("wsol_bench")


def as_dict(node) -> dict:
    """A config node (or None) as a plain dict of keyword arguments."""
    return {} if node is None else dict(OmegaConf.to_container(node, resolve=True))


def build_transform(cfg: DictConfig, model: torch.nn.Module) -> EvalTransform:
    """The model's preprocessing, with any value the config sets taking precedence."""
    dc = data_config(model)
    pre = cfg.preprocess
    size = tuple(pre.input_size) if pre.input_size is not None else tuple(dc.input_size[1:])
    return EvalTransform(size=size, mean=pre.mean if pre.mean is not None else dc.mean,
                         std=pre.std if pre.std is not None else dc.std,
                         interpolation=pre.interpolation or dc.interpolation)


def run(cfg: DictConfig, out_dir: Path) -> pd.DataFrame:
    """Run the benchmark described by `cfg`, writing into `out_dir`; returns the table."""
    torch.manual_seed(int(cfg.seed))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_json(out_dir / "environment.json", environment(cfg.device))

    mcfg = cfg.model
    model = load_model(mcfg.name, pretrained=bool(mcfg.pretrained), checkpoint=mcfg.checkpoint,
                       device=cfg.device, **as_dict(mcfg.kwargs))
    transform = build_transform(cfg, model)
    dcfg = cfg.dataset
    dataset = build_dataset(dcfg.name, transform=transform,
                            **as_dict(dcfg.params))
    model_classes = getattr(model, "num_classes", None)
    data_classes = getattr(dataset, "num_classes", None)
    if model_classes is not None and data_classes is not None and model_classes != data_classes:
        raise ModelLoadError(f"model {mcfg.name} predicts {model_classes} classes but dataset "
                             f"{dcfg.name} has {data_classes}; load a checkpoint trained on it "
                             "(model.checkpoint=...)")
    if not cfg.method:
        raise ValueError("no method selected; e.g. method=[agcam,rollout]")
    explainers = {key: get_explainer(m.name, model, **as_dict(m.params))
                  for key, m in cfg.method.items()}
    log.info("model %s on %s, dataset %s/%s (%d images), methods %s", mcfg.name, cfg.device,
             dcfg.name, dcfg.split, len(dataset), ", ".join(explainers))

    store = run_localization(
        explainers, dataset, records_path=out_dir / "records.csv",
        thresholds=[float(t) for t in cfg.metric.thresholds], dataset_name=dcfg.name,
        split=dcfg.split, target_policy=cfg.target, batch_size=int(cfg.batch_size),
        num_workers=int(cfg.num_workers), box_protocol=cfg.metric.box_protocol,
        progress=bool(cfg.progress))
    store.save(out_dir / "maps")

    if int(cfg.gallery_images) > 0:
        count = min(int(cfg.gallery_images), len(dataset))
        samples = [dataset[i] for i in range(count)]
        heatmap_gallery([denormalize(s.image, transform.mean, transform.std) for s in samples],
                        [s.boxes[s.box_labels == s.label] for s in samples],
                        {m: torch.cat(store.maps[m])[:count] for m in store.maps},
                        out_dir / "gallery.png", threshold=float(cfg.metric.thresholds[0]),
                        titles=[s.image_id for s in samples])

    records = pd.read_csv(out_dir / "records.csv")
    table = localization_table(records, cfg.metric.image_filter)
    table.to_csv(out_dir / "table.csv")
    write_tables(table, out_dir)
    variants = ["box"] + (["mask"] if "mask_iou" in table.columns else [])
    for variant in variants:
        gt = "union of ground-truth boxes" if variant == "box" else "ground-truth segmentation mask"
        print(f"\n{dcfg.name}/{dcfg.split}, model {mcfg.name}, target {cfg.target}, images: "
              f"{cfg.metric.image_filter}; predicted box-union vs {gt} (percent)")
        print(format_table(table, variant))
    print(f"\nrun folder: {out_dir}")
    return table
