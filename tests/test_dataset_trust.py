"""Trust boundaries of the dataset loaders: a path a metadata file gives is read only inside the
dataset root (unless dataset.params.allow_outside_root=true), and only regular files are
opened: a named pipe, a device or a socket in place of an image, mask, annotation or metadata
file is a skip with its reason (or, for a file the whole dataset needs, a one-line refusal),
never a read that waits forever."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_cub import IMAGES, rel_path, write_metadata, write_official, write_soft_mask
from test_cub import write_jpeg as write_cub_jpeg
from test_imagenet import (
    ITEMS,
    KAGGLE_XML_DIR,
    TENCH,
    build_kaggle,
    build_torchvision,
    build_wsol,
    sorted_wnids,
)
from test_imagenet import write_jpeg as write_imagenet_jpeg
from test_openimages import META, make_tree
from test_voc import voc_dir, write_image, write_mask, write_split
from test_voc import write_xml as write_voc_xml

from wsol_bench.datasets import Sample, SkippedSample
from wsol_bench.datasets.cub import CubDataset
from wsol_bench.datasets.image_io import ImageReadError, read_palette_indices, read_rgb
from wsol_bench.datasets.imagenet import ImageNetVal
from wsol_bench.datasets.openimages import OpenImagesDataset
from wsol_bench.datasets.voc import VocDataset
from wsol_bench.errors import InputFileError

# Only a guard against a read that never returns (old code blocked on a named pipe forever);
# every load here takes well under a second.
HANG_GUARD_S = 60.0
PIPE = "not a regular file (a named pipe)"
ALLOW = "dataset.params.allow_outside_root=true"
WHY = {"dotdot": "a '..' part", "absolute": "an absolute path"}
VICTIM_ID = "ILSVRC2012_val_00000009"
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need a POSIX system")


def make_fifo(path: Path) -> Path:
    """A named pipe at `path`, in place of whatever was there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def _release(fifo: Path) -> None:
    """Give a reader blocked on `fifo` its end of file, so a hung test thread can end."""
    with contextlib.suppress(OSError):  # ENXIO: no reader waiting
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def finishes(work, *fifos: Path):
    """`work()` run in a thread: its result (or its exception, raised here); a test failure when
    it is still running after HANG_GUARD_S seconds, i.e. blocked reading one of `fifos`."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except Exception as exc:  # raised again in the test's thread  # noqa: BLE001
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    if thread.is_alive():
        for _ in range(3):
            for fifo in fifos:
                _release(fifo)
            thread.join(1)
        pytest.fail(f"loading did not finish within {HANG_GUARD_S:.0f} s: a read blocked on a named pipe")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def loaded(ds) -> list:
    """Every item of `ds` (records read from disk)."""
    return [ds[i] for i in range(len(ds))]


def reasons(ds) -> dict[str, str]:
    return {s.image_id: s.reason for s in ds.skipped}


def outside(path: str, listed_in: str, form: str) -> str:
    """The skip reason of an item whose `path`, as `listed_in` gives it, leads out of the root."""
    return f"{path} in {listed_in} is outside the dataset root ({WHY[form]}); to read it there, set {ALLOW}"


# -- reading regular files only ---------------------------------------------------------------------

def _socket_file(name: str) -> None:
    """A Unix-domain socket bound at `name` in the current folder (left on disk once closed);
    a relative name, as socket paths are limited to about 100 bytes."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(name)


@needs_fifo
@pytest.mark.parametrize("kind", ["named pipe", "character device", "socket", "folder"])
@pytest.mark.parametrize("read", [read_rgb, read_palette_indices])
def test_image_reading_opens_only_regular_files(tmp_path: Path, monkeypatch, kind: str, read) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "image.png"
    if kind == "named pipe":
        make_fifo(path)
    elif kind == "character device":
        if not os.path.exists(os.devnull):
            pytest.skip("no null device")
        path.symlink_to(os.devnull)  # a link is followed: what it leads to is checked
    elif kind == "socket":
        _socket_file(path.name)
    else:
        path.mkdir()
    with pytest.raises(ImageReadError, match=rf"image\.png: not a regular file \(a {kind}\)$"):
        finishes(lambda: read(path), path)


