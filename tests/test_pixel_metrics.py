"""Hand-computed checks of docs/protocol.md 4.1: AG-CAM pixel scores, and the per-image localization
scores of `wsol_bench.metrics.localization` built on them.

Counts (tp, fp, fn, tn) are written out by hand; every score is the literal formula with
eps = 1e-5 applied to those integers.
"""

from __future__ import annotations

import pytest
import torch

from wsol_bench.datasets.base import Sample
from wsol_bench.metrics.localization import ground_truth, localization_scores, metric_columns
from wsol_bench.metrics.pixel import EPS, PIXEL_METRICS, confusion_counts, pixel_scores


def score_heatmaps(heatmaps, gt, thresholds, protocol="agcam") -> list[list[dict]]:
    """The region engine's scores as rows: result[t][b] = {column: value, "n_pred_boxes": int}."""
    scores, _ = localization_scores(heatmaps, gt, thresholds, protocol)
    return [[{name: (int(v[t, b]) if name == "n_pred_boxes" else float(v[t, b])) for name, v in scores.items()}
             for b in range(len(heatmaps))] for t in range(len(thresholds))]

E = 1e-5


def _mask(rows: list[str]) -> torch.Tensor:
    """A bool [H, W] tensor from strings of '0'/'1', one string per row."""
    return torch.tensor([[c == "1" for c in r] for r in rows], dtype=torch.bool)


