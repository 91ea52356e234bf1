"""Hand-computed checks of docs/protocol.md section 3: map -> heatmap -> binary map -> boxes -> masks.

Every expected value below is written out by hand (with the arithmetic in a comment), never
recomputed by the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsol_bench.regions.components import ThresholdComponents
from wsol_bench.regions.engine import find_regions
from wsol_bench.regions.heatmaps import binarize, to_heatmaps
from wsol_bench.regions.rasterize import agcam_scale, ground_truth_box_mask, union_masks


def _mask(rows: list[str]) -> torch.Tensor:
    """A bool [H, W] tensor from strings of '0'/'1', one string per row."""
    return torch.tensor([[c == "1" for c in r] for r in rows], dtype=torch.bool)


def _sorted_rows(boxes: torch.Tensor) -> list[list[float]]:
    return sorted(boxes.tolist())


# A 3x3 map with a single peak in the centre. Upsampled x2 (3x3 -> 6x6) with
# align_corners=False, output index i samples source coordinate (i + 0.5) / 2 - 0.5 =
# -0.25, 0.25, 0.75, 1.25, 1.75, 2.25 (clamped at the borders), so the weight of the centre
# source pixel along one axis is u = [0, .25, .75, .75, .25, 0]. The upsampled map is
# 4 * u_i * u_j, whose max is 4 * .75 * .75 = 2.25 (the peak value 4 is never reproduced).
# Upsample THEN normalise: heat = u_i u_j / .5625 = v_i v_j with v = [0, 1/3, 1, 1, 1/3, 0].
# Normalise THEN upsample would give a max of only .5625.
PEAK_MAP = torch.tensor([[0.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
_V = torch.tensor([0.0, 1 / 3, 1.0, 1.0, 1 / 3, 0.0])
PEAK_HEAT = _V[:, None] * _V[None, :]


def test_to_heatmaps_upsamples_before_normalising():
    """A 3x3 centre peak upsampled to 6x6 is normalised AFTER interpolation (max exactly 1)."""
    heat, degenerate = to_heatmaps(PEAK_MAP[None], (6, 6))
    assert heat.shape == (1, 6, 6)
    assert heat.dtype == torch.float32
    assert degenerate.dtype == torch.bool
    assert degenerate.tolist() == [False]
    torch.testing.assert_close(heat[0], PEAK_HEAT, rtol=0, atol=1e-6)
    assert heat.min().item() == 0.0
    assert heat.max().item() == 1.0
    # The wrong order (normalise, then upsample) would peak at .5625, not 1.
    wrong = F.interpolate((PEAK_MAP / 4.0)[None, None], size=(6, 6), mode="bilinear",
                          align_corners=False)[0, 0]
    assert wrong.max().item() == pytest.approx(0.5625)


def test_to_heatmaps_matches_interpolate_then_minmax():
    """The heatmap equals F.interpolate(bilinear, align_corners=False) followed by min-max."""
    maps = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 0.0]],
                         [[1.0, -2.0, 0.5], [3.0, 0.0, 2.0], [-1.0, 1.5, 0.25]]])
    heat, degenerate = to_heatmaps(maps, (7, 5))
    up = F.interpolate(maps[:, None], size=(7, 5), mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(heat, (up - lo) / (hi - lo), rtol=0, atol=1e-6)
    assert heat.shape == (2, 7, 5)  # size is (H, W)
    assert degenerate.tolist() == [False, False]
    for b in range(2):
        assert heat[b].min().item() == 0.0
        assert heat[b].max().item() == 1.0


def test_to_heatmaps_bilinear_values_2x2_to_4x4():
    """A 2x2 ramp [[0,4],[8,12]] upsampled to 4x4 has the hand-computed bilinear values / 12."""
    # Weights along each axis for the second source pixel: r = [0, .25, .75, 1]; the
    # upsampled value is 8 * r_row + 4 * r_col, range 0..12, then divided by 12.
    maps = torch.tensor([[[0.0, 4.0], [8.0, 12.0]]])
    heat, degenerate = to_heatmaps(maps, (4, 4))
    expected = torch.tensor([[0.0, 1.0, 3.0, 4.0],
                             [2.0, 3.0, 5.0, 6.0],
                             [6.0, 7.0, 9.0, 10.0],
                             [8.0, 9.0, 11.0, 12.0]]) / 12.0
    torch.testing.assert_close(heat[0], expected, rtol=0, atol=1e-6)
    assert degenerate.tolist() == [False]


def test_to_heatmaps_degenerate_maps_are_zero_and_do_not_affect_neighbours():
    """Constant, NaN, +inf and -inf maps are flagged and all zero; a good map beside them is intact."""
    nan_map = PEAK_MAP.clone()
    nan_map[0, 1] = float("nan")
    inf_map = PEAK_MAP.clone()
    inf_map[2, 2] = float("inf")
    ninf_map = PEAK_MAP.clone()
    ninf_map[1, 0] = float("-inf")
    constant = torch.full((3, 3), 0.3)
    maps = torch.stack([constant, PEAK_MAP, nan_map, inf_map, ninf_map])
    heat, degenerate = to_heatmaps(maps, (6, 6))
    assert degenerate.tolist() == [True, False, True, True, True]
    assert not torch.isnan(heat).any()
    assert torch.isfinite(heat).all()
    for b in (0, 2, 3, 4):
        assert torch.equal(heat[b], torch.zeros(6, 6))
    torch.testing.assert_close(heat[1], PEAK_HEAT, rtol=0, atol=1e-6)
    assert heat[1].max().item() == 1.0


def test_to_heatmaps_constant_maps_of_awkward_values_are_degenerate():
    """Constant maps whose value is not exact in binary (0.1, 1/3, -0.37) stay degenerate at 224."""
    maps = torch.stack([torch.full((14, 14), v) for v in (0.1, 1 / 3, -0.37, 0.0)])
    heat, degenerate = to_heatmaps(maps, (224, 224))
    assert degenerate.tolist() == [True, True, True, True]
    assert torch.equal(heat, torch.zeros(4, 224, 224))


def test_binarize_is_strictly_greater_than_threshold():
    """A pixel exactly equal to the threshold is off; only strictly greater pixels are on."""
    heat = torch.tensor([[0.5, 0.51, 0.49, 1.0],
                         [0.0, 0.5, 0.75, 0.25]])
    assert binarize(heat, 0.5).tolist() == [[False, True, False, True],
                                            [False, False, True, False]]
    # Threshold 0: zero pixels are off. Threshold 1: even the maximum (1.0) is off.
    assert binarize(heat, 0.0).tolist() == [[True, True, True, True],
                                            [False, True, True, True]]
    assert not binarize(heat, 1.0).any()
    assert binarize(heat, 0.5).dtype == torch.bool


def regions_of(binary) -> ThresholdComponents:
    """The region engine's components of one bool [H, W] map (as a 0/1 heatmap cut at 0.5)."""
    heat = torch.as_tensor(np.asarray(binary), dtype=torch.float32)[None]
    return find_regions(heat, [0.5])


