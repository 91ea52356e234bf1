"""ImageNet val in its three official layouts: ids, sorted-wnid labels, inclusive -> continuous
boxes, multi-box images, and every kind of bad input (each with its own test)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from wsol_bench.datasets import EvalTransform, Sample, SkippedSample, build_dataset
from wsol_bench.datasets.base import inclusive_to_continuous
from wsol_bench.datasets.imagenet import ImageNetVal, detect_layout, fit_boxes_to_image
from wsol_bench.datasets.imagenet_annotations import (
    read_loc_solution_csv,
    read_wsol_metadata,
    sanitize_box_sets,
    sanitize_boxes,
)
from wsol_bench.errors import InputFileError

TENCH, TABBY, TISSUE = "n01440764", "n02123045", "n15075141"  # classes 0, 281, 999 of ImageNet-1k
REPO = Path(__file__).resolve().parents[1]
KAGGLE_XML_DIR = "ILSVRC/Annotations/CLS-LOC/val"


@dataclass
class Item:
    """One image of a miniature tree: id, class, on-disk size (W, H), inclusive boxes."""

    image_id: str
    wnid: str
    size: tuple[int, int]
    boxes: list[list]
    xml_size: tuple[int, int] | None = None  # what the XML states; None = the true size
    coords: list[list[str]] | None = field(default=None)  # literal coordinate text for the XML


ITEMS = [
    Item("ILSVRC2012_val_00000001", TABBY, (40, 20), [[4, 2, 13, 11]]),
    Item("ILSVRC2012_val_00000002", TENCH, (30, 30), [[0, 0, 29, 29], [10, 5, 14, 9]]),
    Item("ILSVRC2012_val_00000003", TISSUE, (20, 40), [[5, 10, 9, 30]]),
]
LABELS = {"ILSVRC2012_val_00000001": 281, "ILSVRC2012_val_00000002": 0, "ILSVRC2012_val_00000003": 999}
# The boxes above as continuous edges after a squash-resize to 224 x 224, computed by hand:
# e.g. [4, 2, 13, 11] inclusive -> [4, 2, 14, 12) -> x * 224/40 = 5.6, y * 224/20 = 11.2.
BOXES_224 = {
    "ILSVRC2012_val_00000001": [[22.4, 22.4, 78.4, 134.4]],
    "ILSVRC2012_val_00000002": [[0.0, 0.0, 224.0, 224.0], [74.6667, 37.3333, 112.0, 74.6667]],
    "ILSVRC2012_val_00000003": [[56.0, 56.0, 112.0, 173.6]],
}


def write_jpeg(path: Path, size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format="JPEG")
    return path


def write_xml(path: Path, image_id: str, size: tuple[int, int], objects: list[tuple[str, list]]) -> Path:
    """An annotation file in the ILSVRC2012 bbox format."""
    parts = [(f"<annotation>\n\t<folder>val</folder>\n\t<filename>{image_id}</filename>\n"
             "\t<source>\n\t\t<database>ILSVRC_2012</database>\n\t</source>\n"
             f"\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>{size[1]}</height>\n"
             "\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n")]
    for wnid, (x0, y0, x1, y1) in objects:
        parts.append(f"\t<object>\n\t\t<name>{wnid}</name>\n\t\t<pose>Unspecified</pose>\n"
                     "\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
                     f"\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n\t\t\t<xmax>{x1}</xmax>\n"
                     f"\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n")
    parts.append("</annotation>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))
    return path


def _xml_for(path: Path, item: Item) -> Path:
    boxes = item.coords if item.coords is not None else item.boxes
    return write_xml(path, item.image_id, item.xml_size or item.size, [(item.wnid, b) for b in boxes])


def _place_image(path: Path, item: Item, source: Path | None, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        os.symlink(source, path)  # real files are read in place, never copied
    else:
        write_jpeg(path, item.size, seed)


def build_kaggle(root: Path, items: list[Item], *, csv: bool = True, xml: bool = True,
                 sources: dict[str, Path] | None = None) -> Path:
    """<root>/ILSVRC/Data/CLS-LOC/val/*.JPEG, Annotations/CLS-LOC/val/*.xml, LOC_val_solution.csv."""
    images, xmls = root / "ILSVRC/Data/CLS-LOC/val", root / "ILSVRC/Annotations/CLS-LOC/val"
    images.mkdir(parents=True, exist_ok=True)
    rows = ["ImageId,PredictionString"]
    for seed, item in enumerate(items):
        _place_image(images / f"{item.image_id}.JPEG", item, (sources or {}).get(item.image_id), seed)
        if xml:
            _xml_for(xmls / f"{item.image_id}.xml", item)
        rows.append(f"{item.image_id}," + " ".join(f"{item.wnid} {x0} {y0} {x1} {y1}"
                                                  for x0, y0, x1, y1 in item.boxes) + " ")
    if csv:
        (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def build_torchvision(root: Path, items: list[Item], *, sources: dict[str, Path] | None = None) -> Path:
    """<root>/val/<wnid>/*.JPEG with the bbox XMLs flat in <root>/val."""
    for seed, item in enumerate(items):
        _place_image(root / "val" / item.wnid / f"{item.image_id}.JPEG", item,
                     (sources or {}).get(item.image_id), seed)
        _xml_for(root / "val" / f"{item.image_id}.xml", item)
    return root


def build_wsol(root: Path, metadata: Path, items: list[Item], *, sources: dict[str, Path] | None = None,
               wnids: list[str] | None = None) -> Path:
    """wsolevaluation metadata (4 files) and <root>/val/*.JPEG; returns the metadata folder."""
    index = {w: i for i, w in enumerate(wnids or sorted_wnids())}
    metadata.mkdir(parents=True, exist_ok=True)
    ids, labels, sizes, boxes = [], [], [], []
    for seed, item in enumerate(items):
        key = f"val/{item.image_id}.JPEG"
        _place_image(root / key, item, (sources or {}).get(item.image_id), seed)
        ids.append(key)
        labels.append(f"{key},{index[item.wnid]}")
        sizes.append(f"{key},{(item.xml_size or item.size)[0]},{(item.xml_size or item.size)[1]}")
        boxes += [f"{key},{','.join(map(str, b))}" for b in item.boxes]
    for name, lines in (("image_ids", ids), ("class_labels", labels), ("image_sizes", sizes),
                        ("localization", boxes)):
        (metadata / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return metadata


class _Stub:
    """Just enough of a dataset for `_classes` (the sorted-wnid list) without building one."""

    def __init__(self, root: Path) -> None:
        self.root = root


def sorted_wnids() -> list[str]:
    return list(ImageNetVal._classes(_Stub(Path("/nonexistent")), None)[0])


def build(layout: str, root: Path, items: list[Item], **kwargs) -> ImageNetVal:
    """A miniature tree in `layout` and the dataset reading it (layout auto-detected)."""
    if layout == "kaggle":
        build_kaggle(root, items)
        return ImageNetVal(root, **kwargs)
    if layout == "kaggle_xml":
        build_kaggle(root, items, csv=False)
        return ImageNetVal(root, **kwargs)
    if layout == "torchvision":
        build_torchvision(root, items)
        return ImageNetVal(root, **kwargs)
    metadata = build_wsol(root, root / "metadata", items, wnids=sorted_wnids())
    return ImageNetVal(root, metadata=metadata, **kwargs)


ALL_LAYOUTS = ["kaggle", "kaggle_xml", "torchvision", "wsolevaluation"]


# -- box conventions ---------------------------------------------------------------------------

def test_inclusive_boxes_gain_one_pixel_on_the_far_edges() -> None:
    out = inclusive_to_continuous(np.array([[0, 0, 0, 0], [2, 3, 10, 20]]))
    assert out.tolist() == [[0, 0, 1, 1], [2, 3, 11, 21]]


def test_sanitize_clips_and_drops_by_hand() -> None:
    boxes = np.array([[-2, 1, 5, 4], [3, 3, 12, 9], [11, 0, 15, 3], [2, 2, 2, 5]], dtype=np.float32)
    kept, keep, notes = sanitize_boxes(boxes, (10, 8))
    assert kept.tolist() == [[0, 1, 5, 4], [3, 3, 10, 8]]
    assert keep.tolist() == [0, 1]
    assert notes == ("box clipped to image: 3 of 4 to 10x8", "degenerate box dropped: 2 of 4 without area")
    # Size unknown (Kaggle's csv): nothing is clipped yet, only boxes without area go.
    same, keep, notes = sanitize_boxes(boxes, None)
    assert np.array_equal(same, boxes[:3]) and notes == ("degenerate box dropped: 1 of 4 without area",)


def test_fit_boxes_policies_by_hand() -> None:
    boxes = np.array([[10, 20, 110, 220]], dtype=np.float32)
    scaled, _, notes = fit_boxes_to_image(boxes, (200, 400), (100, 100), "scale")
    assert scaled.tolist() == [[5, 5, 55, 55]]
    assert notes == ("annotation size 200x400 != image size 100x100; boxes scaled to the image",)
    kept, _, notes = fit_boxes_to_image(boxes, (200, 400), (100, 100), "keep")
    assert kept.tolist() == [[10, 20, 100, 100]]
    assert notes == ("annotation size 200x400 != image size 100x100",
                     "box clipped to image: 1 of 1 to 100x100")
    skip = fit_boxes_to_image(boxes, (200, 400), (100, 100), "skip")
    assert skip == "annotation size 200x400 != image size 100x100"
    same_size = fit_boxes_to_image(boxes, (100, 100), (100, 100), "skip")
    assert same_size[2] == ("box clipped to image: 1 of 1 to 100x100",)


# -- the miniature trees -------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_each_layout_gives_the_same_items(tmp_path: Path, layout: str) -> None:
    ds = build(layout, tmp_path, ITEMS)
    assert ds.layout == ("kaggle" if layout.startswith("kaggle") else layout)
    assert len(ds) == 3 and ds.skipped == [] and ds.num_classes == 1000
    assert [r.image_id for r in ds.records] == [i.image_id for i in ITEMS]
    for item in ITEMS:
        sample = ds[[r.image_id for r in ds.records].index(item.image_id)]
        assert isinstance(sample, Sample) and sample.notes == ()
        assert sample.label == LABELS[item.image_id]
        assert sample.box_labels.tolist() == [LABELS[item.image_id]] * len(item.boxes)
        assert sample.image.shape == (3, item.size[1], item.size[0]) and sample.image.dtype == torch.uint8
        assert sample.orig_size == item.size
        expected = inclusive_to_continuous(np.array(item.boxes)).tolist()
        assert sample.boxes.tolist() == expected and sample.orig_boxes.tolist() == expected


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_boxes_after_resize_to_224_by_hand(tmp_path: Path, layout: str) -> None:
    ds = build(layout, tmp_path, ITEMS, transform=EvalTransform((224, 224), (0.5,) * 3, (0.5,) * 3))
    for index in range(len(ds)):
        sample = ds[index]
        assert sample.image.shape == (3, 224, 224) and sample.image.dtype == torch.float32
        torch.testing.assert_close(sample.boxes, torch.tensor(BOXES_224[sample.image_id]), atol=1e-3, rtol=0)
        # orig_boxes stay in on-disk coordinates for protocols that rasterise there.
        assert sample.orig_boxes.tolist() == inclusive_to_continuous(
            np.array(next(i.boxes for i in ITEMS if i.image_id == sample.image_id))).tolist()


def test_class_names_follow_the_sorted_wnids(tmp_path: Path) -> None:
    ds = build("torchvision", tmp_path, ITEMS)
    assert ds.wnids[0] == TENCH and ds.wnids[281] == TABBY and ds.wnids[999] == TISSUE
    assert list(ds.wnids) == sorted(ds.wnids) and len(set(ds.wnids)) == 1000
    assert ds.class_names[0].startswith("tench") and ds.class_names[281].startswith("tabby")


def test_synset_mapping_in_root_gives_the_names(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    wnids = sorted_wnids()
    # Written in reverse: the class index must still be the sorted position.
    (tmp_path / "LOC_synset_mapping.txt").write_text("".join(f"{w} name of {w}\n" for w in reversed(wnids)))
    ds = ImageNetVal(tmp_path)
    assert ds.class_names[281] == f"name of {TABBY}" and ds[0].label == 281


def test_synset_mapping_with_foreign_wnids_is_refused(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    (tmp_path / "LOC_synset_mapping.txt").write_text("n00000001 thing\n")
    with pytest.raises(Exception, match=r"LOC_synset_mapping\.txt does not list the 1000 ImageNet-1k wnids"):
        ImageNetVal(tmp_path)


def test_num_images_keeps_the_first_ids(tmp_path: Path) -> None:
    ds = build("kaggle", tmp_path, ITEMS, num_images=2)
    assert [r.image_id for r in ds.records] == ["ILSVRC2012_val_00000001", "ILSVRC2012_val_00000002"]


def test_registry_and_hydra_config_build_it(tmp_path: Path) -> None:
    build_torchvision(tmp_path, ITEMS)
    cfg = OmegaConf.load(REPO / "conf" / "dataset" / "imagenet.yaml")
    cfg.params.root = str(tmp_path)
    assert cfg.name == "imagenet" and cfg.params.layout == "auto"
    params = OmegaConf.to_container(cfg.params, resolve=True)
    ds = build_dataset(cfg.name, transform=None, **params)
    assert isinstance(ds, ImageNetVal) and len(ds) == 3


# -- real reference data -----------------------------------------------------------------------

REAL = {"ILSVRC2012_val_00000125": 311, "ILSVRC2012_val_00001372": 958, "ILSVRC2012_val_00001854": 759}
REAL_BOX_COUNTS = {"ILSVRC2012_val_00000125": 1, "ILSVRC2012_val_00001372": 6, "ILSVRC2012_val_00001854": 1}


def _real_items(shared: Path) -> tuple[list[Item], dict[str, Path]]:
    """The three sample images with their real metadata lines (read from the files, not typed)."""
    meta = shared / "wsolevaluation-metadata" / "ILSVRC" / "test"
    samples = shared / "imagenet-val-samples"
    if not (meta.is_dir() and samples.is_dir()):
        pytest.skip("wsolevaluation metadata or imagenet-val-samples absent")
    wanted = {f"val/{i}.JPEG": i for i in REAL}

    def lines(name: str) -> dict[str, list[list[str]]]:
        out: dict[str, list[list[str]]] = {}
        for line in (meta / name).read_text().splitlines():
            key, *values = line.split(",")
            if key in wanted:
                out.setdefault(wanted[key], []).append(values)
        return out

    labels, sizes, boxes = lines("class_labels.txt"), lines("image_sizes.txt"), lines("localization.txt")
    wnids = sorted_wnids()
    items = [Item(i, wnids[int(labels[i][0][0])], tuple(map(int, sizes[i][0])),
                  [list(map(int, b)) for b in boxes[i]]) for i in REAL]
    return items, {i: samples / f"{i}.JPEG" for i in REAL}


@pytest.mark.parametrize("layout", ["kaggle", "kaggle_xml", "torchvision", "wsolevaluation"])
def test_real_three_image_tree_in_each_layout(tmp_path: Path, shared_data: Path, layout: str) -> None:
    items, sources = _real_items(shared_data)
    if layout.startswith("kaggle"):
        build_kaggle(tmp_path, items, csv=layout == "kaggle", sources=sources)
        ds = ImageNetVal(tmp_path)
    elif layout == "torchvision":
        ds = ImageNetVal(build_torchvision(tmp_path, items, sources=sources))
    else:
        ds = ImageNetVal(tmp_path, metadata=build_wsol(tmp_path, tmp_path / "meta", items, sources=sources,
                                                       wnids=sorted_wnids()))
    assert [r.image_id for r in ds.records] == list(REAL) and ds.skipped == []
    for index, item in enumerate(items):
        sample = ds[index]
        assert sample.notes == ()  # real sizes agree with the metadata
        assert sample.label == REAL[item.image_id] and len(sample.boxes) == REAL_BOX_COUNTS[item.image_id]
        assert sample.orig_size == item.size
        assert sample.boxes.tolist() == [[x0, y0, x1 + 1, y1 + 1] for x0, y0, x1, y1 in item.boxes]


def test_full_wsol_metadata_parses(shared_data: Path) -> None:
    meta = shared_data / "wsolevaluation-metadata" / "ILSVRC" / "test"
    annotations, problems = read_wsol_metadata(meta)
    counts = [len(a.boxes) for a in annotations.values()]
    assert problems == [] and len(annotations) == 50_000
    assert sum(counts) == 80_477 and sum(c > 1 for c in counts) == 11_715 and max(counts) == 20
    assert sorted({a.box_classes[0] for a in annotations.values()}) == list(range(1000))
    assert annotations["val/ILSVRC2012_val_00001372.JPEG"].boxes[5].tolist() == [9, 213, 27, 227]
    # Every box lies inside its stated size as 0-based inclusive pixels (max W-1, H-1).
    boxes = np.concatenate([a.boxes for a in annotations.values()])
    sizes = np.array([a.size for a in annotations.values() for _ in a.boxes])
    assert (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2] <= sizes[:, 0] - 1).all() and (boxes[:, 3] <= sizes[:, 1] - 1).all()


def test_full_metadata_with_three_present_images(tmp_path: Path, shared_data: Path) -> None:
    _, sources = _real_items(shared_data)
    for image_id, source in sources.items():
        (tmp_path / "val").mkdir(exist_ok=True)
        os.symlink(source, tmp_path / "val" / f"{image_id}.JPEG")
    ds = ImageNetVal(tmp_path, metadata=shared_data / "wsolevaluation-metadata" / "ILSVRC" / "test")
    assert [r.image_id for r in ds.records] == list(REAL)
    assert [r.label for r in ds.records] == list(REAL.values())
    assert len(ds.skipped) == 50_000 - 3 and {s.reason for s in ds.skipped} == {"image file missing"}
    limited = ImageNetVal(tmp_path, metadata=shared_data / "wsolevaluation-metadata" / "ILSVRC" / "test",
                          num_images=1)
    assert len(limited) == 1 and len(limited.skipped) == 124  # ids 1..124 passed over to reach id 125


# -- bad input -----------------------------------------------------------------------------------

def test_missing_root_names_the_layouts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset\.params\.root .*nowhere.* does not exist.*kaggle.*"
                                                 r"torchvision.*wsolevaluation"):
        ImageNetVal(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageNetVal(tmp_path / "nowhere", layout="kaggle")


def test_unrecognised_root_lists_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"cannot tell the layout.*found: readme\.txt, train/"):
        detect_layout(tmp_path, None)


def test_missing_subfolders_are_named(tmp_path: Path) -> None:
    (tmp_path / "ILSVRC").mkdir()
    with pytest.raises(FileNotFoundError, match=r"kaggle layout\): folder .*ILSVRC/Data/CLS-LOC/val does not "
                                                 r"exist.*found in .*: ILSVRC/"):
        ImageNetVal(tmp_path, layout="kaggle")
    with pytest.raises(FileNotFoundError, match=r"torchvision layout\): folder .*val does not exist"):
        ImageNetVal(tmp_path, layout="torchvision")
    with pytest.raises(FileNotFoundError,
                       match=r"metadata .*nometa.* does not exist; it must hold image_ids\.txt"):
        ImageNetVal(tmp_path, metadata=tmp_path / "nometa")
    # Metadata present but the image folder it points into is missing.
    meta = build_wsol(tmp_path / "other", tmp_path / "meta", ITEMS, wnids=sorted_wnids())
    with pytest.raises(FileNotFoundError, match=r"wsolevaluation layout\): folder .*val does not exist"):
        ImageNetVal(tmp_path, metadata=meta)


def test_kaggle_without_any_annotation_source(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS, csv=False, xml=False)
    with pytest.raises(FileNotFoundError, match=r"neither .*LOC_val_solution\.csv nor .*Annotations"):
        ImageNetVal(tmp_path)


def test_missing_wsol_file_is_named(tmp_path: Path) -> None:
    meta = build_wsol(tmp_path, tmp_path / "meta", ITEMS, wnids=sorted_wnids())
    (meta / "image_sizes.txt").unlink()
    with pytest.raises(Exception, match=r"image_sizes\.txt does not exist"):
        ImageNetVal(tmp_path, metadata=meta)


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    for kwargs, pattern in (({"split": "train"}, "split 'train'"), ({"layout": "coco"}, "layout 'coco'"),
                            ({"size_mismatch": "ignore"}, "size_mismatch 'ignore'"),
                            ({"num_images": 0}, "num_images must be >= 1"),
                            ({"layout": "wsolevaluation"}, "metadata is needed")):
        with pytest.raises(ValueError, match=pattern):
            ImageNetVal(tmp_path, **kwargs)


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_corrupt_image_becomes_a_skipped_sample(tmp_path: Path, layout: str) -> None:
    ds = build(layout, tmp_path, ITEMS)
    Path(ds.records[1].path).write_bytes(b"\xff\xd8\xff\xe0 broken")
    item = ds[1]
    assert isinstance(item, SkippedSample) and item.image_id == "ILSVRC2012_val_00000002"
    assert "ILSVRC2012_val_00000002.JPEG" in item.reason and "corrupt" in item.reason
    assert isinstance(ds[0], Sample)


@pytest.mark.parametrize("mode, note", [("CMYK", "cmyk converted to rgb"),
                                        ("L", "greyscale converted to rgb")])
def test_cmyk_and_greyscale_jpegs_are_converted(tmp_path: Path, mode: str, note: str) -> None:
    ds = build("kaggle", tmp_path, ITEMS)
    write_jpeg(Path(ds.records[0].path), ITEMS[0].size, mode=mode)
    sample = ds[0]
    assert sample.notes == (note,) and sample.image.shape == (3, 20, 40)


def test_lying_extension_is_read_by_content(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    images = tmp_path / "ILSVRC/Data/CLS-LOC/val"
    png = images / "ILSVRC2012_val_00000003.png"
    os.rename(images / "ILSVRC2012_val_00000003.JPEG", png)  # JPEG bytes under a .png name
    ds = ImageNetVal(tmp_path)
    sample = ds[2]
    assert sample.notes == ("file extension .png but content is jpeg",) and sample.orig_size == (20, 40)


def test_float_coordinates_in_xml(tmp_path: Path) -> None:
    items = [Item("ILSVRC2012_val_00000001", TABBY, (40, 20), [[4.5, 2, 13, 11]],
                  coords=[["4.5", "2.0", "13", "11"]])]
    ds = build("torchvision", tmp_path, items)
    sample = ds[0]
    assert sample.boxes.tolist() == [[4.5, 2.0, 14.0, 12.0]]
    assert sample.notes == ("box coordinates written as non-integers",)


def test_boxes_outside_the_image_are_clipped_and_degenerate_dropped(tmp_path: Path) -> None:
    items = [Item("ILSVRC2012_val_00000001", TABBY, (40, 20),
                  [[-3, 2, 45, 11], [50, 5, 60, 9], [4, 2, 13, 11]])]
    for layout in ("torchvision", "kaggle"):  # XML (size known at index time) and csv (size at load time)
        root = tmp_path / layout
        build_kaggle(root, items, xml=False) if layout == "kaggle" else build_torchvision(root, items)
        sample = ImageNetVal(root)[0]
        assert sample.boxes.tolist() == [[0, 2, 40, 12], [4, 2, 14, 12]]
        assert sample.box_labels.tolist() == [281, 281]
        assert sample.notes == ("box clipped to image: 2 of 3 to 40x20",
                                "degenerate box dropped: 1 of 3 without area")


def test_image_with_only_degenerate_boxes_is_skipped_at_index_time(tmp_path: Path) -> None:
    items = ITEMS[:1] + [Item("ILSVRC2012_val_00000009", TABBY, (40, 20), [[10, 5, 8, 9]])]
    ds = build("wsolevaluation", tmp_path, items)
    assert len(ds) == 1
    assert ds.skipped == [SkippedSample("ILSVRC2012_val_00000009", "no usable box in the annotation "
                                        "(degenerate box dropped: 1 of 1 without area)")]


@pytest.mark.parametrize("layout", ["kaggle", "torchvision", "wsolevaluation"])
def test_annotation_size_differs_from_image(tmp_path: Path, layout: str) -> None:
    # The annotation describes a 80 x 40 original; the file on disk is a half-size copy.
    items = [Item("ILSVRC2012_val_00000001", TABBY, (40, 20), [[8, 4, 27, 23]], xml_size=(80, 40))]
    scaled = build(layout, tmp_path / "scale", items)[0]
    assert scaled.boxes.tolist() == [[4, 2, 14, 12]]
    assert scaled.notes == ("annotation size 80x40 != image size 40x20; boxes scaled to the image",)
    kept = build(layout, tmp_path / "keep", items, size_mismatch="keep")[0]
    assert kept.boxes.tolist() == [[8, 4, 28, 20]]
    assert kept.notes == ("annotation size 80x40 != image size 40x20",
                          "box clipped to image: 1 of 1 to 40x20")
    skipped = build(layout, tmp_path / "skip", items, size_mismatch="skip")[0]
    assert skipped == SkippedSample("ILSVRC2012_val_00000001", "annotation size 80x40 != image size 40x20")


def test_image_without_annotation_is_skipped_at_index_time(tmp_path: Path) -> None:
    extra = Item("ILSVRC2012_val_00000004", TABBY, (10, 10), [[1, 1, 2, 2]])
    for layout in ("kaggle", "torchvision", "wsolevaluation"):
        root = tmp_path / layout
        ds = build(layout, root, ITEMS)
        image = Path(ds.records[0].path).with_name(f"{extra.image_id}.JPEG")
        write_jpeg(image, extra.size)
        ds = ImageNetVal(root, metadata=ds.metadata)
        assert len(ds) == 3
        if layout == "wsolevaluation":  # image_ids.txt defines the set: an unlisted file is not an item
            assert ds.skipped == []
        else:
            assert ds.skipped == [SkippedSample(extra.image_id, "no annotation for this image")]


def test_annotation_without_image_is_skipped(tmp_path: Path) -> None:
    for layout in ("kaggle", "kaggle_xml", "torchvision", "wsolevaluation"):
        root = tmp_path / layout
        ds = build(layout, root, ITEMS)
        Path(ds.records[2].path).unlink()
        ds = ImageNetVal(root, metadata=ds.metadata)
        assert len(ds) == 2 and ds.skipped == [SkippedSample("ILSVRC2012_val_00000003", "image file missing")]


def test_unknown_classes_are_skipped_with_reason(tmp_path: Path) -> None:
    items = ITEMS + [Item("ILSVRC2012_val_00000005", "n99999999", (10, 10), [[1, 1, 2, 2]])]
    build_kaggle(tmp_path / "k", items)
    ds = ImageNetVal(tmp_path / "k")
    assert ds.skipped == [SkippedSample("ILSVRC2012_val_00000005",
                                        "box class n99999999 is not one of the 1000 ImageNet-1k classes")]
    build_torchvision(tmp_path / "t", items)
    ds = ImageNetVal(tmp_path / "t")
    assert ds.skipped == [SkippedSample("ILSVRC2012_val_00000005",
                                        "class folder 'n99999999' is not an ImageNet-1k wnid")]


def test_malformed_annotation_files_skip_only_their_image(tmp_path: Path) -> None:
    ds = build("torchvision", tmp_path / "t", ITEMS)
    (tmp_path / "t" / "val" / "ILSVRC2012_val_00000002.xml").write_text("<annotation><size>")
    ds = ImageNetVal(tmp_path / "t")
    assert len(ds) == 2 and ds.skipped[0].image_id == "ILSVRC2012_val_00000002"
    assert "ILSVRC2012_val_00000002.xml is not a readable ImageNet XML" in ds.skipped[0].reason

    build_kaggle(tmp_path / "k", ITEMS)
    csv = tmp_path / "k" / "LOC_val_solution.csv"
    csv.write_text(csv.read_text().replace(f"{TENCH} 10 5 14 9", f"{TENCH} 10 5 14"))
    ds = ImageNetVal(tmp_path / "k")
    assert len(ds) == 2 and ds.skipped[0].image_id == "ILSVRC2012_val_00000002"
    assert "unparseable line 3 in" in ds.skipped[0].reason and "groups of 5" in ds.skipped[0].reason

    meta = build_wsol(tmp_path / "w", tmp_path / "w" / "meta", ITEMS, wnids=sorted_wnids())
    loc = meta / "localization.txt"
    loc.write_text(loc.read_text().replace("val/ILSVRC2012_val_00000003.JPEG,5,10,9,30",
                                           "val/ILSVRC2012_val_00000003.JPEG,5,ten,9,30"))
    ds = ImageNetVal(tmp_path / "w", metadata=meta)
    assert len(ds) == 2 and ds.skipped[0].image_id == "ILSVRC2012_val_00000003"
    assert "unparseable line 4 in" in ds.skipped[0].reason


def test_csv_header_is_checked(tmp_path: Path) -> None:
    bad = tmp_path / "LOC_val_solution.csv"
    bad.write_text("id,boxes\nx,n01440764 1 2 3 4\n")
    with pytest.raises(Exception, match=r"LOC_val_solution\.csv does not start with the header"):
        read_loc_solution_csv(bad)


def test_every_problem_skipped_means_an_error(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    with pytest.raises(InputFileError, match=r"no usable item.*3 skipped.*no annotation for this image"):
        ImageNetVal(tmp_path)


def test_box_sets_batched_equal_one_image_at_a_time() -> None:
    rng = np.random.default_rng(0)
    counts = np.array([3, 0, 1, 4, 2])
    sizes = np.array([[20, 10], [5, 5], [np.nan, np.nan], [30, 30], [8, 12]], dtype=np.float64)
    boxes = rng.uniform(-5, 35, (counts.sum(), 4)).astype(np.float32)
    clipped, keep, notes = sanitize_box_sets(boxes, counts, sizes)
    start = 0
    for i, count in enumerate(counts):
        size = None if np.isnan(sizes[i]).any() else tuple(int(v) for v in sizes[i])
        alone, kept, alone_notes = sanitize_boxes(boxes[start:start + count], size)
        assert np.array_equal(clipped[start:start + count][keep[start:start + count]], alone)
        assert np.flatnonzero(keep[start:start + count]).tolist() == kept.tolist()
        assert notes[i] == alone_notes
        start += count


def test_kaggle_label_is_the_class_of_the_boxes(tmp_path: Path) -> None:
    items = [Item("ILSVRC2012_val_00000001", TABBY, (40, 20), [[1, 1, 5, 5]])]
    build_kaggle(tmp_path, items)
    csv = tmp_path / "LOC_val_solution.csv"
    mixed = f"{TENCH} 1 1 5 5 {TABBY} 2 2 6 6 {TABBY} 3 3 7 7"
    csv.write_text(csv.read_text().replace(f"{TABBY} 1 1 5 5", mixed))
    sample = ImageNetVal(tmp_path)[0]
    assert sample.label == 281 and sample.box_labels.tolist() == [0, 281, 281]
    assert sample.notes == ("boxes carry several classes; label is the most frequent",)


def test_wsol_class_index_out_of_range_is_skipped(tmp_path: Path) -> None:
    meta = build_wsol(tmp_path, tmp_path / "meta", ITEMS, wnids=sorted_wnids())
    labels = meta / "class_labels.txt"
    labels.write_text(labels.read_text().replace("val_00000003.JPEG,999", "val_00000003.JPEG,1000"))
    ds = ImageNetVal(tmp_path, metadata=meta)
    assert ds.skipped == [SkippedSample("ILSVRC2012_val_00000003",
                                       "box class 1000 is not one of the 1000 ImageNet-1k classes")]


def test_kaggle_csv_with_unreadable_size_xml_still_loads(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    (tmp_path / KAGGLE_XML_DIR / "ILSVRC2012_val_00000001.xml").write_text("<annotation>")
    sample = ImageNetVal(tmp_path)[0]
    assert sample.boxes.tolist() == [[4, 2, 14, 12]]  # boxes come from the csv
    assert len(sample.notes) == 1 and sample.notes[0].startswith("size not checked: annotation file ")
