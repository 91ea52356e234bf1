"""wsolevaluation metrics (docs/protocol.md 4.2): hand-computed MaxBoxAcc v1/v2, GT-known and
Top-1 Loc, PxAP, merging of shards, and agreement with the reference's conventions. The hand
cases of box accuracy use the float variant (boxes="components"); tests/test_wsoleval_exact.py
holds the OpenCV semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sweep import skimage_boxes

from wsol_bench.datasets.base import Sample
from wsol_bench.metrics.base import RunMetric
from wsol_bench.metrics.box_accuracy import BoxAccuracy, best_ious, inclusive_iou
from wsol_bench.metrics.pxap import PxAP
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.regions.rasterize import ground_truth_box_mask, wsoleval_gt_boxes

# ---------------------------------------------------------------------------------------------
# Four 10x10 heatmaps, thresholds 0.25 / 0.5 / 0.75, IoU thresholds 30 / 50 / 70, float variant.
# Predicted boxes are [x, y, x + w, y + h] clipped to 9, compared inclusively.
# 0 "v1 vs v2": 0.9 on rows 0..3, cols 0..3 (16 px); 0.6 on rows 6..7, cols 6..7 (4 px).
#    GT [6,6,8,7] (6 px). Largest box [0,0,4,4]: IoU 0. Small box [6,6,8,8] (9 px): 6/9.
#    t=0.75 keeps only the big block. v1 IoU [0, 0, 0]; v2 IoU [2/3, 2/3, 0].
# 1 "+1 pixel": 0.8 on rows 2..4, cols 2..4. GT [2,2,4,4] (9 px). Box [2,2,5,5] (16 px):
#    IoU 9/16 = 0.5625 at every threshold (it would be 1.0 without the reference's +1).
# 2 "clip": 0.7 on rows 0..2, cols 7..9. GT [7,0,9,2] (9 px). Box [7,0,10,3] clipped to
#    [7,0,9,3] (12 px): IoU 0.75 at 0.25 and 0.5 (unclipped it would be 9/16). At 0.75 no
#    component: box [0,0,0,0], IoU 0.
# 3 "none": all zero. GT [0,0,1,0] (2 px) and [5,5,9,9]. Box [0,0,0,0] (1 px): IoU 1/2.
# correct = [T, T, F, T].
# v1 hits per delta (30, 50, 70) x t: [3,3,2], [3,3,2], [1,1,0]   (of 4 images)
# v2 hits:                             [4,4,2], [4,4,2], [1,1,0]
# MaxBoxAcc v1 = 75 at t=0.25 (first of a tie); v2 = mean(100, 100, 25) = 75.
# Top-1 at (IoU 50, t=0.25): images 1 and 3 (image 2 is misclassified) = 50.
# ---------------------------------------------------------------------------------------------
THRESHOLDS = (0.25, 0.5, 0.75)


def _box_case() -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    heat = torch.zeros(4, 10, 10)
    heat[0, 0:4, 0:4] = 0.9
    heat[0, 6:8, 6:8] = 0.6
    heat[1, 2:5, 2:5] = 0.8
    heat[2, 0:3, 7:10] = 0.7
    gt = [torch.tensor([[6, 6, 8, 7]]), torch.tensor([[2, 2, 4, 4]]), torch.tensor([[7, 0, 9, 2]]),
          torch.tensor([[0, 0, 1, 0], [5, 5, 9, 9]])]
    return heat, gt, torch.tensor([True, True, False, True])


def test_inclusive_iou_hand_computed():
    """(x1 - x0 + 1) areas; touching-by-one boxes overlap; a non-positive union gives 0."""
    assert inclusive_iou(np.array([0, 0, 9, 9]), np.array([5, 5, 14, 14])) == pytest.approx(25 / 175)
    assert inclusive_iou(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 0])) == 1.0
    assert inclusive_iou(np.array([0, 0, 4, 4]), np.array([4, 4, 8, 8])) == pytest.approx(1 / 49)
    assert inclusive_iou(np.array([0, 0, 4, 4]), np.array([5, 5, 8, 8])) == 0.0
    assert inclusive_iou(np.array([0, 0, -1, 0]), np.array([0, 0, -1, 0])) == 0.0


def test_box_accuracy_hand_computed():
    heat, gt, correct = _box_case()
    metric = BoxAccuracy(THRESHOLDS, boxes="components")
    metric.update(heat, gt, correct)
    ious = best_ious(metric.regions(heat), gt)
    np.testing.assert_allclose(ious["iou_v1"], [[0, 0, 0], [0.5625] * 3, [0.75, 0.75, 0], [0.5] * 3])
    np.testing.assert_allclose(ious["iou_v2"], [[2 / 3, 2 / 3, 0], [0.5625] * 3, [0.75, 0.75, 0], [0.5] * 3])
    assert metric.correct_v1.tolist() == [[3, 3, 2], [3, 3, 2], [1, 1, 0]]
    assert metric.correct_v2.tolist() == [[4, 4, 2], [4, 4, 2], [1, 1, 0]]
    out = metric.compute()
    assert out["maxboxacc"] == 75.0 and out["maxboxacc_threshold"] == 0.25
    assert out["maxboxacc_v2"] == pytest.approx(75.0)
    assert out["maxboxacc_v2_per_iou"] == {30: 100.0, 50: 100.0, 70: 25.0}
    assert out["maxboxacc_v2_thresholds"] == {30: 0.25, 50: 0.25, 70: 0.25}
    assert out["maxboxacc_v1_per_iou"] == {30: 75.0, 50: 75.0, 70: 25.0}
    assert out["gt_known_loc"] == 75.0
    assert out["top1_loc"] == 50.0 and out["loc_threshold"] == 0.25
    assert out["curves"]["v1"][50] == [75.0, 75.0, 50.0]
    assert out["curves"]["v2"][70] == [25.0, 25.0, 0.0]
    assert out["num_images"] == 4 and out["num_without_gt_boxes"] == 0


def test_box_accuracy_best_threshold_is_per_delta():
    """v2 picks a threshold per IoU delta: here IoU 70 is only reached at a high threshold."""
    heat = torch.zeros(1, 10, 10)
    heat[0, 2:8, 2:8] = 0.4  # 6x6 block -> box [2,2,8,8] (49 px) at t < 0.4
    heat[0, 3:7, 3:7] = 0.9  # 4x4 core -> box [3,3,7,7] (25 px) at 0.4 <= t < 0.9
    gt = [torch.tensor([[3, 3, 7, 7]])]  # 25 px: IoU 25/49 = 0.51 at t=0.25, 1.0 at t=0.5
    metric = BoxAccuracy(THRESHOLDS, boxes="components")
    metric.update(heat, gt, torch.tensor([True]))
    out = metric.compute()
    assert out["maxboxacc_v2_thresholds"] == {30: 0.25, 50: 0.25, 70: 0.5}
    assert out["maxboxacc_v2"] == 100.0


def test_image_without_gt_boxes_is_counted_and_never_correct():
    heat, _, _ = _box_case()
    metric = BoxAccuracy(THRESHOLDS)
    no_boxes = [torch.zeros(0, 4, dtype=torch.int64)]
    metric.update(heat[:1], no_boxes, torch.tensor([True]))
    assert (best_ious(metric.regions(heat[:1]), no_boxes)["iou_v2"] == 0).all()
    assert metric.compute()["num_without_gt_boxes"] == 1 and metric.compute()["maxboxacc"] == 0.0


def test_box_accuracy_matches_per_threshold_reference():
    """The vectorised IoUs equal a plain loop over thresholds with scikit-image's labelling."""
    torch.manual_seed(3)
    heat, _ = to_heatmaps(torch.randn(3, 5, 5), (24, 20))
    thresholds = tuple(np.arange(0, 1, 0.1).tolist())
    gt = [torch.tensor([[2, 3, 10, 12]]), torch.tensor([[0, 0, 19, 23], [5, 5, 8, 9]]),
          torch.tensor([[12, 1, 19, 8]])]
    ious = best_ious(BoxAccuracy(thresholds, boxes="components").regions(heat), gt)
    for b in range(3):
        for i, t in enumerate(thresholds):
            for key, largest in (("iou_v1", True), ("iou_v2", False)):
                boxes = skimage_boxes(heat[b] > t, largest_only=largest).long()
                if len(boxes) == 0:
                    boxes = torch.zeros(1, 4, dtype=torch.long)
                boxes[:, 2] = boxes[:, 2].clamp(max=19)
                boxes[:, 3] = boxes[:, 3].clamp(max=23)
                expected = max(float(inclusive_iou(p.numpy(), g.numpy())) for p in boxes for g in gt[b])
                assert ious[key][b, i] == expected, (b, t, key)


