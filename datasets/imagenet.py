"""ImageNet ILSVRC2012 validation set with bounding boxes, read from its official layouts.

Layouts (docs/protocol.md section 6):
- kaggle: <root>/ILSVRC/Data/CLS-LOC/val/*.JPEG (flat) with <root>/LOC_val_solution.csv, or,
  without the csv, <root>/ILSVRC/Annotations/CLS-LOC/val/*.xml; <root>/LOC_synset_mapping.txt.
- torchvision: <root>/val/<wnid>/*.JPEG with the bbox XMLs in `annotations` (default
  <root>/val, where the ILSVRC2012_bbox_val archive puts them when extracted in <root>).
- wsolevaluation: `metadata` = folder with image_ids.txt, class_labels.txt, image_sizes.txt,
  localization.txt; the image paths they list are relative to <root>.

Every layout gives the same items: image id = file stem (ILSVRC2012_val_00000001), label =
position of the wnid in sorted order (= LOC_synset_mapping.txt order = timm/torchvision), boxes
converted from 0-based inclusive to continuous edges. The annotation index is parsed once at
construction; problems with one image (no annotation, missing file, unknown class) are kept
in `skipped`, problems found when decoding become a `SkippedSample` for that item.

Annotation size vs decoded size (`size_mismatch`): the official val annotations agree with the
original files (all 80,477 boxes lie inside their stated image sizes), so a decoded image of
another size is most likely a resampled copy of the dataset, and the default "scale" scales the
boxes to it; "keep" keeps the boxes in their own pixel coordinates and clips them (what the VOC
and CUB loaders do); "skip" skips the item. Each case is noted on the sample.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from timm.data import ImageNetInfo
from torch.utils.data import Dataset

from .base import Sample, SkippedSample
from .image_io import ImageReadError, read_rgb
from .imagenet_annotations import (
    WSOL_FILES,
    AnnotationError,
    parse_imagenet_xml,
    read_loc_solution_csv,
    read_synset_mapping,
    read_wsol_metadata,
    read_xml_size,
)
from .imagenet_index import ImageNetRecord, PendingImage, build_records, fit_boxes_to_image
from .records import folder_listing, limit_index

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


def _file_names(folder: Path) -> list[str]:
    """Visible files of a folder (one directory scan)."""
    with os.scandir(folder) as entries:
        return [e.name for e in entries if e.is_file() and not e.name.startswith(".")]


def _stem(path: str) -> str:
    """File name without folder and extension (Path.stem, for plain strings)."""
    name = path.rpartition("/")[2]
    return name.rpartition(".")[0] or name


def _listing(folder: Path, xml: bool = False) -> dict[str, str]:
    """File stem -> file name of the XML files (xml=True) or of the other files of a folder."""
    return {Path(n).stem: n for n in _file_names(folder) if n.lower().endswith(".xml") == xml}


def detect_layout(root: Path, metadata: Path | None) -> str:
    """Which official layout `root` holds; raises naming the layouts and what was found."""
    if not root.is_dir():
        raise FileNotFoundError(f"imagenet: dataset.params.root {str(root)!r} does not exist; {LAYOUT_HELP}")
    if metadata is not None:
        return "wsolevaluation"
    if (root / KAGGLE_IMAGES).is_dir():
        return "kaggle"
    val = root / "val"
    if val.is_dir() and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(val)):
        return "torchvision"
    raise FileNotFoundError(f"imagenet: cannot tell the layout of {root}: {LAYOUT_HELP}; "
                            f"found: {folder_listing(root)}")


def _require_dir(folder: Path, layout: str, root: Path, setting: str = "dataset.params.root") -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"imagenet ({layout} layout): folder {folder} does not exist; "
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
                 size_mismatch: str = "scale", transform=None) -> None:
        if split != "val":
            raise ValueError(f"imagenet: split {split!r} is not supported; "
                             "only 'val' has boxes for every image")
        if layout not in ("auto",) + LAYOUTS:
            raise ValueError(f"imagenet: layout {layout!r} is unknown; valid: auto, {', '.join(LAYOUTS)}")
        if size_mismatch not in SIZE_MISMATCH_POLICIES:
            raise ValueError(f"imagenet: size_mismatch {size_mismatch!r} is unknown; "
                             f"valid: {', '.join(SIZE_MISMATCH_POLICIES)}")
        self.root = Path(root).expanduser()
        self.metadata = Path(metadata).expanduser() if metadata is not None else None
        if not self.root.is_dir():
            detect_layout(self.root, self.metadata)  # raises the missing-root error
        self.layout = detect_layout(self.root, self.metadata) if layout == "auto" else layout
        if (self.layout == "wsolevaluation") != (self.metadata is not None):
            raise ValueError(f"imagenet: dataset.params.metadata is needed by the wsolevaluation layout and "
                             f"only by it (layout={self.layout}, metadata={metadata}); {LAYOUT_HELP}")
        self.size_mismatch, self.transform = size_mismatch, transform
        self.wnids, self.class_names = self._classes(synsets)
        self._class_index = {wnid: i for i, wnid in enumerate(self.wnids)}
        self._skips: list[SkippedSample] = []
        if self.layout == "kaggle":
            records = self._index_kaggle()
        elif self.layout == "torchvision":
            records = self._index_torchvision(Path(annotations).expanduser() if annotations else None)
        else:
            records = self._index_wsolevaluation()
        index = sorted(records + self._skips, key=lambda item: item.image_id)
        try:
            self.records, self.skipped = limit_index(index, num_images, f"imagenet ({self.layout} layout)")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}. Root {self.root}: {LAYOUT_HELP}") from None

    def _classes(self, synsets: str | os.PathLike | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Sorted wnids and their names: from LOC_synset_mapping.txt when given or present in
        the root, else timm's ImageNet-1k list (the same 1000 wnids)."""
        info = ImageNetInfo()
        reference = info.label_names()
        path = Path(synsets).expanduser() if synsets else self.root / "LOC_synset_mapping.txt"
        if synsets and not path.is_file():
            raise FileNotFoundError(f"imagenet: dataset.params.synsets {str(path)!r} does not exist")
        if path.is_file():
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
        self._skips.append(SkippedSample(image_id, reason))

    def _from_xml(self, image_id: str, image: str, xml: Path, label: int | None = None
                  ) -> PendingImage | None:
        try:
            return PendingImage(image_id, image, parse_imagenet_xml(xml), label)
        except AnnotationError as err:
            self._skip(image_id, str(err))
            return None

    def _build_records(self, pending: list[PendingImage | None]) -> list[ImageNetRecord]:
        records, skips = build_records([p for p in pending if p is not None], self._class_index)
        self._skips += skips
        return records

    def _index_kaggle(self) -> list[ImageNetRecord]:
        images_dir, xml_dir = self.root / KAGGLE_IMAGES, self.root / KAGGLE_XMLS
        _require_dir(images_dir, "kaggle", self.root)
        images = _listing(images_dir)
        csv = self.root / "LOC_val_solution.csv"
        if csv.is_file():
            annotations, problems = read_loc_solution_csv(csv)
            for image_id, reason in problems:
                self._skip(image_id, reason)
            xmls = _listing(xml_dir, xml=True) if xml_dir.is_dir() else {}
            pending = [PendingImage(image_id, os.path.join(images_dir, images[image_id]), ann, None,
                                    os.path.join(xml_dir, xmls[image_id]) if image_id in xmls else None)
                       for image_id, ann in annotations.items() if image_id in images]
            annotated = set(annotations) | {image_id for image_id, _ in problems}
        elif xml_dir.is_dir():
            xmls = _listing(xml_dir, xml=True)
            pending = [self._from_xml(image_id, os.path.join(images_dir, name), xml_dir / xmls[image_id])
                       for image_id, name in images.items() if image_id in xmls]
            annotated = set(xmls)
        else:
            raise FileNotFoundError(f"imagenet (kaggle layout): neither {csv} nor {xml_dir} exists; one of "
                                    f"them holds the boxes. {LAYOUT_HELP}; found in {self.root}: "
                                    f"{folder_listing(self.root)}")
        for image_id in annotated - set(images):
            self._skip(image_id, FILE_MISSING)
        for image_id in set(images) - annotated:
            self._skip(image_id, NO_ANNOTATION)
        return self._build_records(pending)

    def _index_torchvision(self, annotations: Path | None) -> list[ImageNetRecord]:
        val = self.root / "val"
        _require_dir(val, "torchvision", self.root)
        xml_dir = annotations or val
        _require_dir(xml_dir, "torchvision", self.root, "dataset.params.annotations (the bbox XML folder)")
        xmls = _listing(xml_dir, xml=True)
        pending: list[PendingImage | None] = []
        seen: set[str] = set()
        with os.scandir(val) as entries:
            class_dirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        for wnid in class_dirs:
            for image_id, name in _listing(val / wnid).items():
                seen.add(image_id)
                if wnid not in self._class_index:
                    self._skip(image_id, f"class folder {wnid!r} is not an ImageNet-1k wnid")
                elif image_id not in xmls:
                    self._skip(image_id, NO_ANNOTATION)
                else:
                    pending.append(self._from_xml(image_id, os.path.join(val, wnid, name),
                                                  xml_dir / xmls[image_id], label=self._class_index[wnid]))
        for image_id in set(xmls) - seen:
            self._skip(image_id, FILE_MISSING)
        return self._build_records(pending)

    def _index_wsolevaluation(self) -> list[ImageNetRecord]:
        assert self.metadata is not None
        if not self.metadata.is_dir():
            raise FileNotFoundError(f"imagenet (wsolevaluation layout): dataset.params.metadata "
                                    f"{str(self.metadata)!r} does not exist; it must hold "
                                    f"{', '.join(WSOL_FILES)}")
        annotations, problems = read_wsol_metadata(self.metadata)
        for key, reason in problems:
            self._skip(_stem(key), reason)
        # Plain string paths and one directory scan per image folder: 50,000 Path objects
        # would cost seconds.
        present: dict[str, set[str]] = {}
        pending: list[PendingImage | None] = []
        for key, ann in annotations.items():
            folder, _, name = key.rpartition("/")
            if folder not in present:
                _require_dir(self.root / folder, "wsolevaluation", self.root)
                present[folder] = set(_file_names(self.root / folder))
            if name in present[folder]:
                pending.append(PendingImage(_stem(name), os.path.join(self.root, key), ann,
                                            int(ann.box_classes[0])))
            else:
                self._skip(_stem(name), FILE_MISSING)
        return self._build_records(pending)

    # -- items ---------------------------------------------------------------------------------
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
        sample = Sample(image=image, label=record.label, boxes=torch.from_numpy(boxes),
                        box_labels=torch.from_numpy(record.box_labels[keep]), image_id=record.image_id,
                        orig_size=size, notes=notes + box_notes)
        return self.transform(sample) if self.transform is not None else sample
