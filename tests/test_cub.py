"""CUB-200-2011 loader: official layout and wsolevaluation metadata, on miniature datasets and
on the real wsolevaluation test metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsol_bench.datasets import EvalTransform, SkippedSample, build_dataset
from wsol_bench.datasets.cub import CubDataset, cub_box_to_xyxy

TO_224 = EvalTransform((224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)
CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# (id, class id, is_train, file, x y w h, image size): ids 1-3 carry the real CUB entries.
IMAGES = [
    (1, 1, 0, "Black_Footed_Albatross_0046_18.jpg", "60.0 27.0 325.0 304.0", (500, 335)),
    (2, 1, 1, "Black_Footed_Albatross_0009_34.jpg", "139.0 30.0 153.0 264.0", (500, 335)),
    (3, 1, 0, "Black_Footed_Albatross_0002_55.jpg", "14.0 112.0 388.0 186.0", (500, 347)),
    (4, 3, 0, "Sooty_Albatross_0001_1.jpg", "4.0 3.0 15.0 11.0", (40, 30)),
]


def write_jpeg(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(size[0])
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def rel_path(entry: tuple) -> str:
    return f"{CLASSES[entry[1] - 1]}/{entry[3]}"


def write_official(root: Path, entries: list[tuple] = IMAGES, images: bool = True) -> Path:
    """CUB_200_2011 with its five index files; small images only when `images`."""
    cub = root / "CUB_200_2011"
    (cub / "images").mkdir(parents=True, exist_ok=True)
    (cub / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CLASSES)))
    (cub / "images.txt").write_text("".join(f"{e[0]} {rel_path(e)}\n" for e in entries))
    (cub / "image_class_labels.txt").write_text("".join(f"{e[0]} {e[1]}\n" for e in entries))
    (cub / "train_test_split.txt").write_text("".join(f"{e[0]} {e[2]}\n" for e in entries))
    (cub / "bounding_boxes.txt").write_text("".join(f"{e[0]} {e[4]}\n" for e in entries))
    if images:
        for e in entries:
            if e[5][0] < 100:  # the real-size entries stay index-only
                write_jpeg(cub / "images" / rel_path(e), e[5])
    return cub


def write_metadata(folder: Path, rows: list[tuple[str, int, tuple[int, int], list[tuple]]]) -> Path:
    """wsolevaluation files; rows: (path, label, (w, h), [inclusive corners, ...])."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "image_ids.txt").write_text("".join(f"{p}\n" for p, *_ in rows))
    (folder / "class_labels.txt").write_text("".join(f"{p},{label}\n" for p, label, *_ in rows))
    (folder / "image_sizes.txt").write_text("".join(f"{p},{w},{h}\n" for p, _, (w, h), _ in rows))
    (folder / "localization.txt").write_text(
        "".join(f"{p},{','.join(map(str, box))}\n" for p, _, _, boxes in rows for box in boxes))
    return folder


@pytest.fixture(autouse=True)
def _official_tree(tmp_path: Path) -> None:
    """Every test starts from the miniature official tree in tmp_path."""
    write_official(tmp_path)


def test_box_convention_is_inclusive_corners():
    """(x, y, w, h): x + w is the last pixel column inside the box."""
    assert cub_box_to_xyxy(60.0, 27.0, 325.0, 304.0) == [60.0, 27.0, 386.0, 332.0]
    assert cub_box_to_xyxy(0.0, 0.0, 39.0, 29.0) == [0.0, 0.0, 40.0, 30.0]  # a full 40x30 image


def test_official_split_ids_labels_and_boxes(tmp_path: Path):
    ds = CubDataset(tmp_path)
    assert [r.image_id for r in ds.records] == [rel_path(IMAGES[i]) for i in (0, 2, 3)]
    assert [r.label for r in ds.records] == [0, 0, 2] and ds.skipped == []
    assert ds.records[0].boxes.tolist() == [[60.0, 27.0, 386.0, 332.0]] and ds.records[0].size is None
    assert ds.num_classes == 3 and ds.class_names[2] == "003.Sooty_Albatross"
    train = CubDataset(tmp_path / "CUB_200_2011", split="train")
    assert [r.image_id for r in train.records] == [rel_path(IMAGES[1])]