def test_predicted_boxes_equal_external_contour_rectangles():
    """Boxes equal cv2.boundingRect of the external contours, read as the reference does."""
    cv2 = pytest.importorskip("cv2")
    torch.manual_seed(5)
    heat, _ = to_heatmaps(torch.randn(2, 6, 6), (30, 26))
    for b in range(2):
        for t in (0.3, 0.6):
            binary = (heat[b] > t).numpy().astype(np.uint8) * 255
            contours = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
            rects = map(cv2.boundingRect, contours)
            ref = sorted([x, y, min(x + w, 25), min(y + h, 29)] for x, y, w, h in rects)
            ours = BoxAccuracy((t,), boxes="components").regions(heat[b:b + 1]).boxes_at(0, 0).long()
            ours[:, 2] = ours[:, 2].clamp(max=25)
            ours[:, 3] = ours[:, 3].clamp(max=29)
            assert sorted(ours.tolist()) == ref


def test_merge_of_halves_equals_one_pass_and_state_round_trip():
    heat, gt, correct = _box_case()
    whole = BoxAccuracy(THRESHOLDS)
    whole.update(heat, gt, correct)
    first, second = BoxAccuracy(THRESHOLDS), BoxAccuracy(THRESHOLDS)
    first.update(heat[:1], gt[:1], correct[:1])
    second.update(heat[1:], gt[1:], correct[1:])
    restored = RunMetric.from_json(second.to_json())
    first.merge_state(restored)
    assert first.compute() == whole.compute()
    with pytest.raises(ValueError, match="different settings"):
        whole.merge_state(BoxAccuracy((0.1, 0.2)))
    with pytest.raises(ValueError, match="different settings"):
        whole.merge_state(BoxAccuracy(THRESHOLDS, boxes="components"))


