"""ImageNet ILSVRC2012 validation set with bounding boxes, read from its official layouts.

Layouts (docs/protocol.md section 6):
- kaggle: <root>/ILSVRC/Data/CLS-LOC/val/*.JPEG (flat) with <root>/LOC_val_solution.csv, or,
  without the csv, <root>/ILSVRC/Annotations/CLS-LOC/val/*.xml; <root>/LOC_synset_mapping.txt.
- torchvision: <root>/val/<wnid>/*.JPEG with the bbox XMLs in `annotations` (default
  <root>/val, where the ILSVRC2012_bbox_val archive puts them when extracted in <root>).
- wsolevaluation: `metadata` = folder with image_ids.txt, class_labels.txt, image_sizes.txt,
  localization.txt; the image paths they list are relative to <root>. A listed path that leads
  outside <root> (absolute, or with a '..' part) is skipped, naming the setting that allows it
  (`allow_outside_root`); metadata whose every path does is refused (it was written for data in
  another place). The kaggle and torchvision layouts take no path from a file: their images
  and XMLs are found by listing their folders, so the setting does not concern them.

Every layout gives the same items: image id = file stem (ILSVRC2012_val_00000001), label =
position of the wnid in sorted order (= LOC_synset_mapping.txt order = timm/torchvision), boxes
converted from 0-based inclusive to continuous edges. The annotation index is parsed once at
construction; problems with one image (no annotation, missing file, unknown class) are kept
in `skipped`, problems found when decoding become a `SkippedSample` for that item.

Every id has exactly one outcome, a record or a skip, and nothing is decided by file or
directory order. Skipped, each with a reason naming the files:
- an id with several files in one folder (X.JPEG and X.jpg; X.xml and X.XML), in several
  class folders (torchvision: its class is ambiguous), or under several listed paths
  (wsolevaluation); in Kaggle's csv layout, XML twins only leave the size unchecked (noted);
- a file whose name is not UTF-8 (shown with the odd bytes as \\xNN), and an entry that cannot
  be read (a symbolic-link loop, a link to nothing, a named pipe or other non-regular file);
- an image whose csv / metadata lines differ (two lines for one ImageId in
  LOC_val_solution.csv, for one path in class_labels.txt or image_sizes.txt); lines with the
  same content are read once, with a note;
- an image without a usable box of its own class (its boxes are all of other classes, or its
  own are degenerate or, once decoded, outside the image): it has no ground truth to score.
An annotation file that cannot be read, or is not UTF-8 text, is an error naming it and the
line. In the wsolevaluation layout the metadata lists the items: files it does not list are
not looked at.

Annotation size vs decoded size (`size_mismatch`): the official val annotations agree with the
original files (all 80,477 boxes lie inside their stated image sizes), so a decoded image of
another size is most likely a resampled copy of the dataset, and the default "scale" scales the
boxes to it; "keep" keeps the boxes in their own pixel coordinates and clips them (what the VOC
and CUB loaders do); "skip" skips the item. Each case is noted on the sample.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from timm.data import ImageNetInfo
from torch.utils.data import Dataset

from wsol_bench.errors import InputFileError, MissingInputError, SettingError

from .base import Sample, SkippedSample, index_fingerprint
from .image_io import ImageReadError, read_rgb
from .imagenet_annotations import (
    WSOL_FILES,
    AnnotationError,
    ImageAnnotation,
    parse_imagenet_xml,
    read_loc_solution_csv,
    read_synset_mapping,
    read_wsol_metadata,
    read_xml_size,
)
from .imagenet_index import ImageNetRecord, PendingImage, build_records, fit_boxes_to_image
from .records import (
    display_name,
    folder_listing,
    is_utf8,
    limit_index,
    outside_root_reason,
    refuse_all_outside_root,
    scan_folder,
    unreadable_reason,
)

LAYOUTS = ("kaggle", "torchvision", "wsolevaluation")
SIZE_MISMATCH_POLICIES = ("scale", "keep", "skip")
KAGGLE_IMAGES = Path("ILSVRC/Data/CLS-LOC/val")
KAGGLE_XMLS = Path("ILSVRC/Annotations/CLS-LOC/val")
LAYOUT_HELP = (
    "expected one of the ImageNet val layouts: "
    "kaggle (<root>/ILSVRC/Data/CLS-LOC/val/*.JPEG with <root>/LOC_val_solution.csv or "
    "<root>/ILSVRC/Annotations/CLS-LOC/val/*.xml), "
    "torchvision (<root>/val/<wnid>/*.JPEG with the bbox XMLs in <root>/val or dataset.params.annotations), "
    "wsolevaluation (dataset.params.metadata = folder with image_ids.txt, class_labels.txt, "
    "image_sizes.txt, localization.txt; images under <root>)")
NO_ANNOTATION = "no annotation for this image"
FILE_MISSING = "image file missing"


def _stem(path: str) -> str:
    """File name without folder and extension (Path.stem, for plain strings)."""
    name = path.rpartition("/")[2]
    return name.rpartition(".")[0] or name


def _relative(path: Path, root: Path) -> str:
    """`path` as shown in reasons: relative to the dataset root when inside it."""
    try:
        return display_name(path.relative_to(root).as_posix())
    except ValueError:
        return display_name(str(path))


class Listing(NamedTuple):
    """The image ids of one folder (id = file stem).

    names: id -> file name, for ids with exactly one file, readable and named in UTF-8.
    problems: id -> why its file(s) cannot be used (several files, unreadable, not UTF-8).
    found: id -> the names of all its files, usable or not."""

    names: dict[str, str]
    problems: dict[str, str]
    found: dict[str, list[str]]


EMPTY_LISTING = Listing({}, {}, {})


def _listing(folder: Path, root: Path, xml: bool = False) -> Listing:
    """The XML files (xml=True) or the other files of `folder` by image id. An id is never
    resolved by directory order: two files for one id make it a problem."""
    scan = scan_folder(folder)
    found: dict[str, list[str]] = {}
    for name in (*scan.files, *scan.unreadable):
        if name.lower().endswith(".xml") == xml:
            found.setdefault(_stem(display_name(name)), []).append(name)
    names, problems = {}, {}
    for image_id, files in found.items():
        # An id must be writable to records.csv and skipped.csv: its name must be UTF-8.
        if len(files) == 1 and files[0] not in scan.unreadable and is_utf8(files[0]):
            names[image_id] = files[0]
        else:
            problems[image_id] = _listing_problem(files, scan.unreadable, _relative(folder, root))
    return Listing(names, problems, found)


def _listing_problem(files: list[str], unreadable: dict[str, str], where: str) -> str:
    """Why the file(s) of one id in the folder shown as `where` cannot be used."""
    shown = sorted(display_name(name) for name in files)
    if len(files) > 1:
        return f"{len(files)} files for one image id in {where}: {', '.join(shown)}; keep one"
    if files[0] in unreadable:
        return f"cannot read {where}/{shown[0]}: {unreadable[files[0]]}"
    return f"file name is not valid UTF-8: {where}/{shown[0]}; rename the file"


def detect_layout(root: Path, metadata: Path | None) -> str:
    """Which official layout `root` holds; raises naming the layouts and what was found."""
    if not root.is_dir():
        raise MissingInputError(f"imagenet: dataset.params.root {str(root)!r} does not exist; {LAYOUT_HELP}")
    if metadata is not None:
        return "wsolevaluation"
    if (root / KAGGLE_IMAGES).is_dir():
        return "kaggle"
    val = root / "val"
    if val.is_dir() and scan_folder(val).folders:
        return "torchvision"
    raise MissingInputError(f"imagenet: cannot tell the layout of {root}: {LAYOUT_HELP}; "
                            f"found: {folder_listing(root)}")


def _joined(folder: Path, name: str | None) -> str | None:
    return None if name is None else os.path.join(folder, name)


def _size_unchecked(ann: ImageAnnotation, problem: str | None) -> ImageAnnotation:
    """`ann` noted as having no usable size file (Kaggle's csv has no sizes of its own)."""
    return ann if problem is None else replace(ann, notes=ann.notes + (f"size not checked: {problem}",))


def _require_dir(folder: Path, layout: str, root: Path, setting: str = "dataset.params.root") -> None:
    if not folder.is_dir():
        raise MissingInputError(f"imagenet ({layout} layout): folder {folder} does not exist; "
                                f"check {setting}. "
                                f"{LAYOUT_HELP}; found in {root}: {folder_listing(root)}")


class ImageNetVal(Dataset):
    """ImageNet val with boxes from any official layout; items are `Sample`s (or
    `SkippedSample` for an image that cannot be decoded or used); `transform` maps a Sample.

    `records` (one `ImageNetRecord` per item, built without decoding) and `skipped` (images
    dropped at index time, with reasons) serve summaries; `wnids` and `class_names` follow
    the class index."""

    def __init__(self, root: str | os.PathLike, *, split: str = "val", layout: str = "auto",
                 metadata: str | os.PathLike | None = None, annotations: str | os.PathLike | None = None,
                 synsets: str | os.PathLike | None = None, num_images: int | None = None,
                 size_mismatch: str = "scale", allow_outside_root: bool = False, transform=None) -> None:
        if split != "val":
            raise SettingError(f"imagenet: split {split!r} is not supported; "
                               "only 'val' has boxes for every image")
        if layout not in ("auto",) + LAYOUTS:
            raise SettingError(f"imagenet: layout {layout!r} is unknown; valid: auto, {', '.join(LAYOUTS)}")
        if size_mismatch not in SIZE_MISMATCH_POLICIES:
            raise SettingError(f"imagenet: size_mismatch {size_mismatch!r} is unknown; "
                               f"valid: {', '.join(SIZE_MISMATCH_POLICIES)}")
        self.root = Path(root).expanduser()
        self.metadata = Path(metadata).expanduser() if metadata is not None else None
        if not self.root.is_dir():
            detect_layout(self.root, self.metadata)  # raises the missing-root error
        self.layout = detect_layout(self.root, self.metadata) if layout == "auto" else layout
        if (self.layout == "wsolevaluation") != (self.metadata is not None):
            raise SettingError(f"imagenet: dataset.params.metadata is needed by the wsolevaluation layout "
                               f"and only by it (layout={self.layout}, metadata={metadata}); {LAYOUT_HELP}")
        self.size_mismatch, self.transform = size_mismatch, transform
        self.allow_outside_root = bool(allow_outside_root)
        self.wnids, self.class_names = self._classes(synsets)
        self._class_index = {wnid: i for i, wnid in enumerate(self.wnids)}
        self._skips: dict[str, str] = {}  # image id -> reason: one skip per id
        if self.layout == "kaggle":
            records = self._index_kaggle()
        elif self.layout == "torchvision":
            records = self._index_torchvision(Path(annotations).expanduser() if annotations else None)
        else:
            records = self._index_wsolevaluation()
        # One outcome per id: a record is never kept next to a skip of its id.
        records = [r for r in records if r.image_id not in self._skips]
        skips = [SkippedSample(image_id, reason) for image_id, reason in self._skips.items()]
        index = sorted(records + skips, key=lambda item: item.image_id)
        try:
            self.records, self.skipped = limit_index(index, num_images, f"imagenet ({self.layout} layout)")
        except InputFileError as err:  # no usable item: name the layouts, the likeliest fix
            raise InputFileError(f"{err}. Root {self.root}: {LAYOUT_HELP}") from None

    def _classes(self, synsets: str | os.PathLike | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Sorted wnids and their names: from LOC_synset_mapping.txt when given or present in
        the root, else timm's ImageNet-1k list (the same 1000 wnids)."""
        info = ImageNetInfo()
        reference = info.label_names()
        path = Path(synsets).expanduser() if synsets else self.root / "LOC_synset_mapping.txt"
        absent = unreadable_reason(path) == "missing"
        if synsets and absent:
            raise MissingInputError(f"imagenet: dataset.params.synsets {str(path)!r} does not exist")
        if not absent:  # there but unreadable (a named pipe, a link loop): refused, naming it
            names = read_synset_mapping(path)
            if sorted(names) != sorted(reference):
                raise AnnotationError(f"{path} does not list the 1000 ImageNet-1k wnids ({len(names)} wnids, "
                                      f"{len(set(names) - set(reference))} unknown); pass the file of "
                                      "ILSVRC2012 CLS-LOC in dataset.params.synsets")
        else:
            names = dict(zip(reference, info.label_descriptions(), strict=True))
        wnids = sorted(names)
        return tuple(wnids), tuple(names[w] for w in wnids)

    @property
    def num_classes(self) -> int:
        return len(self.wnids)

    # -- index building: one record per usable image, one skip per unusable one ----------------
    def _skip(self, image_id: str, reason: str) -> None:
        """Skip `image_id`; the first reason found for an id is the one kept."""
        self._skips.setdefault(image_id, reason)

    def _from_xml(self, image_id: str, image: str, xml: Path, label: int | None = None
                  ) -> PendingImage | None:
        try:
            return PendingImage(image_id, image, parse_imagenet_xml(xml), label)
        except AnnotationError as err:
            self._skip(image_id, str(err))
            return None

    def _build_records(self, pending: list[PendingImage | None]) -> list[ImageNetRecord]:
        records, skips = build_records([p for p in pending if p is not None], self._class_index)
        for skip in skips:
            self._skip(skip.image_id, skip.reason)
        return records

    def _folder(self, folder: Path, xml: bool = False) -> Listing:
        return _listing(folder, self.root, xml)

    def _index_kaggle(self) -> list[ImageNetRecord]:
        images_dir, xml_dir = self.root / KAGGLE_IMAGES, self.root / KAGGLE_XMLS
        _require_dir(images_dir, "kaggle", self.root)
        images = self._folder(images_dir)
        for image_id, reason in images.problems.items():
            self._skip(image_id, reason)
        csv = self.root / "LOC_val_solution.csv"
        if os.path.lexists(csv):  # a csv that cannot be read (a named pipe...) is an error, not a fallback
            annotations, problems = read_loc_solution_csv(csv)
            for image_id, reason in problems:
                self._skip(image_id, reason)
            # The XMLs only state the image size here: one that cannot be used leaves it unchecked.
            xmls = self._folder(xml_dir, xml=True) if xml_dir.is_dir() else EMPTY_LISTING
            pending = [PendingImage(image_id, os.path.join(images_dir, images.names[image_id]),
                                    _size_unchecked(ann, xmls.problems.get(image_id)), None,
                                    _joined(xml_dir, xmls.names.get(image_id)))
                       for image_id, ann in annotations.items() if image_id in images.names]
            annotated = set(annotations) | {image_id for image_id, _ in problems}
        elif xml_dir.is_dir():
            xmls = self._folder(xml_dir, xml=True)
            for image_id, reason in xmls.problems.items():
                self._skip(image_id, reason)
            pending = [self._from_xml(image_id, os.path.join(images_dir, name),
                                      xml_dir / xmls.names[image_id])
                       for image_id, name in images.names.items() if image_id in xmls.names]
            annotated = set(xmls.names) | set(xmls.problems)
        else:
            raise MissingInputError(f"imagenet (kaggle layout): neither {csv} nor {xml_dir} exists; one of "
                                    f"them holds the boxes. {LAYOUT_HELP}; found in {self.root}: "
                                    f"{folder_listing(self.root)}")
        for image_id in annotated - set(images.names) - set(images.problems):
            self._skip(image_id, FILE_MISSING)
        for image_id in set(images.names) - annotated:
            self._skip(image_id, NO_ANNOTATION)
        return self._build_records(pending)

    def _index_torchvision(self, annotations: Path | None) -> list[ImageNetRecord]:
        val = self.root / "val"
        _require_dir(val, "torchvision", self.root)
        xml_dir = annotations or val
        _require_dir(xml_dir, "torchvision", self.root, "dataset.params.annotations (the bbox XML folder)")
        xmls = self._folder(xml_dir, xml=True)
        top = scan_folder(val)
        for name, why in top.unreadable.items():
            if not name.lower().endswith(".xml"):  # a class folder or not: it cannot be told
                shown = _relative(val / name, self.root)
                self._skip(_stem(display_name(name)), f"cannot read {shown}: {why}")
        folders = {wnid: self._folder(val / wnid) for wnid in sorted(top.folders)}
        holders: dict[str, list[str]] = {}  # image id -> the class folders holding a file of it
        for wnid, listing in folders.items():
            for image_id in listing.found:
                holders.setdefault(image_id, []).append(wnid)
        pending: list[PendingImage | None] = []
        for wnid, listing in folders.items():
            for image_id in listing.found:
                reason = self._torchvision_problem(image_id, wnid, holders[image_id], folders, xmls)
                if reason is not None:
                    self._skip(image_id, reason)
                else:
                    image = os.path.join(val, wnid, listing.names[image_id])
                    pending.append(self._from_xml(image_id, image, xml_dir / xmls.names[image_id],
                                                  label=self._class_index[wnid]))
        for image_id in (set(xmls.names) | set(xmls.problems)) - set(holders):
            self._skip(image_id, xmls.problems.get(image_id, FILE_MISSING))
        return self._build_records(pending)

    def _torchvision_problem(self, image_id: str, wnid: str, holders: list[str], folders: dict[str, Listing],
                             xmls: Listing) -> str | None:
        """Why the image `image_id` of class folder `wnid` cannot be used, or None."""
        if len(holders) > 1:
            paths = sorted(display_name(f"val/{w}/{name}") for w in holders
                           for name in folders[w].found[image_id])
            return (f"image in {len(holders)} class folders: {', '.join(paths)}; its class is ambiguous: "
                    "keep it in one")
        if image_id in folders[wnid].problems:
            return folders[wnid].problems[image_id]
        if wnid not in self._class_index:
            return f"class folder '{display_name(wnid)}' is not an ImageNet-1k wnid"
        if image_id in xmls.problems:
            return xmls.problems[image_id]
        return None if image_id in xmls.names else NO_ANNOTATION

    def _index_wsolevaluation(self) -> list[ImageNetRecord]:
        assert self.metadata is not None
        if not self.metadata.is_dir():
            raise MissingInputError(f"imagenet (wsolevaluation layout): dataset.params.metadata "
                                    f"{str(self.metadata)!r} does not exist; it must hold "
                                    f"{', '.join(WSOL_FILES)}")
        annotations, problems = read_wsol_metadata(self.metadata)
        listed = [*annotations, *(key for key, _ in problems)]
        outside = self._skip_outside_root(listed)
        # Two listed paths with one stem (val/X.JPEG and val/X.jpg) would be one id twice.
        paths: dict[str, set[str]] = {}
        for key in listed:
            paths.setdefault(_stem(key), set()).add(key)
        for image_id, keys in paths.items():
            if len(keys) > 1:
                self._skip(image_id, f"image_ids.txt lists {len(keys)} files for one image id: "
                                     f"{', '.join(sorted(keys))}; keep one")
        for key, reason in problems:
            self._skip(_stem(key), reason)
        # Plain string paths and one directory scan per image folder: 50,000 Path objects
        # would cost seconds.
        present: dict[str, tuple[set[str], dict[str, str]]] = {}
        pending: list[PendingImage | None] = []
        for key, ann in annotations.items():
            if key in outside:  # never looked at: not even its folder is listed
                continue
            folder, _, name = key.rpartition("/")
            if folder not in present:
                _require_dir(self.root / folder, "wsolevaluation", self.root)
                scan = scan_folder(self.root / folder)
                present[folder] = set(scan.files), scan.unreadable
            files, unreadable = present[folder]
            if name in files:
                pending.append(PendingImage(_stem(name), os.path.join(self.root, key), ann,
                                            int(ann.box_classes[0])))
            elif name in unreadable:
                self._skip(_stem(name), f"cannot read {key}: {unreadable[name]}")
            else:
                self._skip(_stem(name), FILE_MISSING)
        return self._build_records(pending)

    def _skip_outside_root(self, listed: list[str]) -> set[str]:
        """Skip each listed image path that leads outside the root (unless allow_outside_root);
        return them. Metadata whose every path does is refused: it was written for another place."""
        image_ids = self.metadata / "image_ids.txt"
        refuse_all_outside_root(listed, image_ids, "image path", self.allow_outside_root)
        outside = set()
        for key in listed:
            reason = outside_root_reason(key, "image_ids.txt", self.allow_outside_root)
            if reason is not None:
                self._skip(_stem(key), reason)
                outside.add(key)
        return outside

    # -- items ---------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """What identifies the data (ids, annotations, image and annotation file stamps)."""
        return index_fingerprint(((r.image_id, [r.path, *([r.size_file] if r.size_file else [])],
                                   (r.label, r.boxes, r.box_labels, r.size)) for r in self.records), self.skipped)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | SkippedSample:
        record = self.records[index]
        try:
            image, notes = read_rgb(record.path)
        except ImageReadError as err:
            return SkippedSample(record.image_id, str(err))
        size = (int(image.shape[2]), int(image.shape[1]))
        notes = record.notes + notes
        stated = record.size
        if stated is None and record.size_file is not None:
            try:
                stated = read_xml_size(Path(record.size_file))
            except AnnotationError as err:
                notes += (f"size not checked: {err}",)
        fitted = fit_boxes_to_image(record.boxes, stated, size, self.size_mismatch)
        if isinstance(fitted, str):
            return SkippedSample(record.image_id, fitted)
        boxes, keep, box_notes = fitted
        if not (record.box_labels[keep] == record.label).any():
            detail = f" ({'; '.join(box_notes)})" if box_notes else ""
            reason = f"no box of its class {self.wnids[record.label]} inside the {size[0]}x{size[1]} image"
            return SkippedSample(record.image_id, reason + detail)
        sample = Sample(image=image, label=record.label, boxes=torch.from_numpy(boxes),
                        box_labels=torch.from_numpy(record.box_labels[keep]), image_id=record.image_id,
                        orig_size=size, notes=notes + box_notes)
        return self.transform(sample) if self.transform is not None else sample
