"""Dataset summaries: counts from the annotation index, from loaded items, and image checks."""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from test_imagenet import ITEMS, TABBY, Item, build, build_kaggle, write_jpeg  # miniature-tree helpers

from wsol_bench.datasets.imagenet import ImageNetVal
from wsol_bench.datasets.imagenet_annotations import read_wsol_metadata
from wsol_bench.datasets.synthetic import SyntheticShapes
from wsol_bench.report.dataset_summary import format_summary, group_key, summarize


def test_group_key_removes_specifics() -> None:
    assert group_key("image file /data/val/a_01.JPEG is truncated or corrupt: image file is truncated "
                     "(68 bytes not processed)") == \
        "image file <file> is truncated or corrupt: image file is truncated (N bytes not processed)"
    assert group_key("annotation size 500x375 != image size 250x188; boxes scaled to the image") == \
        "annotation size WxH != image size WxH; boxes scaled to the image"
    assert group_key("box clipped to image: 2 of 3 to 40x20") == "box clipped to image: N of N to WxH"
    assert group_key("box class n99999999 is not one of the 1000 ImageNet-1k classes",
                     "ILSVRC2012_val_00000005") == \
        "box class n99999999 is not one of the N ImageNet-1k classes"
    image_id = "ILSVRC2012_val_00000007"
    assert group_key(f"id {image_id} has no box", image_id) == "id <id> has no box"


def _tree_with_problems(root: Path) -> ImageNetVal:
    """The three-image Kaggle tree plus an image without annotation and an annotation without image."""
    extra = Item("ILSVRC2012_val_00000004", TABBY, (10, 10), [[1, 1, 2, 2]])
    build_kaggle(root, ITEMS + [extra])
    images = root / "ILSVRC/Data/CLS-LOC/val"
    (images / "ILSVRC2012_val_00000004.JPEG").unlink()
    write_jpeg(images / "ILSVRC2012_val_00000009.JPEG", (12, 12))
    return ImageNetVal(root)


def test_summary_from_the_index_decodes_nothing(tmp_path: Path) -> None:
    ds = _tree_with_problems(tmp_path)
    for record in ds.records:  # any decode would now fail: the summary must not need one
        Path(record.path).write_bytes(b"not an image")
    s = summarize(ds)
    assert s["source"] == "records" and s["checked_images"] is False
    assert (s["images"], s["boxes"], s["classes_present"], s["num_classes"]) == (3, 4, 3, 1000)
    assert (s["multi_box_images"], s["max_boxes_per_image"], s["boxes_per_image"]) == (1, 2, {1: 2, 2: 1})
    assert s["skipped_at_index"] == 2
    assert s["skipped_reasons"] == {"image file missing": 1, "no annotation for this image": 1}
    assert s["skipped_examples"]["image file missing"] == ["ILSVRC2012_val_00000004"]
    assert s["notes"] == {}


def test_check_images_counts_unreadable_files_and_notes(tmp_path: Path) -> None:
    ds = build("wsolevaluation", tmp_path, ITEMS + [Item("ILSVRC2012_val_00000005", TABBY, (16, 16),
                                                         [[-2, 0, 5, 5]])])
    Path(ds.records[0].path).write_bytes(b"\xff\xd8\xff truncated")
    write_jpeg(Path(ds.records[1].path), ITEMS[1].size, mode="CMYK")
    write_jpeg(Path(ds.records[2].path), ITEMS[2].size, mode="L")
    s = summarize(ds, check_images=True, num_workers=0)
    assert s["checked_images"] is True and (s["loaded"], s["unreadable"]) == (3, 1)
    reason = "image file <file> is not a recognised image format (N bytes)"
    assert s["unreadable_reasons"] == {reason: 1}
    assert s["unreadable_examples"] == {reason: ["ILSVRC2012_val_00000001"]}
    assert s["notes"] == {"cmyk converted to rgb": 1, "greyscale converted to rgb": 1,
                          "box clipped to image: N of N to WxH": 1}
    assert s["images_with_notes"] == 3
    # The index-only summary knows the clipping (size stated in the metadata) but not the decodes.
    assert summarize(ds)["notes"] == {"box clipped to image: N of N to WxH": 1}


