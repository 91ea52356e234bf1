"""Parsers for the ImageNet ILSVRC2012 val annotation files, and the box conventions.

ImageNet boxes (XML, Kaggle's LOC_val_solution.csv, wsolevaluation's localization.txt) are
0-based INCLUSIVE integer pixel indices: a box x0..x1 covers columns x0 to x1. Inside the
package boxes are continuous pixel edges, so the box becomes [x0, x1 + 1); that conversion
happens in `base.inclusive_to_continuous` (shared with the other loaders) and nowhere else.

Each parser reads one file format and returns plain data: boxes still in the file's own
inclusive convention (float, since a few files write floats), class wnids or indices, sizes.
Problems that concern one image are returned as (image_id, reason) pairs, never raised, so a
dataset can skip that image and count it; a file that cannot be read at all (unreadable, not
UTF-8 text) raises `AnnotationError` naming it (and the line), a missing one `MissingInputError`.

Several lines for one image in a file that states one line per image (Kaggle's csv,
class_labels.txt, image_sizes.txt, image_ids.txt) are never resolved by their order: lines
with the same content are read once, with a note naming them; lines that differ are a
problem of that image, naming them.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from wsol_bench.errors import InputFileError, MissingInputError

from .records import IndexFileError, read_regular_file, read_text_lines, unreadable_reason

WNID_PATTERN = re.compile(r"n\d{8}")


class AnnotationError(InputFileError):
    """An annotation file that cannot be used; the message names the file and the fix."""


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 annotation file; `AnnotationError` naming it when it cannot be read."""
    try:
        return read_text_lines(path)
    except IndexFileError as err:
        raise AnnotationError(str(err)) from None


def _line_list(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers))


@dataclass
class ImageAnnotation:
    """The ground truth of one image as a file states it.

    boxes: float32 [K, 4] xmin, ymin, xmax, ymax, 0-based inclusive (as in the file).
    box_classes: wnid (str) or class index (int) of each box.
    size: (width, height) the file states, or None when the format has none.
    """

    boxes: np.ndarray
    box_classes: list
    size: tuple[int, int] | None = None
    notes: tuple[str, ...] = field(default=())


def sanitize_box_sets(boxes: np.ndarray, counts: np.ndarray, sizes: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, ...]]]:
    """Clip the continuous xyxy boxes of many images at once and find those without area.

    boxes: [N, 4], the boxes of image i being the next counts[i] rows; sizes: [I, 2] (width,
    height) per image, NaN where unknown (then nothing is clipped: that happens once the
    image is decoded and its size known, so each box is clipped, and noted, once).
    Returns (clipped boxes [N, 4], keep [N] bool, notes per image). One vectorised pass, so
    indexing 80,477 boxes costs milliseconds; the notes use the wording of
    `records.clip_boxes_to_image` so summaries group them with the other datasets'."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    counts = np.asarray(counts, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    image = np.repeat(np.arange(len(counts)), counts)
    known = ~np.isnan(sizes).any(1)[image]
    upper = np.where(np.isnan(sizes), np.inf, sizes)[image]
    lower = np.where(known, 0.0, -np.inf)[:, None]
    clipped = np.empty_like(boxes)
    clipped[:, 0::2] = np.clip(boxes[:, 0::2], lower, upper[:, :1])
    clipped[:, 1::2] = np.clip(boxes[:, 1::2], lower, upper[:, 1:])
    moved = np.bincount(image, weights=(clipped != boxes).any(1), minlength=len(counts)).astype(np.int64)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    dropped = np.bincount(image, weights=~keep, minlength=len(counts)).astype(np.int64)
    notes: list[tuple[str, ...]] = [()] * len(counts)
    for i in np.flatnonzero(moved | dropped).tolist():
        where = f"{sizes[i, 0]:.0f}x{sizes[i, 1]:.0f}"
        clip_note = (f"box clipped to image: {moved[i]} of {counts[i]} to {where}",) if moved[i] else ()
        drop_note = ((f"degenerate box dropped: {dropped[i]} of {counts[i]} without area",)
                     if dropped[i] else ())
        notes[i] = clip_note + drop_note
    return clipped, keep, notes


def sanitize_boxes(boxes: np.ndarray, size: tuple[int, int] | None
                   ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """`sanitize_box_sets` for one image of `size` = (width, height) or None: returns (kept
    boxes, indices of the kept input boxes, notes)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    stated = np.array([size if size is not None else (np.nan, np.nan)], dtype=np.float64)
    clipped, keep, notes = sanitize_box_sets(boxes, np.array([len(boxes)]), stated)
    return clipped[keep], np.flatnonzero(keep), notes[0]


