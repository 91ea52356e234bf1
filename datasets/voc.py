"""Pascal VOC 2012 in its official layout:
VOCdevkit/VOC2012/{JPEGImages, Annotations, SegmentationClass, ImageSets/{Main,Segmentation}}.
`root` may be the folder holding VOCdevkit, VOCdevkit itself, or VOC2012.

Modes:
- detection: ids from ImageSets/Main/<split>.txt, ground truth from Annotations/<id>.xml.
  `multi_label` decides what happens to images whose objects belong to several classes:
  `skip` (default, the AG-CAM protocol: keep only images whose objects all share one class,
  several instances allowed, no difficult filtering; the others are counted in `skipped` with
  reason "objects of several classes"), `largest` (label = the class whose boxes have the
  largest summed area), or `per_class` (one item per class present, id "<id>:<class>").
- segmentation: ids from ImageSets/Segmentation/<split>.txt (val: 1,449 images), mask from
  SegmentationClass/<id>.png read as raw palette indices (0 background, c + 1 for class c,
  255 void kept as the ignore value). `multi_label`: `largest` (default, label = the class
  covering the most pixels), `skip` (single-class filter on the mask) or `per_class`. Boxes
  come from the XML when there is one.
Ties in `largest` go to the lower class index. Every item keeps the boxes of all its classes
with `box_labels` (and, in segmentation mode, the full mask); metrics select the label's.

Boxes: <bndbox> values are 1-based inclusive pixel indices (xmin=1 is the first column), so a
box covers the continuous span [xmin - 1, xmax) x [ymin - 1, ymax). Non-integer values (two
VOC2012 XMLs have them) are kept exactly as written, neither rounded nor floored, and noted.
Boxes are clipped to the XML's <size>; boxes left without area are dropped; both are noted.
A missing <difficult> counts as 0.

The split file defines the items: an id listed twice, a line that is not UTF-8 text, or a split
file that cannot be read is an error naming the file and line(s). Files are found by the ids
it lists, so files it does not list (whatever their names) are not looked at; a listed XML,
mask or image that cannot be read (e.g. a symbolic-link loop, a named pipe) is a skipped item
whose reason names the file. An id that would lead out of its folders (absolute, or with a '..'
part) is a skipped item naming the setting that allows it (`allow_outside_root`); a split file
whose every id does is refused (it was written for data in another place).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from wsol_bench.errors import InputFileError, MissingInputError, SettingError

from .base import IGNORE_INDEX, Sample, SkippedSample, index_fingerprint
from .image_io import ImageReadError, read_palette_indices, read_rgb
from .records import (
    AnnotationRecord,
    clip_boxes_to_image,
    folder_listing,
    limit_index,
    outside_root_reason,
    read_text_lines,
    reconcile_image_size,
    refuse_all_outside_root,
    unreadable_reason,
)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
MODES = ("detection", "segmentation")
MULTI_LABEL_POLICIES = ("skip", "largest", "per_class")
DEFAULT_POLICY = {"detection": "skip", "segmentation": "largest"}
SEVERAL_CLASSES = "objects of several classes"
LAYOUT = ("VOCdevkit/VOC2012/{JPEGImages, Annotations, SegmentationClass, "
          "ImageSets/{Main,Segmentation}}")
REQUIRED = {"detection": ("JPEGImages", "Annotations", "ImageSets/Main"),
            "segmentation": ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")}


class VocAnnotationError(InputFileError):
    """An annotation XML that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class VocAnnotation:
    """The parsed content of one Annotations/<id>.xml (boxes not yet clipped)."""

    size: tuple[int, int] | None  # (width, height); None when <size> is missing or zero
    boxes: torch.Tensor  # float [K, 4] continuous xyxy
    labels: torch.Tensor  # long [K]
    difficult: torch.Tensor  # bool [K]
    notes: tuple[str, ...]


def voc_box_to_xyxy(xmin: float, ymin: float, xmax: float, ymax: float) -> list[float]:
    """VOC's 1-based inclusive <bndbox> corners -> continuous xyxy pixel edges."""
    return [xmin - 1.0, ymin - 1.0, float(xmax), float(ymax)]


