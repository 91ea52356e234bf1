"""ImageNet-segmentation (Guillaumin et al., IJCV 2014), the 4,276 ImageNet images with
foreground masks on which Chefer et al. (CVPR 2021) score ViT explanations, read from the
`gtsegs_ijcv.mat` file their evaluation uses.

The file is MATLAB v7.3, i.e. HDF5, read with h5py as Chefer et al.'s `Imagenet_Segmentation`
reads it (source read: hila-chefer/Transformer-Explainability, data/Imagenet.py):
- `value/img` is an [N, 1] array of object references; item i's image is the dataset the
  reference f['value/img'][i, 0] points to, stored transposed (MATLAB's column-major order):
  [3, W, H] uint8, so `.transpose(2, 1, 0)` gives H x W x 3 RGB;
- `value/gt` is an [N, 1] array of references to [1, 1] arrays of references: item i's mask is
  f[f[f['value/gt'][i, 0]][0, 0]], stored [W, H], `.transpose(1, 0)` gives H x W, 1 on the
  object and 0 elsewhere.
The file holds no class labels: Chefer et al. explain the predicted class. Items are numbered
in file order, ids `imagenet_seg_000000` onwards. Only the reference arrays are read at
construction; images and masks per item (the file is opened once per process).

Sample: label 0 as a placeholder (`has_labels` is False, and the run refuses whatever needs a
label: `target=label`, faithfulness, `metric.image_filter=correct`); mask = 1 on the object, 0
elsewhere (the label's class + 1, as every dataset's masks); one box, the tight box of the
mask's object pixels (not part of Chefer's protocol; none when the mask is empty); the mask is
resized as Chefer's target transform does, a PIL nearest resize (`Sample.mask_resize="pil"`).

Never silent: a missing file or one without `value/img` and `value/gt` is an error naming the
file and the fix; an item whose reference cannot be followed, whose image is not H x W x 3 uint8
(greyscale is converted with a note), whose mask is not 2-D with values 0 and 1 only, or whose
mask size differs from its image's is skipped with the reason (skipped.csv, data.json).

Bounded memory: an entry's declared shape and type are checked before it is read, so an image or
mask of more pixels than one image may have (Pillow's decompression-bomb limit, which the image
files of the other datasets obey too) is skipped unread; and reference arrays listing more items
than the index of the items kept can hold in memory are refused before any record is made.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from wsol_bench.errors import InputFileError, MissingInputError, MissingLibraryError
from wsol_bench.limits import check_memory, max_image_pixels

from .base import Sample, SkippedSample, file_stamp, index_fingerprint, mask_boxes
from .records import AnnotationRecord, limit_index

ID_PREFIX = "imagenet_seg_"
IMAGES, MASKS = "value/img", "value/gt"
# Memory of one item's index record (its id, two empty box tensors): about 1.5 KB, measured on
# 200,000 records; the index of the items kept is refused when it would pass the memory limit.
RECORD_BYTES = 1600


def require_h5py():
    """The h5py module, or a `MissingLibraryError` (an ImportError) that names the fix."""
    try:
        import h5py
    except ImportError as err:  # a dependency of the package; only a broken install lacks it
        raise MissingLibraryError("the imagenet_segmentation dataset reads gtsegs_ijcv.mat with h5py; "
                                  "pip install h5py") from err
    return h5py


def item_id(index: int) -> str:
    """The id of the item at `index` of the file."""
    return f"{ID_PREFIX}{index:06d}"


def _check_file(path: Path):
    """The open HDF5 file at `path`, or an error naming the file and the fix."""
    h5py = require_h5py()
    if not path.is_file():
        raise MissingInputError(f"ImageNet-segmentation file {path} does not exist; set dataset.params.file to "
                                "gtsegs_ijcv.mat (the file of Chefer et al.'s imagenet_seg_eval.py)")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise InputFileError(f"{path} is not an HDF5 file ({err}); gtsegs_ijcv.mat must be the MATLAB v7.3 "
                             "release (HDF5), not an older .mat") from err
    missing = [key for key in (IMAGES, MASKS) if key not in handle]
    if missing:
        found = ", ".join(sorted(handle.keys())) or "nothing"
        handle.close()
        raise InputFileError(f"{path} has no {' or '.join(missing)} (found at the top: {found}); is it "
                             "gtsegs_ijcv.mat?")
    return handle


class ImageNetSegmentation(Dataset):
    """The items of gtsegs_ijcv.mat (see the module docstring)."""

    has_labels = False  # Chefer et al. explain the predicted class; there is no label to explain
    num_classes = None  # any classifier: its classes are not the dataset's
    class_names = ("object",)

    def __init__(self, file: str | Path, num_images: int | None = None, transform=None) -> None:
        self.file = Path(file).expanduser()
        self.transform = transform
        with _check_file(self.file) as handle:
            # a group in place of an array has no shape
            images, masks = (getattr(handle[key], "shape", "not an array") for key in (IMAGES, MASKS))
            if not isinstance(images, tuple) or len(images) != 2 or masks != images:
                raise InputFileError(f"{self.file}: {IMAGES} is {images} and {MASKS} is {masks}; "
                                     "expected two [N, 1] arrays of references")
            count = int(images[0])
        if not count:
            raise InputFileError(f"{self.file}: {IMAGES} lists no image")
        kept = count if num_images is None or int(num_images) < 1 else min(count, int(num_images))
        check_memory(kept * RECORD_BYTES, f"{self.file}: the index of {kept:,} items ({IMAGES} lists {count:,})",
                     "this is no gtsegs_ijcv.mat (it lists 4,276 items); or keep fewer with "
                     "dataset.params.num_images", error=InputFileError)
        items = (AnnotationRecord(image_id=item_id(i), path=str(i), label=0, boxes=torch.zeros(0, 4),
                                  box_labels=torch.zeros(0, dtype=torch.long), size=None) for i in range(count))
        self.records, self.skipped = limit_index(items, num_images, "imagenet_segmentation")  # reads `kept` items
        self._handle, self._pid = None, None

    def __len__(self) -> int:
        return len(self.records)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": None}  # each process opens its own

    def _open(self):
        # an HDF5 handle must not cross a fork: a DataLoader worker opens the file again
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = require_h5py().File(self.file, "r"), os.getpid()
        return self._handle

    def fingerprint(self) -> str:
        """The file's stamp and the ids of the items read from it."""
        return index_fingerprint([("file", [self.file], file_stamp(self.file)),
                                  *((r.image_id, (), int(r.path)) for r in self.records)], self.skipped)

    def read_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray] | str:
        """(image H x W x C or H x W, mask H x W) of file item `index`, as stored, transposed to
        row-major; or why the item is not read (an entry declaring a size or type it cannot
        have, checked before reading). Raises ValueError or KeyError (an h5py reference that
        cannot be followed)."""
        handle = self._open()
        image = handle[handle[IMAGES][index, 0]]
        inner = handle[handle[MASKS][index, 0]]
        mask = handle[inner[0, 0]]
        problem = declared_problem(image, "image", self.file.name) or declared_problem(mask, "mask", self.file.name)
        if problem is not None:
            return problem
        return np.asarray(image).T, np.asarray(mask).T  # MATLAB's column-major storage: reverse every axis

    def __getitem__(self, index: int) -> Sample | SkippedSample:
        record = self.records[index]
        try:
            arrays = self.read_arrays(int(record.path))
        except (KeyError, ValueError, OSError, TypeError, IndexError) as err:
            return SkippedSample(record.image_id, f"unreadable reference in {self.file.name}: {err}")
        if isinstance(arrays, str):
            return SkippedSample(record.image_id, arrays)
        checked = check_arrays(*arrays)
        if isinstance(checked, str):
            return SkippedSample(record.image_id, checked)
        image, foreground, notes = checked
        boxes = mask_boxes(foreground[None])
        if not len(boxes):
            notes = (*notes, "empty mask: no object pixel")
        height, width = foreground.shape
        sample = Sample(image=torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), label=0,
                        boxes=boxes.clone(), image_id=record.image_id, orig_size=(width, height),
                        mask=torch.from_numpy(foreground.astype(np.uint8)), orig_boxes=boxes, notes=notes,
                        mask_resize="pil")
        return self.transform(sample) if self.transform is not None else sample


