"""The wsolevaluation presets (experiment=wsoleval_imagenet|wsoleval_cub): they compose to
wsolevaluation's protocol, and the CUB one runs end to end on a tiny tree in wsolevaluation's
metadata layout, writing MaxBoxAcc and MaxBoxAccV2."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from test_cub import write_jpeg, write_metadata


@pytest.mark.parametrize("name,dataset,model", [("wsoleval_imagenet", "imagenet", "vit_base_patch16_224.orig_in21k_ft_in1k"),
                                                ("wsoleval_cub", "cub", None)])
def test_presets_compose_the_wsolevaluation_protocol(name, dataset, model):
    with initialize_config_module("wsol_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"])
    assert cfg.dataset.name == dataset and OmegaConf.is_missing(cfg.dataset.params, "root")
    if model:
        assert cfg.model.name == model
    else:
        assert OmegaConf.is_missing(cfg.model, "checkpoint")
    assert cfg.target == "label" and cfg.metric.image_filter == "all"
    assert (cfg.sweep.start, cfg.sweep.stop, cfg.sweep.step) == (0.0, 1.0, 0.01)
    assert list(cfg.sweep.iou_thresholds) == [30, 50, 70] and cfg.sweep.boxes == "opencv"
    assert list(cfg.preprocess.input_size) == [224, 224] and cfg.preprocess.resize == "squash"
    assert list(cfg.preprocess.mean) == [0.485, 0.456, 0.406] and list(cfg.preprocess.std) == [0.229, 0.224, 0.225]


def test_cub_preset_runs_on_a_wsolevaluation_tree(tmp_path: Path, command):
    root = tmp_path / "CUB_200_2011" / "images"
    rows = []
    for i in range(4):
        path = f"{i % 2:03d}.Class_{i % 2}/img_{i}.jpg"
        write_jpeg(root / path, (64, 48))
        rows.append((path, i % 2, (64, 48), [(4 + i, 6, 40 + i, 30)]))
    meta = write_metadata(tmp_path / "metadata" / "CUB" / "test", rows)
    proc = command("wsol-bench", ["experiment=wsoleval_cub", f"dataset.params.root={root.parent}",
                                  f"dataset.params.metadata={meta}", "model.name=vit_tiny_patch16_224",
                                  "model.pretrained=false", "model.checkpoint=null", "++model.kwargs.num_classes=200",
                                  "++model.kwargs.img_size=64", "preprocess.input_size=[64,64]",
                                  "method=[rollout,center]", "progress=false", "gallery_images=0",
                                  f"store.root={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wsoleval = pd.read_csv(tmp_path / "run" / "wsoleval.csv")
    assert sorted(wsoleval["method"]) == ["center", "rollout"]
    assert (wsoleval["n_images"] == 4).all() and (wsoleval["boxes"] == "opencv").all()
    assert wsoleval[["maxboxacc", "maxboxacc_v2", "gt_known_loc"]].notna().all().all()
