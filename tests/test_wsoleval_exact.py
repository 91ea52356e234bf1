"""wsolevaluation's box metrics with its own OpenCV semantics (docs/protocol.md 4.2), checked
against a re-computation written here from the published procedure, and hand cases where the
float variant (boxes="components") gives other numbers: holes, thin lines, the uint8 threshold."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from wsol_bench.metrics.box_accuracy import BoxAccuracy
from wsol_bench.regions.contours import opencv_components, require_cv2
from wsol_bench.regions.heatmaps import to_heatmaps

cv2 = pytest.importorskip("cv2")
IOUS = (30, 50, 70)


def published_box_accuracy(heatmaps: np.ndarray, gt_boxes: list[list[list[int]]], thresholds,
                           all_contours: bool) -> dict[int, np.ndarray]:
    """wsolevaluation's BoxEvaluator, step by step: percent correct per IoU delta and threshold.

    Per image and threshold t: the uint8 scoremap (h * 255 truncated), cv2.threshold at
    int(t * its max), cv2.findContours (tree, simple chains); no contour -> box [0, 0, 0, 0];
    otherwise every contour (v2) or the first of largest cv2.contourArea (v1), each box
    [x, y, x + w, y + h] clipped to (W - 1, H - 1); the image's IoU at t is the best over
    predicted x GT boxes with inclusive areas; correct when IoU >= delta / 100."""
    correct = {d: np.zeros(len(thresholds)) for d in IOUS}
    for heat, gts in zip(heatmaps, gt_boxes):
        height, width = heat.shape
        scoremap = np.expand_dims((heat.astype(np.float64) * 255).astype(np.uint8), 2)
        best = []
        for t in thresholds:
            _, binary = cv2.threshold(scoremap, int(t * np.max(scoremap)), 255, cv2.THRESH_BINARY)
            contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
            if len(contours) == 0:
                boxes = [[0, 0, 0, 0]]
            else:
                if not all_contours:
                    contours = [max(contours, key=cv2.contourArea)]
                boxes = []
                for contour in contours:
                    x, y, w, h = cv2.boundingRect(contour)
                    boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
            best.append(max(_inclusive_iou(b, g) for b in boxes for g in gts))
        for delta in IOUS:
            correct[delta][np.asarray(best) >= delta / 100] += 1
    return {d: c * 100.0 / len(heatmaps) for d, c in correct.items()}


def _inclusive_iou(a: list[int], b: list[int]) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return 0.0 if union <= 0 else inter / union


def _shapes() -> torch.Tensor:
    """Maps with holes, touching blobs, several blobs, thin lines, a constant and a ramp."""
    heat = torch.zeros(6, 32, 40)
    heat[0, 4:28, 6:30] = 1.0  # a ring: square with a square hole, and a blob inside the hole
    heat[0, 10:22, 12:24] = 0.0
    heat[0, 14:18, 16:20] = 0.7
    heat[1, 2:8, 2:8] = 0.9  # two blobs touching at one corner (8-connected: one blob)
    heat[1, 8:14, 8:14] = 0.6
    heat[1, 20:30, 25:38] = 0.8  # and a third, apart
    heat[2, 5, 2:38] = 1.0  # a one-pixel line (contour area 0, 36 pixels) and a 5x5 square
    heat[2, 15:20, 15:20] = 0.95
    heat[3] = torch.linspace(0, 1, 40)[None, :].expand(32, 40)  # a ramp: every level present
    heat[4, 0:32, 0:5] = 0.5  # blobs touching the border
    heat[4, 28:32, 30:40] = 1.0
    heat[4, 10:12, 10:30] = 0.25
    # heat[5] stays all zero: no contour at any threshold
    return heat


def _gt() -> list[list[list[int]]]:
    return [[[12, 10, 23, 21]],  # the hole of the ring
            [[2, 2, 13, 13], [25, 20, 37, 29]],
            [[15, 15, 19, 19]],
            [[20, 0, 39, 31]],
            [[0, 0, 4, 31], [30, 28, 39, 31]],
            [[3, 3, 9, 9]]]


def _ours(heat: torch.Tensor, gt, thresholds, boxes: str = "opencv") -> dict:
    metric = BoxAccuracy(thresholds, IOUS, boxes=boxes)
    metric.update(heat, [torch.tensor(g) for g in gt], torch.ones(len(gt), dtype=torch.bool))
    return metric.compute()


def assert_equals_published(heat: torch.Tensor, gt, thresholds) -> dict:
    """Every accuracy curve, MaxBoxAcc and MaxBoxAccV2 equal the published procedure's exactly."""
    ours = _ours(heat, gt, thresholds)
    v1 = published_box_accuracy(heat.numpy(), gt, thresholds, all_contours=False)
    v2 = published_box_accuracy(heat.numpy(), gt, thresholds, all_contours=True)
    for delta in IOUS:
        np.testing.assert_array_equal(ours["curves"]["v1"][delta], v1[delta])
        np.testing.assert_array_equal(ours["curves"]["v2"][delta], v2[delta])
    assert ours["maxboxacc"] == v1[50].max()
    assert ours["maxboxacc_v2"] == pytest.approx(np.mean([v2[d].max() for d in IOUS]))
    return ours


@pytest.mark.parametrize("thresholds", [tuple(np.arange(0, 1, 0.01).tolist()), (0.1, 0.35, 0.5, 0.72, 0.9)])
def test_equals_the_published_procedure_on_shapes(thresholds):
    assert_equals_published(_shapes(), _gt(), thresholds)


