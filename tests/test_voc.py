"""Pascal VOC 2012 loader on miniature datasets written in the official layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsol_bench.datasets import EvalTransform, SkippedSample, build_dataset
from wsol_bench.datasets.voc import SEVERAL_CLASSES, VOC_CLASSES, VocDataset, voc_box_to_xyxy
from wsol_bench.errors import InputFileError

W, H = 40, 30  # every test image is 40 wide, 30 high
TO_224 = EvalTransform((224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
DOG, CAT, PERSON, BIRD = (VOC_CLASSES.index(n) for n in ("dog", "cat", "person", "bird"))


def voc_dir(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def write_image(root: Path, image_id: str, size: tuple[int, int] = (W, H)) -> None:
    path = voc_dir(root) / "JPEGImages" / f"{image_id}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(image_id))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_xml(root: Path, image_id: str, objects: list[tuple], size: tuple[int, int] | None = (W, H)) -> None:
    """objects: (name, xmin, ymin, xmax, ymax) or with a 6th item, the <difficult> text."""
    parts = [f"<annotation><filename>{image_id}.jpg</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, x0, y0, x1, y1, *difficult in objects:
        flag = f"<difficult>{difficult[0]}</difficult>" if difficult else ""  # absent: means 0
        parts.append(f"<object><name>{name}</name>{flag}<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                     f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
                     "<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax>"
                     "<ymax>2</ymax></bndbox></part></object>")
    path = voc_dir(root) / "Annotations" / f"{image_id}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts) + "</annotation>")


def write_split(root: Path, image_set: str, split: str, ids: list[str]) -> None:
    path = voc_dir(root) / "ImageSets" / image_set / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def write_mask(root: Path, image_id: str, indices: np.ndarray, mode: str = "P") -> None:
    path = voc_dir(root) / "SegmentationClass" / f"{image_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.ascontiguousarray(indices, dtype=np.uint8)
    image = Image.frombytes("P", (pixels.shape[1], pixels.shape[0]), pixels.tobytes())
    # A colourful palette, as VOC's: reading colours instead of indices would give other values.
    image.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, i)])
    if mode == "RGB":
        image = image.convert("RGB")
    image.save(path)


@pytest.fixture
def detection_root(tmp_path: Path) -> Path:
    """Three images: one dog, two cats (one difficult), and a dog with a person."""
    write_xml(tmp_path, "2008_000001", [("dog", 5, 4, 20, 15)])
    write_xml(tmp_path, "2008_000002", [("cat", 1, 1, 10, 10), ("cat", 11, 5, 30, 25, 1)])
    write_xml(tmp_path, "2008_000003", [("dog", 1, 1, 30, 30), ("person", 31, 1, 40, 10)])
    for i in ("2008_000001", "2008_000002", "2008_000003"):
        write_image(tmp_path, i)
    write_split(tmp_path, "Main", "val", ["2008_000001", "2008_000002", "2008_000003"])
    write_split(tmp_path, "Main", "train", ["2008_000002"])
    return tmp_path


def test_one_based_inclusive_corners_become_continuous_edges():
    """xmin=1 is the first pixel column: [xmin - 1, xmax)."""
    assert voc_box_to_xyxy(1, 1, 40, 30) == [0.0, 0.0, 40.0, 30.0]
    assert voc_box_to_xyxy(5, 4, 20, 15) == [4.0, 3.0, 20.0, 15.0]


def test_single_class_filter_ids_labels_and_splits(detection_root: Path):
    """AG-CAM protocol: one-class images only, multi-instance allowed, difficult kept."""
    ds = VocDataset(detection_root, split="val")
    assert [r.image_id for r in ds.records] == ["2008_000001", "2008_000002"]
    assert [r.label for r in ds.records] == [DOG, CAT]
    assert ds.skipped == [SkippedSample("2008_000003", SEVERAL_CLASSES)]
    cats = ds.records[1]
    assert cats.boxes.tolist() == [[0, 0, 10, 10], [10, 4, 30, 25]]
    assert cats.difficult.tolist() == [False, True]  # missing <difficult> = 0; no filtering
    assert cats.size == (W, H) and cats.path == "2008_000002.jpg"
    assert ds.num_classes == 20 and ds.class_names[DOG] == "dog"
    assert [r.image_id for r in VocDataset(detection_root, split="train").records] == ["2008_000002"]


def test_boxes_and_image_after_resize_to_224(detection_root: Path):
    """40x30 -> 224x224: x scales by 5.6, y by 224/30; the on-disk boxes stay as they were."""
    raw = VocDataset(detection_root)[0]
    assert raw.image.shape == (3, H, W) and raw.image.dtype == torch.uint8 and raw.orig_size == (W, H)
    out = VocDataset(detection_root, transform=TO_224)[0]
    assert out.image.shape == (3, 224, 224) and out.image.dtype == torch.float32
    assert torch.allclose(out.boxes, torch.tensor([[22.4, 22.4, 112.0, 112.0]]), atol=1e-4)
    assert out.orig_boxes.tolist() == [[4.0, 3.0, 20.0, 15.0]]
    assert out.box_labels.tolist() == [DOG] and out.mask is None and out.notes == ()


def test_multi_label_policies(detection_root: Path):
    """largest: the class with the larger summed box area; per_class: one item per class."""
    largest = VocDataset(detection_root, multi_label="largest")
    assert [(r.image_id, r.label) for r in largest.records][-1] == ("2008_000003", DOG)
    per_class = VocDataset(detection_root, multi_label="per_class")
    assert [(r.image_id, r.label) for r in per_class.records] == [
        ("2008_000001:dog", DOG), ("2008_000002:cat", CAT), ("2008_000003:dog", DOG),
        ("2008_000003:person", PERSON)]
    item = per_class[3]
    assert item.label == PERSON and item.box_labels.tolist() == [DOG, PERSON]
    assert per_class.skipped == [] and largest.skipped == []


def test_largest_breaks_ties_towards_the_lower_class_index(tmp_path: Path):
    write_xml(tmp_path, "a", [("person", 1, 1, 10, 10), ("bird", 11, 11, 20, 20)])
    write_split(tmp_path, "Main", "val", ["a"])
    write_image(tmp_path, "a")
    assert VocDataset(tmp_path, multi_label="largest").records[0].label == BIRD


def test_root_may_be_parent_vocdevkit_or_voc2012(detection_root: Path):
    for root in (detection_root, detection_root / "VOCdevkit", voc_dir(detection_root)):
        assert VocDataset(root).voc_dir == voc_dir(detection_root)


def test_missing_root_or_subfolder_names_the_layout(tmp_path: Path, detection_root: Path):
    with pytest.raises(FileNotFoundError, match="does not exist.*VOCdevkit/VOC2012"):
        VocDataset(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no VOC2012 folder.*found readme.txt"):
        VocDataset(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="needs SegmentationClass, ImageSets/Segmentation"):
        VocDataset(detection_root, mode="segmentation")
    with pytest.raises(FileNotFoundError, match="test.txt is missing.*train.txt, val.txt"):
        VocDataset(detection_root, split="test")
    with pytest.raises(ValueError, match="unknown multi_label"):
        VocDataset(detection_root, multi_label="first")


def test_float_coordinates_are_kept_and_noted(tmp_path: Path):
    write_xml(tmp_path, "f", [("dog", "5.5", "4", "20.25", "15.0")])
    write_split(tmp_path, "Main", "val", ["f"])
    write_image(tmp_path, "f")
    ds = VocDataset(tmp_path)
    assert ds.records[0].boxes.tolist() == [[4.5, 3.0, 20.25, 15.0]]
    assert ds[0].notes == ("float box coordinates kept as written",)


def test_boxes_outside_the_image_are_clipped_or_dropped_with_notes(tmp_path: Path):
    write_xml(tmp_path, "c", [("dog", 0, 5, 50, 31), ("dog", 45, 1, 50, 10)])  # 2nd lies right of it
    write_split(tmp_path, "Main", "val", ["c"])
    write_image(tmp_path, "c")
    sample = VocDataset(tmp_path)[0]
    assert sample.orig_boxes.tolist() == [[0.0, 4.0, 40.0, 30.0]]
    assert sample.notes == ("box clipped to image: 2 of 2 to 40x30",
                            "degenerate box dropped: 1 of 2 without area")


def test_annotation_size_differing_from_the_image_is_noted(tmp_path: Path):
    """The XML claims 50x30; the JPEG is 40x30: noted, boxes clipped to the real image."""
    write_xml(tmp_path, "s", [("cat", 11, 1, 45, 20)], size=(50, 30))
    write_split(tmp_path, "Main", "val", ["s"])
    write_image(tmp_path, "s")
    ds = VocDataset(tmp_path)
    assert ds.records[0].boxes.tolist() == [[10.0, 0.0, 45.0, 20.0]] and ds.records[0].notes == ()
    sample = ds[0]
    assert sample.orig_size == (W, H) and sample.orig_boxes.tolist() == [[10.0, 0.0, 40.0, 20.0]]
    assert sample.notes == ("annotation size 50x30 != image size 40x30",
                            "box clipped to image: 1 of 1 to 40x30")


def test_images_without_usable_annotation_are_counted(detection_root: Path):
    write_split(detection_root, "Main", "val", ["2008_000001", "2008_000009", "2008_000010", "2008_000011"])
    write_xml(detection_root, "2008_000010", [("unicorn", 1, 1, 5, 5)])
    write_xml(detection_root, "2008_000011", [("dog", "a", 1, 5, 5)])
    ds = VocDataset(detection_root)
    reasons = {s.image_id: s.reason for s in ds.skipped}
    assert len(ds) == 1 and set(reasons) == {"2008_000009", "2008_000010", "2008_000011"}
    assert "Annotations/2008_000009.xml is missing" in reasons["2008_000009"]
    assert "2008_000010.xml: unknown class 'unicorn'" in reasons["2008_000010"]
    assert "<xmin> is 'a', not a number" in reasons["2008_000011"]


def test_corrupt_or_missing_image_gives_a_skipped_sample(detection_root: Path):
    (voc_dir(detection_root) / "JPEGImages" / "2008_000001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (voc_dir(detection_root) / "JPEGImages" / "2008_000002.jpg").unlink()
    ds = VocDataset(detection_root, transform=TO_224)
    first, second = ds[0], ds[1]
    assert isinstance(first, SkippedSample) and first.image_id == "2008_000001"
    assert "2008_000001.jpg" in first.reason
    assert isinstance(second, SkippedSample) and "2008_000002.jpg" in second.reason


def test_a_split_without_any_usable_image_is_an_error(detection_root: Path):
    write_split(detection_root, "Main", "val", ["2008_000003", "2008_000404"])
    with pytest.raises(InputFileError, match="no usable item.*2 skipped.*objects of several classes"):
        VocDataset(detection_root)


def test_num_images_keeps_the_first_items_and_the_skips_before_them(detection_root: Path):
    write_split(detection_root, "Main", "val", ["2008_000003", "2008_000001", "2008_000002"])
    ds = VocDataset(detection_root, num_images=1)
    assert [r.image_id for r in ds.records] == ["2008_000001"] and len(ds.skipped) == 1


@pytest.fixture
def segmentation_root(tmp_path: Path) -> Path:
    """'two': left half dog, right half cat (fewer pixels), void top row; 'one': a bird."""
    two = np.zeros((H, W), dtype=np.uint8)
    two[:, :20] = DOG + 1
    two[10:, 20:] = CAT + 1
    two[0, :] = 255
    one = np.zeros((H, W), dtype=np.uint8)
    one[5:10, 5:10] = BIRD + 1
    write_mask(tmp_path, "two", two)
    write_mask(tmp_path, "one", one)
    write_xml(tmp_path, "two", [("dog", 1, 1, 20, 30), ("cat", 21, 11, 40, 30)])
    for i in ("two", "one"):
        write_image(tmp_path, i)
    write_split(tmp_path, "Segmentation", "val", ["two", "one"])
    return tmp_path


def test_segmentation_label_is_the_class_with_most_pixels(segmentation_root: Path):
    ds = VocDataset(segmentation_root, mode="segmentation")
    assert [(r.image_id, r.label) for r in ds.records] == [("two", DOG), ("one", BIRD)]
    assert ds.records[0].boxes.tolist() == [[0, 0, 20, 30], [20, 10, 40, 30]]
    assert ds.records[1].notes == ("no boxes: no annotation: Annotations/one.xml is missing",)
    sample = ds[0]
    assert sample.mask.dtype == torch.uint8 and sample.mask.shape == (H, W)
    assert torch.unique(sample.mask).tolist() == [0, CAT + 1, DOG + 1, 255]


def test_mask_and_void_after_nearest_resize_to_224(segmentation_root: Path):
    """Nearest neighbour: output column j reads source column floor(j * 40 / 224), row i reads
    floor(i * 30 / 224); source row 0 (void) covers output rows 0..7, column 19 ends at 111."""
    mask = build_dataset("voc_segmentation", root=segmentation_root, transform=TO_224)[0].mask
    assert mask.shape == (224, 224)
    assert (mask[:8] == 255).all() and not (mask[8:] == 255).any()
    assert (mask[8:, :112] == DOG + 1).all()
    rows = torch.tensor([int(i * 30 / 224) for i in range(224)])
    expected_right = torch.where(rows >= 10, CAT + 1, 0).to(torch.uint8)
    assert torch.equal(mask[8:, 112:], expected_right[8:, None].expand(-1, 112))


def test_segmentation_single_class_filter_and_per_class(segmentation_root: Path):
    single = VocDataset(segmentation_root, mode="segmentation", multi_label="skip")
    assert [r.image_id for r in single.records] == ["one"]
    assert single.skipped == [SkippedSample("two", SEVERAL_CLASSES)]
    per_class = VocDataset(segmentation_root, mode="segmentation", multi_label="per_class")
    assert [r.image_id for r in per_class.records] == ["two:cat", "two:dog", "one:bird"]


def test_bad_segmentation_masks_are_counted(segmentation_root: Path):
    """An RGB png (colours, not indices), values outside the classes, no mask at all."""
    write_mask(segmentation_root, "rgb", np.zeros((H, W)), mode="RGB")
    write_mask(segmentation_root, "odd", np.full((H, W), 30))
    write_split(segmentation_root, "Segmentation", "val", ["one", "rgb", "odd", "none"])
    ds = VocDataset(segmentation_root, mode="segmentation")
    reasons = {s.image_id: s.reason for s in ds.skipped}
    assert [r.image_id for r in ds.records] == ["one"]
    assert "rgb.png has mode RGB, not a palette" in reasons["rgb"]
    assert "mask values [30] are neither a class" in reasons["odd"]
    assert "SegmentationClass/none.png is missing" in reasons["none"]


def test_mask_replaced_after_indexing_with_other_size_is_skipped(segmentation_root: Path):
    ds = VocDataset(segmentation_root, mode="segmentation")
    write_mask(segmentation_root, "one", np.zeros((H, W + 2)))
    item = ds[1]
    assert isinstance(item, SkippedSample) and "42x30 but the image is 40x30" in item.reason