def test_a_link_to_a_regular_file_is_read(tmp_path: Path) -> None:
    target = write_imagenet_jpeg(tmp_path / "elsewhere" / "a.jpg", (8, 6))
    (tmp_path / "link.jpg").symlink_to(target)
    image, notes = read_rgb(tmp_path / "link.jpg")
    assert tuple(image.shape) == (3, 6, 8) and notes == ()


# -- ImageNet ------------------------------------------------------------------------------------------

def _append_wsol(metadata: Path, key: str, label: int, size: tuple[int, int], box: list[int]) -> None:
    """One more image in the four wsolevaluation metadata files."""
    for name, line in (("image_ids", key), ("class_labels", f"{key},{label}"),
                       ("image_sizes", f"{key},{size[0]},{size[1]}"),
                       ("localization", f"{key},{','.join(map(str, box))}")):
        with (metadata / f"{name}.txt").open("a") as handle:
            handle.write(line + "\n")


def _wsol_with_victim(tmp_path: Path, form: str) -> tuple[Path, Path, str]:
    """An ImageNet wsolevaluation tree under tmp_path/root whose metadata also lists an image
    outside the root, as `../` or as an absolute path; (root, metadata, listed path)."""
    root = tmp_path / "root"
    metadata = build_wsol(root, root / "metadata", ITEMS, wnids=sorted_wnids())
    victim = write_imagenet_jpeg(tmp_path / "outside" / f"{VICTIM_ID}.JPEG", (16, 12))
    key = f"../outside/{victim.name}" if form == "dotdot" else str(victim)
    _append_wsol(metadata, key, 0, (16, 12), [1, 1, 10, 8])
    return root, metadata, key


@pytest.mark.parametrize("form", ["dotdot", "absolute"])
def test_imagenet_wsol_path_outside_the_root_is_skipped(tmp_path: Path, form: str) -> None:
    root, metadata, key = _wsol_with_victim(tmp_path, form)
    ds = ImageNetVal(root, metadata=metadata)
    assert [r.image_id for r in ds.records] == [item.image_id for item in ITEMS]
    assert reasons(ds) == {VICTIM_ID: outside(key, "image_ids.txt", form)}


@pytest.mark.parametrize("form", ["dotdot", "absolute"])
def test_imagenet_wsol_path_outside_the_root_is_read_when_allowed(tmp_path: Path, form: str) -> None:
    root, metadata, _ = _wsol_with_victim(tmp_path, form)
    ds = ImageNetVal(root, metadata=metadata, allow_outside_root=True)
    assert ds.skipped == [] and ds.records[-1].image_id == VICTIM_ID
    sample = ds[len(ds) - 1]
    assert isinstance(sample, Sample) and sample.orig_size == (16, 12) and sample.label == 0


def test_imagenet_wsol_metadata_with_only_absolute_paths_is_refused(tmp_path: Path) -> None:
    """Metadata written for data in another place: one line naming the file and both fixes."""
    moved = tmp_path / "moved"
    metadata = build_wsol(tmp_path / "old_place", tmp_path / "metadata", ITEMS, wnids=sorted_wnids())
    for name in ("image_ids", "class_labels", "image_sizes", "localization"):
        path = metadata / f"{name}.txt"
        path.write_text(path.read_text().replace("val/", f"{tmp_path / 'old_place'}/val/"))
    moved.mkdir()
    with pytest.raises(InputFileError) as info:
        ImageNetVal(moved, metadata=metadata)
    message = str(info.value)
    assert "\n" not in message and str(metadata / "image_ids.txt") in message
    assert "every image path" in message and "outside the dataset root" in message and ALLOW in message
    assert len(ImageNetVal(moved, metadata=metadata, allow_outside_root=True)) == 3