def _coordinate(bndbox: ET.Element, tag: str, path: Path) -> tuple[float, bool]:
    """(value, is it written as a non-integer) of one <bndbox> child."""
    text = (bndbox.findtext(tag) or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise VocAnnotationError(f"{path}: <{tag}> is {text!r}, not a number") from None
    if not np.isfinite(value):
        raise VocAnnotationError(f"{path}: <{tag}> is {text!r}, not a finite number")
    return value, not text.lstrip("+-").isdigit()


def _flag(obj: ET.Element, tag: str, path: Path) -> bool:
    text = (obj.findtext(tag) or "0").strip() or "0"  # missing flags mean 0
    try:
        return float(text) != 0
    except ValueError:
        raise VocAnnotationError(f"{path}: <{tag}> is {text!r}, expected 0 or 1") from None


def _size(root: ET.Element) -> tuple[int, int] | None:
    try:
        width, height = (int(float(root.findtext(f"size/{t}") or 0)) for t in ("width", "height"))
    except (ValueError, OverflowError):  # OverflowError: int(float("inf"))
        return None
    return (width, height) if width > 0 and height > 0 else None


def parse_voc_xml(path: Path) -> VocAnnotation:
    """Parse one VOC annotation XML. Raises `VocAnnotationError` for malformed content."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, LookupError, ValueError) as exc:  # an unknown or multi-byte declared encoding
        raise VocAnnotationError(f"{path}: not valid XML ({exc})") from None
    except OSError as exc:
        raise VocAnnotationError(f"cannot read {path}: {exc.strerror or exc}") from None
    boxes, labels, difficult, non_integer = [], [], [], False
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise VocAnnotationError(f"{path}: unknown class {name!r}; VOC classes: {', '.join(VOC_CLASSES)}")
        bndbox = obj.find("bndbox")  # the object's own box, not those of its <part>s
        if bndbox is None:
            raise VocAnnotationError(f"{path}: object {name!r} has no <bndbox>")
        corners = [_coordinate(bndbox, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax")]
        non_integer |= any(is_float for _, is_float in corners)
        boxes.append(voc_box_to_xyxy(*(value for value, _ in corners)))
        labels.append(VOC_CLASSES.index(name))
        difficult.append(_flag(obj, "difficult", path))
    size = _size(root)
    notes = (() if size else ("no image size in annotation",)) + (
        ("float box coordinates kept as written",) if non_integer else ())
    return VocAnnotation(size=size, boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                         labels=torch.tensor(labels, dtype=torch.long),
                         difficult=torch.tensor(difficult, dtype=torch.bool), notes=notes)


def resolve_voc_root(root: str | Path) -> Path:
    """The VOC2012 folder for `root` = the folder holding VOCdevkit, VOCdevkit, or VOC2012."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingInputError(f"VOC root {root} does not exist; set dataset.params.root to the folder "
                                f"holding {LAYOUT}")
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "ImageSets").is_dir() or (candidate / "JPEGImages").is_dir():
            return candidate
    raise MissingInputError(f"no VOC2012 folder in {root}: expected {LAYOUT} (root may also be VOCdevkit or "
                            f"VOC2012); found {folder_listing(root)}")


def read_split_ids(path: Path) -> list[str]:
    """Image ids of an ImageSets split file, in file order (first token of each line); an id
    listed twice is an error naming both lines."""
    if unreadable_reason(path) == "missing":
        raise MissingInputError(f"VOC split file {path} is missing; found in {path.parent}: "
                                f"{folder_listing(path.parent)}")
    lines: dict[str, int] = {}
    for number, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            continue
        image_id = line.split()[0]
        if image_id in lines:
            raise InputFileError(f"VOC split file {path}: lines {lines[image_id]} and {number} both list "
                                 f"{image_id}; list each id once: fix the file")
        lines[image_id] = number
    return list(lines)


