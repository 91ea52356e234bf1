"""Masks as COCO run-length encoding (RLE), written as a COCO-style JSON and read back.

Exports predicted box-union masks (at one threshold) and ground-truth masks so that other
tools (pycocotools, FiftyOne, CVAT) can read them. Each mask is one annotation:
`segmentation` = {"size": [H, W], "counts": str} as `pycocotools.mask.encode` makes it
(column-major, uncompressed counts turned into COCO's compact string), with `image_id`
(an int, the image's position in "images"; the dataset's own id is kept as "file_name"),
`category_id`, `score`, `area`, `bbox` (x, y, w, h) and `iscrowd` 0.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from wsol_bench.errors import InputFileError, MissingInputError
from wsol_bench.files import atomic_write_text
from wsol_bench.regions.engine import find_regions
from wsol_bench.regions.rasterize import union_masks


def encode_mask(mask: torch.Tensor | np.ndarray) -> dict:
    """One bool [H, W] mask -> {"size": [H, W], "counts": str} (COCO compressed RLE)."""
    array = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
    if array.ndim != 2:
        raise ValueError(f"a mask must be [H, W], got shape {array.shape}")
    rle = mask_utils.encode(np.asfortranarray(array.astype(np.uint8)))  # pycocotools reads column-major
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict) -> torch.Tensor:
    """{"size": [H, W], "counts": str | bytes} -> bool [H, W] tensor."""
    counts = rle["counts"]
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    with warnings.catch_warnings():
        # pycocotools' compiled decoder trips numpy 2's __array__(copy=...) deprecation; harmless
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        array = mask_utils.decode({"size": list(rle["size"]), "counts": counts})
    return torch.from_numpy(array.astype(bool))


def predicted_union_masks(heatmaps: torch.Tensor, threshold: float, protocol: str = "agcam") -> torch.Tensor:
    """Box-union masks (all components, docs/protocol.md 4.1) of `heatmaps > threshold`, bool [B, H, W]."""
    return union_masks(find_regions(heatmaps, [threshold]), 0, protocol)


def coco_document(image_keys: Sequence[str], masks: torch.Tensor, category_ids: Sequence[int],
                  scores: Sequence[float] | None = None, categories: dict[int, str] | None = None) -> dict:
    """A COCO-style dict with one image and one mask annotation per entry. `image_keys` are the
    dataset's image ids; `scores` default to 1.0 (ground truth)."""
    masks = torch.as_tensor(masks)
    count = len(image_keys)
    if masks.ndim != 3 or len(masks) != count or len(category_ids) != count:
        raise ValueError(f"need one [H, W] mask and one category per image: {count} images, masks "
                         f"{tuple(masks.shape)}, {len(category_ids)} categories")
    if scores is not None and len(scores) != count:
        raise ValueError(f"{count} images but {len(scores)} scores")
    if len(set(image_keys)) != count:
        raise ValueError("image_keys repeat; give each mask its own image id")
    height, width = int(masks.shape[1]), int(masks.shape[2])
    images, annotations = [], []
    for index, key in enumerate(image_keys):
        rle = encode_mask(masks[index])
        coco_rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        images.append({"id": index, "file_name": str(key), "height": height, "width": width})
        annotations.append({
            "id": index + 1,  # COCO annotation ids start at 1
            "image_id": index,
            "category_id": int(category_ids[index]),
            "segmentation": rle,
            "area": float(mask_utils.area(coco_rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(coco_rle)],
            "iscrowd": 0,
            "score": 1.0 if scores is None else float(scores[index]),
        })
    used = sorted({int(c) for c in category_ids})
    names = categories or {}
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": names.get(c, str(c))} for c in used]}


def write_coco_masks(path: str | Path, image_keys: Sequence[str], masks: torch.Tensor,
                     category_ids: Sequence[int], scores: Sequence[float] | None = None,
                     categories: dict[int, str] | None = None) -> Path:
    """Write `coco_document(...)` as JSON to `path` (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(coco_document(image_keys, masks, category_ids, scores, categories)))
    return path


@dataclass
class CocoMask:
    """One annotation read back: the dataset's image id, category, score and the decoded mask."""

    image_key: str
    category_id: int
    score: float
    mask: torch.Tensor  # bool [H, W]


def read_coco_masks(path: str | Path) -> list[CocoMask]:
    """Read a file written by `write_coco_masks` (or any COCO file with RLE segmentations), in
    annotation order."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"COCO mask file {path} does not exist")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        keys = {image["id"]: image.get("file_name", str(image["id"])) for image in document["images"]}
        return [CocoMask(image_key=keys[a["image_id"]], category_id=int(a["category_id"]),
                         score=float(a.get("score", 1.0)), mask=decode_mask(a["segmentation"]))
                for a in document["annotations"]]
    # ValueError: not UTF-8 or not JSON, or a value of the wrong kind; AttributeError: an entry that is
    # no mapping
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise InputFileError(f"{path} is not a COCO mask file with RLE segmentations ({error!r}); "
                             "write it with wsol_bench.report.export.write_coco_masks") from error
