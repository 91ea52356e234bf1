"""CUB-200-2011, from its official index files or from the wsolevaluation metadata.

Layouts (`layout`):
- official: CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt,
  bounding_boxes.txt, classes.txt, images/}; `root` = CUB_200_2011 or its parent; split `test`
  (is_training_image = 0, 5,794 images) or `train`.
- wsolevaluation: `metadata` = a folder holding image_ids.txt, class_labels.txt,
  image_sizes.txt and localization.txt, or its parent holding <split>/ with them; image paths
  are relative to CUB_200_2011/images under `root`. Only the index is read at construction,
  so the images need not be present until items are read.
- auto (default): wsolevaluation when `metadata` is set, else official.

Ids are the image paths relative to images/ (e.g.
"001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"), identical in both layouts.
Labels are 0-based: class_id - 1.

Boxes: bounding_boxes.txt holds x y w h. As in wsolevaluation, (x, y, x + w, y + h) are the
0-based INCLUSIVE corner pixels: on the real test split x + w reaches at most W - 1 (67 images
reach it exactly, none reach W), and likewise y + h. The continuous box is therefore
[x, y, x + w + 1, y + h + 1]. localization.txt stores the same inclusive corners, so both
layouts give identical boxes. Values are kept as written (never rounded; a fractional value,
which the real files do not have, is noted). The official index
has no image sizes: its boxes are checked against the decoded image when an item is read.

segmentations: optional folder of the CUB segmentation release, <class dir>/<stem>.png soft
greyscale masks. Object pixels are those > 127 (on the channel mean if a file is not grey,
which is noted); mask = label + 1 on the object, 0 elsewhere.

Index files are the dataset's definition, so any problem in one is an error naming the file
and line(s) and the fix, never resolved by line order: a malformed line, text that is not
UTF-8, a file that cannot be read, and an image listed twice: the same number on two lines
of any file (also the same path in a wsolevaluation file), or the same path under two image
numbers in images.txt (whose label, split and box would be ambiguous). Images are found by
the paths the index lists, so files it does not list (whatever their names) are not looked
at; a listed image or mask that cannot be read (e.g. a symbolic-link loop, a named pipe) is a
skipped item whose reason names the file.

Image paths (images.txt, image_ids.txt) must stay inside images/: one that is absolute or has
a '..' part is a skipped item naming the setting that allows it (`allow_outside_root`), and an
index whose every path is such is refused (it was written for data in another place).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

from wsol_bench.errors import InputFileError, MissingInputError, SettingError

from .base import Sample, SkippedSample, inclusive_to_continuous, index_fingerprint
from .image_io import ImageReadError, read_rgb
from .records import (
    AnnotationRecord,
    clip_boxes_to_image,
    folder_listing,
    is_present,
    limit_index,
    outside_root_reason,
    read_text_lines,
    reconcile_image_size,
    refuse_all_outside_root,
    unreadable_reason,
)

LAYOUTS = ("official", "wsolevaluation", "auto")
# Official index files with their number of whitespace-separated fields per line.
OFFICIAL_FIELDS = {"images.txt": 2, "image_class_labels.txt": 2, "train_test_split.txt": 2,
                   "bounding_boxes.txt": 5, "classes.txt": 2}
OFFICIAL_FILES = tuple(OFFICIAL_FIELDS)
METADATA_FILES = ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt")
NUM_CLASSES = 200
OFFICIAL_SPLITS = {"train": "1", "test": "0"}  # train_test_split.txt's is_training_image value
LAYOUT = "CUB_200_2011/{" + ", ".join(OFFICIAL_FILES) + ", images/}"


def cub_box_to_xyxy(x: float, y: float, w: float, h: float) -> list[float]:
    """A bounding_boxes.txt entry (x, y, w, h) -> continuous xyxy: [x, y, x + w + 1, y + h + 1]
    (x + w is the last pixel, as wsolevaluation reads it)."""
    return inclusive_to_continuous([x, y, x + w, y + h])[0].tolist()


IndexTable = dict[str, list[tuple[int, list[str]]]]  # key -> [(line number, other fields)]


def read_index_file(path: Path, fields: int, sep: str | None = None) -> IndexTable:
    """Rows of a CUB / wsolevaluation index file keyed by their first field: key -> [(line
    number, other fields)], in file order. Raises for a missing or unreadable file (naming
    it) and for a malformed line or one that is not UTF-8 (naming the file and line)."""
    if unreadable_reason(path) == "missing":
        raise MissingInputError(f"CUB index file {path} is missing; found in {path.parent}: "
                                f"{folder_listing(path.parent)}")
    table: IndexTable = {}
    for number, line in enumerate(read_text_lines(path), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(sep)] if sep else line.split()
        if len(parts) != fields:
            raise InputFileError(f"{path}:{number}: expected {fields} fields, got {line!r}")
        table.setdefault(parts[0], []).append((number, parts[1:]))
    return table


def _single(table: IndexTable, path: Path) -> dict[str, tuple[int, list[str]]]:
    """The table of a file that must list each key once."""
    for key, rows in table.items():
        if len(rows) > 1:
            raise InputFileError(f"{path}: lines {rows[0][0]} and {rows[1][0]} both list {key}; list each once: "
                                 "fix the file")
    return {key: rows[0] for key, rows in table.items()}


def _check_unique_paths(images: dict[str, tuple[int, list[str]]], path: Path) -> None:
    """images.txt must give each image path one number: under two, its label, split and box
    would be whichever line came first."""
    first: dict[str, tuple[str, int]] = {}
    for key, (number, (image_path,)) in images.items():
        if image_path in first:
            other, line = first[image_path]
            raise InputFileError(f"{path}: lines {line} and {number} both list {image_path} (images {other} and "
                                 f"{key}); list each image once: fix the file")
        first[image_path] = (key, number)


def _numbers(values: list[str], path: Path, number: int) -> list[float]:
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        numbers = []
    if len(numbers) != len(values) or not all(map(math.isfinite, numbers)):  # "nan" and "inf" parse
        raise InputFileError(f"{path}:{number}: expected numbers, got {values}")
    return numbers


def _label(text: str, offset: int, num_classes: int, path: Path, number: int) -> int:
    """A class index from `text` minus `offset`, checked to lie in 0..num_classes-1."""
    try:
        label = int(text) - offset
    except ValueError:
        label = -1
    if not 0 <= label < num_classes:
        raise InputFileError(f"{path}:{number}: class {text!r} is not in {offset}..{num_classes - 1 + offset}")
    return label


def resolve_cub_root(root: str | Path) -> Path:
    """The CUB_200_2011 folder for `root` = CUB_200_2011 or its parent."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingInputError(f"CUB root {root} does not exist; set dataset.params.root to the folder "
                                f"holding {LAYOUT}")
    for candidate in (root / "CUB_200_2011", root):
        if (candidate / "images").is_dir() or (candidate / "images.txt").is_file():
            return candidate
    raise MissingInputError(f"no CUB_200_2011 folder in {root}: expected {LAYOUT} (root may also be "
                            f"CUB_200_2011 itself); found {folder_listing(root)}")