def test_item_boxes_after_resize_to_224(tmp_path: Path):
    """40x30 -> 224: x scales by 5.6, y by 224/30; box [4, 3, 20, 15] -> [22.4, 22.4, 112, 112]."""
    ds = build_dataset("cub", root=tmp_path, split="test", transform=TO_224)
    sample = ds[2]
    assert sample.image.shape == (3, 224, 224) and sample.label == 2 and sample.orig_size == (40, 30)
    assert torch.allclose(sample.boxes, torch.tensor([[22.4, 22.4, 112.0, 112.0]]), atol=1e-4)
    assert sample.orig_boxes.tolist() == [[4.0, 3.0, 20.0, 15.0]] and sample.notes == ()
    assert sample.mask is None


def test_real_test_metadata_parses_without_images(tmp_path: Path, shared_data: Path):
    """All 5,794 real test entries: ids, labels 0..199, one box each inside its image."""
    metadata = shared_data / "wsolevaluation-metadata" / "CUB"
    root = tmp_path / "bare"
    (root / "CUB_200_2011" / "images").mkdir(parents=True)
    ds = CubDataset(root, split="test", metadata=metadata)
    assert ds.layout == "wsolevaluation" and len(ds) == 5794 and ds.skipped == []
    assert len({r.image_id for r in ds.records}) == 5794
    assert {r.label for r in ds.records} == set(range(200)) and ds.num_classes == 200
    assert all(len(r.boxes) == 1 and r.size is not None for r in ds.records)
    assert not any(r.notes for r in ds.records)  # inclusive corners: no box reaches past W or H
    first = ds.records[0]
    assert first.image_id == "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    assert first.label == 0 and first.size == (500, 335)
    assert first.boxes.tolist() == [[60.0, 27.0, 386.0, 332.0]]
    assert ds.class_names[0] == "001.Black_footed_Albatross"
    assert ds.class_names[199] == "200.Common_Yellowthroat"
    edges = torch.cat([r.boxes for r in ds.records])
    widths = torch.tensor([r.size[0] for r in ds.records], dtype=torch.float32)
    assert int((edges[:, 2] == widths).sum()) == 67  # x + w = W - 1 exactly: 67 real images


def test_official_conversion_reproduces_the_metadata(tmp_path: Path, shared_data: Path):
    """The official x y w h entries give the metadata's localization.txt corners: the real
    entries of ids 1 and 3, and further test entries written from the metadata."""
    folder = shared_data / "wsolevaluation-metadata" / "CUB" / "test"
    lines = (folder / "localization.txt").read_text().splitlines()[:40:7]
    expected = {p: [float(v) for v in rest] for p, *rest in (line.split(",") for line in lines)}
    labels = dict(line.split(",") for line in (folder / "class_labels.txt").read_text().splitlines())
    extra = []
    for n, (path, (x0, y0, x1, y1)) in enumerate(expected.items(), start=10):
        klass, name = path.split("/")
        if name in {e[3] for e in IMAGES}:
            continue
        assert klass == CLASSES[int(labels[path])]
        extra.append((n, int(labels[path]) + 1, 0, name, f"{x0} {y0} {x1 - x0} {y1 - y0}", (500, 500)))
    assert len(extra) >= 3
    write_official(tmp_path / "official", IMAGES + extra, images=False)
    official = {r.image_id: r.boxes[0].tolist() for r in CubDataset(tmp_path / "official").records}
    for path, corners in expected.items():
        assert official[path] == [corners[0], corners[1], corners[2] + 1, corners[3] + 1], path
    root = tmp_path / "bare" / "CUB_200_2011" / "images"
    root.mkdir(parents=True)
    meta = {r.image_id: r.boxes[0].tolist() for r in CubDataset(root.parent, metadata=folder).records}
    assert all(meta[p] == official[p] for p in expected)


