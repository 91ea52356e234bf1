"""Per-item annotation records that real-data loaders build once at construction, the box
checks they share (clipping to the image, reconciling the annotated size with the decoded one),
and the file-system and text reading every index relies on.

A record holds everything a summary needs (ids, label, boxes in on-disk coordinates, image
size) so boxes can be counted without decoding a single image.

Names and text: ids, reasons and notes end up in UTF-8 files (records.csv, skipped.csv), so a
file name that is not UTF-8 is shown with its odd bytes as \\xNN (`display_name`) and never
used as an id; an index file that is not UTF-8 text is an error naming the file and line.
"""

from __future__ import annotations

import codecs
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from wsol_bench.errors import InputFileError, SettingError

from .base import SkippedSample


@dataclass(frozen=True)
class AnnotationRecord:
    """The annotation of one dataset item.

    image_id: unique id of the item (what records and tables show).
    path: image file relative to the dataset's image folder.
    boxes: float [K, 4] xyxy with continuous pixel edges in on-disk image coordinates.
    box_labels: long [K], the class of each box.
    size: (width, height) as annotated; None when the annotation carries no size.
    difficult: bool [K], VOC's flag (all False for CUB, which has none).
    notes: what the index had to change (clipping, dropped boxes, float coordinates).
    """

    image_id: str
    path: str
    label: int
    boxes: torch.Tensor
    box_labels: torch.Tensor
    size: tuple[int, int] | None
    difficult: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    notes: tuple[str, ...] = ()


def clip_boxes_to_image(boxes: torch.Tensor | np.ndarray, size: tuple[int, int] | None
                        ) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Clip continuous xyxy `boxes` to an image of `size` = (width, height); with no size,
    only to the top-left corner (0, 0).

    Returns the clipped boxes (float32), a bool keep-mask that is False for boxes left without
    area (the caller drops them together with their labels), and notes saying what changed."""
    # numpy: indexes call this once per image, where torch's per-op overhead dominates.
    original = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    clipped = np.maximum(original, 0)
    if size is not None:
        width, height = size
        clipped = np.minimum(clipped, np.array([width, height, width, height], dtype=np.float32))
    notes: list[str] = []
    changed = int((clipped != original).any(1).sum())
    if changed:
        where = f"{size[0]}x{size[1]}" if size is not None else "non-negative coordinates"
        notes.append(f"box clipped to image: {changed} of {len(original)} to {where}")
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    if not keep.all():
        notes.append(f"degenerate box dropped: {int((~keep).sum())} of {len(original)} without area")
    return torch.from_numpy(clipped), torch.from_numpy(keep), tuple(notes)


def reconcile_image_size(record: AnnotationRecord, image_size: tuple[int, int]
                         ) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Boxes and box labels of `record` made valid for the decoded image of `image_size`.

    The annotated boxes are kept in their own pixel coordinates (never rescaled: a wrong size
    field is likelier than a resampled image); a size mismatch is noted and the boxes are
    clipped to the decoded image. Records without a size (nothing to check against) are
    clipped to the decoded image too."""
    if record.size is not None and tuple(record.size) == tuple(image_size):
        return record.boxes, record.box_labels, ()  # already clipped to this size by the index
    notes: tuple[str, ...] = ()
    if record.size is not None:
        size_note = (f"annotation size {record.size[0]}x{record.size[1]} != image size "
                     f"{image_size[0]}x{image_size[1]}")
        notes = (size_note,)
    boxes, keep, clip_notes = clip_boxes_to_image(record.boxes, image_size)
    return boxes[keep], record.box_labels[keep], notes + clip_notes


def display_name(text: str) -> str:
    """A file name or path as it can be shown and written as UTF-8: bytes that are not UTF-8
    (which Python keeps as surrogate escapes) appear as \\xNN; any other name is unchanged."""
    if text.isascii():  # nearly every name: the fast path
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_utf8(text: str) -> bool:
    """Whether `text` (e.g. a file name from the file system) is valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class IndexFileError(InputFileError):
    """An index or annotation file that cannot be read; the message names the file and the fix."""


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a leading byte-order mark dropped). A file that cannot be
    read, or holds bytes that are not UTF-8, raises `IndexFileError` naming the file (and the
    line and column of the first such byte)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise IndexFileError(f"cannot read {display_name(str(path))}: {err.strerror or err}") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        where = f"{display_name(str(path))}:{line}"
        raise IndexFileError(f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
                             "restore the original file or convert it to UTF-8") from None


def unreadable_reason(path: Path) -> str | None:
    """None when `path` is a file that can be opened; otherwise why not: "missing", "symbolic
    link to a missing file", "not a file", or the system's error (e.g. a symbolic-link loop)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "symbolic link to a missing file" if os.path.islink(path) else "missing"
    except OSError as err:
        return err.strerror or str(err)
    return None if stat.S_ISREG(mode) else "not a file"


class FolderScan(NamedTuple):
    """The visible entries of a folder: files, sub-folders, and entries that cannot be told
    apart (a symbolic-link loop, a link to nothing) with why. Names as the file system gives
    them (possibly not UTF-8: see `display_name`)."""

    files: list[str]
    folders: list[str]
    unreadable: dict[str, str]


def scan_folder(folder: Path) -> FolderScan:
    """One directory scan of `folder` (hidden entries left out). A broken entry never raises:
    it is reported in `unreadable`, so the caller can skip the item it would have been."""
    files, folders, unreadable = [], [], {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError as err:  # e.g. a link to itself: stat fails with ELOOP
                unreadable[entry.name] = err.strerror or str(err)
                continue
            if is_dir:
                folders.append(entry.name)
            elif is_file:
                files.append(entry.name)
            elif entry.is_symlink():
                unreadable[entry.name] = "symbolic link to a missing file"
    return FolderScan(files, folders, unreadable)


def folder_listing(folder: Path, limit: int = 12) -> str:
    """What a folder holds, for error messages about an unexpected layout."""
    names = sorted(display_name(p.name) + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "nothing (empty folder)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def limit_index(items: list[AnnotationRecord | SkippedSample], num_images: int | None, dataset: str
                ) -> tuple[list[AnnotationRecord], list[SkippedSample]]:
    """Split an index (records and skips in index order) into (records, skipped), keeping the
    first `num_images` records and the skips passed over to reach them. An index without a
    single usable item means a wrong root or broken files: an error naming the commonest reasons."""
    if num_images is not None and int(num_images) < 1:
        raise SettingError(f"{dataset}: num_images must be >= 1 or null (all), got {num_images}")
    records: list[AnnotationRecord] = []
    skipped: list[SkippedSample] = []
    for item in items:
        if num_images is not None and len(records) == int(num_images):
            break
        (skipped if isinstance(item, SkippedSample) else records).append(item)
    if not records:
        reasons = Counter(s.reason for s in skipped).most_common(3)
        raise InputFileError(f"{dataset}: no usable item in the index; {len(skipped)} skipped, most "
                             f"often: {reasons}")
    return records, skipped
