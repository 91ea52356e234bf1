"""Boxes <-> pixel masks, with every rasterisation convention in this one module
(docs/protocol.md 3, 4.1, 4.2).

Boxes inside the suite are float xyxy with continuous pixel edges: a region over pixel
columns x0..x1 (inclusive) has the box [x0, y0, x1 + 1, y1 + 1]. The references rasterise
in their own integer conventions:
- "agcam" (the AG-CAM reference): a predicted box (cv2 x, y, w, h) is filled up to x + w and
  y + h INCLUSIVE, one pixel beyond the region on the right and bottom (clipped at the image
  edge). Ground-truth boxes are the dataset's integer inclusive boxes scaled to the
  evaluation size with int(v / orig * size) (division first, then truncation), filled
  inclusively.
- "exact" (a cleaner variant): predicted boxes cover exactly their region's bounding
  rectangle; a ground-truth pixel belongs to a box when its centre lies inside the box scaled
  to the evaluation size.
- wsolevaluation's box accuracy compares inclusive integer boxes: ground truth scaled with
  int(v * size / orig) (multiplication first, as its resize_bbox), predictions
  [x, y, x + w, y + h] clipped to (W - 1, H - 1).
"""

from __future__ import annotations

import numpy as np
import torch

from wsol_bench.choices import BOX_PROTOCOLS
from wsol_bench.datasets.base import Sample, boxes_to_mask
from wsol_bench.errors import SettingError
from wsol_bench.regions.components import ThresholdComponents

PROTOCOLS = BOX_PROTOCOLS  # metric.box_protocol
# How far a predicted box is filled beyond its continuous right/bottom edge, per protocol.
_FILL_BEYOND = {"agcam": 1, "exact": 0}


def check_protocol(protocol: str) -> str:
    """`protocol` if it is a known rasterisation protocol, else a SettingError naming the valid ones."""
    if protocol not in PROTOCOLS:
        raise SettingError(f"unknown box protocol {protocol!r} (metric.box_protocol); valid: "
                           f"{', '.join(PROTOCOLS)}")
    return protocol


def coverage_levels(components: ThresholdComponents, protocol: str = "agcam") -> np.ndarray:
    """[B, H, W] unsigned ints: 1 + the highest threshold index whose predicted box-union covers
    the pixel (0: never covered). The union at threshold index i is exactly `coverage > i`."""
    height, width = components.size
    levels = len(components.thresholds)
    # the smallest type that holds T: painting is memory-bound, and low thresholds paint big boxes
    dtype = np.uint8 if levels < 255 else np.uint16 if levels < 65535 else np.int64
    cover = np.zeros((components.num_images, height, width), dtype=dtype)
    extra = _FILL_BEYOND[check_protocol(protocol)]
    bounds = np.searchsorted(components.image, np.arange(components.num_images + 1)).tolist()
    values = (components.level + 1).tolist()
    boxes = (components.boxes + np.array([0, 0, extra, extra])).tolist()
    for b in range(components.num_images):
        view = cover[b]
        # components are sorted by level within an image: later, higher levels overwrite
        for value, (x0, y0, x1, y1) in zip(values[bounds[b]:bounds[b + 1]], boxes[bounds[b]:bounds[b + 1]]):
            view[y0:y1, x0:x1] = value
    return cover


def union_masks(regions: ThresholdComponents, level: int, protocol: str = "agcam") -> torch.Tensor:
    """The predicted box-union masks at threshold index `level`, bool [B, H, W]."""
    return torch.from_numpy(coverage_levels(regions, protocol) > level)


def ground_truth_box_mask(orig_boxes: torch.Tensor, orig_size: tuple[int, int], size: tuple[int, int],
                          protocol: str = "agcam") -> torch.Tensor:
    """Union of ground-truth boxes (given in the on-disk image's coordinates, `orig_size` =
    (width, height)) as a bool [H, W] mask at the evaluation `size` = (H, W)."""
    check_protocol(protocol)
    height, width = size
    orig_w, orig_h = orig_size
    if protocol == "exact":
        scale = torch.tensor([width / orig_w, height / orig_h] * 2)
        return boxes_to_mask(orig_boxes.float() * scale, size)
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in inclusive_corners(orig_boxes):
        # Scaled as the reference does: int(v / orig * size), division first. The order
        # matters: float rounding can land just under an integer (244 / 448 * 224 =
        # 121.999...), and the reference truncates that to 121 where int(244 * 224 / 448) is 122.
        c0, r0 = agcam_scale(x0, orig_w, width), agcam_scale(y0, orig_h, height)
        c1, r1 = agcam_scale(x1, orig_w, width), agcam_scale(y1, orig_h, height)
        mask[max(r0, 0):min(r1 + 1, height), max(c0, 0):min(c1 + 1, width)] = True
    return torch.from_numpy(mask)


def agcam_scale(value: float, orig: int, size: int) -> int:
    """One ground-truth coordinate rescaled as the AG-CAM reference's dataset code does:
    int(value / orig * size), in float64, division first."""
    return int(float(value) / float(orig) * float(size))


def inclusive_corners(boxes: torch.Tensor) -> list[list[float]]:
    """Continuous xyxy boxes -> the integer inclusive corners [x0, y0, x1 - 1, y1 - 1] the
    references scale, as float64 Python numbers."""
    return [[x0, y0, x1 - 1, y1 - 1] for x0, y0, x1, y1 in boxes.double().tolist()]


def wsoleval_scale(value: float, orig: int, size: int) -> int:
    """One ground-truth coordinate rescaled as wsolevaluation's resize_bbox does:
    int(value * size / orig), in float64, multiplication first."""
    return int(float(value) * float(size) / float(orig))


def wsoleval_gt_boxes(sample: Sample, size: tuple[int, int]) -> torch.Tensor:
    """Ground-truth boxes of the sample's label class as inclusive integers at the evaluation
    `size` = (H, W), int64 [K, 4], rescaled from the on-disk image as wsolevaluation does."""
    height, width = size
    orig_w, orig_h = sample.orig_size
    own = sample.orig_boxes[sample.box_labels == sample.label]
    boxes = [[wsoleval_scale(x0, orig_w, width), wsoleval_scale(y0, orig_h, height),
              wsoleval_scale(x1, orig_w, width), wsoleval_scale(y1, orig_h, height)]
             for x0, y0, x1, y1 in inclusive_corners(own)]
    return torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4)