def _coordinate(text: str) -> tuple[float, bool]:
    """Parse one coordinate; the flag says it was written as a non-integer literal."""
    text = text.strip()
    try:
        return float(int(text)), False
    except ValueError:
        return float(text), True  # ValueError propagates for text that is no number at all


def _coordinates(texts: list[str]) -> tuple[list[float], bool]:
    """Parse coordinates; the flag says some were written as non-integers."""
    try:
        return list(map(int, texts)), False  # the common case, fast for 80k boxes
    except ValueError:
        values = [_coordinate(t) for t in texts]
        return [v for v, _ in values], any(f for _, f in values)


FLOAT_NOTE = "box coordinates written as non-integers"


def parse_imagenet_xml(path: Path) -> ImageAnnotation:
    """One ImageNet (PASCAL-style) XML file: size and each object's wnid and bndbox."""
    try:
        data = read_regular_file(path)  # never a read that waits on a named pipe
    except OSError as err:
        raise AnnotationError(f"cannot read annotation file {path}: {err.strerror or err}") from None
    try:
        root = ET.fromstring(data)
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        boxes, wnids, has_float = [], [], False
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            values, is_float = _coordinates([box.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")])
            boxes.append(values)
            wnids.append((obj.findtext("name") or "").strip())
            has_float |= is_float
    except (ET.ParseError, TypeError, ValueError, AttributeError,
            LookupError) as err:  # LookupError: an XML declaration naming an unknown encoding
        raise AnnotationError(f"annotation file {path} is not a readable ImageNet XML "
                              f"(size and object/bndbox with xmin, ymin, xmax, ymax): {err}") from err
    return ImageAnnotation(boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4), box_classes=wnids,
                           size=(width, height), notes=(FLOAT_NOTE,) if has_float else ())


def read_xml_size(path: Path) -> tuple[int, int]:
    """(width, height) stated by an ImageNet XML file."""
    return parse_imagenet_xml(path).size


def read_loc_solution_csv(path: Path) -> tuple[dict[str, ImageAnnotation], list[tuple[str, str]]]:
    """Kaggle's LOC_val_solution.csv: `ImageId,PredictionString` with repeated
    `wnid xmin ymin xmax ymax`. Returns annotations by image id and per-image problems."""
    lines = _read_lines(path)
    if not lines or lines[0].replace(" ", "").lower() != "imageid,predictionstring":
        raise AnnotationError(f"{path} does not start with the header 'ImageId,PredictionString'; "
                              "expected Kaggle's LOC_val_solution.csv")
    rows: dict[str, list[tuple[int, str]]] = {}  # image id -> [(line number, prediction string)]
    for number, line in enumerate(lines[1:], start=2):
        if line.strip():
            image_id, _, prediction = line.partition(",")
            rows.setdefault(image_id.strip(), []).append((number, prediction))
    annotations: dict[str, ImageAnnotation] = {}
    problems: list[tuple[str, str]] = []
    for image_id, entries in rows.items():
        number, prediction = entries[0]
        notes: tuple[str, ...] = ()
        if len(entries) > 1:
            numbers = _line_list([n for n, _ in entries])
            if len({tuple(p.split()) for _, p in entries}) > 1:
                reason = f"{path} lists this image on lines {numbers} with different content"
                problems.append((image_id, f"{reason}; keep one line per ImageId"))
                continue
            notes = (f"{path.name} lists this image on lines {numbers} with the same content; read once",)
        tokens = prediction.split()
        try:
            if not tokens or len(tokens) % 5:
                raise ValueError(f"{len(tokens)} fields, expected groups of 5 (wnid xmin ymin xmax ymax)")
            coords, has_float = _coordinates([t for i, t in enumerate(tokens) if i % 5])
        except ValueError as err:
            problems.append((image_id, f"unparseable line {number} in {path}: {err}"))
            continue
        annotations[image_id] = ImageAnnotation(
            boxes=np.array(coords, dtype=np.float32).reshape(-1, 4), box_classes=tokens[0::5],
            notes=notes + ((FLOAT_NOTE,) if has_float else ()))
    return annotations, problems


WSOL_FILES = ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt")


def _require_file(path: Path) -> None:
    """A missing metadata file is an error naming the files the folder must hold (one that is
    there but cannot be read is named when it is read)."""
    if unreadable_reason(path) == "missing":
        raise MissingInputError(f"{path} does not exist; the wsolevaluation metadata folder must hold "
                                f"{', '.join(WSOL_FILES)}")


def _wsol_lines(metadata: Path, name: str) -> list[tuple[int, str]]:
    """(line number, line) of the non-blank lines of one metadata file."""
    path = metadata / name
    _require_file(path)
    return [(number, line) for number, line in enumerate(_read_lines(path), start=1) if line.strip()]


def _wsol_table(metadata: Path, name: str, width: int
                ) -> tuple[list[str], np.ndarray, set[str], list[tuple[str, str]]]:
    """Rows `<path>,<v1>..<v_width>` of one metadata file -> (paths, values [n, width] float64,
    paths written with non-integer values, problems). pandas' C parser reads the usual
    all-integer file fast; any other file is parsed line by line to say which lines are odd."""
    path = metadata / name
    _require_file(path)
    try:
        # read through the regular-file check: pandas would wait forever on a named pipe
        table = pd.read_csv(io.BytesIO(read_regular_file(path)), header=None, dtype={0: str},
                            keep_default_na=False, skip_blank_lines=True)
        if table.shape[1] == width + 1 and all(pd.api.types.is_integer_dtype(t) for t in table.dtypes[1:]):
            return table[0].tolist(), table.iloc[:, 1:].to_numpy(np.float64), set(), []
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError):
        pass  # the line-by-line reading below says what is wrong, and where
    keys, rows, floats, problems = [], [], set(), []
    for number, line in _wsol_lines(metadata, name):
        key, *texts = line.split(",")
        try:
            if len(texts) != width:
                raise ValueError
            values, has_float = _coordinates(texts)
        except ValueError:
            reason = f"unparseable line {number} in {path}: {line!r}"
            problems.append((key, f"{reason} (expected <path> and {width} numbers)"))
            continue
        keys.append(key)
        rows.append(values)
        if has_float:
            floats.add(key)
    return keys, np.array(rows, dtype=np.float64).reshape(-1, width), floats, problems