def boxes_of(binary, largest_only: bool = False) -> torch.Tensor:
    regions = regions_of(binary)
    if largest_only:
        keep = regions.largest()
        return torch.from_numpy(regions.boxes[keep]).float().reshape(-1, 4)
    return regions.boxes_at(0, 0)


def test_components_single_component_continuous_edges():
    """A component over columns 1..2 of row 3 gives the float xyxy box [1, 3, 3, 4]."""
    binary = torch.zeros(6, 6, dtype=torch.bool)
    binary[3, 1] = binary[3, 2] = True
    boxes = boxes_of(binary)
    assert boxes.dtype == torch.float32
    assert boxes.shape == (1, 4)
    assert boxes.tolist() == [[1.0, 3.0, 3.0, 4.0]]
    assert regions_of(binary).area.tolist() == [2]


def test_components_diagonal_pixels_are_one_component():
    """Two pixels touching only at a corner are one 8-connected component."""
    binary = np.zeros((4, 4), dtype=bool)
    binary[0, 0] = binary[1, 1] = True
    assert boxes_of(binary).tolist() == [[0.0, 0.0, 2.0, 2.0]]
    # The anti-diagonal too: (row 2, col 3) and (row 3, col 2).
    binary = np.zeros((4, 4), dtype=bool)
    binary[2, 3] = binary[3, 2] = True
    assert boxes_of(torch.from_numpy(binary)).tolist() == [[2.0, 2.0, 4.0, 4.0]]


