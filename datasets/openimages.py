"""OpenImages30k, the PxAP benchmark of wsolevaluation (Choe et al., CVPR 2020), from its metadata.

Layout (wsolevaluation's): `root` is the folder the metadata paths are relative to
(wsolevaluation's `dataset/OpenImages`, holding test/<class folder>/<id>.jpg and the mask PNGs
beside the images; `root` may also be its parent holding OpenImages/). `metadata` is the folder
with image_ids.txt, class_labels.txt, image_sizes.txt and localization.txt, or its parent holding
<split>/ with them; null looks in <root>/metadata/OpenImages[/<split>] and then in the
wsolevaluation checkout that holds `root` (<repo>/metadata/OpenImages/<split> for root =
<repo>/dataset/OpenImages). Only the index is read at construction; images and masks are read
per item.

- image_ids.txt: `test/<class folder>/<id>.jpg`, one image a line (the upstream test split
  lists 5,000 images of 100 classes; its last line has no newline, so `wc -l` says 4,999).
- class_labels.txt: `<path>,<0-based class>`. Class names are the class folders (OpenImages
  MIDs without "/m/", e.g. 01226z).
- localization.txt: `<image path>,<instance mask png>,<ignore mask png or empty>`, one line per
  instance mask (several per image); as in wsolevaluation's `get_mask_paths`, the image's one
  ignore mask is on its first line and later lines leave the field empty (the upstream test
  split: 7,632 mask lines, 5,000 ignore masks).
- image_sizes.txt: may be empty (it is upstream); where it lists an image, a decoded size that
  differs is noted.

Ground truth, exactly as wsolevaluation's evaluation.py (`load_mask_image`, `get_mask`) builds
it (source read: clovaai/wsolevaluation evaluation.py and data_loaders.py):
- each mask is read as greyscale (cv2.imread(..., IMREAD_GRAYSCALE), raw 0..255 values, made
  float32), resized with nearest neighbour to the evaluation size, and binarised as
  `mask > 0.5` ON THE RAW 0..255 VALUE (no division by 255): every non-zero pixel is object;
- the GT mask is the union (logical or) of the image's instance masks;
- the ignore region is `ignore_mask > 0.5` (same binarisation) minus the GT foreground;
- PxAP counts GT-foreground pixels as positives and the rest as negatives, ignore pixels
  excluded (evaluation mask value 1 / 0 / 255).
Here the masks are binarised at their stored size and the transform resizes the result with
nearest neighbour (`datasets.base.resize_mask`, which calls cv2.resize with INTER_NEAREST as
wsolevaluation does: OpenCV's source index is not torch's nearest rule): since the binarisation
is per pixel and nearest neighbour picks the same source pixel for every mask, this equals
wsolevaluation's resize-then-binarise. Sample.mask = label + 1 on the object, 255
(`IGNORE_INDEX`) on ignore pixels, 0 elsewhere; the metrics' valid mask is `mask != 255`.
Masks are read like cv2's greyscale read: an "L" PNG as is, a 1-bit PNG as 0/255, any other
8-bit mode converted to greyscale (noted); 16-bit masks are refused.

wsolevaluation evaluates OpenImages with masks only (PxAP). The boxes of a Sample here are
the tight boxes of its instance masks (continuous pixel edges), derived so that box-based
scores have something to compare with; they are not part of the published protocol.

Skipped items (never silent): an image without a mask line ("no instance mask"), an image or
mask that cannot be read or is no regular file (the reason names the file), a mask whose size
differs from its image's (both sizes named), an image whose image or mask path leads outside
`root` (absolute, or with a '..' part; `allow_outside_root` allows it; metadata whose every
image or mask path does is refused, as written for data in another place). An image whose
masks hold no object pixel is kept, as wsolevaluation keeps it (its pixels are PxAP
negatives), with a note. An image without an ignore mask (the reference requires one) is kept
with no ignore pixels and a note. Index problems (a malformed line, a duplicate image, a label
outside 0.., a second ignore mask for one image) are errors naming the file and line.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from wsol_bench.errors import InputFileError, MissingInputError, SettingError

from .base import IGNORE_INDEX, Sample, SkippedSample, index_fingerprint, mask_boxes
from .image_io import ImageReadError, read_rgb
from .records import (
    AnnotationRecord,
    display_name,
    folder_listing,
    is_present,
    limit_index,
    outside_root_reason,
    read_regular_file,
    read_text_lines,
    reconcile_image_size,
    refuse_all_outside_root,
    unreadable_reason,
)

METADATA_FILES = ("image_ids.txt", "class_labels.txt", "image_sizes.txt", "localization.txt")
SPLITS = ("train", "val", "test")


def binarize_mask(values: np.ndarray) -> np.ndarray:
    """wsolevaluation's binarisation of a greyscale mask: raw value (0..255) > 0.5."""
    return values.astype(np.float32) > 0.5


