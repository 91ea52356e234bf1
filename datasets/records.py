"""Per-item annotation records that real-data loaders build once at construction, the box
checks they share (clipping to the image, reconciling the annotated size with the decoded one),
and the file-system and text reading every index relies on.

A record holds everything a summary needs (ids, label, boxes in on-disk coordinates, image
size) so boxes can be counted without decoding a single image.

Names and text: ids, reasons and notes end up in UTF-8 files (records.csv, skipped.csv), so a
file name that is not UTF-8 is shown with its odd bytes as \\xNN (`display_name`) and never
used as an id; an index file that is not UTF-8 text is an error naming the file and line.

Trust boundaries: every file a loader reads is read through `read_regular_file`, which opens
regular files only (a named pipe would block the read forever, a device may never end), and a
path a metadata file gives is used only when it stays inside the dataset root
(`outside_root_reason`), unless the user sets dataset.params.allow_outside_root=true. That
check is on the path as written, not on where symbolic links lead: a link inside the root
(val/ on another disk) is the user's own setup and is followed.
"""

from __future__ import annotations

import codecs
import errno
import os
import stat
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
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
        data = read_regular_file(path)
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


# What a path that is not a regular file leads to, in the words of a skip reason.
_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def not_regular_reason(mode: int) -> str | None:
    """None for the `st_mode` of a regular file; otherwise what it is instead, e.g. "not a
    regular file (a named pipe)"."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "an entry of an unknown kind")
    return f"not a regular file ({kind})"


class NotRegularFileError(OSError):
    """A path read as a file that leads to something else; `strerror` says what (the reason
    `not_regular_reason` gives), so every reader's "cannot read <file>: <strerror>" names it."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(errno.EINVAL, reason, os.fsdecode(path))


def _stat(path: str | os.PathLike) -> os.stat_result:
    """os.stat (following links); a path holding a NUL character, which no file has, is an
    OSError like any other path that cannot be looked up (os.stat raises ValueError)."""
    try:
        return os.stat(path)
    except ValueError:
        raise OSError(errno.EINVAL, "invalid path (it holds a NUL character)", os.fsdecode(path)) from None


def read_regular_file(path: str | os.PathLike) -> bytes:
    """The bytes of the regular file at `path` (a symbolic link is followed to it). Anything
    else raises `NotRegularFileError` without being read: a named pipe would block the read
    until a writer comes (forever), a device may never end (/dev/zero), a socket or folder is
    no file. A missing or unreadable file raises the system's OSError."""
    problem = not_regular_reason(_stat(path).st_mode)  # a device is never even opened
    if problem is None:
        # Non-blocking, so a path swapped for a named pipe since the stat still opens at once;
        # what was opened is checked again (fstat) before a byte is read.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        with os.fdopen(os.open(path, flags), "rb") as handle:
            problem = not_regular_reason(os.fstat(handle.fileno()).st_mode)
            if problem is None:
                return handle.read()
    raise NotRegularFileError(path, problem)


def unreadable_reason(path: Path) -> str | None:
    """None when `path` is a regular file (or a link to one); otherwise why it cannot be read:
    "missing", "symbolic link to a missing file", "not a regular file (a named pipe)" (a
    folder, a device, a socket), or the system's error (e.g. a symbolic-link loop)."""
    try:
        mode = _stat(path).st_mode
    except FileNotFoundError:
        return "symbolic link to a missing file" if os.path.islink(path) else "missing"
    except OSError as err:
        return err.strerror or str(err)
    return not_regular_reason(mode)


def is_present(path: Path) -> bool:
    """Whether an entry other than a folder is at `path`, whatever it is: an index file that is
    there but cannot be read (a named pipe, a broken link) is then refused naming why, rather
    than treated as absent."""
    return os.path.lexists(path) and not path.is_dir()


OUTSIDE_ROOT_SETTING = "dataset.params.allow_outside_root=true"


def path_leaves_root(relative: str) -> str | None:
    """Why `relative`, a path a metadata file gives relative to a dataset folder, names a file
    outside that folder: "an absolute path" or "a '..' part"; None when it stays inside. The
    text alone is judged: symbolic links inside the folder are the user's and are followed."""
    path = PurePath(relative)
    if path.is_absolute() or path.anchor:  # anchor: also a drive or root alone, on Windows
        return "an absolute path"
    if ".." in path.parts:
        return "a '..' part"
    return None


def outside_root_reason(relative: str, listed_in: str, allowed: bool = False) -> str | None:
    """The skip reason of an item whose file `relative` (as the metadata file `listed_in` gives
    it) lies outside the dataset root; None when it is inside, or when `allowed` (the user's
    dataset.params.allow_outside_root)."""
    why = None if allowed else path_leaves_root(relative)
    if why is None:
        return None
    return (f"{display_name(relative)} in {listed_in} is outside the dataset root ({why}); to read it "
            f"there, set {OUTSIDE_ROOT_SETTING}")


def refuse_all_outside_root(paths: Sequence[str], listed_in: Path, what: str, allowed: bool = False) -> None:
    """Refuse, in one line naming `listed_in`, metadata in which every path (each `what`) lies
    outside the dataset root: it was written for data in another place (moved, or absolute paths
    of another machine), so skipping every item one by one would only hide that."""
    if allowed or not paths or not all(path_leaves_root(p) for p in paths):
        return
    raise InputFileError(f"every {what} in {display_name(str(listed_in))} is outside the dataset root (e.g. "
                         f"{display_name(paths[0])}): the metadata was written for data in another place; "
                         "rewrite its paths relative to dataset.params.root, or set "
                         f"{OUTSIDE_ROOT_SETTING} to read the files where it says")


class FolderScan(NamedTuple):
    """The visible entries of a folder: regular files, sub-folders, and the entries that are
    neither or cannot be told (a symbolic-link loop, a link to nothing, a named pipe, a device)
    with why. Names as the file system gives them (possibly not UTF-8: see `display_name`)."""

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
                # anything else (a named pipe, a device, a socket) is no file to read: say what it is
                other = None if is_dir or is_file else not_regular_reason(entry.stat().st_mode)
            except FileNotFoundError:  # a link to nothing
                unreadable[entry.name] = "symbolic link to a missing file"
                continue
            except OSError as err:  # e.g. a link to itself: stat fails with ELOOP
                unreadable[entry.name] = err.strerror or str(err)
                continue
            if is_dir:
                folders.append(entry.name)
            elif is_file:
                files.append(entry.name)
            else:
                unreadable[entry.name] = other
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