def test_imagenet_layouts_that_list_folders_take_no_path_from_a_file(tmp_path: Path) -> None:
    """Kaggle's csv and the torchvision XMLs give ids, never paths: an id that reads like a path
    outside the root only names an image the folder listing does not hold."""
    root = build_kaggle(tmp_path / "kaggle", ITEMS)
    write_imagenet_jpeg(tmp_path / "outside.JPEG", (16, 12))
    with (root / "LOC_val_solution.csv").open("a") as handle:
        handle.write(f"../../../../../outside,{TENCH} 1 1 10 8\n{tmp_path / 'outside'},{TENCH} 1 1 10 8\n")
    ds = ImageNetVal(root)
    assert all(Path(r.path).resolve().is_relative_to(root.resolve()) for r in ds.records)
    assert len(ds) == 3 and set(reasons(ds).values()) == {"image file missing"}


@needs_fifo
def test_imagenet_named_pipe_in_place_of_an_image_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    metadata = build_wsol(root, root / "metadata", ITEMS, wnids=sorted_wnids())
    fifo = make_fifo(root / "val" / f"{ITEMS[0].image_id}.JPEG")
    ds = finishes(lambda: ImageNetVal(root, metadata=metadata), fifo)
    assert reasons(ds) == {ITEMS[0].image_id: f"cannot read val/{fifo.name}: {PIPE}"}


@needs_fifo
def test_imagenet_image_replaced_by_a_named_pipe_after_indexing_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ds = ImageNetVal(root, metadata=build_wsol(root, root / "metadata", ITEMS, wnids=sorted_wnids()))
    fifo = make_fifo(Path(ds.records[1].path))
    items = finishes(lambda: loaded(ds), fifo)
    assert items[1] == SkippedSample(ITEMS[1].image_id, f"cannot read image file {fifo}: {PIPE}")
    assert isinstance(items[0], Sample) and isinstance(items[2], Sample)


@needs_fifo
@pytest.mark.parametrize("layout", ["kaggle", "torchvision"])
def test_imagenet_named_pipe_in_place_of_an_xml_is_skipped(tmp_path: Path, layout: str) -> None:
    if layout == "kaggle":
        build_kaggle(tmp_path, ITEMS, csv=False)
        xml_dir = KAGGLE_XML_DIR
    else:
        build_torchvision(tmp_path, ITEMS)
        xml_dir = "val"
    fifo = make_fifo(tmp_path / xml_dir / f"{ITEMS[2].image_id}.xml")
    ds = finishes(lambda: ImageNetVal(tmp_path), fifo)
    assert reasons(ds) == {ITEMS[2].image_id: f"cannot read {xml_dir}/{fifo.name}: {PIPE}"}
    assert all(isinstance(item, Sample) for item in finishes(lambda: loaded(ds), fifo))


@needs_fifo
def test_imagenet_kaggle_size_xml_that_is_a_named_pipe_leaves_the_size_unchecked(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    fifo = make_fifo(tmp_path / KAGGLE_XML_DIR / f"{ITEMS[0].image_id}.xml")
    ds = finishes(lambda: ImageNetVal(tmp_path), fifo)
    sample = finishes(lambda: ds[0], fifo)
    assert sample.notes == (f"size not checked: cannot read {KAGGLE_XML_DIR}/{fifo.name}: {PIPE}",)


@needs_fifo
@pytest.mark.parametrize("name", ["image_ids.txt", "localization.txt"])
def test_imagenet_wsol_metadata_file_that_is_a_named_pipe_is_refused(tmp_path: Path, name: str) -> None:
    metadata = build_wsol(tmp_path, tmp_path / "metadata", ITEMS, wnids=sorted_wnids())
    fifo = make_fifo(metadata / name)
    with pytest.raises(InputFileError, match=rf"^cannot read {re.escape(str(fifo))}: {re.escape(PIPE)}$"):
        finishes(lambda: ImageNetVal(tmp_path, metadata=metadata), fifo)


@needs_fifo
def test_imagenet_synset_mapping_that_is_a_named_pipe_is_refused(tmp_path: Path) -> None:
    build_kaggle(tmp_path, ITEMS)
    fifo = make_fifo(tmp_path / "LOC_synset_mapping.txt")
    with pytest.raises(InputFileError, match=rf"LOC_synset_mapping\.txt: {re.escape(PIPE)}$"):
        finishes(lambda: ImageNetVal(tmp_path), fifo)


def test_a_linked_image_folder_inside_the_root_is_read(tmp_path: Path) -> None:
    """Links the user made inside the root are followed (e.g. val/ on another disk)."""
    disk = tmp_path / "other_disk"
    metadata = build_wsol(disk, tmp_path / "metadata", ITEMS, wnids=sorted_wnids())
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "val").symlink_to(disk / "val", target_is_directory=True)
    ds = ImageNetVal(tmp_path / "root", metadata=metadata)
    assert ds.skipped == [] and all(isinstance(item, Sample) for item in loaded(ds))


