"""Chefer et al.'s segmentation scores (docs/protocol.md 4.4) on hand-computed cases, scikit-learn's
average precision reproduced bit for bit, totals accumulated as the reference accumulates them,
and the scorer's states merging across batches and ranks exactly."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from wsol_bench.datasets.base import Sample
from wsol_bench.metrics.base import RunMetric
from wsol_bench.metrics.segmentation import (
    CheferSegmentation,
    average_precision,
    image_segmentation_counts,
    mean_threshold_prediction,
    segmentation_summary,
)
from wsol_bench.run.batch import BatchTruth, MethodBatch
from wsol_bench.run.scorers.segmentation import SegmentationScorer

# Image A, heatmap in eighths (exact in binary, so no float tie is ambiguous):
#   0 1 2 2        mask (1 = object):   0 0 0 0
#   1 7 8 2                             0 1 1 1
#   2 6 5 1                             0 1 0 0
#   0 1 2 2                             0 0 0 0
HEAT_A = np.array([[0, 1, 2, 2], [1, 7, 8, 2], [2, 6, 5, 1], [0, 1, 2, 2]], dtype=np.float32) / 8
MASK_A = np.array([[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
# Image B, 2 x 4: the peak at (0, 0), the object at (1, 3).
HEAT_B = np.array([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=np.float32)
MASK_B = np.array([[0, 0, 0, 0], [0, 0, 0, 1]], dtype=bool)


def test_hand_computed_image():
    """Image A: mean = 42/8/16 = 0.328125, so the prediction is the four pixels 7, 8, 6, 5 (in
    eighths): (1,1), (1,2), (2,1), (2,2). Against the mask (1,1), (1,2), (2,1), (1,3):
    foreground intersection 3, union 4 + 4 - 3 = 5; background intersection 16 - 5 = 11, union
    12 + 12 - 11 = 13; correct 11 + 3 = 14 of 16.

    AP pools 32 scores: the heatmap on the foreground channel (positives: the 4 object pixels)
    and 1 - heatmap on the background channel (positives: the 12 others). By score (eighths),
    positives / negatives: 8: 3/0, 7: 5/0, 6: 6/1, 5: 0/1, 3: 1/0, 2: 1/6, 1: 0/5, 0: 0/3.
    Thresholds where recall grows: 8 (P 3/3, R 3/16), 7 (P 8/8, R 8/16), 6 (P 14/15, R 14/16),
    3 (P 15/17, R 15/16), 2 (P 16/24, R 1), so
    AP = (3 + 5 + 6 * 14/15 + 15/17 + 2/3) / 16 = 3863/4080."""
    pred = mean_threshold_prediction(HEAT_A)
    assert np.array_equal(np.argwhere(pred), [[1, 1], [1, 2], [2, 1], [2, 2]])
    counts = image_segmentation_counts(HEAT_A, MASK_A)
    assert counts["correct"] == 14 and counts["labelled"] == 16
    assert counts["intersection"].tolist() == [11, 3] and counts["union"].tolist() == [13, 5]
    assert counts["ap"] == pytest.approx(3863 / 4080, abs=1e-15)
    one = segmentation_summary(14, 16, [11, 3], [13, 5], counts["ap"], 1)
    assert one["pixel_accuracy"] == pytest.approx(14 / 16, abs=1e-15)
    assert one["mIoU"] == pytest.approx((11 / 13 + 3 / 5) / 2, abs=1e-15)


def test_totals_are_pixel_sums_not_means_of_image_ratios():
    """Image B: the prediction is (0, 0) (above the mean 1/8), the object (1, 3): correct 6 of
    8, intersection [6, 0], union [8, 2]; AP: score 1 holds 6 positives and 2 negatives, score 0
    2 and 6: AP = 6/8 * 6/8 + 2/8 * 8/16 = 0.6875.
    Dataset: pixel accuracy = (14 + 6) / (16 + 8) = 5/6 (the mean of the image ratios would be
    0.8125); IoU = [(11 + 6) / (13 + 8), (3 + 0) / (5 + 2)] = [17/21, 3/7], mIoU = 13/21 (the
    mean of the images' mIoUs: 0.549); mAP = the mean of the two APs."""
    b = image_segmentation_counts(HEAT_B, MASK_B)
    assert (b["correct"], b["labelled"]) == (6, 8) and b["union"].tolist() == [8, 2]
    assert b["ap"] == 0.6875
    metric = CheferSegmentation()
    metric.update_counts(image_segmentation_counts(HEAT_A, MASK_A))
    metric.update_counts(b)
    scores = metric.compute()
    assert scores["pixel_accuracy"] == pytest.approx(5 / 6, abs=1e-15)
    assert scores["iou_background"] == pytest.approx(17 / 21, abs=1e-15)
    assert scores["iou_foreground"] == pytest.approx(3 / 7, abs=1e-15)
    assert scores["mIoU"] == pytest.approx(13 / 21, abs=1e-15)
    assert scores["mAP"] == pytest.approx((3863 / 4080 + 0.6875) / 2, abs=1e-15)
    assert scores["images"] == 2 and scores["n_degenerate"] == 0


def test_degenerate_map_is_the_references_nan_map():
    """A constant map: the reference's min-max gives NaN, every comparison is False (no
    foreground predicted) and both AP channels become 0, so AP = 16 positives / 32 = 0.5."""
    flat = np.full((4, 4), 0.0, dtype=np.float32)
    counts = image_segmentation_counts(flat, MASK_A, degenerate=True)
    assert counts["intersection"].tolist() == [12, 0] and counts["ap"] == 0.5


def test_an_ap_a_rounding_above_one_still_sums_exactly():
    """scikit-learn's AP of a perfect ranking can come out as 1 + 4e-16; the exact sum keeps it."""
    metric = CheferSegmentation()
    for ap in (1.0000000000000004, 0.25):
        metric.update_counts({"correct": 1, "labelled": 1, "intersection": [0, 1], "union": [0, 1], "ap": ap})
    assert metric.compute()["mAP"] == (1.0000000000000004 + 0.25) / 2


def test_ignored_pixels_count_nowhere():
    valid = np.ones((4, 4), dtype=bool)
    valid[0] = False
    counts = image_segmentation_counts(HEAT_A, MASK_A, valid)
    assert counts["labelled"] == 12 and counts["correct"] == 10


def test_average_precision_hand_case_and_no_positive():
    """Scores 0.9 (+), 0.8 (-), 0.8 (+), 0.1 (-): thresholds 0.9 (P 1, R 1/2), 0.8 (P 2/3, R 1):
    AP = 1/2 + 1/2 * 2/3 = 5/6."""
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.1]) == pytest.approx(5 / 6, abs=1e-15)
    assert average_precision([0, 0], [0.3, 0.2]) == 0.0


