"""The imagenet_segmentation dataset on an HDF5 file written here with gtsegs_ijcv.mat's structure
(MATLAB v7.3: `value/img` references to images stored [3, W, H], `value/gt` references to [1, 1]
cells of references to masks stored [W, H]), with non-square images so that a transposition
error shows; bad entries are skipped with their reason; and experiment=chefer_segmentation runs
end to end through the command on such a file with a random ViT."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CommandResult
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

from wsol_bench.datasets import build_dataset
from wsol_bench.datasets.base import EvalTransform, SkippedSample, resize_mask


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 H x W x 3 image whose every pixel differs from its transposed position."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def box_mask(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 H x W mask with 1 inside [x0, y0, x1, y1) and 0 elsewhere."""
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    return mask


def write_gtsegs(path: Path, items: list[tuple[np.ndarray | None, np.ndarray | None]]) -> Path:
    """An HDF5 file with gtsegs_ijcv.mat's structure; an item's None leaves its reference null."""
    with h5py.File(path, "w") as f:
        images = f.create_dataset("value/img", (len(items), 1), dtype=h5py.ref_dtype)
        masks = f.create_dataset("value/gt", (len(items), 1), dtype=h5py.ref_dtype)
        refs = f.create_group("#refs#")
        for i, (image, mask) in enumerate(items):
            if image is not None:  # MATLAB writes column-major: HDF5 sees every axis reversed
                images[i, 0] = refs.create_dataset(f"img_{i}", data=image.transpose(2, 1, 0)).ref
            if mask is not None:
                cell = refs.create_dataset(f"cell_{i}", (1, 1), dtype=h5py.ref_dtype)
                cell[0, 0] = refs.create_dataset(f"gt_{i}", data=mask.T).ref
                masks[i, 0] = cell.ref
    return path


@pytest.fixture()
def gtsegs(tmp_path: Path) -> tuple[Path, list]:
    items = [(random_image(30, 40, 0), box_mask(30, 40, (5, 4, 25, 20))),
             (random_image(30, 40, 1), box_mask(40, 30, (2, 2, 10, 10))),   # mask transposed: wrong size
             (random_image(30, 40, 2), box_mask(30, 40, (10, 8, 38, 29))),
             (None, box_mask(30, 40, (0, 0, 4, 4))),                     # unreadable image reference
             (random_image(24, 36, 3), box_mask(24, 36, (0, 0, 0, 0)))]    # an empty mask is kept
    return write_gtsegs(tmp_path / "gtsegs_ijcv.mat", items), items


def test_items_read_as_the_reference_reads_them(gtsegs):
    path, items = gtsegs
    ds = build_dataset("imagenet_segmentation", file=str(path))
    assert len(ds) == 5 and ds.num_classes is None and not ds.has_labels
    first = ds[0]
    assert first.image_id == "imagenet_seg_000000" and first.label == 0 and first.orig_size == (40, 30)
    assert torch.equal(first.image, torch.from_numpy(items[0][0]).permute(2, 0, 1))
    assert torch.equal(first.mask, torch.from_numpy(items[0][1]))  # 1 on the object, as label + 1
    assert first.boxes.tolist() == [[5.0, 4.0, 25.0, 20.0]] and first.mask_resize == "pil"
    assert ds[2].boxes.tolist() == [[10.0, 8.0, 38.0, 29.0]]
    empty = ds[4]
    assert len(empty.boxes) == 0 and "empty mask: no object pixel" in empty.notes and empty.orig_size == (36, 24)


def test_bad_entries_are_skipped_with_their_reason(gtsegs):
    path, _ = gtsegs
    ds = build_dataset("imagenet_segmentation", file=str(path))
    mismatch, broken = ds[1], ds[3]
    assert isinstance(mismatch, SkippedSample) and mismatch.image_id == "imagenet_seg_000001"
    assert mismatch.reason == "mask is 30x40 but the image is 40x30 (width x height)"
    assert isinstance(broken, SkippedSample) and broken.reason.startswith("unreadable reference in gtsegs_ijcv.mat")


def test_mask_values_other_than_0_and_1_are_skipped(tmp_path: Path):
    path = write_gtsegs(tmp_path / "g.mat", [(random_image(8, 12, 0), np.full((8, 12), 255, dtype=np.uint8))])
    item = build_dataset("imagenet_segmentation", file=str(path))[0]
    assert isinstance(item, SkippedSample) and "mask holds values 255" in item.reason