class VocDataset(Dataset):
    """Pascal VOC 2012 (see the module docstring for modes and conventions).

    `records` holds the usable items' annotations (built once, no image decoded); `skipped`
    the split's ids that cannot be used, with reasons; `num_images` keeps the first N items
    (and the skips passed over to reach them)."""

    class_names = VOC_CLASSES

    def __init__(self, root: str | Path, split: str = "val", mode: str = "detection",
                 multi_label: str | None = None, num_images: int | None = None,
                 allow_outside_root: bool = False, transform=None) -> None:
        if mode not in MODES:
            raise SettingError(f"voc: unknown mode {mode!r}; valid: {MODES}")
        multi_label = multi_label or DEFAULT_POLICY[mode]
        if multi_label not in MULTI_LABEL_POLICIES:
            raise SettingError(f"voc: unknown multi_label {multi_label!r}; valid: {MULTI_LABEL_POLICIES}")
        self.voc_dir = resolve_voc_root(root)
        missing = [sub for sub in REQUIRED[mode] if not (self.voc_dir / sub).is_dir()]
        if missing:
            raise MissingInputError(f"VOC {mode} mode needs {', '.join(missing)} in {self.voc_dir} "
                                    f"(layout {LAYOUT}); found {folder_listing(self.voc_dir)}")
        self.split, self.mode, self.multi_label, self.transform = split, mode, multi_label, transform
        image_set = "Main" if mode == "detection" else "Segmentation"
        split_file = self.voc_dir / "ImageSets" / image_set / f"{split}.txt"
        ids = read_split_ids(split_file)
        refuse_all_outside_root(ids, split_file, "image id", allow_outside_root)
        items: list[AnnotationRecord | SkippedSample] = []
        for image_id in ids:
            # an id names JPEGImages/<id>.jpg, Annotations/<id>.xml, SegmentationClass/<id>.png
            outside = outside_root_reason(image_id, f"ImageSets/{image_set}/{split}.txt", allow_outside_root)
            if outside is not None:
                items.append(SkippedSample(image_id, outside))
                continue
            indexed = self._index_detection(image_id) if mode == "detection" else self._index_mask(image_id)
            items += [indexed] if isinstance(indexed, SkippedSample) else indexed
        self.records, self.skipped = limit_index(items, num_images, f"voc {mode} {split}")

    @property
    def num_classes(self) -> int:
        return len(VOC_CLASSES)

    def fingerprint(self) -> str:
        """What identifies the data (ids, annotations, image and mask file stamps)."""
        def files(record) -> list[Path]:
            stem = Path(record.path).stem
            mask = [self.voc_dir / "SegmentationClass" / f"{stem}.png"] if self.mode == "segmentation" else []
            return [self.voc_dir / "JPEGImages" / record.path, *mask]
        return index_fingerprint(((r.image_id, files(r), (r.label, r.boxes, r.box_labels, r.size))
                                  for r in self.records), self.skipped)

    def __len__(self) -> int:
        return len(self.records)

    def _annotation(self, image_id: str, size: tuple[int, int] | None = None
                    ) -> VocAnnotation | SkippedSample:
        """The clipped annotation of `image_id` (to `size`, else to the XML's own size)."""
        path = self.voc_dir / "Annotations" / f"{image_id}.xml"
        problem = unreadable_reason(path)
        if problem == "missing":
            return SkippedSample(image_id, f"no annotation: Annotations/{image_id}.xml is missing")
        if problem is not None:
            return SkippedSample(image_id, f"cannot read Annotations/{image_id}.xml: {problem}")
        try:
            ann = parse_voc_xml(path)
        except VocAnnotationError as exc:
            return SkippedSample(image_id, str(exc))
        notes = ann.notes
        if size is not None and ann.size is not None and ann.size != size:
            notes += (f"annotation size {ann.size[0]}x{ann.size[1]} != mask size {size[0]}x{size[1]}",)
        size = size or ann.size
        boxes, keep, clip_notes = clip_boxes_to_image(ann.boxes, size)
        return VocAnnotation(size, boxes[keep], ann.labels[keep], ann.difficult[keep], notes + clip_notes)

    def _index_detection(self, image_id: str) -> list[AnnotationRecord] | SkippedSample:
        ann = self._annotation(image_id)
        if isinstance(ann, SkippedSample):
            return ann
        if len(ann.labels) == 0:
            return SkippedSample(image_id, f"no object with a box in Annotations/{image_id}.xml")
        areas = (ann.boxes[:, 2] - ann.boxes[:, 0]) * (ann.boxes[:, 3] - ann.boxes[:, 1])
        coverage = np.bincount(ann.labels.numpy(), weights=areas.double().numpy(), minlength=len(VOC_CLASSES))
        return self._items(image_id, coverage, ann, "no box with area")

    def _index_mask(self, image_id: str) -> list[AnnotationRecord] | SkippedSample:
        path = self.voc_dir / "SegmentationClass" / f"{image_id}.png"
        problem = unreadable_reason(path)
        if problem == "missing":
            return SkippedSample(image_id, f"no mask: SegmentationClass/{image_id}.png is missing")
        if problem is not None:
            return SkippedSample(image_id, f"cannot read SegmentationClass/{image_id}.png: {problem}")
        try:
            mask = read_palette_indices(path).numpy()
        except ImageReadError as exc:
            return SkippedSample(image_id, str(exc))
        counts = np.bincount(mask.ravel(), minlength=256)
        bad = [int(v) for v in np.flatnonzero(counts) if len(VOC_CLASSES) < v < IGNORE_INDEX]
        if bad:
            return SkippedSample(image_id, f"SegmentationClass/{image_id}.png: mask values {bad[:5]} are "
                                           f"neither a class (0..20) nor void ({IGNORE_INDEX})")
        size = (mask.shape[1], mask.shape[0])
        ann = self._annotation(image_id, size)
        if isinstance(ann, SkippedSample):  # the mask is the ground truth here; boxes are extra
            ann = VocAnnotation(size, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                                torch.zeros(0, dtype=torch.bool), (f"no boxes: {ann.reason}",))
        return self._items(image_id, counts[1:len(VOC_CLASSES) + 1].astype(np.float64), ann,
                           "no object pixels in the mask")

    def _items(self, image_id: str, coverage: np.ndarray, ann: VocAnnotation, empty_reason: str
               ) -> list[AnnotationRecord] | SkippedSample:
        """Apply the multi-label policy given how much of the image each class covers."""
        present = np.flatnonzero(coverage > 0)
        if len(present) == 0:
            return SkippedSample(image_id, empty_reason)
        if len(present) > 1 and self.multi_label == "skip":
            return SkippedSample(image_id, SEVERAL_CLASSES)
        per_class = self.multi_label == "per_class"
        labels = present if per_class else [int(np.argmax(coverage))]  # argmax: first of ties
        return [AnnotationRecord(
            image_id=f"{image_id}:{VOC_CLASSES[c]}" if per_class else image_id, path=f"{image_id}.jpg",
            label=int(c), boxes=ann.boxes, box_labels=ann.labels, size=ann.size,
            difficult=ann.difficult, notes=ann.notes) for c in labels]

    def __getitem__(self, index: int) -> Sample | SkippedSample:
        record = self.records[index]
        try:
            image, image_notes = read_rgb(self.voc_dir / "JPEGImages" / record.path)
        except ImageReadError as exc:
            return SkippedSample(record.image_id, str(exc))
        width, height = image.shape[-1], image.shape[-2]
        boxes, box_labels, size_notes = reconcile_image_size(record, (width, height))
        mask = None
        if self.mode == "segmentation":
            stem = Path(record.path).stem
            try:
                mask = read_palette_indices(self.voc_dir / "SegmentationClass" / f"{stem}.png")
            except ImageReadError as exc:
                return SkippedSample(record.image_id, str(exc))
            if tuple(mask.shape) != (height, width):
                return SkippedSample(record.image_id, f"mask SegmentationClass/{stem}.png is "
                                     f"{mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}")
        elif not bool((box_labels == record.label).any()):
            return SkippedSample(record.image_id, f"no box of {VOC_CLASSES[record.label]} inside the "
                                 f"{width}x{height} image")
        sample = Sample(image=image, label=record.label, boxes=boxes.clone(), box_labels=box_labels,
                        image_id=record.image_id, orig_size=(width, height), mask=mask,
                        orig_boxes=boxes, notes=record.notes + image_notes + size_notes)
        return self.transform(sample) if self.transform is not None else sample
