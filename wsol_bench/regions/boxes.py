"""Binary maps -> boxes -> box-union masks, and ground-truth boxes -> masks.

Boxes are float xyxy with continuous pixel edges: a component spanning pixel columns
x0..x1 (inclusive) has the box [x0, y0, x1 + 1, y1 + 1].

Rasterisation protocols (how boxes become pixel masks):
- "agcam": the AG-CAM reference. Predicted boxes (cv2 x, y, w, h) are filled up to x+w and
  y+h INCLUSIVE, one pixel beyond the component on the right and bottom (clipped at the
  image edge). Ground-truth boxes are the dataset's integer inclusive boxes, scaled to the
  evaluation size as the reference's dataset code does, int(v / orig * size) (division
  first, then truncation), filled inclusively.
- "exact": a cleaner variant. Predicted boxes cover exactly their component's bounding
  rectangle; a ground-truth pixel belongs to a box when its centre lies inside the box scaled
  to the evaluation size.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from skimage.measure import label as label_components

from wsol_bench.datasets.base import boxes_to_mask

PROTOCOLS = ("agcam", "exact")


def components_to_boxes(binary: torch.Tensor | np.ndarray, largest_only: bool = False) -> torch.Tensor:
    """One box per 8-connected component of a [H, W] binary map, float xyxy [K, 4] (K may be 0).
    With `largest_only`, only the component with the most pixels."""
    array = np.asarray(binary.cpu() if isinstance(binary, torch.Tensor) else binary, dtype=bool)
    labels, count = label_components(array, connectivity=2, return_num=True)
    if count == 0:
        return torch.zeros(0, 4)
    slices = ndimage.find_objects(labels)
    if largest_only:
        sizes = np.bincount(labels.ravel())[1:]
        slices = [slices[int(np.argmax(sizes))]]
    boxes = [[sx.start, sy.start, sx.stop, sy.stop] for sy, sx in slices]
    return torch.tensor(boxes, dtype=torch.float32)


def predicted_box_mask(boxes: torch.Tensor, size: tuple[int, int], protocol: str = "agcam") -> torch.Tensor:
    """Union of predicted boxes as a bool [H, W] mask under `protocol`."""
    _check_protocol(protocol)
    height, width = size
    mask = np.zeros((height, width), dtype=bool)  # numpy: slice fills cost microseconds
    extra = 1 if protocol == "agcam" else 0  # the reference fills x..x+w inclusive
    for x0, y0, x1, y1 in np.rint(boxes.detach().cpu().numpy()).astype(np.int64).tolist():
        mask[max(y0, 0):min(y1 + extra, height), max(x0, 0):min(x1 + extra, width)] = True
    return torch.from_numpy(mask)


def ground_truth_box_mask(orig_boxes: torch.Tensor, orig_size: tuple[int, int], size: tuple[int, int],
                          protocol: str = "agcam") -> torch.Tensor:
    """Union of ground-truth boxes (given in the on-disk image's coordinates, `orig_size` =
    (width, height)) as a bool [H, W] mask at the evaluation `size` = (H, W)."""
    _check_protocol(protocol)
    height, width = size
    orig_w, orig_h = orig_size
    if protocol == "exact":
        scale = torch.tensor([width / orig_w, height / orig_h] * 2)
        return boxes_to_mask(orig_boxes.float() * scale, size)
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in orig_boxes.double().tolist():
        # Integer inclusive corners (x1 - 1: our boxes have continuous edges), scaled as the
        # reference does: int(v / orig * size), division first. The order matters: float
        # rounding can land just under an integer (244 / 448 * 224 = 121.999...), and the
        # reference truncates that to 121 where int(244 * 224 / 448) gives 122.
        c0, r0 = agcam_scale(x0, orig_w, width), agcam_scale(y0, orig_h, height)
        c1, r1 = agcam_scale(x1 - 1, orig_w, width), agcam_scale(y1 - 1, orig_h, height)
        mask[max(r0, 0):min(r1 + 1, height), max(c0, 0):min(c1 + 1, width)] = True
    return torch.from_numpy(mask)


def agcam_scale(value: float, orig: int, size: int) -> int:
    """One ground-truth coordinate rescaled as the AG-CAM reference's dataset code does:
    int(value / orig * size), in float64, division first."""
    return int(float(value) / float(orig) * float(size))


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown box protocol {protocol!r}; valid: {PROTOCOLS}")