def test_missing_or_foreign_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="set dataset.params.file to gtsegs_ijcv.mat"):
        build_dataset("imagenet_segmentation", file=str(tmp_path / "nowhere.mat"))
    (tmp_path / "old.mat").write_bytes(b"MATLAB 5.0 MAT-file")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        build_dataset("imagenet_segmentation", file=str(tmp_path / "old.mat"))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("data", data=np.zeros(3))
    with pytest.raises(ValueError, match=r"has no value/img or value/gt \(found at the top: data\)"):
        build_dataset("imagenet_segmentation", file=str(tmp_path / "other.h5"))


def test_the_mask_follows_pils_nearest_resize(gtsegs):
    """Chefer's target transform resizes the mask as a PIL image (pixel under each output
    pixel's centre), which differs from OpenCV's floor(i * scale) rule."""
    path, items = gtsegs
    ds = build_dataset("imagenet_segmentation", file=str(path),
                       transform=EvalTransform((16, 16), [0.5] * 3, [0.5] * 3))
    expected = np.asarray(Image.fromarray(items[2][1]).resize((16, 16), Image.Resampling.NEAREST))
    assert np.array_equal(ds[2].mask.numpy(), expected)
    opencv = resize_mask(torch.from_numpy(items[2][1]), (16, 16), "opencv").numpy()
    assert not np.array_equal(opencv, expected)  # the test would not tell the rules apart otherwise


def test_fingerprint_follows_the_file(gtsegs):
    path, _ = gtsegs
    first = build_dataset("imagenet_segmentation", file=str(path)).fingerprint()
    assert build_dataset("imagenet_segmentation", file=str(path), num_images=2).fingerprint() != first
    assert build_dataset("imagenet_segmentation", file=str(path)).fingerprint() == first


def test_preset_composes_chefers_protocol():
    with initialize_config_module("wsol_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=chefer_segmentation"])
    assert cfg.dataset.name == "imagenet_segmentation" and OmegaConf.is_missing(cfg.dataset.params, "file")
    assert cfg.model.name == "vit_base_patch16_224.orig_in21k_ft_in1k" and cfg.target == "predicted"
    assert list(cfg.preprocess.input_size) == [224, 224] and cfg.preprocess.resize == "squash"
    assert list(cfg.preprocess.mean) == [0.5] * 3 and list(cfg.preprocess.std) == [0.5] * 3
    assert cfg.metric.image_filter == "all" and cfg.segmentation.protocol == "chefer"
    assert list(cfg.method) == ["transformer_attribution", "rollout", "gradcam", "raw_attention", "lrp_last_layer",
                                "full_lrp", "attention_gradcam"]
    assert cfg.method.transformer_attribution.params.start_layer == 1


def _cli(command, tmp_path: Path, path: Path, *extra: str) -> CommandResult:
    """`wsol-bench experiment=chefer_segmentation ...`, in this process through the command's entry point."""
    return command("wsol-bench", ["experiment=chefer_segmentation", f"dataset.params.file={path}",
                                  "model.name=vit_tiny_patch16_224", "model.pretrained=false",
                                  "++model.kwargs.num_classes=10", "++model.kwargs.img_size=64",
                                  "preprocess.input_size=[64,64]", "progress=false", "gallery_images=0",
                                  f"store.root={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
                                  *extra], tmp_path)


def test_preset_runs_end_to_end(gtsegs, tmp_path: Path, command):
    path, _ = gtsegs
    proc = _cli(command, tmp_path, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    table = pd.read_csv(run / "segmentation.csv")
    assert list(table["method"]) == ["transformer_attribution", "rollout", "gradcam", "raw_attention",
                                     "lrp_last_layer", "full_lrp", "attention_gradcam"]
    assert (table["images"] == 3).all()  # 5 items, 2 skipped
    assert table[["pixel_accuracy", "mIoU", "mAP"]].apply(lambda c: c.between(0, 100)).all().all()
    rows = pd.read_csv(run / "segmentation_records.csv")
    assert len(rows) == 3 * 7 and set(rows["labelled"]) == {64 * 64}
    for method, part in rows.groupby("method", sort=False):  # the table is the totals of the rows
        row = table.set_index("method").loc[method]
        assert row["pixel_accuracy"] == pytest.approx(100 * part["correct"].sum() / part["labelled"].sum())
        assert row["mAP"] == pytest.approx(100 * part["ap"].mean())
    skipped = pd.read_csv(run / "skipped.csv")
    assert sorted(skipped["image_id"]) == ["imagenet_seg_000001", "imagenet_seg_000003"]


def test_label_free_dataset_refuses_target_label(gtsegs, tmp_path: Path, command):
    path, _ = gtsegs
    proc = _cli(command, tmp_path, path, "target=label", "method=[raw_attention]")
    assert proc.returncode != 0
    assert "has no class labels, so target=label cannot be computed" in proc.stderr