# -- CUB ---------------------------------------------------------------------------------------------

def _cub_victim(tmp_path: Path, form: str) -> str:
    """A 40x30 image outside the CUB root tmp_path/data, named as `../` from
    data/CUB_200_2011/images/ or absolutely."""
    victim = tmp_path / "outside" / "victim.jpg"
    write_cub_jpeg(victim, (40, 30))
    return "../../../outside/victim.jpg" if form == "dotdot" else str(victim)


def _add_official(cub: Path, number: int, path: str) -> None:
    """One more test image (class 3, box inside 40x30) in the official index files."""
    for name, text in (("images.txt", path), ("image_class_labels.txt", "3"), ("train_test_split.txt", "0"),
                       ("bounding_boxes.txt", "4.0 3.0 15.0 11.0")):
        with (cub / name).open("a") as handle:
            handle.write(f"{number} {text}\n")


@pytest.mark.parametrize("layout", ["official", "wsolevaluation"])
@pytest.mark.parametrize("form", ["dotdot", "absolute"])
def test_cub_path_outside_the_root_is_skipped_unless_allowed(tmp_path: Path, layout: str, form: str) -> None:
    cub = write_official(tmp_path / "data")
    path = _cub_victim(tmp_path, form)
    if layout == "official":
        _add_official(cub, 5, path)
        metadata, listed_in = None, "images.txt"
    else:
        rows = [(rel_path(IMAGES[3]), 2, (40, 30), [(4, 3, 19, 14)]), (path, 2, (40, 30), [(4, 3, 19, 14)])]
        metadata, listed_in = write_metadata(tmp_path / "meta", rows), "image_ids.txt"

    def build(**params) -> CubDataset:
        return CubDataset(tmp_path / "data", metadata=metadata, **params)

    ds = build()
    assert path not in [r.image_id for r in ds.records]
    assert reasons(ds) == {path: outside(path, listed_in, form)}
    allowed = build(allow_outside_root=True)
    assert allowed.skipped == [] and allowed.records[-1].image_id == path
    assert isinstance(allowed[len(allowed) - 1], Sample)


def test_cub_index_with_only_absolute_paths_is_refused(tmp_path: Path) -> None:
    cub = write_official(tmp_path)
    images = cub / "images.txt"
    images.write_text("".join(f"{e[0]} /old/disk/CUB_200_2011/images/{rel_path(e)}\n" for e in IMAGES))
    pattern = rf"every image path in {re.escape(str(images))} .*outside the dataset root.*{re.escape(ALLOW)}"
    with pytest.raises(InputFileError, match=pattern):
        CubDataset(tmp_path)


