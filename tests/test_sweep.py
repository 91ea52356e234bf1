"""The threshold sweep: components of every threshold in one pass, and pixel scores equal to
`score_heatmaps` at every threshold, for both box protocols."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from wsol_bench.datasets.base import Sample

from wsol_bench.regions.boxes import components_to_boxes
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.metrics.localization import ground_truth, score_heatmaps
from wsol_bench.metrics.wsoleval import BoxAccuracy
from wsol_bench.regions.components import (
    DEFAULT_THRESHOLDS,
    SweepResult,
    sweep_heatmaps,
    threshold_array,
    threshold_components,
)


def _mixed_heatmaps(height: int = 20, width: int = 18) -> torch.Tensor:
    """Smooth maps, per-pixel noise (many small components), a degenerate all-zero map, and a
    map holding exactly the threshold values (the strict > comparison matters)."""
    torch.manual_seed(1)
    smooth, _ = to_heatmaps(torch.randn(2, 4, 4), (height, width))
    noise = torch.rand(1, height, width)
    zero = torch.zeros(1, height, width)
    steps = (torch.arange(height * width).reshape(1, height, width) % 11).float() / 10
    return torch.cat([smooth, noise, zero, steps])


def test_default_thresholds_are_wsolevaluation_grid():
    assert len(DEFAULT_THRESHOLDS) == 100
    assert DEFAULT_THRESHOLDS == tuple(np.arange(0, 1, 0.01).tolist())


def test_components_equal_per_threshold_labelling():
    """Every (image, threshold): the same boxes in the same order as components_to_boxes, the
    pixel counts of the labelling, and the same largest component (first in raster order)."""
    heat = _mixed_heatmaps()
    thresholds = tuple(np.arange(0, 1, 0.05).tolist())
    comps = threshold_components(heat, thresholds)
    largest = set(comps.largest().tolist())
    for b in range(len(heat)):
        for i, t in enumerate(thresholds):
            binary = heat[b] > t
            assert torch.equal(comps.boxes_at(b, i), components_to_boxes(binary)), (b, t)
            keep = np.flatnonzero((comps.image == b) & (comps.level == i))
            assert comps.counts()[b, i] == len(keep)
            assert int(comps.area[keep].sum()) == int(binary.sum())
            chosen = [k for k in keep if k in largest]
            expected = components_to_boxes(binary, largest_only=True)
            assert len(chosen) == len(expected)
            if chosen:
                assert comps.boxes[chosen[0]].tolist() == expected[0].long().tolist(), (b, t)


def test_diagonal_touch_is_one_component_and_ties_take_raster_first():
    """8-connectivity joins diagonal neighbours; two equal components: the upper-left one wins."""
    heat = torch.zeros(1, 6, 6)
    heat[0, 0, 0] = heat[0, 1, 1] = 1.0  # diagonal pair: one component of 2 px
    heat[0, 4, 4] = heat[0, 4, 5] = 1.0  # another 2 px component
    comps = threshold_components(heat, (0.5,))
    assert comps.boxes.tolist() == [[0, 0, 2, 2], [4, 4, 6, 5]]
    assert comps.area.tolist() == [2, 2]
    assert comps.largest().tolist() == [0]


def _samples(height: int, width: int, count: int) -> list[Sample]:
    """Samples with boxes in a larger on-disk image (int() rescale matters) and masks with ignore."""
    generator = torch.Generator().manual_seed(2)
    samples = []
    for i in range(count):
        mask = torch.zeros(height, width, dtype=torch.uint8)
        mask[3 + i:12, 2:10 + i] = 2  # label 1 -> value 2
        mask[0, :] = 255
        mask[15:, 12:] = 1  # another class
        x0, y0 = torch.randint(0, 20, (2,), generator=generator).tolist()
        boxes = torch.tensor([[x0, y0, x0 + 17.0, y0 + 25.0], [1.0, 2.0, 9.0, 7.0]])
        samples.append(Sample(image=torch.zeros(3, height, width), label=1, boxes=boxes, image_id=str(i),
                              orig_size=(2 * width + 1, 2 * height + 3), box_labels=torch.tensor([1, 0]),
                              mask=mask, orig_boxes=boxes))
    return samples


@pytest.mark.parametrize("protocol", ["agcam", "exact"])
@pytest.mark.parametrize("with_masks", [True, False])
def test_sweep_equals_score_heatmaps_at_every_threshold(protocol, with_masks):
    heat = _mixed_heatmaps()
    samples = _samples(20, 18, len(heat))
    if not with_masks:
        for s in samples:
            s.mask = None
    gt = ground_truth(samples, (20, 18), protocol)
    thresholds = tuple(np.arange(0, 1, 0.05).tolist())
    result, _ = sweep_heatmaps(heat, gt, thresholds, protocol)
    assert result.rows() == score_heatmaps(heat, gt, list(thresholds), protocol)


def test_sweep_result_table_mean_best_and_concat():
    scores = {"box_iou": np.array([[0.25, 0.5, 1.0], [0.75, 0.75, 0.0], [1.0, 0.5, 0.25]]),
              "n_pred_boxes": np.array([[1, 2, 3], [1, 1, 0], [1, 1, 1]])}
    result = SweepResult((0.1, 0.2, 0.3), scores)
    np.testing.assert_allclose(result.mean()["box_iou"], [1.75 / 3, 0.5, 1.75 / 3])
    select = torch.tensor([True, True, False])
    np.testing.assert_allclose(result.mean(select)["box_iou"], [0.375, 0.75, 0.75])
    # ties go to the lower threshold: 0.75 at 0.2 and 0.3 (first two images), 1.75/3 at 0.1 and 0.3 (all)
    assert result.best_thresholds(select) == {"box_iou": {"threshold": 0.2, "value": 0.75}}
    assert result.best_thresholds()["box_iou"]["threshold"] == 0.1
    table = result.table()
    assert list(table.columns) == ["threshold", "box_iou", "n_pred_boxes"]
    assert table["n_pred_boxes"].tolist() == pytest.approx([2.0, 2 / 3, 1.0])
    joined = SweepResult.concat([SweepResult((0.1, 0.2, 0.3), {k: v[:, :1] for k, v in scores.items()}),
                                 SweepResult((0.1, 0.2, 0.3), {k: v[:, 1:] for k, v in scores.items()})])
    assert all(np.array_equal(joined.scores[k], scores[k]) for k in scores)
    with pytest.raises(ValueError, match="keeps no image"):
        result.mean(torch.zeros(3, dtype=torch.bool))


def test_box_accuracy_from_sweep_components_equals_direct_update():
    heat = _mixed_heatmaps()
    samples = _samples(20, 18, len(heat))
    thresholds = tuple(np.arange(0, 1, 0.1).tolist())
    _, comps = sweep_heatmaps(heat, ground_truth(samples, (20, 18)), thresholds)
    gt_boxes = [torch.tensor([[1, 2, 9, 12]])] * len(heat)
    correct = torch.tensor([True, False, True, True, False])
    direct, shared = BoxAccuracy(thresholds, boxes="components"), BoxAccuracy(thresholds, boxes="components")
    direct.update(heat, gt_boxes, correct)
    shared.update_components(comps, gt_boxes, correct)
    assert direct.compute() == shared.compute()
    with pytest.raises(ValueError, match="other thresholds"):
        BoxAccuracy((0.5,), boxes="components").update_components(comps, gt_boxes, correct)


def test_threshold_and_heatmap_checks():
    with pytest.raises(ValueError, match="strictly increasing"):
        threshold_array([0.5, 0.5])
    with pytest.raises(ValueError, match="non-empty"):
        threshold_array([])
    with pytest.raises(ValueError, match="NaN"):
        threshold_components(torch.full((1, 3, 3), float("nan")), (0.5,))
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        threshold_components(torch.zeros(3, 3), (0.5,))