def test_components_empty_map_gives_no_boxes():
    """An all-False map yields a float tensor of shape [0, 4], also for the largest."""
    empty = torch.zeros(5, 5, dtype=torch.bool)
    for largest_only in (False, True):
        boxes = boxes_of(empty, largest_only=largest_only)
        assert boxes.shape == (0, 4)
        assert boxes.dtype == torch.float32


def test_components_several_components():
    """Three separate components give three boxes (compared as a sorted set)."""
    binary = _mask(["001101",   # C: rows 0..1, cols 2..3; A: (0, 5)
                    "001100",
                    "100000",   # B: L-shape (2,0) (3,0) (4,0) (4,1) (4,2)
                    "100000",
                    "111000",
                    "000000"])
    boxes = boxes_of(binary)
    assert boxes.shape == (3, 4)
    assert _sorted_rows(boxes) == [[0.0, 2.0, 3.0, 5.0],   # B
                                   [2.0, 0.0, 4.0, 2.0],   # C
                                   [5.0, 0.0, 6.0, 1.0]]   # A


def test_components_largest_counts_pixels():
    """The largest component is the one with most PIXELS, not the largest box."""
    binary = _mask(["000100",   # X: diagonal (0,3) (1,4) (2,5): 3 pixels, box area 9
                    "000010",
                    "000001",
                    "000000",
                    "110000",   # Y: 2x2 block rows 4..5, cols 0..1: 4 pixels, box area 4
                    "110000"])
    assert _sorted_rows(boxes_of(binary)) == [[0.0, 4.0, 2.0, 6.0], [3.0, 0.0, 6.0, 3.0]]
    assert boxes_of(binary, largest_only=True).tolist() == [[0.0, 4.0, 2.0, 6.0]]


# Two components on a (H=5, W=6) image: row 1, cols 1..2 (box [1,1,3,2], cv2 rect x=1, y=1,
# w=2, h=1), and rows 3..4, cols 4..5 (box [4,3,6,5]), touching the right/bottom border.
PRED_BINARY = _mask(["000000",
                     "011000",
                     "000000",
                     "000011",
                     "000011"])


def test_union_mask_agcam_fills_one_extra_pixel_clipped():
    """agcam fills columns x..x+w and rows y..y+h inclusive, clipped at the image border."""
    mask = union_masks(regions_of(PRED_BINARY), 0, "agcam")[0]
    expected = _mask(["000000",
                      "011100",    # cols 1..3 (x=1 .. x+w=3), rows 1..2 (y=1 .. y+h=2)
                      "011100",
                      "000011",    # cols 4..5, rows 3..4: the extra pixel falls off the image
                      "000011"])
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_union_mask_exact_fills_exactly_the_box():
    """exact fills exactly the component's bounding rectangle."""
    mask = union_masks(regions_of(PRED_BINARY), 0, "exact")[0]
    assert torch.equal(mask, PRED_BINARY)


def test_union_mask_default_protocol_is_agcam_and_empty_maps():
    """The default protocol is agcam; no regions give an all-False mask."""
    assert torch.equal(union_masks(regions_of(PRED_BINARY), 0), union_masks(regions_of(PRED_BINARY), 0, "agcam"))
    for protocol in ("agcam", "exact"):
        mask = union_masks(regions_of(torch.zeros(3, 4, dtype=torch.bool)), 0, protocol)[0]
        assert mask.shape == (3, 4)
        assert not mask.any()