def declared_problem(entry, kind: str, file_name: str) -> str | None:
    """Why the HDF5 `entry` holding an item's image or mask (`kind`) must not be read, from its
    declared shape and type alone: not an array, an image not uint8, a shape an image ([3, W, H]
    or [W, H]) or a mask ([W, H]) cannot have, or more pixels than one image may have
    (`limits.max_image_pixels`); None when it may be read."""
    shape, dtype = getattr(entry, "shape", None), getattr(entry, "dtype", None)
    name = f"{kind} entry {getattr(entry, 'name', '?')} of {file_name}"
    if shape is None or dtype is None:
        return f"{name} is not an array"
    if kind == "image" and dtype != np.uint8:
        return f"image is {dtype}, expected uint8"
    channels = (3,) if kind == "image" else ()
    if len(shape) not in (2, 2 + len(channels)) or (len(shape) == 3 and shape[0] not in channels):
        return f"{name} declares shape {list(shape)}, expected {'[3, W, H] or ' if channels else ''}[W, H]"
    width, height = shape[-2:]
    limit = max_image_pixels()
    if limit is not None and math.prod(shape[-2:]) > limit:
        return (f"{name} declares {height}x{width} pixels, more than the {limit:,} one image may have "
                "(Pillow's decompression-bomb limit, as for image files); not read")
    return None


def check_arrays(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]] | str:
    """(uint8 H x W x 3 image, bool H x W foreground, notes) of one item's arrays, or why they
    cannot be used."""
    notes: tuple[str, ...] = ()
    if image.dtype != np.uint8:
        return f"image is {image.dtype}, expected uint8"
    if image.ndim == 2:
        image, notes = np.repeat(image[:, :, None], 3, axis=2), ("greyscale converted to rgb",)
    if image.ndim != 3 or image.shape[2] != 3:
        return f"image has shape {image.shape} after transposing, expected H x W x 3"
    if mask.ndim != 2:
        return f"mask has shape {mask.shape}, expected H x W"
    if mask.shape != image.shape[:2]:
        return (f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image.shape[1]}x{image.shape[0]} "
                "(width x height)")
    values = np.unique(mask)
    if not np.isin(values, (0, 1)).all():
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        return f"mask holds values {shown}; expected 0 (background) and 1 (object) only"
    return image, mask.astype(bool), notes
