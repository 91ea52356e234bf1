"""The whole pipeline on a real three-image ImageNet val tree (the real sample images with
their real boxes) in every official layout, through the paper_imagenet preset: every layout
gives the same records, and the ground truth the metrics see is the real boxes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from test_imagenet import (
    REAL,
    REAL_BOX_COUNTS,
    _real_items,
    build_kaggle,
    build_torchvision,
    build_wsol,
    sorted_wnids,
)

from wsol_bench.run.runner import run

LAYOUTS = ["kaggle", "torchvision", "wsolevaluation"]


def _tree(layout: str, root: Path, shared: Path) -> list[str]:
    """Build the tree; returns the dataset overrides that point at it."""
    items, sources = _real_items(shared)
    if layout == "kaggle":
        build_kaggle(root, items, sources=sources)
        return [f"dataset.params.root={root}"]
    if layout == "torchvision":
        build_torchvision(root, items, sources=sources)
        return [f"dataset.params.root={root}"]
    meta = build_wsol(root, root / "meta", items, sources=sources, wnids=sorted_wnids())
    return [f"dataset.params.root={root}", f"dataset.params.metadata={meta}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    out = {}
    for layout in LAYOUTS:
        tmp = tmp_path_factory.mktemp(layout)
        overrides = _tree(layout, tmp / "imagenet", shared_data)
        with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                "experiment=paper_imagenet", *overrides, "run_name=test",
                # a random-weight ViT with ImageNet's 1000 classes stands in for the paper's weights;
                # two blocks (of 12) are enough to explain and score, and make ABPC's passes cheap
                "model.name=vit_tiny_patch16_224", "model.pretrained=false", "++model.kwargs.depth=2",
                "method=[agcam,rollout,center]", "sweep=grid", "metric.image_filter=all", "gallery_images=2", "progress=false",
                f"store.root={tmp / 'cache'}", "batch_size=2", "faithfulness.batch_size=16"])
        run(cfg, tmp / "run")
        out[layout] = tmp / "run"
    return out


def test_every_layout_gives_the_same_records(runs):
    frames = {layout: pd.read_csv(path / "records.csv") for layout, path in runs.items()}
    first = frames["kaggle"]
    assert sorted(first["image_id"].unique()) == sorted(REAL)
    for layout, frame in frames.items():
        pd.testing.assert_frame_equal(frame.drop(columns=["dataset"]), first.drop(columns=["dataset"]),
                                      obj=layout)
    for name in ("faithfulness.csv", "wsoleval.csv"):
        ref = pd.read_csv(runs["kaggle"] / name)
        for layout in LAYOUTS[1:]:
            pd.testing.assert_frame_equal(pd.read_csv(runs[layout] / name), ref, obj=f"{layout} {name}")


def test_records_carry_the_real_labels_and_box_counts(runs):
    records = pd.read_csv(runs["wsolevaluation"] / "records.csv")
    for image_id, row in records.drop_duplicates("image_id").set_index("image_id").iterrows():
        assert row["label"] == REAL[image_id] and row["n_gt_boxes"] == REAL_BOX_COUNTS[image_id]
    faith = pd.read_csv(runs["wsolevaluation"] / "faithfulness.csv")
    assert (faith["target"] == faith["label"]).all() and len(faith) == 3 * 3
    for name in ("table_box.md", "gallery.png", "sweep.png", "faithfulness_curves.png", "data.json"):
        assert (runs["wsolevaluation"] / name).is_file(), name