def test_box_accuracy_rejects_bad_settings():
    with pytest.raises(ValueError, match="50"):
        BoxAccuracy(THRESHOLDS, iou_thresholds=(30, 70))
    with pytest.raises(ValueError, match="sweep.boxes.*opencv, components"):
        BoxAccuracy(THRESHOLDS, boxes="contours")
    with pytest.raises(ValueError, match="increasing"):
        BoxAccuracy((0.5, 0.25))
    with pytest.raises(ValueError, match="no images"):
        BoxAccuracy(THRESHOLDS).compute()
    heat, gt, correct = _box_case()
    with pytest.raises(ValueError, match="GT box lists"):
        BoxAccuracy(THRESHOLDS).update(heat, gt[:2], correct)


def test_wsoleval_gt_boxes_rescale_with_int_and_match_agcam_mask():
    """int(v * 224 / orig) on inclusive corners; label-class boxes only; same pixels as the
    agcam ground-truth box mask."""
    # inclusive boxes 10..100 x 20..200 (class 3) and 0..499 x 0..374 (class 1), image 500x375
    sample = Sample(image=torch.zeros(3, 224, 224), label=3, boxes=torch.zeros(2, 4), image_id="x",
                    orig_size=(500, 375), box_labels=torch.tensor([3, 1]),
                    orig_boxes=torch.tensor([[10.0, 20.0, 101.0, 201.0], [0.0, 0.0, 500.0, 375.0]]))
    boxes = wsoleval_gt_boxes(sample, (224, 224))
    # 10*224/500 = 4.48; 20*224/375 = 11.95; 100*224/500 = 44.8; 200*224/375 = 119.47
    assert boxes.tolist() == [[4, 11, 44, 119]]
    assert boxes.dtype == torch.int64
    mask = torch.zeros(224, 224, dtype=torch.bool)
    mask[11:120, 4:45] = True
    own = sample.orig_boxes[:1]
    assert torch.equal(ground_truth_box_mask(own, sample.orig_size, (224, 224), "agcam"), mask)


