"""wsolevaluation's boxes, exactly as its own code finds them (docs/protocol.md section 4.2):
OpenCV contours of a uint8 copy of the heatmap.

For one heatmap and threshold t:
1. u = uint8(heatmap * 255) (computed in float64, truncated);
2. binary = u > int(t * max(u)) (cv2.threshold, THRESH_BINARY);
3. contours = cv2.findContours(binary, RETR_TREE, CHAIN_APPROX_SIMPLE): the outer boundary of
   every 8-connected blob AND the boundary of every hole inside one (so MaxBoxAccV2, which uses
   every contour, also scores the boxes of holes);
4. a contour's box is cv2.boundingRect (x, y, w, h) read as [x, y, x + w, y + h]; MaxBoxAcc v1
   takes the contour of largest cv2.contourArea (polygon area, 0 for a one-pixel-wide line),
   the first one in OpenCV's order on ties, as Python's max() does.

The result is a `ThresholdComponents` whose entries are contours (in OpenCV's order) and whose
`area` is the contour area, so `BoxAccuracy.update_components` scores it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsol_bench.errors import MissingLibraryError, SettingError
from wsol_bench.regions.components import ThresholdComponents, heatmaps_as_numpy
from wsol_bench.regions.thresholds import DEFAULT_THRESHOLDS, threshold_array

INSTALL_HINT = ("pip install opencv-python-headless (it comes with wsol-bench; reinstall it), or score "
                "with the float variant: sweep.boxes=components")


def require_cv2():
    """OpenCV, or a MissingLibraryError that names the install command and the alternative."""
    try:
        import cv2
    except ImportError as exc:
        raise MissingLibraryError(f"sweep.boxes=opencv (wsolevaluation's exact boxes) needs OpenCV: "
                                     f"{INSTALL_HINT}") from exc
    return cv2


def uint8_heatmaps(heatmaps: np.ndarray) -> np.ndarray:
    """wsolevaluation's uint8 copy of [B, H, W] heatmaps in [0, 1]: (h * 255) truncated, in float64."""
    if heatmaps.size and (heatmaps.min() < 0 or heatmaps.max() > 1):
        raise SettingError("wsolevaluation's boxes need heatmaps in [0, 1]; normalise them with "
                           "wsol_bench.regions.heatmaps.to_heatmaps")
    return (heatmaps.astype(np.float64) * 255).astype(np.uint8)


def opencv_components(heatmaps, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> ThresholdComponents:
    """Contours of every [B, H, W] heatmap at every threshold, as wsolevaluation computes them."""
    cv2 = require_cv2()
    heat = heatmaps_as_numpy(heatmaps)
    threshold_array(thresholds, np.float64)  # names a bad grid
    values = [float(t) for t in thresholds]
    scoremaps = uint8_heatmaps(heat)
    columns: list[list] = [[], [], [], []]  # image, level, box, area
    for b, scoremap in enumerate(scoremaps):
        peak = int(scoremap.max())
        present = np.unique(scoremap)
        found: dict[int, list[tuple[list[int], float]]] = {}
        for level, t in enumerate(values):
            cut = int(t * peak)
            # Two cuts with no pixel value between them give the same binary map and contours.
            key = int(np.searchsorted(present, cut, side="right"))
            if key not in found:
                binary = np.where(scoremap > cut, np.uint8(255), np.uint8(0))
                contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
                found[key] = [(_bounding_box(cv2, c), float(cv2.contourArea(c))) for c in contours]
            for box, area in found[key]:
                columns[0].append(b)
                columns[1].append(level)
                columns[2].append(box)
                columns[3].append(area)
    image, level, boxes, area = columns
    return ThresholdComponents(
        thresholds=tuple(values), size=(heat.shape[1], heat.shape[2]), num_images=len(heat),
        image=np.asarray(image, dtype=np.int64), level=np.asarray(level, dtype=np.int64),
        boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 4), area=np.asarray(area, dtype=np.float64),
        source="opencv")


def _bounding_box(cv2, contour) -> list[int]:
    x, y, w, h = cv2.boundingRect(contour)
    return [x, y, x + w, y + h]