def test_union_mask_single_pixel_component():
    """A 1-pixel component at (row 0, col 0) covers 2x2 under agcam and 1x1 under exact."""
    binary = _mask(["100", "000", "000"])
    assert torch.equal(union_masks(regions_of(binary), 0, "agcam")[0], _mask(["110", "110", "000"]))
    assert torch.equal(union_masks(regions_of(binary), 0, "exact")[0], _mask(["100", "000", "000"]))


def test_box_masks_reject_unknown_protocol():
    """An unknown protocol raises ValueError in both rasterisers, even with no boxes."""
    with pytest.raises(ValueError, match="metric.box_protocol"):
        union_masks(regions_of(PRED_BINARY), 0, "cv2")
    with pytest.raises(ValueError):
        union_masks(regions_of(torch.zeros(5, 6, dtype=torch.bool)), 0, "AGCAM")
    with pytest.raises(ValueError):
        ground_truth_box_mask(torch.tensor([[1.0, 1.0, 3.0, 2.0]]), (6, 5), (5, 6), "wsolevaluation")


def test_ground_truth_box_mask_agcam_truncates_scaled_inclusive_box():
    """agcam: integer inclusive box (x1 - 1), scaled with int(v / orig * size), filled inclusively."""
    # Original image W=10, H=5; evaluation size H=4, W=8 (both axes scale by 0.8).
    # Box [3, 1, 8, 4] continuous = inclusive columns 3..7, rows 1..3.
    #   c0 = int(3 / 10 * 8) = int(2.4) = 2      c1 = int(7 / 10 * 8) = int(5.6) = 5
    #   r0 = int(1 / 5 * 4)  = int(0.8) = 0      r1 = int(3 / 5 * 4)  = int(2.4) = 2
    # -> rows 0..2, columns 2..5. (Rounding would give rows 1..2, cols 2..6; using x1 without
    # the -1 would give cols 2..6 and rows 0..2.)
    mask = ground_truth_box_mask(torch.tensor([[3.0, 1.0, 8.0, 4.0]]), (10, 5), (4, 8), "agcam")
    expected = _mask(["00111100",
                      "00111100",
                      "00111100",
                      "00000000"])
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_ground_truth_box_mask_agcam_divides_before_multiplying():
    """agcam scales as the reference's dataset code, int(v / orig * size): 244 / 448 * 224 is
    121.99999999999999 in float64, so column 121, where int(244 * 224 / 448) would give 122."""
    # Original W=448, H=4 -> evaluation H=4, W=224. Box [244, 0, 245, 4] = inclusive column 244,
    # rows 0..3: c0 = c1 = int(244 / 448 * 224) = 121. Rows: int(v / 4 * 4) = v.
    mask = ground_truth_box_mask(torch.tensor([[244.0, 0.0, 245.0, 4.0]]), (448, 4), (4, 224), "agcam")
    expected = torch.zeros(4, 224, dtype=torch.bool)
    expected[:, 121] = True
    assert torch.equal(mask, expected)
    assert agcam_scale(244, 448, 224) == 121 and int(244 * 224 / 448) == 122


