"""The sample every dataset yields, the one transform that moves image and ground truth
together, and the batch collation."""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wsol_bench import choices
from wsol_bench.errors import SettingError, counted

IGNORE_INDEX = 255  # mask value excluded from every pixel metric (VOC's "void")


@dataclass
class Sample:
    """One image with its ground truth.

    image: uint8 [3, H, W] as decoded, or float [3, H, W] normalised after `transform`.
    boxes: float [K, 4] xyxy with continuous pixel edges in the coordinates of `image`
        (a pixel column x spans [x, x+1)).
    box_labels: long [K], the class of each box (the image label for single-class data).
    mask: optional uint8 [H, W] semantic mask: 0 background, class index + 1 on objects,
        255 ignore.
    orig_boxes: the boxes in the coordinates of the image as stored on disk; protocols that
        rasterise in the original integer convention (AG-CAM's GT boxes) read these.
    orig_size: (width, height) of the image as stored on disk.
    notes: what the loader had to change to make the item usable (e.g. "cmyk converted to
        rgb", "box clipped to image"), so a run can count and report it; empty when nothing.
    mask_resize: how `mask` is resized to the model input, the rule of the protocol its
        dataset follows (`MASK_RESIZE_RULES`): "opencv" (wsolevaluation) or "pil" (Chefer et al.'s
        ImageNet-segmentation evaluation, which resizes the mask as a PIL image).
    """

    image: torch.Tensor
    label: int
    boxes: torch.Tensor
    image_id: str
    orig_size: tuple[int, int]
    box_labels: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    orig_boxes: torch.Tensor | None = None
    notes: tuple[str, ...] = ()
    mask_resize: str = "opencv"

    def __post_init__(self) -> None:
        self.boxes = torch.as_tensor(self.boxes, dtype=torch.float32).reshape(-1, 4)
        if self.box_labels is None:
            self.box_labels = torch.full((len(self.boxes),), int(self.label), dtype=torch.long)
        if self.orig_boxes is None:
            self.orig_boxes = self.boxes.clone()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the current image."""
        return int(self.image.shape[-1]), int(self.image.shape[-2])


# Which implementation resizes images; part of the map-store key, since another resampler gives
# other pixels and so other maps.
RESAMPLER = "pil"
# torchvision's interpolation names -> Pillow's resampling filters (what torchvision's Resize
# hands to PIL.Image.resize when it is given a PIL image).
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST, "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS,
}


def resize_image(image: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, height, width] with Pillow's resampling, exactly the pixels
    torchvision's `Resize` gives on the decoded PIL image (the reference implementations'
    path). A tensor resize differs from it by one level in about 0.1-0.2 % of the values."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"resize_image takes a decoded uint8 [3, H, W] image, got {image.dtype} "
                         f"{tuple(image.shape)}")
    if interpolation not in _PIL_FILTERS:
        raise SettingError(f"unknown preprocess.interpolation {interpolation!r}; valid: {', '.join(_PIL_FILTERS)}")
    height, width = size
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())  # uint8 [H, W, 3]: RGB
    resized = pil.resize((width, height), resample=_PIL_FILTERS[interpolation])
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).contiguous()


# Nearest-neighbour rules for label masks: "opencv" takes source pixel floor(i * scale) (OpenCV's
# INTER_NEAREST, wsolevaluation's resize); "pil" takes floor((i + 0.5) * scale), the pixel under
# the output pixel's centre (Pillow's NEAREST, what torchvision's Resize does to a PIL mask).
MASK_RESIZE_RULES = ("opencv", "pil")


def resize_mask(mask: torch.Tensor, size: tuple[int, int], rule: str = "opencv") -> torch.Tensor:
    """Nearest-neighbour resize of a uint8 [H, W] label mask to `size` = (height, width) by
    `rule` (`MASK_RESIZE_RULES`); class indices and the ignore value survive unchanged."""
    if rule == "pil":  # Pillow itself, so the pixels are the reference's bit for bit
        resized = Image.fromarray(mask.numpy()).resize((size[1], size[0]), resample=Image.Resampling.NEAREST)
        return torch.from_numpy(np.asarray(resized).copy())
    if rule != "opencv":
        raise ValueError(f"unknown mask resize rule {rule!r}; valid: {', '.join(MASK_RESIZE_RULES)}")
    # OpenCV itself: its INTER_NEAREST source index (float64 scale, its own rounding) is not
    # torch's nearest rule, which picks a neighbouring row or column for some sizes
    import cv2

    return torch.from_numpy(cv2.resize(mask.numpy(), (size[1], size[0]), interpolation=cv2.INTER_NEAREST))


def resize_sample(sample: Sample, size: tuple[int, int], interpolation: str = "bilinear") -> Sample:
    """Squash-resize image, boxes and mask to `size` = (height, width), as the paper's
    `Resize((224, 224))` on a PIL image does (bit for bit). Boxes scale with the image."""
    height, width = size
    w0, h0 = sample.size
    if (h0, w0) == (height, width):
        return sample
    image = resize_image(sample.image, (height, width), interpolation)
    scale = torch.tensor([width / w0, height / h0, width / w0, height / h0])
    mask = sample.mask if sample.mask is None else resize_mask(sample.mask, (height, width), sample.mask_resize)
    return replace(sample, image=image, boxes=sample.boxes * scale, mask=mask)


def resize_center_crop(sample: Sample, size: tuple[int, int], crop_pct: float,
                       interpolation: str = "bilinear") -> Sample:
    """timm's eval transform for a square input: resize the shorter side to
    floor(size / crop_pct) keeping the aspect ratio (the longer side int(short * long /
    short_side), torchvision's truncation; Pillow's resampling, as timm on a PIL image), then
    take the centre `size` crop (torchvision's rounding of the crop offset), so the pixels equal
    timm's transform on the decoded PIL image. Boxes are scaled, shifted and clipped to the
    crop (boxes left with no area are dropped, with a note); the mask follows with nearest
    neighbour. The result's `orig_boxes`/`orig_size` are the cropped image's, so every
    protocol rasterises ground truth in the coordinates the model sees."""
    height, width = size
    if height != width:
        raise SettingError(f"preprocess.resize=timm needs a square input size, got {size}; use squash")
    w0, h0 = sample.size
    short = math.floor(height / crop_pct)
    new_w, new_h = (short, int(short * h0 / w0)) if w0 <= h0 else (int(short * w0 / h0), short)
    image = sample.image if (new_h, new_w) == (h0, w0) else resize_image(sample.image, (new_h, new_w),
                                                                         interpolation)
    top, left = round((new_h - height) / 2.0), round((new_w - width) / 2.0)
    image = image[:, top:top + height, left:left + width]
    factor = torch.tensor([new_w / w0, new_h / h0, new_w / w0, new_h / h0])
    shift = torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = sample.boxes * factor - shift
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    notes = sample.notes
    if not bool(keep.all()):
        notes = (*notes, "box outside the centre crop dropped")
    mask = sample.mask
    if mask is not None:
        mask = resize_mask(mask, (new_h, new_w), sample.mask_resize)[top:top + height, left:left + width]
    return replace(sample, image=image, boxes=boxes[keep], box_labels=sample.box_labels[keep], mask=mask,
                   orig_boxes=boxes[keep].clone(), orig_size=(width, height), notes=notes)


RESIZE_MODES = choices.RESIZE_MODES  # preprocess.resize


def normalize_image(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [3, H, W] -> float32 normalised with the model's mean and std."""
    x = image.float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean_t) / std_t