def test_worker_processes_give_the_same_summary(tmp_path: Path) -> None:
    ds = build("torchvision", tmp_path, ITEMS)
    write_jpeg(Path(ds.records[1].path), ITEMS[1].size, mode="CMYK")
    assert summarize(ds, check_images=True, num_workers=2) == summarize(ds, check_images=True, num_workers=0)


def test_dataset_without_records_is_counted_from_its_items() -> None:
    ds = SyntheticShapes(num_images=6, image_size=64)
    s = summarize(ds, num_workers=0)
    samples = [ds[i] for i in range(len(ds))]
    counts = [len(x.boxes) for x in samples]
    assert s["source"] == "items" and s["checked_images"] is True
    assert s["images"] == 6 and s["boxes"] == sum(counts) and s["max_boxes_per_image"] == max(counts)
    assert s["multi_box_images"] == sum(c > 1 for c in counts)
    assert s["classes_present"] == len({x.label for x in samples}) and s["num_classes"] == 6
    assert s["skipped_at_index"] == 0 and s["unreadable"] == 0


@dataclass
class _Row:
    image_id: str
    label: int
    boxes: np.ndarray


class _IndexOnly:
    """Any object following the index protocol: `records` aligned with the items."""

    def __init__(self, records: list[_Row]) -> None:
        self.records = records
        self.num_classes = 1000

    def __len__(self) -> int:
        return len(self.records)


def test_full_imagenet_metadata_summary(shared_data: Path) -> None:
    annotations, _ = read_wsol_metadata(shared_data / "wsolevaluation-metadata" / "ILSVRC" / "test")
    ds = _IndexOnly([_Row(k, a.box_classes[0], a.boxes) for k, a in annotations.items()])
    s = summarize(ds)
    counts = (s["images"], s["boxes"], s["multi_box_images"], s["max_boxes_per_image"])
    assert counts == (50_000, 80_477, 11_715, 20)
    assert s["classes_present"] == 1000 and sum(s["boxes_per_image"].values()) == 50_000
    assert s["boxes_per_image"][1] == 50_000 - 11_715


def test_real_partial_tree_groups_the_missing_files(tmp_path: Path, shared_data: Path) -> None:
    samples = shared_data / "imagenet-val-samples"
    (tmp_path / "val").mkdir()
    for path in sorted(samples.glob("*.JPEG")):
        (tmp_path / "val" / path.name).symlink_to(path)
    ds = ImageNetVal(tmp_path, metadata=shared_data / "wsolevaluation-metadata" / "ILSVRC" / "test")
    s = summarize(ds, check_images=True, num_workers=0)
    assert (s["images"], s["boxes"], s["multi_box_images"], s["max_boxes_per_image"]) == (3, 8, 1, 6)
    assert s["skipped_reasons"] == {"image file missing": 49_997}
    assert (s["loaded"], s["unreadable"], s["notes"]) == (3, 0, {})
    text = format_summary(s)
    assert "ImageNetVal: 3 images, 8 boxes, 3 of 1,000 classes present" in text
    assert "49,997  image file missing  (e.g. ILSVRC2012_val_00000001, ILSVRC2012_val_00000002" in text


def test_format_summary_lists_every_group(tmp_path: Path) -> None:
    ds = _tree_with_problems(tmp_path)
    text = format_summary(summarize(ds))
    assert text.splitlines()[:3] == [
        "ImageNetVal: 3 images, 4 boxes, 3 of 1,000 classes present",
        "  boxes per image: max 2; 1 image with more than one box",
        "  skipped by the index: 2"]
    assert "1  image file missing  (e.g. ILSVRC2012_val_00000004)" in text
    assert "1  no annotation for this image  (e.g. ILSVRC2012_val_00000009)" in text
    assert text.splitlines()[-2:] == [
        "    none", "  ground-truth coverage: not mapped (images not decoded; check_images=True maps it)"]