def test_agcam_scale_on_the_real_imagenet_val_boxes(shared_data):
    """Over all 80,477 real ImageNet val boxes, division first differs from multiplication first
    in exactly five coordinates of four images (the reference's order is division first), and
    the masks of those images follow it."""
    from wsol_bench.datasets.base import inclusive_to_continuous
    from wsol_bench.datasets.imagenet_annotations import read_wsol_metadata

    annotations, problems = read_wsol_metadata(shared_data / "wsolevaluation-metadata" / "ILSVRC" / "test")
    assert problems == []
    changed = {}
    for key, ann in annotations.items():
        width, height = ann.size
        for box in ann.boxes.tolist():
            for value, orig in zip(box, (width, height, width, height)):
                if agcam_scale(value, orig, 224) != int(value * 224 / orig):
                    changed.setdefault(key, []).append((int(value), orig, agcam_scale(value, orig, 224)))
    assert changed == {
        "val/ILSVRC2012_val_00003899.JPEG": [(244, 448, 121)],
        "val/ILSVRC2012_val_00004376.JPEG": [(183, 336, 121)],
        "val/ILSVRC2012_val_00033919.JPEG": [(610, 1120, 121), (575, 1120, 114)],
        "val/ILSVRC2012_val_00037292.JPEG": [(183, 336, 121)],
    }
    # Image 00003899 (448 x 500 as stored): inclusive box [244, 163, 446, 478] starts at column
    # 121 of the 224 x 224 mask, one column left of where int(v * 224 / W) would put it.
    ann = annotations["val/ILSVRC2012_val_00003899.JPEG"]
    box = ann.boxes[[b.tolist() == [244, 163, 446, 478] for b in ann.boxes]]
    assert ann.size == (448, 500) and len(box) == 1
    mask = ground_truth_box_mask(torch.from_numpy(inclusive_to_continuous(box)), ann.size, (224, 224), "agcam")
    columns = torch.nonzero(mask.any(0))[:, 0]
    rows = torch.nonzero(mask.any(1))[:, 0]
    assert (int(columns.min()), int(columns.max())) == (121, int(446 / 448 * 224))
    assert (int(rows.min()), int(rows.max())) == (int(163 / 500 * 224), int(478 / 500 * 224))


def test_ground_truth_box_mask_agcam_same_size_is_the_box_pixels():
    """agcam with orig size == eval size fills exactly the box's pixels (union of boxes)."""
    # Original W=8, H=6 = evaluation H=6, W=8. Box [2,1,5,4] -> cols 2..4, rows 1..3;
    # box [6,4,8,6] -> cols 6..7, rows 4..5.
    boxes = torch.tensor([[2.0, 1.0, 5.0, 4.0], [6.0, 4.0, 8.0, 6.0]])
    mask = ground_truth_box_mask(boxes, (8, 6), (6, 8), "agcam")
    expected = _mask(["00000000",
                      "00111000",
                      "00111000",
                      "00111000",
                      "00000011",
                      "00000011"])
    assert torch.equal(mask, expected)
    assert torch.equal(ground_truth_box_mask(boxes, (8, 6), (6, 8), "exact"), expected)


def test_ground_truth_box_mask_exact_uses_pixel_centres_in_scaled_box():
    """exact: a pixel is in when its centre lies inside the continuous box scaled to the eval size."""
    # Same box as the agcam case: [3, 1, 8, 4] * 0.8 = [2.4, 0.8, 6.4, 3.2].
    # Column centres c + .5 in (2.4, 6.4): 2.5, 3.5, 4.5, 5.5 -> cols 2..5.
    # Row centres r + .5 in (0.8, 3.2): 1.5, 2.5 -> rows 1..2.
    mask = ground_truth_box_mask(torch.tensor([[3.0, 1.0, 8.0, 4.0]]), (10, 5), (4, 8), "exact")
    expected = _mask(["00000000",
                      "00111100",
                      "00111100",
                      "00000000"])
    assert torch.equal(mask, expected)


def test_ground_truth_box_mask_no_boxes_is_empty():
    """No ground-truth boxes give an all-False mask of the evaluation size."""
    for protocol in ("agcam", "exact"):
        mask = ground_truth_box_mask(torch.zeros(0, 4), (10, 5), (4, 8), protocol)
        assert mask.shape == (4, 8)
        assert not mask.any()


def test_to_heatmaps_extreme_finite_range_is_not_nan():
    """A finite map whose range overflows float32 still normalises to [0, 1], no NaN."""
    heat, degenerate = to_heatmaps(torch.tensor([[[-3e38, 3e38], [0.0, 0.0]]]), (4, 4))
    assert not degenerate[0] and torch.isfinite(heat).all()
    assert heat.min() == 0 and heat.max() == 1