class EvalTransform:
    """Resize image + ground truth to the model input and normalise the image.

    The one place where a sample enters model space: after it, boxes and masks live in the
    coordinates of the image the model sees, so every metric compares like with like."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear", resize: str = "squash", crop_pct: float = 0.875) -> None:
        if resize not in RESIZE_MODES:
            raise SettingError(f"unknown preprocess.resize {resize!r}; valid: {', '.join(RESIZE_MODES)}")
        if not 0 < crop_pct <= 1:
            raise SettingError(f"preprocess.crop_pct must be in (0, 1], got {crop_pct}")
        self.size = (int(size[0]), int(size[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation
        self.resize, self.crop_pct = resize, float(crop_pct)

    def __call__(self, sample: Sample | SkippedSample) -> Sample | SkippedSample:
        if isinstance(sample, SkippedSample):
            return sample
        if self.resize == "timm":
            sample = resize_center_crop(sample, self.size, self.crop_pct, self.interpolation)
        else:
            sample = resize_sample(sample, self.size, self.interpolation)
        return replace(sample, image=normalize_image(sample.image, self.mean, self.std))

    def __repr__(self) -> str:
        crop = f", crop_pct={self.crop_pct}" if self.resize == "timm" else ""
        return (f"EvalTransform(size={self.size}, mean={self.mean}, std={self.std}, "
                f"interpolation={self.interpolation!r}, resize={self.resize!r}{crop})")


@dataclass(frozen=True)
class SkippedSample:
    """What a dataset returns instead of a `Sample` for an item it cannot use (corrupt or
    unreadable image, no usable annotation). The pipeline records and counts it; it never
    reaches a model or a metric, and it never stops a run."""

    image_id: str
    reason: str


def skipped_summary(reasons: Sequence[str], items: int) -> str:
    """The line that reports skipped items: how many of the `items` a run went through (those
    its dataset's index skipped included, e.g. the images of an annotation file that are not on
    disk), for which reasons (commonest first), and how many are left to use."""
    why = "; ".join(f"{reason}: {count:,}" for reason, count in Counter(reasons).most_common())
    used = max(items - len(reasons), 0)
    return f"skipped {len(reasons):,} of {counted(items, 'item')} ({why}), {used:,} used; see skipped.csv"


@dataclass
class Batch:
    """A collated batch: stacked images and labels, per-image ground truth in lists, and the
    items of this batch that were skipped (with their reasons)."""

    images: torch.Tensor
    labels: torch.Tensor
    samples: list[Sample]
    skipped: list[SkippedSample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)


def collate_samples(items: list[Sample | SkippedSample]) -> Batch:
    """Stack images (they share one size after `EvalTransform`); keep ground truth per image;
    set skipped items aside. A batch may be empty (every item skipped)."""
    samples = [s for s in items if isinstance(s, Sample)]
    skipped = [s for s in items if isinstance(s, SkippedSample)]
    images = torch.stack([s.image for s in samples]) if samples else torch.empty(0, 3, 0, 0)
    labels = torch.tensor([int(s.label) for s in samples], dtype=torch.long)
    return Batch(images=images, labels=labels, samples=samples, skipped=skipped)


def inclusive_to_continuous(boxes) -> np.ndarray:
    """0-based inclusive pixel boxes [x0, y0, x1, y1] (ImageNet, CUB, wsolevaluation metadata)
    -> continuous edges [x0, y0, x1 + 1, y1 + 1], float32 [K, 4]: every loader that reads
    inclusive corners converts here and nowhere else."""
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    out[:, 2:] += 1.0
    return out


def boxes_to_mask(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixels whose centre lies inside any continuous xyxy box; bool [H, W]."""
    height, width = size
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    if len(boxes) == 0:
        return torch.zeros(height, width, dtype=torch.bool)
    b = boxes.float()
    inside_y = (ys[None, :] > b[:, 1:2]) & (ys[None, :] < b[:, 3:4])  # [K, H]
    inside_x = (xs[None, :] > b[:, 0:1]) & (xs[None, :] < b[:, 2:3])  # [K, W]
    return (inside_y[:, :, None] & inside_x[:, None, :]).any(0)