def test_file_problems_of_the_index_are_grouped(tmp_path: Path) -> None:
    """Twin files, a symbolic-link loop and a name that is not UTF-8: one group each, and a
    summary that can be written as UTF-8."""
    build_kaggle(tmp_path, ITEMS)
    images = tmp_path / "ILSVRC/Data/CLS-LOC/val"
    shutil.copy(images / "ILSVRC2012_val_00000001.JPEG", images / "ILSVRC2012_val_00000001.jpg")
    (images / "ILSVRC2012_val_00000002.JPEG").unlink()
    os.symlink("ILSVRC2012_val_00000002.JPEG", images / "ILSVRC2012_val_00000002.JPEG")
    try:
        write_jpeg(images / os.fsdecode(b"ILSVRC2012_val_\xff.JPEG"), (8, 8))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this filesystem does not store non-UTF-8 file names")
    s = summarize(ImageNetVal(tmp_path))
    assert s["images"] == 1 and s["skipped_reasons"] == {
        "N files for one image id in <file>: <id>.JPEG, <id>.jpg; keep one": 1,
        f"cannot read <file>: {os.strerror(errno.ELOOP)}": 1,
        "file name is not valid UTF-8: <file>; rename the file": 1}
    not_utf8 = "file name is not valid UTF-8: <file>; rename the file"
    assert s["skipped_examples"][not_utf8] == ["ILSVRC2012_val_\\xff"]
    format_summary(s).encode("utf-8")


def test_foreign_items_are_refused() -> None:
    class Odd:
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> tuple:
            return (1, 2)

    with pytest.raises(TypeError, match="item 0 of Odd is a tuple, not a Sample or SkippedSample"):
        summarize(Odd(), num_workers=0)


class _Items:
    """Items given as a list (no index): a summary loads each one."""

    def __init__(self, samples: list) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return self.samples[index]


def test_ground_truth_coverage_by_hand() -> None:
    """64x64 images on the 32x32 coverage grid (2x2 pixels a cell). Image 1: a mask on the
    top-left 32x32 pixels, with VOC's 255 (void) on a 2x2 cell that does not count. Image 2: no
    mask, a box [10.6, 0, 32, 20] holding the pixel centres of columns 11..31 and rows 0..19.
    Cell (0, 5) holds columns 10..11: image 1 covers it, image 2 half of it -> (1 + 0.5) / 2.
    The central quarter is cells 8..23 of each side; image 1 puts 8x8 of its 16x16 covered
    cells there, image 2 none (rows 0..19 are cells 0..9; cells 8..9 x 8..15 are covered: 2x8),
    so the share is (64 + 16) / (256 + 10.5 * 10)."""
    from wsol_bench.datasets.base import Sample
    from wsol_bench.report.dataset_summary import COVERAGE_GRID, centre_share, ground_truth_coverage

    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[:32, :32] = 1
    mask[40:42, 40:42] = 255
    with_mask = Sample(image=image, label=0, boxes=torch.tensor([[0.0, 0, 32, 32]]), image_id="a",
                       orig_size=(64, 64), mask=mask)
    boxes_only = Sample(image=image, label=0, boxes=torch.tensor([[10.6, 0, 32, 20]]), image_id="b",
                        orig_size=(64, 64))
    first, second = ground_truth_coverage(with_mask), ground_truth_coverage(boxes_only)
    assert first.shape == (COVERAGE_GRID, COVERAGE_GRID) and first.sum() == 256 and first[20, 20] == 0
    assert second[0, 5] == 0.5 and second[0, 6] == 1 and second[9, 15] == 1 and second[10, 15] == 0
    assert second.sum() == 10 * 10.5
    summary = summarize(_Items([with_mask, boxes_only]), num_workers=0)
    coverage = torch.tensor(summary["coverage"]["grid"])
    assert coverage[0, 5] == 0.75 and coverage[0, 0] == 0.5
    expected = (64 + 16) / (256 + 105)
    assert summary["coverage"]["centre_quarter_share"] == round(expected, 4)
    assert centre_share(first) == 0.25
    assert "the central quarter holds 22.2% of it" in format_summary(summary)


def test_coverage_is_not_mapped_from_the_index_alone(tmp_path: Path) -> None:
    """A summary from the annotation index decodes nothing, so it has no coverage map and says so."""
    s = summarize(_IndexOnly([_Row("a", 1, np.zeros((1, 4)))]), num_workers=0)
    assert "coverage" not in s and "coverage: not mapped" in format_summary(s)