def read_grey_mask(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """A mask PNG as uint8 [H, W] grey values, as cv2.imread(IMREAD_GRAYSCALE) gives them.
    Raises `ImageReadError` naming the file for a missing, corrupt or 16-bit file."""
    shown = display_name(str(path))
    try:
        data = read_regular_file(path)  # a named pipe would block the read forever
    except OSError as err:
        raise ImageReadError(f"cannot read mask file {shown}: {err.strerror or err}") from err
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode, notes = image.mode, ()
            if mode.startswith(("I", "F")):
                raise ImageReadError(f"mask file {shown} has high bit depth (mode {mode}); expected 8-bit grey")
            if mode == "1":
                image = image.convert("L")
            elif mode != "L":
                notes = (f"mask {mode.lower()} converted to grey",)
                image = image.convert("L")
            return np.array(image, dtype=np.uint8), notes
    except ImageReadError:
        raise
    except Image.UnidentifiedImageError as err:
        raise ImageReadError(f"mask file {shown} is not a recognised image format ({len(data)} bytes)") from err
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(f"mask file {shown} is truncated or corrupt: {err}") from err


def resolve_root(root: str | Path) -> Path:
    """The folder the metadata paths are relative to: `root`, or `root`/OpenImages."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingInputError(f"OpenImages root {root} does not exist; set dataset.params.root to the folder "
                                "the metadata paths (test/<class>/<id>.jpg) are relative to "
                                "(wsolevaluation's dataset/OpenImages)")
    nested = root / "OpenImages"
    if nested.is_dir() and not any((root / split).is_dir() for split in SPLITS):
        return nested
    return root


def resolve_metadata(metadata: str | Path | None, root: Path, split: str) -> Path:
    """The metadata folder of `split` (see the module docstring for where null looks)."""
    if metadata is not None:
        base = Path(metadata).expanduser()
        candidates = [base / split, base]
    else:
        candidates = [root / "metadata" / "OpenImages" / split, root / "metadata" / "OpenImages",
                      root.parent.parent / "metadata" / "OpenImages" / split]
    for candidate in candidates:
        if is_present(candidate / METADATA_FILES[0]):  # one that cannot be read is refused naming it
            if candidate.name in SPLITS and candidate.name != split:
                raise SettingError(f"OpenImages metadata folder {candidate} is the {candidate.name!r} split but "
                                   f"split={split!r}; set split={candidate.name} or point metadata at its parent")
            return candidate
    raise MissingInputError(f"no wsolevaluation OpenImages metadata for split {split!r}: looked for "
                            f"{METADATA_FILES[0]} in {', '.join(str(c) for c in candidates)}; set "
                            "dataset.params.metadata to <wsolevaluation>/metadata/OpenImages")


def _rows(path: Path, fields: int, required: bool = True) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-empty line of a comma-separated metadata file."""
    problem = unreadable_reason(path)
    if problem == "missing" and not required:
        return []
    if problem == "missing":
        raise MissingInputError(f"OpenImages metadata file {path} is missing; found in {path.parent}: "
                                f"{folder_listing(path.parent)}")
    rows = []
    for number, line in enumerate(read_text_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split(",") if fields > 1 else [line.strip()]
        if len(parts) != fields:
            raise InputFileError(f"{path}:{number}: expected {fields} comma-separated fields, got {line!r}")
        rows.append((number, [p.strip() for p in parts]))
    return rows


class OpenImagesDataset(Dataset):
    """OpenImages30k with instance and ignore masks (see the module docstring).

    `records` holds the usable items (no image decoded); `skipped` those the index cannot use;
    `mask_paths` / `ignore_paths` map an image id to its mask files (relative to `data_dir`)."""

    def __init__(self, root: str | Path, metadata: str | Path | None = None, split: str = "test",
                 num_images: int | None = None, allow_outside_root: bool = False, transform=None) -> None:
        self.data_dir = resolve_root(root)
        self.metadata_dir = resolve_metadata(metadata, self.data_dir, split)
        self.split, self.transform, self.allow_outside_root = split, transform, bool(allow_outside_root)
        files = {name: self.metadata_dir / name for name in METADATA_FILES}
        ids = self._unique(_rows(files["image_ids.txt"], 1), files["image_ids.txt"])
        labels = self._unique(_rows(files["class_labels.txt"], 2), files["class_labels.txt"])
        sizes = self._unique(_rows(files["image_sizes.txt"], 3, required=False), files["image_sizes.txt"])
        self.mask_paths, self.ignore_paths = self._masks(files["localization.txt"])
        parsed: dict[str, int] = {}
        for path, (number, (text,)) in labels.items():
            try:
                parsed[path] = int(text)
            except ValueError:
                parsed[path] = -1
            if parsed[path] < 0:
                raise InputFileError(f"{files['class_labels.txt']}:{number}: class {text!r} is not an integer "
                                     ">= 0")
        self.sizes: dict[str, tuple[int, int]] = {}
        for path, (number, values) in sizes.items():
            try:
                self.sizes[path] = (int(values[0]), int(values[1]))
            except ValueError:
                raise InputFileError(f"{files['image_sizes.txt']}:{number}: {values} is not a size in "
                                     "pixels") from None
        num_classes = max((parsed[p] for p in ids if p in parsed), default=-1) + 1
        names = [f"class_{i}" for i in range(num_classes)]
        self._refuse_all_outside_root(list(ids), files)
        items: list[AnnotationRecord | SkippedSample] = []
        for path in ids:
            outside = self._outside_root(path)
            if outside is not None:
                items.append(SkippedSample(path, outside))
                continue
            if path not in parsed:
                items.append(SkippedSample(path, f"no class label: {path} is not in {files['class_labels.txt']}"))
                continue
            label = parsed[path]
            names[label] = Path(path).parent.name or names[label]
            if path not in self.mask_paths:
                items.append(SkippedSample(path, f"no instance mask: {path} is not in {files['localization.txt']}"))
                continue
            items.append(AnnotationRecord(image_id=path, path=path, label=label, boxes=torch.zeros(0, 4),
                                          box_labels=torch.zeros(0, dtype=torch.long),
                                          size=self.sizes.get(path)))
        self.class_names = tuple(names)
        self.records, self.skipped = limit_index(items, num_images, f"openimages {split}")

    def _refuse_all_outside_root(self, ids: list[str], files: dict[str, Path]) -> None:
        """Metadata whose every image path, or every mask path, leads outside the root is refused."""
        masks = [m for image in self.mask_paths.values() for m in image]
        refuse_all_outside_root(ids, files["image_ids.txt"], "image path", self.allow_outside_root)
        refuse_all_outside_root(masks, files["localization.txt"], "mask path", self.allow_outside_root)

    def _outside_root(self, path: str) -> str | None:
        """Why the image `path` must be skipped for its image or a mask outside the root, or None."""
        reasons = [outside_root_reason(path, "image_ids.txt", self.allow_outside_root)]
        masks = [*self.mask_paths.get(path, []), self.ignore_paths.get(path, "")]
        reasons += [outside_root_reason(m, "localization.txt", self.allow_outside_root) for m in masks if m]
        return next((reason for reason in reasons if reason is not None), None)

    @staticmethod
    def _unique(rows: list[tuple[int, list[str]]], path: Path) -> dict[str, tuple[int, list[str]]]:
        table: dict[str, tuple[int, list[str]]] = {}
        for number, (key, *rest) in rows:
            if key in table:
                raise InputFileError(f"{path}: lines {table[key][0]} and {number} both list {key}; list each "
                                     "once: fix the file")
            table[key] = (number, rest)
        return table

    @staticmethod
    def _masks(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
        """wsolevaluation's get_mask_paths: image -> [instance masks], image -> ignore mask (the
        field of the image's first line; later lines must leave it empty)."""
        masks: dict[str, list[str]] = {}
        ignores: dict[str, str] = {}
        first: dict[str, int] = {}
        for number, (image, mask, ignore) in _rows(path, 3):
            if not mask:
                raise InputFileError(f"{path}:{number}: no instance mask path")
            if image in masks:
                if ignore:
                    raise InputFileError(f"{path}:{number}: a second ignore mask for {image} (its first line, "
                                         f"{first[image]}, gives the image's one ignore mask); leave the field "
                                         "empty")
                masks[image].append(mask)
            else:
                masks[image], ignores[image], first[image] = [mask], ignore, number
        return masks, ignores

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def _files(self, record: AnnotationRecord) -> list[Path]:
        ignore = self.ignore_paths.get(record.path)
        return [self.data_dir / record.path, *(self.data_dir / m for m in self.mask_paths[record.path]),
                *([self.data_dir / ignore] if ignore else [])]

    def fingerprint(self) -> str:
        """What identifies the data (ids, labels, mask lists, image and mask file stamps)."""
        return index_fingerprint(((r.image_id, self._files(r),
                                   (r.label, self.mask_paths[r.path], self.ignore_paths.get(r.path, "")))
                                  for r in self.records), self.skipped)

    def _read(self, record: AnnotationRecord, relative: str, size: tuple[int, int]
              ) -> tuple[np.ndarray, tuple[str, ...]] | SkippedSample:
        """One binarised mask at the image's size, or why the item cannot be used."""
        try:
            values, notes = read_grey_mask(self.data_dir / relative)
        except ImageReadError as exc:
            return SkippedSample(record.image_id, str(exc))
        if (values.shape[1], values.shape[0]) != size:
            return SkippedSample(record.image_id, f"mask {relative} is {values.shape[1]}x{values.shape[0]} but "
                                 f"the image is {size[0]}x{size[1]}")
        return binarize_mask(values), notes

    def __getitem__(self, index: int) -> Sample | SkippedSample:
        record = self.records[index]
        try:
            image, notes = read_rgb(self.data_dir / record.path)
        except ImageReadError as exc:
            return SkippedSample(record.image_id, str(exc))
        size = (image.shape[-1], image.shape[-2])
        notes += reconcile_image_size(record, size)[2]  # the size note (the record has no boxes)
        instances = []
        for relative in self.mask_paths[record.path]:
            read = self._read(record, relative, size)
            if isinstance(read, SkippedSample):
                return read
            instances.append(read[0])
            notes += tuple(n for n in read[1] if n not in notes)
        foreground = np.logical_or.reduce(instances)
        mask = np.where(foreground, record.label + 1, 0).astype(np.uint8)
        ignore_path = self.ignore_paths.get(record.path, "")
        if ignore_path:
            read = self._read(record, ignore_path, size)
            if isinstance(read, SkippedSample):
                return read
            mask[read[0] & ~foreground] = IGNORE_INDEX
            notes += tuple(n for n in read[1] if n not in notes)
        else:
            notes += ("no ignore mask: every pixel counts",)
        if not foreground.any():
            notes += ("no object pixel in any instance mask (all pixels are negatives)",)
        boxes = mask_boxes(instances)
        sample = Sample(image=image, label=record.label, boxes=boxes.clone(), image_id=record.image_id,
                        orig_size=size, mask=torch.from_numpy(mask), orig_boxes=boxes, notes=notes)
        return self.transform(sample) if self.transform is not None else sample