def mask_boxes(masks) -> torch.Tensor:
    """Tight continuous xyxy box [x0, y0, x1 + 1, y1 + 1] of each non-empty binary mask (an
    empty one has no box), float32 [K, 4]."""
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(np.asarray(mask))
        if len(xs):
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)



def file_stamp(path: str | Path) -> str:
    """`size:mtime_ns` of a file, or why it has none: what identifies its content cheaply (a
    file replaced or edited in place gets a new stamp)."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        return f"unreadable:{exc.strerror}"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def index_fingerprint(items: Iterable[tuple[str, Sequence[str | Path], Any]], skipped: Sequence = ()) -> str:
    """sha256 identifying a dataset's data: per item, in order, its id, its annotation (labels,
    boxes, sizes) and the stamp of each file it is read from, then the items the index
    skipped. Swapping two images, replacing one id by another or editing an annotation changes
    it, so cached maps of other data are never used."""
    digest = hashlib.sha256()
    for image_id, files, annotation in items:
        digest.update(repr((image_id, _plain(annotation))).encode("utf-8", "surrogateescape"))
        for path in files:
            digest.update(f"|{os.fsdecode(path)}={file_stamp(path)}".encode("utf-8", "surrogateescape"))
        digest.update(b"\n")
    for item in skipped:
        digest.update(repr((getattr(item, "image_id", item), getattr(item, "reason", ""))).encode(
            "utf-8", "surrogateescape"))
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """Tensors and arrays as nested lists, so an annotation's repr is its content."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