# ---------------------------------------------------------------------------------------------
# PxAP on six pixels, thresholds (0.0, 0.5) -> edges 0.0, 0.5, 1.0 (value >= edge is positive).
#   values 1.0  0.7  0.5  0.3  0.2  0.0      GT 1 0 1 0 1 0  (3 positives)
#   edge 1.0: {1.0}            tp 1 fp 0  P 1    R 1/3
#   edge 0.5: {1.0, 0.7, 0.5}  tp 2 fp 1  P 2/3  R 2/3
#   edge 0.0: all              tp 3 fp 3  P 1/2  R 1
#   AP = 1 * 1/3 + 2/3 * 1/3 + 1/2 * 1/3 = 13/18 -> 72.22 %
# A seventh pixel (0.9, negative) is marked ignore; counted it would give
#   1/3 + 1/2 * 1/3 + 3/7 * 1/3.
# ---------------------------------------------------------------------------------------------
PX_VALUES = torch.tensor([[[1.0, 0.7, 0.5, 0.3, 0.2, 0.0, 0.9]]])
PX_GT = torch.tensor([[[True, False, True, False, True, False, False]]])
PX_VALID = torch.tensor([[[True] * 6 + [False]]])


def test_pxap_hand_computed_with_ignore_pixels():
    metric = PxAP((0.0, 0.5))
    metric.update(PX_VALUES, PX_GT, PX_VALID)
    out = metric.compute()
    assert out["pxap"] == pytest.approx(100 * 13 / 18, rel=1e-12)
    assert out["edges"] == [0.0, 0.5, 1.0]
    assert out["precision"] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert out["recall"] == pytest.approx([1.0, 2 / 3, 1 / 3])
    counted = PxAP((0.0, 0.5))
    counted.update(PX_VALUES, PX_GT, None)
    assert counted.compute()["pxap"] == pytest.approx(100 * (1 / 3 + 1 / 6 + 1 / 7), rel=1e-12)


def test_pxap_skips_edges_without_predictions():
    """Nothing reaches 1.0: that point is left out (precision NaN), recall starts from 0."""
    metric = PxAP((0.0, 0.5))
    metric.update(torch.tensor([[[0.9, 0.4]]]), torch.tensor([[[True, False]]]))
    out = metric.compute()
    assert out["pxap"] == 100.0
    assert np.isnan(out["precision"][2])


def _reference_pxap(heat: np.ndarray, gt: np.ndarray, valid: np.ndarray, thresholds: np.ndarray) -> float:
    """wsolevaluation's MaskEvaluator formula: histograms over [t..., 1, 2, 3] bins, reversed
    cumulative sums, AP = sum of precision[1:] * diff(recall) where anything is predicted."""
    edges = np.append(thresholds, [1.0, 2.0, 3.0])
    pos, _ = np.histogram(heat[gt & valid], bins=edges)
    neg, _ = np.histogram(heat[~gt & valid], bins=edges)
    tp, fp = pos[::-1].cumsum(), neg[::-1].cumsum()
    with np.errstate(invalid="ignore"):
        precision = tp / (tp + fp)
    recall = tp / pos.sum()
    used = (tp + fp) != 0
    return float((precision[1:] * np.diff(recall))[used[1:]].sum() * 100)


def test_pxap_equals_reference_formula_and_merges():
    torch.manual_seed(0)
    heat, _ = to_heatmaps(torch.randn(4, 4, 4), (16, 12))
    gt = torch.rand(4, 16, 12) > 0.6
    valid = torch.rand(4, 16, 12) > 0.1
    thresholds = np.arange(0, 1, 0.01)
    whole = PxAP(tuple(thresholds.tolist()))
    whole.update(heat, gt, valid)
    expected = _reference_pxap(heat.numpy(), gt.numpy(), valid.numpy(), thresholds)
    assert whole.compute()["pxap"] == pytest.approx(expected, rel=1e-12)
    first, second = PxAP(tuple(thresholds.tolist())), PxAP(tuple(thresholds.tolist()))
    first.update(heat[:1], gt[:1], valid[:1])
    second.update(heat[1:], gt[1:], valid[1:])
    first.merge_state(RunMetric.from_json(second.to_json()))
    assert first.compute()["pxap"] == whole.compute()["pxap"]


def test_pxap_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        PxAP((0.0, 1.0))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        PxAP((0.0, 0.5)).update(torch.full((1, 2, 2), 1.5), torch.ones(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="match"):
        PxAP((0.0, 0.5)).update(torch.zeros(1, 2, 2), torch.ones(1, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="positive"):
        empty = PxAP((0.0, 0.5))
        empty.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool))
        empty.compute()