def _expected(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """The five docs/protocol.md 4.1 formulas for literal integer counts."""
    n = tp + fp + fn + tn
    return {
        "pixel_acc": (tp + tn + E) / (n + E),
        "iou": (tp + E) / (tp + fp + fn + E),
        "dice": (2 * tp + E) / (2 * tp + fp + fn + E),
        "precision": (tp + E) / (tp + fp + E),
        "recall": (tp + E) / (tp + fn + E),
    }


def _assert_scores(scores: dict, expected: dict[str, float], index: int = 0, prefix: str = "") -> None:
    for name, value in expected.items():
        got = scores[prefix + name]
        got = float(got[index]) if isinstance(got, torch.Tensor) else float(got)
        assert got == pytest.approx(value, rel=1e-12, abs=0), prefix + name


# 4x4 example:
#   pred        gt
#   1 1 0 0     1 1 1 0
#   1 1 0 0     1 0 0 0
#   0 0 1 0     0 0 0 0
#   0 0 0 0     0 0 0 1
# tp = (0,0) (0,1) (1,0) = 3; fp = (1,1) (2,2) = 2; fn = (0,2) (3,3) = 2; tn = 16 - 7 = 9.
PRED = _mask(["1100", "1100", "0010", "0000"])
GT = _mask(["1110", "1000", "0000", "0001"])


def test_eps_and_metric_names():
    """eps is 1e-5 and the five AG-CAM scores are named as in the records."""
    assert EPS == 1e-5
    assert tuple(PIXEL_METRICS) == ("pixel_acc", "iou", "dice", "precision", "recall")


def test_confusion_counts_hand_example():
    """tp/fp/fn/tn of the 4x4 example are 3/2/2/9, as float64 per image."""
    counts = confusion_counts(PRED[None], GT[None])
    assert set(counts) == {"tp", "fp", "fn", "tn"}
    for key in counts:
        assert counts[key].dtype == torch.float64
        assert counts[key].shape == (1,)
    assert [counts[k].item() for k in ("tp", "fp", "fn", "tn")] == [3.0, 2.0, 2.0, 9.0]


def test_pixel_scores_hand_example():
    """The five scores of the 4x4 example equal the docs/protocol.md 4.1 formulas on tp=3, fp=2, fn=2, tn=9."""
    scores = pixel_scores(PRED[None], GT[None])
    assert set(scores) == set(PIXEL_METRICS)
    # (3 + 9 + eps) / (16 + eps), (3 + eps) / (7 + eps), (6 + eps) / (10 + eps),
    # (3 + eps) / (5 + eps), (3 + eps) / (5 + eps).
    expected = {
        "pixel_acc": (12 + E) / (16 + E),
        "iou": (3 + E) / (7 + E),
        "dice": (6 + E) / (10 + E),
        "precision": (3 + E) / (5 + E),
        "recall": (3 + E) / (5 + E),
    }
    assert expected == _expected(3, 2, 2, 9)
    _assert_scores(scores, expected)
    for value in scores.values():
        assert value.dtype == torch.float64
    # eps is really there: without it IoU would be 3/7 = 0.428571428..., with it 0.4285722...
    assert scores["iou"].item() != pytest.approx(3 / 7, rel=1e-9, abs=0)
    assert scores["iou"].item() == pytest.approx(0.42857224489, rel=1e-9)


def test_pixel_scores_empty_prediction_and_empty_gt_are_all_one():
    """With no predicted and no GT pixels, every score is eps/eps (or (16+eps)/(16+eps)) = 1."""
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    counts = confusion_counts(empty, empty)
    assert [counts[k].item() for k in ("tp", "fp", "fn", "tn")] == [0.0, 0.0, 0.0, 16.0]
    scores = pixel_scores(empty, empty)
    for name in PIXEL_METRICS:
        assert scores[name].item() == pytest.approx(1.0, rel=1e-12, abs=0), name
        assert not torch.isnan(scores[name]).any()


def test_pixel_scores_empty_prediction_nonempty_gt():
    """No prediction, 4 GT pixels: tp=0, fp=0, fn=4, tn=12 -> precision 1 (eps/eps), iou ~ 2.5e-6."""
    pred = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt = _mask(["0000", "0110", "0110", "0000"])[None]
    scores = pixel_scores(pred, gt)
    _assert_scores(scores, {
        "pixel_acc": (12 + E) / (16 + E),
        "iou": E / (4 + E),
        "dice": E / (4 + E),
        "precision": 1.0,
        "recall": E / (4 + E),
    })


def test_ignore_pixels_are_excluded_from_every_count():
    """valid=False pixels count in none of tp/fp/fn/tn, nor in N."""
    # Ignore (0,0) [a tp], (1,1) [an fp], (3,3) [an fn] and (3,0) [a tn]:
    # tp = 2, fp = 1, fn = 1, tn = 8, N = 12.
    valid = ~_mask(["1000", "0100", "0000", "1001"])
    counts = confusion_counts(PRED[None], GT[None], valid[None])
    assert [counts[k].item() for k in ("tp", "fp", "fn", "tn")] == [2.0, 1.0, 1.0, 8.0]
    scores = pixel_scores(PRED[None], GT[None], valid[None])
    _assert_scores(scores, {
        "pixel_acc": (10 + E) / (12 + E),
        "iou": (2 + E) / (4 + E),
        "dice": (4 + E) / (6 + E),
        "precision": (2 + E) / (3 + E),
        "recall": (2 + E) / (3 + E),
    })


def test_all_valid_mask_equals_no_valid_mask():
    """An all-True valid mask gives the same scores as passing no valid mask."""
    with_valid = pixel_scores(PRED[None], GT[None], torch.ones(1, 4, 4, dtype=torch.bool))
    _assert_scores(with_valid, _expected(3, 2, 2, 9))


def test_pixel_scores_per_image_independence_in_a_batch():
    """Each image of a batch of 2 is scored on its own counts only."""
    pred = torch.stack([PRED, torch.zeros(4, 4, dtype=torch.bool)])
    gt = torch.stack([GT, torch.zeros(4, 4, dtype=torch.bool)])
    counts = confusion_counts(pred, gt)
    assert counts["tp"].tolist() == [3.0, 0.0]
    assert counts["fp"].tolist() == [2.0, 0.0]
    assert counts["fn"].tolist() == [2.0, 0.0]
    assert counts["tn"].tolist() == [9.0, 16.0]
    scores = pixel_scores(pred, gt)
    _assert_scores(scores, _expected(3, 2, 2, 9), index=0)
    _assert_scores(scores, _expected(0, 0, 0, 16), index=1)
    # Swap the order and add ignore pixels to image 1 only: image 0's scores don't move.
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[1, 0] = False
    swapped = pixel_scores(pred.flip(0), gt.flip(0), valid.flip(0))
    _assert_scores(swapped, _expected(3, 2, 2, 9), index=1)
    _assert_scores(swapped, _expected(0, 0, 0, 12), index=0)


# ---------------------------------------------------------------------------------------------
# localization.ground_truth / localization_scores on two hand-built 8x8 samples.
#
# Sample A: label 2, stored at 8x8 (orig == eval size).
#   boxes: [1,1,5,4] class 2 -> cols 1..4, rows 1..3 (12 px); [5,5,8,8] class 0 -> EXCLUDED.
#   mask: 3 (= label + 1) on rows 1..4, cols 1..3; 1 (other class) on rows 5..7, cols 5..7;
#         255 (ignore) on all of row 0, on (7,7) and on (3,1).
#   heatmap: 0.9 on rows 1..2, cols 1..2; 0.6 at (6,6); exactly 0.5 at (0,7).
# Sample B: label 0, stored at W=16, H=16, orig box [3,4,11,9] (inclusive cols 3..10, rows 4..8)
#   -> agcam: c0 = int(3*8/16) = 1, c1 = int(10*8/16) = 5, r0 = int(4*8/16) = 2,
#      r1 = int(8*8/16) = 4 -> rows 2..4, cols 1..5 (15 px). Its `boxes` (at 8x8) are
#      [1.5, 2, 5.5, 4.5], which rasterised directly would give cols 1..4, rows 2..3.
#   mask: 1 (= label + 1) on rows 2..3, cols 1..5 (10 px); no ignore pixels.
#   heatmap: 0.8 on rows 2..3, cols 2..3; 0.6 at (7,0).
# ---------------------------------------------------------------------------------------------
SIZE = (8, 8)


def _samples() -> list[Sample]:
    mask_a = torch.zeros(8, 8, dtype=torch.uint8)
    mask_a[1:5, 1:4] = 3
    mask_a[5:8, 5:8] = 1
    mask_a[0, :] = 255
    mask_a[7, 7] = 255
    mask_a[3, 1] = 255
    a = Sample(image=torch.zeros(3, 8, 8), label=2,
               boxes=torch.tensor([[1.0, 1.0, 5.0, 4.0], [5.0, 5.0, 8.0, 8.0]]),
               image_id="a", orig_size=(8, 8), box_labels=torch.tensor([2, 0]), mask=mask_a)
    mask_b = torch.zeros(8, 8, dtype=torch.uint8)
    mask_b[2:4, 1:6] = 1
    b = Sample(image=torch.zeros(3, 8, 8), label=0,
               boxes=torch.tensor([[1.5, 2.0, 5.5, 4.5]]), image_id="b", orig_size=(16, 16),
               box_labels=torch.tensor([0]), mask=mask_b,
               orig_boxes=torch.tensor([[3.0, 4.0, 11.0, 9.0]]))
    return [a, b]


def _heatmaps() -> torch.Tensor:
    heat = torch.zeros(2, 8, 8)
    heat[0, 1:3, 1:3] = 0.9
    heat[0, 6, 6] = 0.6
    heat[0, 0, 7] = 0.5
    heat[1, 2:4, 2:4] = 0.8
    heat[1, 7, 0] = 0.6
    return heat


def test_ground_truth_masks_of_hand_built_samples():
    """GT box masks use only the label-class boxes (orig coords); seg = label+1; ignore = 255."""
    gt = ground_truth(_samples(), SIZE, "agcam")
    assert gt.num_boxes == [1, 1]
    assert gt.box_masks.dtype == torch.bool
    assert torch.equal(gt.box_masks[0], _mask(["00000000",
                                               "01111000",
                                               "01111000",
                                               "01111000",
                                               "00000000",
                                               "00000000",   # the class-0 box [5,5,8,8] is
                                               "00000000",   # not part of the class-2 union
                                               "00000000"]))
    assert torch.equal(gt.box_masks[1], _mask(["00000000",
                                               "00000000",
                                               "01111100",
                                               "01111100",
                                               "01111100",
                                               "00000000",
                                               "00000000",
                                               "00000000"]))
    assert torch.equal(gt.seg_masks[0], _mask(["00000000",
                                               "01110000",
                                               "01110000",
                                               "00110000",   # (3,1) is ignore, not class 3
                                               "01110000",
                                               "00000000",
                                               "00000000",
                                               "00000000"]))
    assert torch.equal(gt.seg_valid[0], ~_mask(["11111111",
                                                "00000000",
                                                "00000000",
                                                "01000000",
                                                "00000000",
                                                "00000000",
                                                "00000000",
                                                "00000001"]))
    assert torch.equal(gt.seg_masks[1], _mask(["00000000",
                                               "00000000",
                                               "01111100",
                                               "01111100",
                                               "00000000",
                                               "00000000",
                                               "00000000",
                                               "00000000"]))
    assert bool(gt.seg_valid[1].all())


def test_ground_truth_without_masks_and_mask_size_check():
    """Mask-less samples give seg None; a mask not at the evaluation size raises ValueError."""
    a, b = _samples()
    a.mask, b.mask = None, None
    gt = ground_truth([a, b], SIZE)
    assert gt.seg_masks is None and gt.seg_valid is None
    assert metric_columns(False) == [f"box_{m}" for m in PIXEL_METRICS]
    a, b = _samples()
    a.mask = torch.zeros(4, 4, dtype=torch.uint8)
    b.mask = torch.zeros(4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError):
        ground_truth([a, b], SIZE)


def test_score_heatmaps_hand_computed_two_thresholds():
    """box_* and mask_* scores and n_pred_boxes of two samples at thresholds 0.5 and 0.7."""
    gt = ground_truth(_samples(), SIZE, "agcam")
    result = score_heatmaps(_heatmaps(), gt, [0.5, 0.7], "agcam")
    assert len(result) == 2 and all(len(rows) == 2 for rows in result)
    assert set(result[0][0]) == set(metric_columns(True)) | {"n_pred_boxes"}

    # --- t = 0.5, sample A ------------------------------------------------------------------
    # Components: rows 1..2 x cols 1..2 (box [1,1,3,3]) and (6,6) (box [6,6,7,7]); (0,7) is
    # exactly 0.5 and stays off. agcam fills rows 1..3 x cols 1..3 (9 px) and rows 6..7 x
    # cols 6..7 (4 px): 13 px.
    #   box:  tp = 9, fp = 4, fn = 12 - 9 = 3, tn = 64 - 16 = 48.
    #   mask (valid = 64 - 8 - 1 - 1 = 54; seg = 12 - 1 = 11 valid px):
    #         pred valid = 9 - 1 [(3,1)] + 4 - 1 [(7,7)] = 11; tp = 8, fp = 3, fn = 3, tn = 40.
    row = result[0][0]
    assert row["n_pred_boxes"] == 2
    _assert_scores(row, {"pixel_acc": (57 + E) / (64 + E), "iou": (9 + E) / (16 + E),
                         "dice": (18 + E) / (25 + E), "precision": (9 + E) / (13 + E),
                         "recall": (9 + E) / (12 + E)}, prefix="box_")
    _assert_scores(row, {"pixel_acc": (48 + E) / (54 + E), "iou": (8 + E) / (14 + E),
                         "dice": (16 + E) / (22 + E), "precision": (8 + E) / (11 + E),
                         "recall": (8 + E) / (11 + E)}, prefix="mask_")

    # --- t = 0.5, sample B ------------------------------------------------------------------
    # Components: rows 2..3 x cols 2..3 (box [2,2,4,4]) -> agcam rows 2..4 x cols 2..4 (9 px);
    # (7,0) (box [0,7,1,8]) -> row 7 (row 8 clipped) x cols 0..1 (2 px). 11 px.
    #   box (GT rows 2..4 x cols 1..5, 15 px): tp = 9, fp = 2, fn = 6, tn = 64 - 17 = 47.
    #   mask (seg rows 2..3 x cols 1..5, 10 px): tp = 6, fp = 5, fn = 4, tn = 64 - 15 = 49.
    row = result[0][1]
    assert row["n_pred_boxes"] == 2
    _assert_scores(row, {"pixel_acc": (56 + E) / (64 + E), "iou": (9 + E) / (17 + E),
                         "dice": (18 + E) / (26 + E), "precision": (9 + E) / (11 + E),
                         "recall": (9 + E) / (15 + E)}, prefix="box_")
    _assert_scores(row, {"pixel_acc": (55 + E) / (64 + E), "iou": (6 + E) / (15 + E),
                         "dice": (12 + E) / (21 + E), "precision": (6 + E) / (11 + E),
                         "recall": (6 + E) / (10 + E)}, prefix="mask_")

    # --- t = 0.7, sample A ------------------------------------------------------------------
    # Only the 0.9 block: agcam rows 1..3 x cols 1..3 (9 px).
    #   box:  tp = 9, fp = 0, fn = 3, tn = 52.
    #   mask: pred valid = 8 (all seg): tp = 8, fp = 0, fn = 3 (row 4, cols 1..3), tn = 43.
    row = result[1][0]
    assert row["n_pred_boxes"] == 1
    _assert_scores(row, {"pixel_acc": (61 + E) / (64 + E), "iou": (9 + E) / (12 + E),
                         "dice": (18 + E) / (21 + E), "precision": (9 + E) / (9 + E),
                         "recall": (9 + E) / (12 + E)}, prefix="box_")
    _assert_scores(row, {"pixel_acc": (51 + E) / (54 + E), "iou": (8 + E) / (11 + E),
                         "dice": (16 + E) / (19 + E), "precision": (8 + E) / (8 + E),
                         "recall": (8 + E) / (11 + E)}, prefix="mask_")

    # --- t = 0.7, sample B ------------------------------------------------------------------
    # Only the 0.8 block: agcam rows 2..4 x cols 2..4 (9 px).
    #   box:  tp = 9, fp = 0, fn = 6, tn = 49.
    #   mask: tp = 6, fp = 3 (row 4), fn = 4 (cols 1 and 5 of rows 2..3), tn = 51.
    row = result[1][1]
    assert row["n_pred_boxes"] == 1
    _assert_scores(row, {"pixel_acc": (58 + E) / (64 + E), "iou": (9 + E) / (15 + E),
                         "dice": (18 + E) / (24 + E), "precision": (9 + E) / (9 + E),
                         "recall": (9 + E) / (15 + E)}, prefix="box_")
    _assert_scores(row, {"pixel_acc": (57 + E) / (64 + E), "iou": (6 + E) / (13 + E),
                         "dice": (12 + E) / (19 + E), "precision": (6 + E) / (9 + E),
                         "recall": (6 + E) / (10 + E)}, prefix="mask_")


def test_score_heatmaps_exact_protocol_sample_a():
    """Under the exact protocol the predicted boxes are not grown by a pixel (sample A, t=0.7)."""
    gt = ground_truth(_samples(), SIZE, "exact")
    # exact GT for A: centres inside [1,1,5,4] -> cols 1..4, rows 1..3 (12 px), same as agcam.
    assert int(gt.box_masks[0].sum()) == 12
    row = score_heatmaps(_heatmaps(), gt, [0.7], "exact")[0][0]
    # pred = rows 1..2 x cols 1..2 (4 px): box tp = 4, fp = 0, fn = 8, tn = 52.
    # mask: pred valid 4, all seg: tp = 4, fp = 0, fn = 11 - 4 = 7, tn = 54 - 11 = 43.
    assert row["n_pred_boxes"] == 1
    _assert_scores(row, _expected(4, 0, 8, 52), prefix="box_")
    _assert_scores(row, _expected(4, 0, 7, 43), prefix="mask_")
    assert row["box_iou"] == pytest.approx((4 + E) / (12 + E), rel=1e-12)


def test_score_heatmaps_without_masks_has_only_box_columns():
    """Without segmentation masks only box_* columns and n_pred_boxes are produced."""
    a, b = _samples()
    a.mask, b.mask = None, None
    rows = score_heatmaps(_heatmaps(), ground_truth([a, b], SIZE), [0.7])[0]
    assert set(rows[0]) == set(metric_columns(False)) | {"n_pred_boxes"}
    _assert_scores(rows[1], _expected(9, 0, 6, 49), prefix="box_")