@needs_fifo
def test_cub_named_pipes_in_place_of_an_image_a_mask_or_an_index_file(tmp_path: Path) -> None:
    cub = write_official(tmp_path)
    segs = tmp_path / "segmentations"
    write_soft_mask(segs / rel_path(IMAGES[0]).replace(".jpg", ".png"), np.zeros((335, 500)))
    write_soft_mask(segs / rel_path(IMAGES[3]).replace(".jpg", ".png"), np.zeros((30, 40)))
    ds = CubDataset(tmp_path, segmentations=segs)
    mask = make_fifo(segs / rel_path(IMAGES[3]).replace(".jpg", ".png"))
    assert finishes(lambda: ds[len(ds) - 1], mask) == SkippedSample(
        rel_path(IMAGES[3]), f"cannot read image file {mask}: {PIPE}")
    again = finishes(lambda: CubDataset(tmp_path, segmentations=segs), mask)
    assert reasons(again)[rel_path(IMAGES[3])] == (f"cannot read segmentation mask "
                                                   f"{mask.relative_to(segs)}: {PIPE}")
    image = make_fifo(cub / "images" / rel_path(IMAGES[3]))
    plain = CubDataset(tmp_path)
    assert finishes(lambda: loaded(plain), image)[-1] == SkippedSample(
        rel_path(IMAGES[3]), f"cannot read image file {image}: {PIPE}")
    index = make_fifo(cub / "images.txt")
    with pytest.raises(InputFileError, match=rf"^cannot read {re.escape(str(index))}: {re.escape(PIPE)}$"):
        finishes(lambda: CubDataset(tmp_path), index)


# -- VOC -------------------------------------------------------------------------------------------------

def _voc_tree(root: Path, victim_form: str | None = None, mode: str = "detection") -> str | None:
    """Two images in the official layout, and optionally a split line naming an image (and its
    XML) outside the root; returns that line."""
    image_set = "Main" if mode == "detection" else "Segmentation"
    ids = ["2008_000001", "2008_000002"]
    for image_id in ids:
        write_voc_xml(root, image_id, [("dog", 5, 4, 20, 15)])
        write_image(root, image_id)
        indices = np.zeros((30, 40), dtype=np.uint8)
        indices[4:15, 5:20] = 12  # dog
        write_mask(root, image_id, indices)
    line = None
    if victim_form is not None:
        # <id> names JPEGImages/<id>.jpg and Annotations/<id>.xml: both lead to other/victim.*
        other = root.parent / "other"
        write_voc_xml(other, "victim", [("dog", 5, 4, 20, 15)])
        write_image(other, "victim")
        victim = other / "victim"
        for sub, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
            (voc_dir(other) / sub / f"victim{suffix}").rename(victim.with_suffix(suffix))
        line = "../../../../other/victim" if victim_form == "dotdot" else str(victim)
        ids.append(line)
    write_split(root, image_set, "val", ids)
    return line


@pytest.mark.parametrize("form", ["dotdot", "absolute"])
def test_voc_split_line_outside_the_root_is_skipped_unless_allowed(tmp_path: Path, form: str) -> None:
    root = tmp_path / "root"
    line = _voc_tree(root, form)
    ds = VocDataset(root)
    assert [r.image_id for r in ds.records] == ["2008_000001", "2008_000002"]
    assert reasons(ds) == {line: outside(line, "ImageSets/Main/val.txt", form)}
    allowed = VocDataset(root, allow_outside_root=True)
    assert allowed.skipped == [] and isinstance(allowed[2], Sample)


def test_voc_split_with_only_absolute_ids_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _voc_tree(root)
    split = voc_dir(root) / "ImageSets" / "Main" / "val.txt"
    split.write_text(f"{voc_dir(root)}/JPEGImages/2008_000001\n")
    pattern = rf"every image id in {re.escape(str(split))} .*outside the dataset root.*{re.escape(ALLOW)}"
    with pytest.raises(InputFileError, match=pattern):
        VocDataset(root)


