"""Index integrity of the real-data loaders: every id has exactly one outcome (a record or a
skip with its reason), duplicates are never resolved by file or directory order, an ImageNet
image needs a box of its own class, and file names, symbolic links and text that cannot be
read become a skip naming the file or an error naming the file and line, never a traceback."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_cub import IMAGES, rel_path, write_metadata, write_official, write_soft_mask
from test_imagenet import (
    ITEMS,
    KAGGLE_XML_DIR,
    TABBY,
    TENCH,
    TISSUE,
    Item,
    build,
    build_kaggle,
    build_torchvision,
    build_wsol,
    sorted_wnids,
    write_jpeg,
    write_xml,
)
from test_imagenet_segmentation import box_mask, random_image, write_gtsegs
from test_openimages import META, make_tree
from test_voc import voc_dir, write_image, write_mask, write_split
from test_voc import write_xml as write_voc_xml

from wsol_bench.datasets import EvalTransform, SkippedSample, build_dataset
from wsol_bench.datasets.cub import CubDataset
from wsol_bench.datasets.imagenet import ImageNetVal
from wsol_bench.datasets.openimages import OpenImagesDataset
from wsol_bench.datasets.synthetic import SyntheticShapes
from wsol_bench.datasets.voc import VocDataset
from wsol_bench.errors import InputFileError, MissingInputError, SettingError, UserError

LOOP = os.strerror(errno.ELOOP)  # "Too many levels of symbolic links" on Linux
KAGGLE_IMAGES = "ILSVRC/Data/CLS-LOC/val"
ID1, ID2, ID3 = (item.image_id for item in ITEMS)
BAD_NAME = os.fsdecode(b"ILSVRC2012_val_\xff.JPEG")  # surrogate-escaped, as os.listdir returns it
SHOWN_ID = "ILSVRC2012_val_\\xff"  # how the loaders show that name: the byte as \xff


def assert_one_outcome_per_id(ds) -> None:
    """Each id once across records and skips, and every id and reason writable as UTF-8."""
    ids = [r.image_id for r in ds.records] + [s.image_id for s in ds.skipped]
    assert len(ids) == len(set(ids)), ids
    for text in ids + [s.reason for s in ds.skipped]:
        text.encode("utf-8")


def make_non_utf8_file(path: Path) -> Path:
    """A JPEG whose name holds a byte that is not UTF-8; skips where the filesystem refuses."""
    try:
        return write_jpeg(path, (12, 12))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this filesystem does not store non-UTF-8 file names")


def self_loop(path: Path) -> Path:
    """A symbolic link that points at itself (any stat of it fails with ELOOP)."""
    if path.exists() or path.is_symlink():
        path.unlink()
    os.symlink(path.name, path)
    return path


def image_folder(ds: ImageNetVal) -> Path:
    return Path(ds.records[0].path).parent


# -- ImageNet: duplicates ----------------------------------------------------------------------

def test_torchvision_image_in_two_class_folders_is_skipped(tmp_path: Path) -> None:
    build_torchvision(tmp_path, ITEMS)
    shutil.copy(tmp_path / "val" / TABBY / f"{ID1}.JPEG", tmp_path / "val" / TENCH / f"{ID1}.JPEG")
    ds = ImageNetVal(tmp_path)
    assert [r.image_id for r in ds.records] == [ID2, ID3]
    assert ds.skipped == [SkippedSample(ID1, f"image in 2 class folders: val/{TENCH}/{ID1}.JPEG, val/{TABBY}/"
                                             f"{ID1}.JPEG; its class is ambiguous: keep it in one")]
    assert_one_outcome_per_id(ds)


@pytest.mark.parametrize("layout", ["kaggle", "kaggle_xml", "torchvision"])
def test_jpeg_and_jpg_twins_of_one_id_are_skipped(tmp_path: Path, layout: str) -> None:
    ds = build(layout, tmp_path, ITEMS)
    folder = image_folder(ds)
    shutil.copy(folder / f"{ID1}.JPEG", folder / f"{ID1}.jpg")
    ds = ImageNetVal(tmp_path)
    where = folder.relative_to(tmp_path).as_posix()
    assert [r.image_id for r in ds.records] == [ID2, ID3]
    assert ds.skipped == [SkippedSample(ID1, f"2 files for one image id in {where}: {ID1}.JPEG, {ID1}.jpg; "
                                             "keep one")]
    assert_one_outcome_per_id(ds)


def test_xml_twins_of_one_id_are_skipped_or_leave_the_size_unchecked(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    xmls = tmp_path / KAGGLE_XML_DIR
    shutil.copy(xmls / f"{ID2}.xml", xmls / f"{ID2}.XML")
    reason = f"2 files for one image id in {KAGGLE_XML_DIR}: {ID2}.XML, {ID2}.xml; keep one"
    # The csv holds the boxes: the XML only states the size, which is then not checked.
    ds = ImageNetVal(tmp_path)
    assert len(ds) == 3 and ds.skipped == []
    assert ds[1].notes == (f"size not checked: {reason}",)
    (tmp_path / "LOC_val_solution.csv").unlink()  # now the XMLs hold the boxes
    ds = ImageNetVal(tmp_path)
    assert [r.image_id for r in ds.records] == [ID1, ID3] and ds.skipped == [SkippedSample(ID2, reason)]


def test_wsol_paths_with_one_stem_are_skipped(tmp_path: Path) -> None:
    meta = build_wsol(tmp_path, tmp_path / "meta", ITEMS, wnids=sorted_wnids())
    shutil.copy(tmp_path / "val" / f"{ID1}.JPEG", tmp_path / "val" / f"{ID1}.jpg")
    # A file the metadata does not list is not an item: the listed path decides.
    ds = ImageNetVal(tmp_path, metadata=meta)
    assert len(ds) == 3 and ds.skipped == [] and ds.records[0].path.endswith(f"{ID1}.JPEG")
    for name in ("image_ids", "class_labels", "image_sizes", "localization"):
        lines = (meta / f"{name}.txt").read_text().splitlines()
        twin = [line.replace(f"{ID1}.JPEG", f"{ID1}.jpg") for line in lines if ID1 in line]
        (meta / f"{name}.txt").write_text("\n".join(lines + twin) + "\n")
    ds = ImageNetVal(tmp_path, metadata=meta)
    assert [r.image_id for r in ds.records] == [ID2, ID3]
    assert ds.skipped == [SkippedSample(ID1, f"image_ids.txt lists 2 files for one image id: val/{ID1}.JPEG, "
                                             f"val/{ID1}.jpg; keep one")]


def test_kaggle_csv_lines_for_one_image(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    csv = tmp_path / "LOC_val_solution.csv"
    original = csv.read_text()
    second = original.splitlines()[2]  # line 3: ID2 with two boxes
    csv.write_text(original + second + "\n")  # line 5: the same line again
    ds = ImageNetVal(tmp_path)
    assert len(ds) == 3 and ds.skipped == []
    note = "LOC_val_solution.csv lists this image on lines 3, 5 with the same content; read once"
    assert ds.records[1].notes == (note,)
    assert ds[1].boxes.tolist() == [[0, 0, 30, 30], [10, 5, 15, 10]]
    for extra in (f"{ID2},{TENCH} 1 1 5 5", f"{ID2},{TENCH} 1 1 5"):  # other boxes; unparseable
        csv.write_text(original + extra + "\n")
        ds = ImageNetVal(tmp_path)
        assert [r.image_id for r in ds.records] == [ID1, ID3]
        assert ds.skipped == [SkippedSample(ID2, f"{csv} lists this image on lines 3, 5 with different "
                                                 "content; keep one line per ImageId")]


@pytest.mark.parametrize("name, value", [("class_labels", "0"), ("image_sizes", "31,30")])
def test_wsol_lines_for_one_image(tmp_path: Path, name: str, value: str) -> None:
    meta = build_wsol(tmp_path, tmp_path / "meta", ITEMS, wnids=sorted_wnids())
    path = meta / f"{name}.txt"
    original = path.read_text()
    line3 = original.splitlines()[2]  # ID3's line
    path.write_text(original + line3 + "\n")
    ds = ImageNetVal(tmp_path, metadata=meta)
    assert len(ds) == 3 and ds.skipped == []
    note = f"{name}.txt lists this image on lines 3, 4 with the same content; read once"
    assert ds.records[2].notes == (note,)
    assert ds[2].label == 999 and ds[2].orig_size == (20, 40) and ds[2].notes == ds.records[2].notes
    path.write_text(original + f"val/{ID3}.JPEG,{value}\n")
    ds = ImageNetVal(tmp_path, metadata=meta)
    assert [r.image_id for r in ds.records] == [ID1, ID2]
    assert ds.skipped == [SkippedSample(ID3, f"{path} lists this image on lines 3, 4 with different content; "
                                             "keep one line per image")]


def test_wsol_image_listed_twice_is_read_once(tmp_path: Path) -> None:
    meta = build_wsol(tmp_path, tmp_path / "meta", ITEMS, wnids=sorted_wnids())
    ids = meta / "image_ids.txt"
    ids.write_text(ids.read_text() + f"val/{ID1}.JPEG\n")
    ds = ImageNetVal(tmp_path, metadata=meta)
    assert [r.image_id for r in ds.records] == [ID1, ID2, ID3] and ds.skipped == []
    assert ds.records[0].notes == ("image_ids.txt lists this image on lines 1, 4; read once",)


# -- ImageNet: a box of the image's own class ----------------------------------------------------

def test_torchvision_image_whose_boxes_are_all_of_another_class_is_skipped(tmp_path: Path) -> None:
    build_torchvision(tmp_path, ITEMS)
    xml = tmp_path / "val" / f"{ID1}.xml"
    write_xml(xml, ID1, (40, 20), [(TENCH, [4, 2, 13, 11]), (TISSUE, [1, 1, 5, 5])])
    ds = ImageNetVal(tmp_path)
    assert [r.image_id for r in ds.records] == [ID2, ID3]
    assert ds.skipped == [SkippedSample(ID1, f"no box of its class {TABBY} in the annotation (its boxes are "
                                             f"of {TENCH}, {TISSUE})")]
    # Some boxes of the class: the image is kept, the other boxes noted.
    write_xml(xml, ID1, (40, 20), [(TENCH, [4, 2, 13, 11]), (TABBY, [1, 1, 5, 5])])
    sample = ImageNetVal(tmp_path)[0]
    assert sample.label == 281 and sample.box_labels.tolist() == [0, 281]
    assert sample.notes == ("some boxes carry another class than the image label",)



def test_kaggle_image_whose_own_boxes_are_all_degenerate_is_skipped(tmp_path: Path) -> None:
    items = [Item(ID1, TABBY, (40, 20), [[10, 5, 8, 9], [12, 5, 10, 9]]), ITEMS[1]]
    build_kaggle(tmp_path, items, xml=False)
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(csv.read_text().replace(f"{TABBY} 12 5 10 9", f"{TABBY} 12 5 10 9 {TENCH} 1 1 5 5"))
    ds = ImageNetVal(tmp_path)
    assert [r.image_id for r in ds.records] == [ID2]
    assert ds.skipped == [SkippedSample(ID1, f"no box of its class {TABBY} in the annotation (its boxes are "
                                             f"of {TENCH}; degenerate box dropped: 2 of 3 without area)")]


def test_wsol_image_without_localization_line_is_skipped(tmp_path: Path) -> None:
    meta = build_wsol(tmp_path, tmp_path / "meta", ITEMS, wnids=sorted_wnids())
    loc = meta / "localization.txt"
    loc.write_text("".join(f"{line}\n" for line in loc.read_text().splitlines() if ID3 not in line))
    ds = ImageNetVal(tmp_path, metadata=meta)
    assert [r.image_id for r in ds.records] == [ID1, ID2]
    assert ds.skipped == [SkippedSample(ID3, "no box in the wsolevaluation metadata")]


@pytest.mark.parametrize("layout", ["kaggle", "torchvision"])
def test_image_left_without_a_box_of_its_class_when_loaded_is_skipped(tmp_path: Path, layout: str) -> None:
    # Annotated for an 80 x 40 original; the file is 40 x 20. Kept in place (size_mismatch=keep),
    # the class's boxes lie outside the image and only the other class's box remains.
    # (wsolevaluation boxes all carry the image's class: nothing else can remain there.)
    items = [Item(ID1, TABBY, (40, 20), [[50, 5, 70, 9]], xml_size=(80, 40))]
    build_kaggle(tmp_path, items, csv=False) if layout == "kaggle" else build_torchvision(tmp_path, items)
    xml = tmp_path / (KAGGLE_XML_DIR if layout == "kaggle" else "val") / f"{ID1}.xml"
    write_xml(xml, ID1, (80, 40), [(TABBY, [50, 5, 70, 9]), (TABBY, [60, 5, 70, 9]), (TENCH, [1, 1, 5, 5])])
    ds = ImageNetVal(tmp_path, size_mismatch="keep")
    assert ds.records[0].label == 281
    assert ds[0] == SkippedSample(ID1, f"no box of its class {TABBY} inside the 40x20 image (annotation size "
                                       "80x40 != image size 40x20; box clipped to image: 2 of 3 to 40x20; "
                                       "degenerate box dropped: 2 of 3 without area)")


# -- ImageNet: file names, links and text that cannot be read -------------------------------------

@pytest.mark.parametrize("layout", ["kaggle", "kaggle_xml", "torchvision"])
def test_non_utf8_file_name_is_skipped_naming_it(tmp_path: Path, layout: str) -> None:
    ds = build(layout, tmp_path, ITEMS)
    folder = image_folder(ds)
    make_non_utf8_file(folder / BAD_NAME)
    ds = ImageNetVal(tmp_path)
    where = folder.relative_to(tmp_path).as_posix()
    assert len(ds) == 3
    assert ds.skipped == [SkippedSample(SHOWN_ID, f"file name is not valid UTF-8: {where}/{SHOWN_ID}.JPEG; "
                                                  "rename the file")]
    assert_one_outcome_per_id(ds)


def test_non_utf8_names_of_annotations_and_class_folders_are_shown_escaped(tmp_path: Path) -> None:
    build_torchvision(tmp_path, ITEMS)
    make_non_utf8_file(tmp_path / "val" / os.fsdecode(b"n0144076\xff") / f"{ID1}.JPEG")
    (tmp_path / "val" / TABBY / f"{ID1}.JPEG").unlink()
    (tmp_path / "val" / os.fsdecode(b"ILSVRC2012_val_\xfe.xml")).write_text("<annotation/>")
    ds = ImageNetVal(tmp_path)
    assert [r.image_id for r in ds.records] == [ID2, ID3]
    assert ds.skipped == [
        SkippedSample(ID1, "class folder 'n0144076\\xff' is not an ImageNet-1k wnid"),
        SkippedSample("ILSVRC2012_val_\\xfe", "file name is not valid UTF-8: val/ILSVRC2012_val_\\xfe.xml; "
                                              "rename the file")]
    assert_one_outcome_per_id(ds)


def test_wsol_ignores_unlisted_files_with_non_utf8_names(tmp_path: Path) -> None:
    meta = build_wsol(tmp_path, tmp_path / "meta", ITEMS, wnids=sorted_wnids())
    make_non_utf8_file(tmp_path / "val" / BAD_NAME)
    ds = ImageNetVal(tmp_path, metadata=meta)
    assert len(ds) == 3 and ds.skipped == []


@pytest.mark.parametrize("layout", ["kaggle", "kaggle_xml", "torchvision", "wsolevaluation"])
def test_symlink_loop_is_skipped_naming_it(tmp_path: Path, layout: str) -> None:
    ds = build(layout, tmp_path, ITEMS)
    folder = image_folder(ds)
    where = folder.relative_to(tmp_path).as_posix()
    self_loop(folder / "loop.JPEG")  # a stray link: not an ImageNet image, yet it must not stop the index
    self_loop(folder / f"{ID1}.JPEG")  # an annotated image replaced by a loop
    ds = ImageNetVal(tmp_path, metadata=ds.metadata)
    assert [r.image_id for r in ds.records] == [ID2, ID3]
    skipped = [SkippedSample(ID1, f"cannot read {where}/{ID1}.JPEG: {LOOP}")]
    if layout != "wsolevaluation":  # wsolevaluation: the metadata lists the items; the stray link is not one
        skipped.append(SkippedSample("loop", f"cannot read {where}/loop.JPEG: {LOOP}"))
    assert ds.skipped == skipped
    assert_one_outcome_per_id(ds)


def test_symlink_loops_among_annotations_are_skipped_naming_them(tmp_path: Path) -> None:
    build_torchvision(tmp_path, ITEMS)
    self_loop(tmp_path / "val" / f"{ID3}.xml")
    self_loop(tmp_path / "val" / "n99999999")  # class folder or file? It cannot be told
    ds = ImageNetVal(tmp_path)
    assert [r.image_id for r in ds.records] == [ID1, ID2]
    assert ds.skipped == [SkippedSample(ID3, f"cannot read val/{ID3}.xml: {LOOP}"),
                          SkippedSample("n99999999", f"cannot read val/n99999999: {LOOP}")]


def test_dangling_symlink_is_named(tmp_path: Path) -> None:
    ds = build("kaggle", tmp_path, ITEMS)
    link = image_folder(ds) / f"{ID3}.JPEG"
    link.unlink()
    os.symlink(tmp_path / "elsewhere.JPEG", link)
    ds = ImageNetVal(tmp_path)
    assert ds.skipped == [SkippedSample(ID3, f"cannot read {KAGGLE_IMAGES}/{ID3}.JPEG: symbolic link to a "
                                             "missing file")]


def _with_bad_byte(path: Path, old: bytes) -> None:
    path.write_bytes(path.read_bytes().replace(old, old + b"\xff", 1))


def test_non_utf8_csv_line_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    _with_bad_byte(tmp_path / "LOC_val_solution.csv", TENCH.encode())
    with pytest.raises(ValueError, match=r"LOC_val_solution\.csv:3: not UTF-8 text \(byte 0xff at column "
                                         r"34\); restore the original file or convert it to UTF-8"):
        ImageNetVal(tmp_path)


@pytest.mark.parametrize("name", ["image_ids", "class_labels", "image_sizes", "localization"])
def test_non_utf8_metadata_line_is_an_error_naming_file_and_line(tmp_path: Path, name: str) -> None:
    meta = build_wsol(tmp_path, tmp_path / "meta", ITEMS, wnids=sorted_wnids())
    _with_bad_byte(meta / f"{name}.txt", ID2.encode())  # line 2 of each file
    with pytest.raises(ValueError, match=rf"{name}\.txt:2: not UTF-8 text"):
        ImageNetVal(tmp_path, metadata=meta)


def test_non_utf8_synset_mapping_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    mapping = tmp_path / "LOC_synset_mapping.txt"
    text = "".join(f"{w} name\n" for w in sorted_wnids())
    mapping.write_bytes(text.encode().replace(b"name", b"n\xe9", 1))
    with pytest.raises(ValueError, match=r"LOC_synset_mapping\.txt:1: not UTF-8 text"):
        ImageNetVal(tmp_path)


def test_synset_mapping_listing_a_wnid_twice_is_an_error(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    lines = [f"{w} name of {w}" for w in sorted_wnids()]
    (tmp_path / "LOC_synset_mapping.txt").write_text("\n".join(lines + [f"{TENCH} another name"]) + "\n")
    with pytest.raises(ValueError, match=rf"LOC_synset_mapping\.txt: lines 1 and 1001 both list {TENCH}; "
                                         "list each wnid once: fix the file"):
        ImageNetVal(tmp_path)


def test_unreadable_annotation_file_is_an_error_naming_it(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    self_loop(tmp_path / "LOC_val_solution.csv")
    with pytest.raises(ValueError, match=rf"cannot read .*LOC_val_solution\.csv: {LOOP}"):
        ImageNetVal(tmp_path)


# -- CUB -------------------------------------------------------------------------------------------

def test_cub_path_under_two_image_numbers_is_an_error(tmp_path: Path) -> None:
    entries = IMAGES + [(5,) + IMAGES[3][1:]]  # image 5 repeats image 4's path
    cub = write_official(tmp_path, entries)
    with pytest.raises(ValueError, match=rf"images\.txt: lines 4 and 5 both list {rel_path(IMAGES[3])} "
                                         r"\(images 4 and 5\); list each image once: fix the file"):
        CubDataset(tmp_path)
    (cub / "images.txt").write_text((cub / "images.txt").read_text().replace("5 ", "4 "))
    with pytest.raises(ValueError, match=r"images\.txt: lines 4 and 5 both list 4; list each once: fix"):
        CubDataset(tmp_path)


def test_cub_metadata_line_for_one_image_twice_is_an_error(tmp_path: Path) -> None:
    write_official(tmp_path)
    rows = [(rel_path(IMAGES[3]), 2, (40, 30), [(4, 3, 19, 14)])]
    folder = write_metadata(tmp_path / "meta", rows)
    labels = folder / "class_labels.txt"
    labels.write_text(labels.read_text() * 2)
    with pytest.raises(ValueError, match=rf"class_labels\.txt: lines 1 and 2 both list {rows[0][0]};"):
        CubDataset(tmp_path, metadata=folder)


@pytest.mark.parametrize("name", ["images", "image_class_labels", "bounding_boxes"])
def test_cub_non_utf8_index_line_is_an_error_naming_file_and_line(tmp_path: Path, name: str) -> None:
    cub = write_official(tmp_path)
    _with_bad_byte(cub / f"{name}.txt", b"2 ")
    with pytest.raises(ValueError, match=rf"{name}\.txt:2: not UTF-8 text"):
        CubDataset(tmp_path)


def test_cub_non_utf8_metadata_line_is_an_error(tmp_path: Path) -> None:
    write_official(tmp_path)
    folder = write_metadata(tmp_path / "meta", [(rel_path(IMAGES[3]), 2, (40, 30), [(4, 3, 19, 14)])])
    _with_bad_byte(folder / "localization.txt", b"Sooty")
    with pytest.raises(ValueError, match=r"localization\.txt:1: not UTF-8 text"):
        CubDataset(tmp_path, metadata=folder)


def test_cub_links_and_names_that_cannot_be_read(tmp_path: Path) -> None:
    cub = write_official(tmp_path)
    make_non_utf8_file(cub / "images" / rel_path(IMAGES[3]).replace("Sooty", os.fsdecode(b"\xff")))
    self_loop(cub / "images" / "003.Sooty_Albatross" / "loop.jpg")
    ds = CubDataset(tmp_path)  # files images.txt does not list are not items
    assert len(ds) == 3 and ds.skipped == []
    self_loop(cub / "images" / rel_path(IMAGES[3]))
    item = ds[2]
    assert item == SkippedSample(rel_path(IMAGES[3]), f"cannot read image file "
                                                      f"{cub / 'images' / rel_path(IMAGES[3])}: {LOOP}")
    self_loop(cub / "images.txt")
    with pytest.raises(ValueError, match=rf"cannot read .*images\.txt: {LOOP}"):
        CubDataset(tmp_path)


def test_cub_mask_link_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    write_official(tmp_path)
    segs = tmp_path / "segmentations"
    write_soft_mask(segs / rel_path(IMAGES[0]).replace(".jpg", ".png"), np.zeros((335, 500)))
    mask = segs / rel_path(IMAGES[3]).replace(".jpg", ".png")
    mask.parent.mkdir(parents=True)
    self_loop(mask)
    ds = CubDataset(tmp_path, segmentations=segs)
    assert [r.image_id for r in ds.records] == [rel_path(IMAGES[0])]
    reasons = {s.image_id: s.reason for s in ds.skipped}
    assert reasons[rel_path(IMAGES[3])] == f"cannot read segmentation mask {mask.relative_to(segs)}: {LOOP}"


# -- VOC -------------------------------------------------------------------------------------------

@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    for image_id, name in (("a", "dog"), ("b", "cat"), ("c", "bird")):
        write_voc_xml(tmp_path, image_id, [(name, 1, 1, 10, 10)])
        write_image(tmp_path, image_id)
    write_split(tmp_path, "Main", "val", ["a", "b", "c"])
    return tmp_path


def test_voc_split_line_listed_twice_names_both_lines(voc_root: Path) -> None:
    write_split(voc_root, "Main", "val", ["a", "b", "c", "b"])
    with pytest.raises(ValueError, match=r"val\.txt: lines 2 and 4 both list b; list each id once: fix"):
        VocDataset(voc_root)


def test_voc_non_utf8_split_line_is_an_error_naming_file_and_line(voc_root: Path) -> None:
    _with_bad_byte(voc_dir(voc_root) / "ImageSets" / "Main" / "val.txt", b"b")
    with pytest.raises(ValueError, match=r"val\.txt:2: not UTF-8 text \(byte 0xff at column 2\)"):
        VocDataset(voc_root)


def test_voc_non_utf8_xml_is_skipped_naming_it(voc_root: Path) -> None:
    _with_bad_byte(voc_dir(voc_root) / "Annotations" / "b.xml", b"<name>ca")
    ds = VocDataset(voc_root)
    assert [r.image_id for r in ds.records] == ["a", "c"]
    assert ds.skipped[0].image_id == "b" and "b.xml: not valid XML" in ds.skipped[0].reason


def test_voc_links_that_cannot_be_read_are_named(voc_root: Path) -> None:
    self_loop(voc_dir(voc_root) / "Annotations" / "b.xml")
    self_loop(voc_dir(voc_root) / "JPEGImages" / "c.jpg")
    make_non_utf8_file(voc_dir(voc_root) / "JPEGImages" / BAD_NAME)  # not listed: not an item
    ds = VocDataset(voc_root)
    assert [r.image_id for r in ds.records] == ["a", "c"]
    assert ds.skipped == [SkippedSample("b", f"cannot read Annotations/b.xml: {LOOP}")]
    item = ds[1]
    assert item == SkippedSample("c", f"cannot read image file {voc_dir(voc_root) / 'JPEGImages' / 'c.jpg'}: "
                                      f"{LOOP}")


def test_voc_mask_link_that_cannot_be_read_is_named(voc_root: Path) -> None:
    for image_id in ("a", "b"):
        write_mask(voc_root, image_id, np.ones((30, 40)))
    write_split(voc_root, "Segmentation", "val", ["a", "b"])
    self_loop(voc_dir(voc_root) / "SegmentationClass" / "b.png")
    ds = VocDataset(voc_root, mode="segmentation")
    assert [r.image_id for r in ds.records] == ["a"]
    assert ds.skipped == [SkippedSample("b", f"cannot read SegmentationClass/b.png: {LOOP}")]



# -- the error model: refusals of settings and files are UserErrors -------------------------------

def _gtsegs(root: Path) -> Path:
    return write_gtsegs(root / "gtsegs_ijcv.mat", [(random_image(8, 12, 0), box_mask(8, 12, (1, 1, 5, 5)))])


REFUSALS = [  # (what raises, given an empty tmp_path; the class; what the message names)
    pytest.param(lambda root: ImageNetVal(build_kaggle(root, ITEMS), split="train"), SettingError,
                 "split 'train' is not supported", id="imagenet-setting"),
    pytest.param(lambda root: ImageNetVal(root / "nowhere"), MissingInputError, r"nowhere.* does not exist",
                 id="imagenet-missing-root"),
    pytest.param(lambda root: VocDataset(root, mode="boxes"), SettingError, "voc: unknown mode 'boxes'",
                 id="voc-setting"),
    pytest.param(lambda root: VocDataset(root / "nowhere"), MissingInputError, "VOC root .*nowhere does not exist",
                 id="voc-missing-root"),
    pytest.param(lambda root: CubDataset(write_official(root, images=False), layout="flat"), SettingError,
                 "cub: unknown layout 'flat'", id="cub-setting"),
    pytest.param(lambda root: CubDataset(write_official(root, images=False), metadata=root / "nometa"),
                 MissingInputError, "no wsolevaluation metadata for split 'test'", id="cub-missing-metadata"),
    pytest.param(lambda root: OpenImagesDataset(make_tree(root), metadata=root / META, split="val"),
                 SettingError, "is the 'test' split but split='val'", id="openimages-setting"),
    pytest.param(lambda root: OpenImagesDataset(make_tree(root), split="val"), MissingInputError,
                 "no wsolevaluation OpenImages metadata for split 'val'", id="openimages-missing-metadata"),
    pytest.param(lambda root: build_dataset("imagenet_segmentation", file=str(_gtsegs(root)), num_images=0),
                 SettingError, "num_images must be >= 1", id="imagenet_segmentation-setting"),
    pytest.param(lambda root: build_dataset("imagenet_segmentation", file=str(root / "nowhere.mat")),
                 MissingInputError, "nowhere.mat does not exist", id="imagenet_segmentation-missing-file"),
    pytest.param(lambda root: SyntheticShapes("val", num_images=0), SettingError, "num_images must be >= 1",
                 id="synthetic-setting"),
    pytest.param(lambda root: build_dataset("imagenett"), SettingError, "unknown dataset 'imagenett'",
                 id="unknown-dataset"),
    pytest.param(lambda root: EvalTransform((224, 224), (0.5,) * 3, (0.5,) * 3, resize="crop"), SettingError,
                 "unknown preprocess.resize 'crop'", id="preprocess-setting"),
]


@pytest.mark.parametrize(("make", "kind", "match"), REFUSALS)
def test_refusals_of_settings_and_paths_are_user_errors(tmp_path: Path, make, kind, match) -> None:
    """What the user can fix is a `UserError` (one line from the commands, no traceback), of the
    built-in kind a library caller catches: a ValueError, or FileNotFoundError for an absent path."""
    with pytest.raises(kind, match=match) as caught:
        make(tmp_path)
    assert isinstance(caught.value, UserError)
    assert isinstance(caught.value, FileNotFoundError if kind is MissingInputError else ValueError)


def _garbage(path: Path) -> Path:
    path.write_bytes(bytes(range(128, 256)) * 8)  # not UTF-8, not a format: a damaged or foreign file
    return path


def _cub_binary_index(root: Path) -> None:
    _garbage(write_official(root) / "images.txt")
    CubDataset(root)


def _cub_non_finite_box(root: Path) -> None:
    boxes = write_official(root) / "bounding_boxes.txt"
    boxes.write_text(boxes.read_text().replace("4.0 3.0 15.0 11.0", "nan 3.0 inf 11.0"))
    CubDataset(root)


def _imagenet_binary_csv(root: Path) -> None:
    _garbage(build_kaggle(root, ITEMS) / "LOC_val_solution.csv")
    ImageNetVal(root)


def _openimages_binary_labels(root: Path) -> None:
    _garbage(make_tree(root) / META / "class_labels.txt")
    OpenImagesDataset(root)


def _gtsegs_binary(root: Path) -> None:
    build_dataset("imagenet_segmentation", file=str(_garbage(root / "g.mat")))


def _gtsegs_with_groups(root: Path) -> None:
    path = root / "gtsegs_ijcv.mat"
    with h5py.File(path, "w") as f:
        f.create_group("value/img")
        f.create_group("value/gt")
    build_dataset("imagenet_segmentation", file=str(path))


GARBAGE = [  # (damage a user file and load the dataset, the message naming the file)
    pytest.param(_cub_binary_index, r"images\.txt:1: not UTF-8 text", id="cub-binary-index"),
    pytest.param(_cub_non_finite_box, r"bounding_boxes\.txt:4: expected numbers, got \['nan', '3.0', 'inf'",
                 id="cub-non-finite-box"),
    pytest.param(_imagenet_binary_csv, r"LOC_val_solution\.csv:1: not UTF-8 text", id="imagenet-binary-csv"),
    pytest.param(_openimages_binary_labels, r"class_labels\.txt:1: not UTF-8 text", id="openimages-binary-labels"),
    pytest.param(_gtsegs_binary, r"g\.mat is not an HDF5 file", id="imagenet_segmentation-binary"),
    pytest.param(_gtsegs_with_groups, r"gtsegs_ijcv\.mat: value/img is not an array",
                 id="imagenet_segmentation-groups"),
]


@pytest.mark.parametrize(("load", "match"), GARBAGE)
def test_garbage_index_files_are_input_errors_naming_the_file(tmp_path: Path, load, match) -> None:
    """A damaged index or annotation file is an `InputFileError` naming it, never an unrelated
    exception from the parser."""
    with pytest.raises(InputFileError, match=match):
        load(tmp_path)


def test_annotation_xml_declaring_an_unknown_encoding_is_skipped_naming_it(tmp_path: Path) -> None:
    """An XML declaration the parser cannot honour is that item's problem (a skip), not a crash."""
    build_kaggle(tmp_path, ITEMS, csv=False)
    xml = tmp_path / KAGGLE_XML_DIR / f"{ID2}.xml"
    xml.write_text('<?xml version="1.0" encoding="bogus"?>' + xml.read_text())
    ds = ImageNetVal(tmp_path)
    assert [r.image_id for r in ds.records] == [ID1, ID3]
    assert f"{ID2}.xml is not a readable ImageNet XML" in ds.skipped[0].reason
    write_voc_xml(tmp_path, "a", [("dog", 1, 1, 10, 10)])
    write_image(tmp_path, "a")
    write_voc_xml(tmp_path, "b", [("dog", 1, 1, 10, 10)], size=("inf", 30))  # no usable size: noted
    write_image(tmp_path, "b")
    (voc_dir(tmp_path) / "Annotations" / "c.xml").write_text('<?xml version="1.0" encoding="bogus"?><annotation/>')
    write_split(tmp_path, "Main", "val", ["a", "b", "c"])
    voc = VocDataset(tmp_path)
    assert [r.image_id for r in voc.records] == ["a", "b"] and "no image size in annotation" in voc.records[1].notes
    assert voc.skipped[0].image_id == "c" and "c.xml: not valid XML" in voc.skipped[0].reason