def test_wsolevaluation_layout_with_images_several_boxes_and_size_mismatch(tmp_path: Path):
    cub = tmp_path / "CUB_200_2011"
    sooty = rel_path(IMAGES[3])
    folder = write_metadata(tmp_path / "metadata" / "CUB" / "test", [
        (sooty, 2, (40, 30), [(4, 3, 19, 14), (30, 20, 45, 29)]),  # 2nd box reaches past x = 40
        (rel_path(IMAGES[0]), 0, (500, 335), [(60, 27, 385, 331)]),
        ("001.Black_footed_Albatross/none.jpg", 0, (10, 10), []),
    ])
    ds = CubDataset(cub, metadata=folder.parent, layout="wsolevaluation")
    assert [r.image_id for r in ds.records] == [sooty, rel_path(IMAGES[0])]
    assert ds.skipped[0].image_id.endswith("none.jpg") and "localization.txt" in ds.skipped[0].reason
    assert ds.records[0].boxes.tolist() == [[4, 3, 20, 15], [30, 20, 40, 30]]
    assert ds.records[0].notes == ("box clipped to image: 1 of 2 to 40x30",)
    (folder / "image_sizes.txt").write_text(f"{sooty},44,30\n")
    sample = CubDataset(cub, metadata=folder)[0]
    assert sample.notes == ("box clipped to image: 1 of 2 to 44x30",
                            "annotation size 44x30 != image size 40x30",
                            "box clipped to image: 1 of 2 to 40x30")
    assert sample.orig_boxes.tolist() == [[4, 3, 20, 15], [30, 20, 40, 30]]
    missing = CubDataset(cub, metadata=folder)[1]
    assert isinstance(missing, SkippedSample) and "Black_Footed_Albatross_0046_18.jpg" in missing.reason
    with pytest.raises(ValueError, match="is the 'test' split but split='train'"):
        CubDataset(cub, split="train", metadata=folder)
    with pytest.raises(ValueError, match="needs dataset.params.metadata"):
        CubDataset(cub, layout="wsolevaluation")


def write_soft_mask(path: Path, values: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).convert(mode).save(path)


def test_segmentations_binarise_above_127(tmp_path: Path):
    """Soft mask: 127 is background, 128 object; mask = label + 1 on the object."""
    soft = np.zeros((30, 40), dtype=np.uint8)
    soft[:, 20:] = 128
    soft[:15, 20:] = 127
    soft[:15, :20] = 255
    segs = tmp_path / "segmentations"
    write_soft_mask(segs / rel_path(IMAGES[3]).replace(".jpg", ".png"), soft)
    ds = CubDataset(tmp_path, segmentations=segs, transform=TO_224)
    assert [r.image_id for r in ds.records] == [rel_path(IMAGES[3])]
    assert {s.image_id for s in ds.skipped} == {rel_path(IMAGES[0]), rel_path(IMAGES[2])}
    assert all("no segmentation mask" in s.reason for s in ds.skipped)
    mask = ds[0].mask
    expected = torch.zeros(30, 40, dtype=torch.uint8)
    expected[15:, 20:] = 3
    expected[:15, :20] = 3
    # Nearest resize: output (i, j) reads source (floor(i * 30 / 224), floor(j * 40 / 224)).
    rows = torch.tensor([int(i * 30 / 224) for i in range(224)])
    cols = torch.tensor([int(j * 40 / 224) for j in range(224)])
    assert torch.equal(mask, expected[rows][:, cols])
    rgb = soft[..., None].repeat(3, axis=2)
    rgb[..., 0] = 0
    Image.fromarray(rgb).save(segs / rel_path(IMAGES[3]).replace(".jpg", ".png"))
    sample = CubDataset(tmp_path, segmentations=segs)[0]
    assert sample.notes == ("segmentation mask is not grey: binarised on the channel mean",)
    write_soft_mask(segs / rel_path(IMAGES[3]).replace(".jpg", ".png"), soft[:, :30])
    item = CubDataset(tmp_path, segmentations=segs)[0]
    assert isinstance(item, SkippedSample) and "30x30 but the image is 40x30" in item.reason
    with pytest.raises(FileNotFoundError, match="segmentations folder"):
        CubDataset(tmp_path, segmentations=tmp_path / "nope")