def _line_numbers(path: Path, keys: set[str]) -> dict[str, list[int]]:
    """The numbers of the lines of `path` that start with one of `keys` (then a comma)."""
    found: dict[str, list[int]] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        key = line.split(",", 1)[0]
        if key in keys:
            found.setdefault(key, []).append(number)
    return found


def _one_value_per_image(path: Path, keys: list[str], values: list[Hashable]
                         ) -> tuple[dict[str, Hashable], dict[str, str], dict[str, tuple[str, ...]]]:
    """The value each image has in a file that states one line per image: (key -> value,
    key -> problem for keys on several lines that differ, key -> note for keys on several
    lines that agree)."""
    by_key = dict(zip(keys, values, strict=True))
    if len(by_key) == len(keys):
        return by_key, {}, {}
    repeated = {key for key, count in Counter(keys).items() if count > 1}
    distinct: dict[str, set] = {}
    for key, value in zip(keys, values, strict=True):
        if key in repeated:
            distinct.setdefault(key, set()).add(value)
    lines = _line_numbers(path, repeated)
    conflicts, notes = {}, {}
    for key in repeated:
        numbers = _line_list(lines.get(key, []))
        if len(distinct[key]) > 1:
            conflicts[key] = (f"{path} lists this image on lines {numbers} with different content; keep one "
                              "line per image")
        else:
            note = f"{path.name} lists this image on lines {numbers} with the same content"
            notes[key] = (f"{note}; read once",)
    return by_key, conflicts, notes