@needs_fifo
@pytest.mark.parametrize("mode", ["detection", "segmentation"])
def test_voc_named_pipes_in_place_of_an_image_an_xml_or_a_mask(tmp_path: Path, mode: str) -> None:
    _voc_tree(tmp_path, mode=mode)
    ds = VocDataset(tmp_path, mode=mode)
    image = make_fifo(voc_dir(tmp_path) / "JPEGImages" / "2008_000002.jpg")
    assert finishes(lambda: loaded(ds), image)[1] == SkippedSample(
        "2008_000002", f"cannot read image file {image}: {PIPE}")
    if mode == "detection":
        fifo = make_fifo(voc_dir(tmp_path) / "Annotations" / "2008_000001.xml")
        expected = f"cannot read Annotations/2008_000001.xml: {PIPE}"
    else:
        fifo = make_fifo(voc_dir(tmp_path) / "SegmentationClass" / "2008_000001.png")
        expected = f"cannot read SegmentationClass/2008_000001.png: {PIPE}"
    again = finishes(lambda: VocDataset(tmp_path, mode=mode), fifo, image)
    assert reasons(again) == {"2008_000001": expected}


@needs_fifo
def test_voc_split_file_that_is_a_named_pipe_is_refused(tmp_path: Path) -> None:
    _voc_tree(tmp_path)
    fifo = make_fifo(voc_dir(tmp_path) / "ImageSets" / "Main" / "val.txt")
    with pytest.raises(InputFileError, match=rf"^cannot read {re.escape(str(fifo))}: {re.escape(PIPE)}$"):
        finishes(lambda: VocDataset(tmp_path), fifo)


# -- OpenImages ------------------------------------------------------------------------------------------

def _append_lines(path: Path, *lines: str) -> None:
    text = path.read_text()
    """Append `lines` to a text file (whose last line may have no newline, as upstream's)."""
    separator = "" if text.endswith("\n") or not text else "\n"
    path.write_text(text + separator + "".join(f"{line}\n" for line in lines))


def _openimages_victims(tree: Path, form: str) -> dict[str, tuple[str, str]]:
    """Three more images in the metadata: one whose image, one whose instance mask and one
    whose ignore mask lie outside the root (named with `../` or absolutely).
    -> {image id: (the outside path, the metadata file naming it)}"""
    outside = tree.parent / "outside"
    outside.mkdir()
    image, mask = (tree / "test/0aaa/a2.jpg").read_bytes(), (tree / "test/0aaa/a2_m0aaa_1.png").read_bytes()
    (outside / "v.jpg").write_bytes(image)
    (outside / "m.png").write_bytes(mask)
    for name in ("c1", "c2"):
        (tree / f"test/0aaa/{name}.jpg").write_bytes(image)
        (tree / f"test/0aaa/{name}_m.png").write_bytes(mask)
    image_path, mask_path = (("../outside/v.jpg", "../outside/m.png") if form == "dotdot"
                             else (str(outside / "v.jpg"), str(outside / "m.png")))
    meta = tree / META
    ids = [image_path, "test/0aaa/c1.jpg", "test/0aaa/c2.jpg"]
    _append_lines(meta / "image_ids.txt", *ids)
    _append_lines(meta / "class_labels.txt", *(f"{i},0" for i in ids))
    _append_lines(meta / "localization.txt", f"{image_path},test/0aaa/c1_m.png,",
                  f"test/0aaa/c1.jpg,{mask_path},", f"test/0aaa/c2.jpg,test/0aaa/c2_m.png,{mask_path}")
    return {image_path: (image_path, "image_ids.txt"), "test/0aaa/c1.jpg": (mask_path, "localization.txt"),
            "test/0aaa/c2.jpg": (mask_path, "localization.txt")}


@pytest.mark.parametrize("form", ["dotdot", "absolute"])
def test_openimages_image_and_mask_paths_outside_the_root_are_skipped_unless_allowed(
        tmp_path: Path, form: str) -> None:
    tree = make_tree(tmp_path / "OpenImages")
    victims = _openimages_victims(tree, form)
    ds = OpenImagesDataset(tree)
    assert {image_id: reasons(ds)[image_id] for image_id in victims} == {
        image_id: outside(path, listed_in, form) for image_id, (path, listed_in) in victims.items()}
    assert not set(victims) & {r.image_id for r in ds.records}
    allowed = OpenImagesDataset(tree, allow_outside_root=True)
    items = {r.image_id: allowed[i] for i, r in enumerate(allowed.records)}
    assert all(isinstance(items[image_id], Sample) for image_id in victims)