def test_equals_the_published_procedure_on_smooth_random_maps():
    """300 maps from random 14 x 14 grids, upsampled and normalised as the suite does."""
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(300, 14, 14, generator=generator) ** 3  # peaky, several blobs per map
    heat, _ = to_heatmaps(raw, (224, 224))
    rng = np.random.default_rng(1)
    gt = []
    for _ in range(len(heat)):
        boxes = []
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.integers(0, 180, 2)
            boxes.append([int(x0), int(y0), int(x0 + rng.integers(10, 44)), int(y0 + rng.integers(10, 44))])
        gt.append(boxes)
    thresholds = tuple(np.arange(0, 1, 0.01).tolist())
    ours = assert_equals_published(heat, gt, thresholds)
    # the float variant is a different metric on the same maps
    float_variant = _ours(heat, gt, thresholds, boxes="components")
    assert any(float_variant["curves"]["v2"][d] != ours["curves"]["v2"][d] for d in IOUS)


def test_hole_boxes_count_for_v2():
    """A ring whose hole is the GT box: OpenCV's tree of contours boxes the hole (v2 correct);
    the float variant has only the ring's box (IoU 144 / 625 < 0.3)."""
    heat = torch.zeros(1, 32, 40)
    heat[0, 4:29, 6:31] = 1.0
    heat[0, 10:22, 12:24] = 0.0  # hole: rows 10..21, columns 12..23
    gt = [[[12, 10, 23, 21]]]
    ours = _ours(heat, gt, (0.5,))
    assert ours["maxboxacc_v2_per_iou"] == {30: 100.0, 50: 100.0, 70: 0.0}  # hole contour box 11..24 x 9..22
    assert ours["maxboxacc"] == 0.0  # v1: the outer contour is the largest
    components = _ours(heat, gt, (0.5,), boxes="components")
    assert components["maxboxacc_v2_per_iou"] == {30: 0.0, 50: 0.0, 70: 0.0}


def test_v1_takes_the_largest_contour_area_not_the_most_pixels():
    """A one-pixel-wide line (36 pixels, contour area 0) and a 5 x 5 square (25 pixels, area
    16): OpenCV's v1 takes the square, the float variant the line."""
    heat = torch.zeros(1, 32, 40)
    heat[0, 5, 2:38] = 1.0
    heat[0, 15:20, 15:20] = 1.0
    square, line = [[15, 15, 19, 19]], [[2, 5, 38, 6]]
    assert _ours(heat, [square], (0.5,))["maxboxacc"] == 100.0  # box [15, 15, 20, 20]: IoU 25/36
    assert _ours(heat, [line], (0.5,))["maxboxacc"] == 0.0
    assert _ours(heat, [line], (0.5,), boxes="components")["maxboxacc"] == 100.0
    assert _ours(heat, [square], (0.5,), boxes="components")["maxboxacc"] == 0.0


def test_threshold_applies_to_the_uint8_copy_scaled_by_its_max():
    """0.5015 * 255 = 127.9 -> 127, which is not above int(0.5 * 255) = 127: off in OpenCV's
    semantics, on in the float variant (0.5015 > 0.5). And the cut scales with the map's max:
    a map peaking at 0.6 (153) is cut at int(0.5 * 153) = 76 at t = 0.5."""
    heat = torch.zeros(1, 20, 20)
    heat[0, 0:2, 0:2] = 1.0
    heat[0, 10:20, 10:20] = 0.5015
    comps = opencv_components(heat, (0.5,))
    assert comps.boxes.tolist() == [[0, 0, 2, 2]]
    floats = BoxAccuracy((0.5,), boxes="components").regions(heat)
    assert sorted(floats.boxes.tolist()) == [[0, 0, 2, 2], [10, 10, 20, 20]]
    low = torch.zeros(1, 20, 20)
    low[0, 0:2, 0:2] = 0.6
    low[0, 10:20, 10:20] = 0.3  # 76.5 -> 76: not above 76; 0.31 -> 79 is
    assert opencv_components(low, (0.5,)).boxes.tolist() == [[0, 0, 2, 2]]
    low[0, 10:20, 10:20] = 0.31
    assert len(opencv_components(low, (0.5,)).boxes) == 2


def test_shared_contours_across_equal_cuts_and_batches():
    """Batched equals one map at a time; equal binary maps at neighbouring thresholds give the
    same boxes (contours are cached per distinct cut)."""
    heat = _shapes()
    thresholds = tuple(np.arange(0, 1, 0.01).tolist())
    batched = opencv_components(heat, thresholds)
    for b in range(len(heat)):
        single = opencv_components(heat[b:b + 1], thresholds)
        keep = batched.image == b
        assert batched.boxes[keep].tolist() == single.boxes.tolist()
        assert batched.level[keep].tolist() == single.level.tolist()
    assert batched.counts()[5].tolist() == [0] * len(thresholds)  # the all-zero map


def test_refuses_heatmaps_outside_unit_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        opencv_components(torch.full((1, 4, 4), 1.5), (0.5,))


def test_missing_opencv_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match="pip install opencv-python-headless.*sweep.boxes=components"):
        require_cv2()


def test_regions_of_the_other_source_are_refused():
    heat = _shapes()[:2]
    gt = [torch.tensor(g) for g in _gt()[:2]]
    floats = BoxAccuracy((0.5,), boxes="components").regions(heat)
    with pytest.raises(ValueError, match="boxes='opencv'"):
        BoxAccuracy((0.5,)).update(floats, gt, torch.ones(2, dtype=torch.bool))