def test_average_precision_is_scikit_learns_bit_for_bit():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 400))
        labels = rng.random(n) < rng.random()
        if not labels.any():
            labels[0] = True
        scores = (rng.integers(0, 9, n) / 8).astype(np.float32) if trial % 2 else rng.random(n).astype(np.float32)
        assert average_precision(labels, scores) == metrics.average_precision_score(labels, scores), trial
    assert image_segmentation_counts(HEAT_A, MASK_A)["ap"] == metrics.average_precision_score(
        np.r_[~MASK_A.ravel(), MASK_A.ravel()], np.r_[1 - HEAT_A.ravel(), HEAT_A.ravel()])


def _method_batch(seed: int, positions: list[int]) -> MethodBatch:
    rng = np.random.default_rng(seed)
    samples = []
    for p in positions:
        mask = torch.from_numpy((rng.random((8, 8)) < 0.3).astype(np.uint8))
        samples.append(Sample(image=torch.zeros(3, 8, 8), label=0, boxes=torch.tensor([[0.0, 0.0, 8.0, 8.0]]),
                              image_id=f"img_{p}", orig_size=(8, 8), mask=mask))
    maps = torch.from_numpy(rng.random((len(positions), 2, 2)).astype(np.float32))
    maps[0] = 1.0  # one degenerate map per batch
    return MethodBatch(method="m", truth=BatchTruth(samples, (8, 8), "agcam"), maps=maps,
                       logits=torch.zeros(len(positions), 3), targets=torch.zeros(len(positions), dtype=torch.long),
                       positions=positions, shard_index=0, target_source="predicted", class_specific=True)


def test_scorer_states_merge_exactly_across_batches_and_ranks(tmp_path):
    """Two ranks each scoring one batch, their states summed (what `gather` does across ranks),
    equal one process scoring both; the kernel and its result pickle (scoring workers)."""
    first, second = _method_batch(1, [0, 1, 2]), _method_batch(2, [3, 4, 5])
    single = SegmentationScorer(tmp_path / "one", methods=["m"])
    kernel = pickle.loads(pickle.dumps(single.kernel))
    for mb in (first, second):
        single.add("m", pickle.loads(pickle.dumps(kernel(mb))))
    ranks = [SegmentationScorer(tmp_path / f"rank{r}", methods=["m"]) for r in range(2)]
    ranks[0].add("m", ranks[0].kernel(first))
    ranks[1].add("m", ranks[1].kernel(second))
    merged = CheferSegmentation()
    for scorer in ranks:
        merged.merge_state(scorer.metrics["m"].metric_state)
    expected = single.metrics["m"]
    for name, value in expected.metric_state.items():
        assert torch.equal(merged.metric_state[name], value), name
    assert merged.compute() == expected.compute() and expected.compute()["n_degenerate"] == 2
    written = single.write(tmp_path / "one")
    assert {p.name for p in written} == {"segmentation.json", "segmentation_records.csv"}  # the table: run_tables
    restored = RunMetric.from_json(expected.to_json())
    assert restored.compute() == expected.compute()
    for scorer in ranks:
        scorer.close()