def resolve_metadata_dir(metadata: str | Path, split: str) -> Path:
    """The wsolevaluation metadata folder of `split`: `metadata` itself or `metadata`/<split>."""
    metadata = Path(metadata).expanduser()
    for candidate in (metadata / split, metadata):
        if is_present(candidate / METADATA_FILES[0]):  # one that cannot be read is refused naming it
            if candidate == metadata and metadata.name in ("train", "val", "test") and metadata.name != split:
                raise SettingError(f"CUB metadata folder {metadata} is the {metadata.name!r} split but "
                                   f"split={split!r}; set split={metadata.name} or point metadata at its "
                                   "parent")
            return candidate
    found = folder_listing(metadata) if metadata.is_dir() else "no such folder"
    raise MissingInputError(f"no wsolevaluation metadata for split {split!r} in {metadata}: expected "
                            f"{', '.join(METADATA_FILES)} there or in {metadata / split}; found {found}")


class CubDataset(Dataset):
    """CUB-200-2011 (see the module docstring for layouts and conventions).

    `records` holds the usable items' annotations (built once, no image decoded); `skipped`
    the split's images that cannot be used, with reasons; `num_images` keeps the first N items
    (and the skips passed over to reach them)."""

    def __init__(self, root: str | Path, split: str = "test", layout: str = "auto",
                 metadata: str | Path | None = None, segmentations: str | Path | None = None,
                 num_images: int | None = None, allow_outside_root: bool = False, transform=None) -> None:
        if layout not in LAYOUTS:
            raise SettingError(f"cub: unknown layout {layout!r}; valid: {LAYOUTS}")
        if layout == "auto":
            layout = "wsolevaluation" if metadata is not None else "official"
        if layout == "wsolevaluation" and metadata is None:
            raise SettingError("cub: layout wsolevaluation needs dataset.params.metadata, the folder with "
                               f"{', '.join(METADATA_FILES)}")
        self.cub_dir = resolve_cub_root(root)
        self.images_dir = self.cub_dir / "images"
        needed = ["images/"] + (list(OFFICIAL_FILES) if layout == "official" else [])
        missing = [n for n in needed if unreadable_reason(self.cub_dir / n) == "missing"]
        if missing:
            raise MissingInputError(f"CUB {layout} layout needs {', '.join(missing)} in {self.cub_dir} "
                                    f"(layout {LAYOUT}); found {folder_listing(self.cub_dir)}")
        self.split, self.layout, self.transform = split, layout, transform
        self.allow_outside_root = bool(allow_outside_root)
        self.class_names = self._class_names()
        self.segmentations_dir = None if segmentations is None else Path(segmentations).expanduser()
        if self.segmentations_dir is not None and not self.segmentations_dir.is_dir():
            raise MissingInputError(f"CUB segmentations folder {self.segmentations_dir} does not exist; "
                                    "set dataset.params.segmentations to the folder holding "
                                    "<class dir>/<stem>.png")
        if layout == "official":
            items = self._index_official()
        else:
            items = self._index_metadata(resolve_metadata_dir(metadata, split))
        if layout == "wsolevaluation" and not is_present(self.cub_dir / "classes.txt"):
            self.class_names = self._names_from_paths(items)
        items = [self._require_mask(item) for item in items]
        self.records, self.skipped = limit_index(items, num_images, f"cub {layout} {split}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """What identifies the data (ids, annotations, image and mask file stamps)."""
        masks = self.segmentations_dir is not None
        return index_fingerprint(((r.image_id, [self.images_dir / r.path, *([self._mask_path(r)] if masks else [])],
                                   (r.label, r.boxes, r.box_labels, r.size)) for r in self.records), self.skipped)

    def __len__(self) -> int:
        return len(self.records)

    def _class_names(self) -> tuple[str, ...]:
        path = self.cub_dir / "classes.txt"
        if not is_present(path):  # wsolevaluation without the official files: see _names_from_paths
            return tuple(f"class_{i + 1:03d}" for i in range(NUM_CLASSES))
        rows = _single(read_index_file(path, 2), path)
        ids = sorted(rows, key=lambda key: _label(key, 1, len(rows), path, rows[key][0]))
        return tuple(rows[key][1][0] for key in ids)

    def _names_from_paths(self, items: list[AnnotationRecord | SkippedSample]) -> tuple[str, ...]:
        """Class names from the image folders (e.g. 001.Black_footed_Albatross) where a class
        has an image, a placeholder otherwise."""
        names = list(self.class_names)
        for item in items:
            if isinstance(item, AnnotationRecord):
                names[item.label] = Path(item.path).parent.name or names[item.label]
        return tuple(names)

    def _record(self, image_id: str, label: int, boxes: list[list[float]], size: tuple[int, int] | None,
                notes: tuple[str, ...] = ()) -> AnnotationRecord | SkippedSample:
        if any(v != int(v) for box in boxes for v in box):
            notes += ("fractional box coordinates kept as written",)
        clipped, keep, clip_notes = clip_boxes_to_image(boxes, size)
        count = int(keep.sum())
        if count == 0:
            return SkippedSample(image_id, f"no box with area inside the image ({', '.join(clip_notes)})")
        return AnnotationRecord(image_id=image_id, path=image_id, label=label,
                                boxes=clipped if count == len(keep) else clipped[keep],
                                box_labels=torch.full((count,), label, dtype=torch.long), size=size,
                                difficult=torch.zeros(count, dtype=torch.bool), notes=notes + clip_notes)

    def _index_official(self) -> list[AnnotationRecord | SkippedSample]:
        if self.split not in OFFICIAL_SPLITS:
            raise SettingError(f"cub: unknown split {self.split!r} for the official layout; valid: "
                               f"{sorted(OFFICIAL_SPLITS)}")
        images, labels, splits, boxes = (
            _single(read_index_file(self.cub_dir / name, OFFICIAL_FIELDS[name]), self.cub_dir / name)
            for name in OFFICIAL_FILES[:4])  # classes.txt was read by _class_names
        _check_unique_paths(images, self.cub_dir / "images.txt")
        refuse_all_outside_root([path for _, (path,) in images.values()], self.cub_dir / "images.txt",
                                "image path", self.allow_outside_root)
        items: list[AnnotationRecord | SkippedSample] = []
        for key, (_, (path,)) in images.items():
            if key not in splits:
                items.append(SkippedSample(path, f"image {key} is not in train_test_split.txt"))
                continue
            number, (flag,) = splits[key]
            if flag not in ("0", "1"):
                raise InputFileError(f"{self.cub_dir / 'train_test_split.txt'}:{number}: expected 0 or 1, "
                                     f"got {flag!r}")
            if flag != OFFICIAL_SPLITS[self.split]:
                continue
            outside = outside_root_reason(path, "images.txt", self.allow_outside_root)
            if outside is not None:
                items.append(SkippedSample(path, outside))
                continue
            if key not in labels or key not in boxes:
                where = "image_class_labels.txt" if key not in labels else "bounding_boxes.txt"
                items.append(SkippedSample(path, f"no annotation: image {key} is not in {where}"))
                continue
            number, (class_id,) = labels[key]
            label = _label(class_id, 1, self.num_classes, self.cub_dir / "image_class_labels.txt", number)
            number, values = boxes[key]
            x, y, w, h = _numbers(values, self.cub_dir / "bounding_boxes.txt", number)
            items.append(self._record(path, label, [cub_box_to_xyxy(x, y, w, h)], None))
        return items

    def _index_metadata(self, folder: Path) -> list[AnnotationRecord | SkippedSample]:
        files = {name: folder / name for name in METADATA_FILES}
        ids = list(_single(read_index_file(files["image_ids.txt"], 1), files["image_ids.txt"]))
        labels = _single(read_index_file(files["class_labels.txt"], 2, ","), files["class_labels.txt"])
        sizes = _single(read_index_file(files["image_sizes.txt"], 3, ","), files["image_sizes.txt"])
        boxes = read_index_file(files["localization.txt"], 5, ",")
        refuse_all_outside_root(ids, files["image_ids.txt"], "image path", self.allow_outside_root)
        items: list[AnnotationRecord | SkippedSample] = []
        for path in ids:
            outside = outside_root_reason(path, "image_ids.txt", self.allow_outside_root)
            if outside is not None:
                items.append(SkippedSample(path, outside))
                continue
            if path not in labels or path not in boxes:
                where = files["class_labels.txt" if path not in labels else "localization.txt"]
                items.append(SkippedSample(path, f"no annotation: {path} is not in {where}"))
                continue
            number, (text,) = labels[path]
            label = _label(text, 0, self.num_classes, files["class_labels.txt"], number)
            corners = [_numbers(values, files["localization.txt"], n) for n, values in boxes[path]]
            size, notes = None, ("no size in image_sizes.txt",)
            if path in sizes:
                number, values = sizes[path]
                width, height = _numbers(values, files["image_sizes.txt"], number)
                if width != int(width) or height != int(height) or min(width, height) < 1:
                    raise InputFileError(f"{files['image_sizes.txt']}:{number}: {values} is not a size in "
                                         "pixels")
                size, notes = (int(width), int(height)), ()
            items.append(self._record(path, label, inclusive_to_continuous(corners).tolist(), size, notes))
        return items

    def _mask_path(self, record: AnnotationRecord) -> Path:
        return self.segmentations_dir / Path(record.path).with_suffix(".png")

    def _require_mask(self, item: AnnotationRecord | SkippedSample) -> AnnotationRecord | SkippedSample:
        """With segmentations requested, an image without its mask file is skipped."""
        if self.segmentations_dir is None or isinstance(item, SkippedSample):
            return item
        problem = unreadable_reason(self._mask_path(item))
        if problem is None:
            return item
        mask = Path(item.path).with_suffix(".png")
        if problem == "missing":
            return SkippedSample(item.image_id, f"no segmentation mask {mask}")
        return SkippedSample(item.image_id, f"cannot read segmentation mask {mask}: {problem}")

    def _read_mask(self, record: AnnotationRecord, size: tuple[int, int]
                   ) -> tuple[torch.Tensor, tuple[str, ...]] | SkippedSample:
        """Binarised segmentation: label + 1 where the soft mask is > 127, 0 elsewhere."""
        try:
            pixels, _ = read_rgb(self._mask_path(record))
        except ImageReadError as exc:
            return SkippedSample(record.image_id, str(exc))
        if (pixels.shape[-1], pixels.shape[-2]) != size:
            return SkippedSample(record.image_id, f"segmentation mask is {pixels.shape[-1]}x"
                                 f"{pixels.shape[-2]} but the image is {size[0]}x{size[1]}")
        grey = (pixels[0] == pixels[1]).all() and (pixels[1] == pixels[2]).all()
        notes = () if grey else ("segmentation mask is not grey: binarised on the channel mean",)
        obj = pixels.float().mean(0) > 127
        return (obj.to(torch.uint8) * (record.label + 1)), notes

    def __getitem__(self, index: int) -> Sample | SkippedSample:
        record = self.records[index]
        try:
            image, notes = read_rgb(self.images_dir / record.path)
        except ImageReadError as exc:
            return SkippedSample(record.image_id, str(exc))
        size = (image.shape[-1], image.shape[-2])
        boxes, box_labels, size_notes = reconcile_image_size(record, size)
        if len(boxes) == 0:
            return SkippedSample(record.image_id, f"no box inside the {size[0]}x{size[1]} image "
                                 f"({', '.join(size_notes)})")
        mask, mask_notes = None, ()
        if self.segmentations_dir is not None:
            read = self._read_mask(record, size)
            if isinstance(read, SkippedSample):
                return read
            mask, mask_notes = read
        sample = Sample(image=image, label=record.label, boxes=boxes.clone(), box_labels=box_labels,
                        image_id=record.image_id, orig_size=size, mask=mask, orig_boxes=boxes,
                        notes=record.notes + notes + size_notes + mask_notes)
        return self.transform(sample) if self.transform is not None else sample