def test_openimages_metadata_with_only_absolute_paths_is_refused(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "OpenImages")
    meta = tree / META
    for name in ("image_ids.txt", "class_labels.txt", "localization.txt"):
        (meta / name).write_text((meta / name).read_text().replace("test/", "/old/disk/test/"))
    pattern = rf"every image path in {re.escape(str(meta / 'image_ids.txt'))} .*{re.escape(ALLOW)}"
    with pytest.raises(InputFileError, match=pattern):
        OpenImagesDataset(tree)


@needs_fifo
def test_openimages_named_pipes_in_place_of_an_image_a_mask_or_the_metadata(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "OpenImages")
    ds = OpenImagesDataset(tree)
    image = make_fifo(tree / "test/0aaa/a2.jpg")
    mask = make_fifo(tree / "test/0bbb/b1_m0bbb_1.png")
    items = {r.image_id: item for r, item in zip(ds.records, finishes(lambda: loaded(ds), image, mask),
                                                 strict=True)}
    assert items["test/0aaa/a2.jpg"].reason == f"cannot read image file {image}: {PIPE}"
    assert items["test/0bbb/b1.jpg"].reason == f"cannot read mask file {mask}: {PIPE}"
    assert isinstance(items["test/0aaa/a1.jpg"], Sample)
    index = make_fifo(tree / META / "localization.txt")
    with pytest.raises(InputFileError, match=rf"^cannot read {re.escape(str(index))}: {re.escape(PIPE)}$"):
        finishes(lambda: OpenImagesDataset(tree), index, image, mask)


# -- end to end ------------------------------------------------------------------------------------------

@needs_fifo
def test_cli_run_completes_and_skipped_csv_gives_the_reasons(tmp_path: Path, command) -> None:
    """A run over data holding a named pipe and a path outside the root finishes, and both
    items are in skipped.csv (and counted in data.json) with their reasons."""
    tree = make_tree(tmp_path / "OpenImages")
    image = make_fifo(tree / "test/0aaa/a2.jpg")
    (tmp_path / "outside.jpg").write_bytes((tree / "test/0aaa/a1.jpg").read_bytes())
    meta = tree / META
    _append_lines(meta / "image_ids.txt", "../outside.jpg")
    _append_lines(meta / "class_labels.txt", "../outside.jpg,0")
    _append_lines(meta / "localization.txt", "../outside.jpg,test/0aaa/a1_m0aaa_1.png,")
    args = ["experiment=wsoleval_openimages", f"dataset.params.root={tree}", "model=vit_base_orig",
            "model.name=vit_tiny_patch16_224", "model.pretrained=false", "++model.kwargs.num_classes=2",
            "method=[center]", "progress=false", "gallery_images=0", "batch_size=4", "num_workers=0",
            "scoring_workers=0", f"store.root={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run"]
    done = finishes(lambda: command("wsol-bench", args, Path(__file__).resolve().parents[1]), image)
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = dict(pd.read_csv(tmp_path / "run" / "skipped.csv").itertuples(index=False))
    assert skipped["test/0aaa/a2.jpg"] == f"cannot read image file {image}: {PIPE}"
    assert skipped["../outside.jpg"] == outside("../outside.jpg", "image_ids.txt", "dotdot")
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["skipped"] == len(skipped) == 6  # b2, b3, b4, b5 of the tree, and these two


def test_allow_outside_root_is_a_typed_setting_of_every_file_based_dataset() -> None:
    from hydra import compose, initialize_config_module

    from wsol_bench.config.datasets import DATASET_SCHEMAS

    for name in ("imagenet", "voc", "voc_segmentation", "cub", "openimages"):
        assert DATASET_SCHEMAS[name]().params.allow_outside_root is False, name
    with initialize_config_module("wsol_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["dataset=voc", "dataset.params.root=x",
                                           "dataset.params.allow_outside_root=true"])
    assert cfg.dataset.params.allow_outside_root is True