def _listed_paths(metadata: Path) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """image_ids.txt: the image paths in file order, each once, and a note for each path
    listed on several lines."""
    lines: dict[str, list[int]] = {}
    for number, line in _wsol_lines(metadata, "image_ids.txt"):
        lines.setdefault(line.strip(), []).append(number)
    notes = {key: (f"image_ids.txt lists this image on lines {_line_list(numbers)}; read once",)
             for key, numbers in lines.items() if len(numbers) > 1}
    return list(lines), notes


def read_wsol_metadata(metadata: Path) -> tuple[dict[str, ImageAnnotation], list[tuple[str, str]]]:
    """wsolevaluation metadata: image_ids.txt (`<path>`), class_labels.txt (`<path>,<index>`),
    image_sizes.txt (`<path>,<w>,<h>`), localization.txt (`<path>,<x0>,<y0>,<x1>,<y1>`, one line
    per box). Returns annotations keyed by the image path as listed (order of image_ids.txt;
    `box_classes` holds the image's class index once per box) and per-image problems. The
    image set is image_ids.txt: lines of the other files for unlisted paths are not used."""
    paths, id_notes = _listed_paths(metadata)
    label_keys, label_values, label_floats, problems = _wsol_table(metadata, "class_labels.txt", 1)
    size_keys, size_values, size_floats, size_problems = _wsol_table(metadata, "image_sizes.txt", 2)
    box_keys, box_values, floats, box_problems = _wsol_table(metadata, "localization.txt", 4)
    problems += size_problems + box_problems
    problems += [(key, f"non-integer class label or image size in {metadata}")
                 for key in sorted(label_floats | size_floats)]
    labels, label_conflicts, label_notes = _one_value_per_image(
        metadata / "class_labels.txt", label_keys, label_values[:, 0].astype(np.int64).tolist())
    sizes, size_conflicts, size_notes = _one_value_per_image(
        metadata / "image_sizes.txt", size_keys, list(map(tuple, size_values.astype(np.int64).tolist())))
    problems += [*label_conflicts.items(), *size_conflicts.items()]
    listed = set(paths)
    problems = [(key, reason) for key, reason in problems if key in listed]
    # Group the box lines by image: one stable sort instead of 80k dictionary appends.
    keys = np.array(box_keys, dtype=object)
    order = np.argsort(keys, kind="stable")
    unique, starts, counts = np.unique(keys[order], return_index=True, return_counts=True)
    box_values = box_values.astype(np.float32)[order]
    boxes = {k: box_values[s:s + c] for k, s, c in zip(unique.tolist(), starts.tolist(), counts.tolist(),
                                                                  strict=True)}
    annotations: dict[str, ImageAnnotation] = {}
    failed = {key for key, _ in problems}
    for key in paths:
        if key in failed:
            continue
        if key not in labels or key not in sizes or key not in boxes:
            missing = [what for what, store in (("class label", labels), ("image size", sizes),
                                                ("box", boxes)) if key not in store]
            problems.append((key, f"no {' and no '.join(missing)} in the wsolevaluation metadata"))
            continue
        notes = id_notes.get(key, ()) + label_notes.get(key, ()) + size_notes.get(key, ())
        notes += (FLOAT_NOTE,) if key in floats else ()
        annotations[key] = ImageAnnotation(boxes=boxes[key], box_classes=[labels[key]] * len(boxes[key]),
                                           size=sizes[key], notes=notes)
    return annotations, problems


def read_synset_mapping(path: Path) -> dict[str, str]:
    """LOC_synset_mapping.txt: `<wnid> <names>` per line -> {wnid: names}."""
    mapping: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        wnid, _, names = line.strip().partition(" ")
        if not WNID_PATTERN.fullmatch(wnid):
            raise AnnotationError(f"line {number} of {path} does not start with a wnid (n########): {line!r}")
        if wnid in lines:
            raise AnnotationError(f"{path}: lines {lines[wnid]} and {number} both list {wnid}; list each "
                                  "wnid once: fix the file")
        mapping[wnid], lines[wnid] = names.strip(), number
    return mapping
