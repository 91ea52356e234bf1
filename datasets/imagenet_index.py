"""The ImageNet annotation index: one record per usable image, built once from parsed
annotations, and the check of a record's boxes against the decoded image.

Building is vectorised over all boxes (80,477 for the full val set), so the whole index takes
well under a second beyond parsing; per image only the record itself is created.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .base import SkippedSample, inclusive_to_continuous
from .imagenet_annotations import ImageAnnotation, sanitize_box_sets, sanitize_boxes


@dataclass(frozen=True)
class ImageNetRecord:
    """The annotation of one usable image, fixed at construction.

    boxes: float32 [K, 4] continuous xyxy in the frame of the annotated image (`size`).
    size: (width, height) the annotation states; None when only `size_file` (an XML read when
        the item is loaded: Kaggle's csv has no sizes) or nothing states it.
    """

    image_id: str
    path: str
    label: int
    boxes: np.ndarray
    box_labels: np.ndarray
    size: tuple[int, int] | None
    size_file: str | None = None
    notes: tuple[str, ...] = ()


class PendingImage(NamedTuple):
    """An image found with its parsed annotation, before the checks that make it a record."""

    image_id: str
    path: str
    ann: ImageAnnotation
    label: int | None  # None: the class of its boxes (Kaggle)
    size_file: str | None = None


def _bad_classes(classes: list, class_index: dict[str, int]) -> str:
    num_classes = len(class_index)
    return ", ".join(sorted({str(c) for c in classes
                             if not (isinstance(c, str) and c in class_index)
                             and not (isinstance(c, int) and 0 <= c < num_classes)}))


def _no_box_of_its_class(label: int, kept_labels: np.ndarray, box_notes: tuple[str, ...],
                         wnids: list[str]) -> str:
    """The skip reason of an image whose usable boxes all belong to other classes."""
    others = ", ".join(sorted({wnids[c] for c in kept_labels.tolist()}))
    detail = "".join(f"; {note}" for note in box_notes)
    return f"no box of its class {wnids[label]} in the annotation (its boxes are of {others}{detail})"


def build_records(pending: list[PendingImage], class_index: dict[str, int]
                  ) -> tuple[list[ImageNetRecord], list[SkippedSample]]:
    """Annotations -> records: class indices (wnids through `class_index`, the sorted-wnid
    position), continuous boxes clipped to the stated size; a skip for each image with an
    unknown class, without a usable box, or without a usable box of its own class (its score
    would have no ground truth: a localization metric would count it as found)."""
    if not pending:
        return [], []
    num_classes, n = len(class_index), len(pending)
    counts = np.array([len(p.ann.boxes) for p in pending], dtype=np.int64)
    image = np.repeat(np.arange(n), counts)
    box_labels = np.array([class_index.get(c, -1) if isinstance(c, str) else int(c)
                           for p in pending for c in p.ann.box_classes], dtype=np.int64)
    invalid = np.bincount(image, weights=(box_labels < 0) | (box_labels >= num_classes), minlength=n)
    sizes = np.array([p.ann.size or (np.nan, np.nan) for p in pending], dtype=np.float64)
    boxes, keep, box_notes = sanitize_box_sets(
        inclusive_to_continuous(np.concatenate([p.ann.boxes for p in pending])), counts, sizes)
    # The image's class is given (class folder, class_labels.txt) or that of its boxes (Kaggle):
    # per-image lowest and highest box class tell whether the boxes agree.
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    labels = np.array([-1 if p.label is None else p.label for p in pending], dtype=np.int64)
    lowest, highest = np.full(n, -1), np.full(n, -1)
    nonempty = counts > 0
    lowest[nonempty] = np.minimum.reduceat(box_labels, starts[nonempty])
    highest[nonempty] = np.maximum.reduceat(box_labels, starts[nonempty])
    other_class = np.bincount(image, weights=box_labels != labels[image], minlength=n) > 0
    kept_counts = np.bincount(image[keep], minlength=n)
    kept_boxes = np.split(boxes[keep], np.cumsum(kept_counts)[:-1])
    kept_labels = np.split(box_labels[keep], np.cumsum(kept_counts)[:-1])
    wnids = sorted(class_index, key=class_index.__getitem__)
    records, skips = [], []
    for i, p in enumerate(pending):
        if invalid[i]:
            bad = _bad_classes(p.ann.box_classes, class_index)
            skips.append(SkippedSample(p.image_id, f"box class {bad} is not one of the {num_classes} "
                                                   "ImageNet-1k classes"))
            continue
        if kept_counts[i] == 0:
            detail = f" ({'; '.join(box_notes[i])})" if box_notes[i] else ""
            skips.append(SkippedSample(p.image_id, f"no usable box in the annotation{detail}"))
            continue
        label, notes = int(labels[i]), p.ann.notes
        mixed = bool(highest[i] != lowest[i]) if p.label is None else bool(other_class[i])
        if p.label is None:
            label = int(lowest[i])
            if mixed:
                label = Counter(box_labels[starts[i]:starts[i] + counts[i]].tolist()).most_common(1)[0][0]
                notes += ("boxes carry several classes; label is the most frequent",)
        elif mixed:
            notes += ("some boxes carry another class than the image label",)
        # Only images with boxes of several classes can be left without one of their own.
        if mixed and not (kept_labels[i] == label).any():
            reason = _no_box_of_its_class(label, kept_labels[i], box_notes[i], wnids)
            skips.append(SkippedSample(p.image_id, reason))
            continue
        records.append(ImageNetRecord(image_id=p.image_id, path=p.path, label=label, boxes=kept_boxes[i],
                                      box_labels=kept_labels[i], size=p.ann.size, size_file=p.size_file,
                                      notes=notes + box_notes[i]))
    return records, skips


def fit_boxes_to_image(boxes: np.ndarray, stated: tuple[int, int] | None, size: tuple[int, int],
                       policy: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]] | str:
    """Boxes annotated for an image of `stated` size made valid for the decoded `size` (both
    (width, height)) under a `size_mismatch` policy (scale | keep | skip): (boxes, kept
    indices, notes), or the skip reason when the item cannot be used."""
    notes: tuple[str, ...] = ()
    if stated is not None and tuple(stated) != tuple(size):
        mismatch = f"annotation size {stated[0]}x{stated[1]} != image size {size[0]}x{size[1]}"
        if policy == "skip":
            return mismatch
        if policy == "scale":
            boxes = boxes * np.array([size[0] / stated[0], size[1] / stated[1]] * 2, dtype=np.float32)
            mismatch += "; boxes scaled to the image"
        notes = (mismatch,)
    boxes, keep, box_notes = sanitize_boxes(boxes, size)
    if len(boxes) == 0:
        return f"no box inside the image ({'; '.join(notes + box_notes)})"
    return boxes, keep, notes + box_notes