def test_missing_root_or_files_name_the_layout(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist.*CUB_200_2011/"):
        CubDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no CUB_200_2011 folder.*found nothing"):
        CubDataset(tmp_path / "empty")
    (tmp_path / "CUB_200_2011" / "bounding_boxes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="needs bounding_boxes.txt.*found classes.txt"):
        CubDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="no wsolevaluation metadata for split 'test'"):
        CubDataset(tmp_path, metadata=tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown layout"):
        CubDataset(tmp_path, layout="kaggle")


def test_malformed_index_lines_name_file_and_line(tmp_path: Path):
    cub = tmp_path / "CUB_200_2011"
    (cub / "bounding_boxes.txt").write_text("1 60.0 27.0 325.0\n")
    with pytest.raises(ValueError, match=r"bounding_boxes.txt:1: expected 5 fields"):
        CubDataset(tmp_path)
    (cub / "bounding_boxes.txt").write_text("1 60.0 27.0 325.0 x\n")
    with pytest.raises(ValueError, match=r"bounding_boxes.txt:1: expected numbers"):
        CubDataset(tmp_path)
    write_official(tmp_path)
    (cub / "image_class_labels.txt").write_text("1 1\n2 1\n3 1\n4 9\n")
    with pytest.raises(ValueError, match=r"image_class_labels.txt:4: class '9' is not in 1..3"):
        CubDataset(tmp_path)


def test_float_coordinates_and_boxes_outside_the_image(tmp_path: Path):
    """Fractional values stay as written; the official index has no sizes, so a box past the
    image is clipped (with a note) when the item is read."""
    entries = [IMAGES[3][:4] + ("4.5 3.25 40.0 11.0", (40, 30))]
    write_official(tmp_path, entries)
    ds = CubDataset(tmp_path)
    assert ds.records[0].boxes.tolist() == [[4.5, 3.25, 45.5, 15.25]]
    sample = ds[0]
    assert sample.orig_boxes.tolist() == [[4.5, 3.25, 40.0, 15.25]]
    assert sample.notes == ("fractional box coordinates kept as written",
                            "box clipped to image: 1 of 1 to 40x30")
    write_official(tmp_path, [IMAGES[3][:4] + ("45.0 3.0 5.0 5.0", (40, 30))])
    outside = CubDataset(tmp_path)[0]
    assert isinstance(outside, SkippedSample) and "no box inside the 40x30 image" in outside.reason


def test_images_without_annotation_are_counted(tmp_path: Path):
    cub = tmp_path / "CUB_200_2011"
    (cub / "bounding_boxes.txt").write_text("".join(f"{e[0]} {e[4]}\n" for e in IMAGES if e[0] != 3))
    (cub / "train_test_split.txt").write_text("".join(f"{e[0]} {e[2]}\n" for e in IMAGES if e[0] != 4))
    ds = CubDataset(tmp_path)
    assert [r.image_id for r in ds.records] == [rel_path(IMAGES[0])]
    reasons = {s.image_id: s.reason for s in ds.skipped}
    assert reasons == {rel_path(IMAGES[2]): "no annotation: image 3 is not in bounding_boxes.txt",
                       rel_path(IMAGES[3]): "image 4 is not in train_test_split.txt"}


def test_corrupt_image_gives_a_skipped_sample(tmp_path: Path):
    (tmp_path / "CUB_200_2011" / "images" / rel_path(IMAGES[3])).write_bytes(b"GIF89a broken")
    item = CubDataset(tmp_path, num_images=3)[2]
    assert isinstance(item, SkippedSample) and item.image_id == rel_path(IMAGES[3])
    assert "Sooty_Albatross_0001_1.jpg" in item.reason
