"""The region engine and the sweep: components of every threshold in one pass equal to a
per-threshold labelling with scikit-image, pixel scores equal to a per-threshold reference
written here for both box protocols, and exact, mergeable sweep means."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.measure import label as label_components

from wsol_bench.datasets.base import Sample
from wsol_bench.metrics.base import RunMetric
from wsol_bench.metrics.box_accuracy import BoxAccuracy
from wsol_bench.metrics.localization import ground_truth, localization_scores
from wsol_bench.metrics.pixel import pixel_scores
from wsol_bench.metrics.sweep import SweepMeans
from wsol_bench.regions.components import threshold_components
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.regions.thresholds import DEFAULT_THRESHOLDS, threshold_array


def skimage_boxes(binary: torch.Tensor, largest_only: bool = False) -> torch.Tensor:
    """Reference boxes of one binary map: scikit-image's 8-connected labelling, one float xyxy
    box per label in label order (raster order of first pixels); the largest by pixel count."""
    labels, count = label_components(np.asarray(binary, dtype=bool), connectivity=2, return_num=True)
    if count == 0:
        return torch.zeros(0, 4)
    slices = ndimage.find_objects(labels)
    if largest_only:
        slices = [slices[int(np.argmax(np.bincount(labels.ravel())[1:]))]]
    return torch.tensor([[sx.start, sy.start, sx.stop, sy.stop] for sy, sx in slices], dtype=torch.float32)


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
    assert tuple(np.arange(0, 1, 0.01).tolist()) == DEFAULT_THRESHOLDS


def test_components_equal_per_threshold_labelling():
    """Every (image, threshold): the same boxes in the same order as scikit-image's labelling,
    its pixel counts, and the same largest component (first in raster order)."""
    heat = _mixed_heatmaps()
    thresholds = tuple(np.arange(0, 1, 0.05).tolist())
    comps = threshold_components(heat, thresholds)
    largest = set(comps.largest().tolist())
    for b in range(len(heat)):
        for i, t in enumerate(thresholds):
            binary = heat[b] > t
            assert torch.equal(comps.boxes_at(b, i), skimage_boxes(binary)), (b, t)
            keep = np.flatnonzero((comps.image == b) & (comps.level == i))
            assert comps.counts()[b, i] == len(keep)
            assert int(comps.area[keep].sum()) == int(binary.sum())
            chosen = [k for k in keep if k in largest]
            expected = skimage_boxes(binary, largest_only=True)
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


def reference_scores(heat: torch.Tensor, gt, thresholds, protocol: str) -> dict[str, np.ndarray]:
    """Per threshold, one image at a time: scikit-image boxes, filled by hand (agcam: up to
    x + w and y + h inclusive, clipped; exact: the box), scored with the mask formula."""
    height, width = heat.shape[-2:]
    extra = 1 if protocol == "agcam" else 0
    out: dict[str, list] = {}
    for t in thresholds:
        masks, counts = [], []
        for image in heat:
            boxes = skimage_boxes(image > t).long().tolist()
            mask = torch.zeros(height, width, dtype=torch.bool)
            for x0, y0, x1, y1 in boxes:
                mask[y0:min(y1 + extra, height), x0:min(x1 + extra, width)] = True
            masks.append(mask)
            counts.append(len(boxes))
        pred = torch.stack(masks)
        row = {f"box_{k}": v.numpy() for k, v in pixel_scores(pred, gt.box_masks).items()}
        if gt.seg_masks is not None:
            row.update({f"mask_{k}": v.numpy() for k, v in pixel_scores(pred, gt.seg_masks, gt.seg_valid).items()})
        row["n_pred_boxes"] = np.array(counts)
        for k, v in row.items():
            out.setdefault(k, []).append(v)
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("protocol", ["agcam", "exact"])
@pytest.mark.parametrize("with_masks", [True, False])
def test_engine_scores_equal_a_per_threshold_reference(protocol, with_masks):
    heat = _mixed_heatmaps()
    samples = _samples(20, 18, len(heat))
    if not with_masks:
        for s in samples:
            s.mask = None
    gt = ground_truth(samples, (20, 18), protocol)
    thresholds = tuple(np.arange(0, 1, 0.05).tolist())
    scores, _ = localization_scores(heat, gt, thresholds, protocol)
    expected = reference_scores(heat, gt, thresholds, protocol)
    assert sorted(scores) == sorted(expected)
    for name in scores:
        np.testing.assert_array_equal(scores[name], expected[name], err_msg=name)


def test_sweep_means_by_hand_filters_merge_and_json_round_trip():
    """Means per threshold over all images and over the correct ones; a split in two merges to
    the same state; the state survives JSON."""
    scores = {"box_iou": np.array([[0.25, 0.5, 1.0], [0.75, 0.75, 0.0], [1.0, 0.5, 0.25]]),
              "n_pred_boxes": np.array([[1, 2, 3], [1, 1, 0], [1, 1, 1]])}
    correct = np.array([True, True, False])
    whole = SweepMeans((0.1, 0.2, 0.3), ["box_iou"])
    whole.update(scores, correct)
    tables = whole.compute()
    assert tables["all"]["box_iou"].tolist() == [1.75 / 3, 0.5, 1.75 / 3]
    assert tables["correct"]["box_iou"].tolist() == [0.375, 0.75, 0.75]
    assert tables["all"]["n_pred_boxes"].tolist() == [2.0, 2 / 3, 1.0]
    assert list(tables["all"].columns) == ["threshold", "box_iou", "n_pred_boxes", "n_images"]
    assert tables["correct"]["n_images"].tolist() == [2, 2, 2]
    first, second = SweepMeans((0.1, 0.2, 0.3), ["box_iou"]), SweepMeans((0.1, 0.2, 0.3), ["box_iou"])
    first.update({k: v[:, 2:] for k, v in scores.items()}, correct[2:])
    second.update({k: v[:, :2] for k, v in scores.items()}, correct[:2])
    restored = RunMetric.from_json(second.to_json())
    first.merge_state(restored)
    for name in ("all", "correct"):
        assert first.compute()[name].equals(tables[name])
    with pytest.raises(ValueError, match="different settings"):
        first.merge_state(SweepMeans((0.1, 0.2), ["box_iou"]))
    empty = SweepMeans((0.5,), ["box_iou"])
    empty.update({k: v[:1, 2:] for k, v in scores.items()}, np.array([False]))
    assert len(empty.compute()["correct"]) == 0 and len(empty.compute()["all"]) == 1


def test_sweep_means_are_exact_and_independent_of_the_split():
    """1,000 awkward values: the exact mean equals the correctly rounded mean of their exact
    rational sum, for every way of splitting them into batches."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    values = rng.random((1, 1000)) ** 7  # many magnitudes
    scores = {"box_iou": values, "n_pred_boxes": np.ones((1, 1000), dtype=np.int64)}
    exact = float(sum(Fraction(v) for v in values[0]) / 1000)
    for cuts in ([1000], [1, 999], [333, 333, 334], [7] * 142 + [6]):
        metric, start = SweepMeans((0.5,), ["box_iou"]), 0
        for size in cuts:
            metric.update({k: v[:, start:start + size] for k, v in scores.items()}, np.ones(size, dtype=bool))
            start += size
        assert metric.compute()["all"]["box_iou"].tolist() == [exact]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SweepMeans((0.5,), ["box_iou"]).update({"box_iou": np.array([[1.5]]), "n_pred_boxes": np.array([[1]])},
                                              np.array([True]))


def test_box_accuracy_from_shared_components_equals_direct_update():
    heat = _mixed_heatmaps()
    samples = _samples(20, 18, len(heat))
    thresholds = tuple(np.arange(0, 1, 0.1).tolist())
    _, comps = localization_scores(heat, ground_truth(samples, (20, 18)), thresholds)
    gt_boxes = [torch.tensor([[1, 2, 9, 12]])] * len(heat)
    correct = torch.tensor([True, False, True, True, False])
    direct, shared = BoxAccuracy(thresholds, boxes="components"), BoxAccuracy(thresholds, boxes="components")
    direct.update(heat, gt_boxes, correct)
    shared.update(comps, gt_boxes, correct)
    assert direct.compute() == shared.compute()
    with pytest.raises(ValueError, match="other thresholds"):
        BoxAccuracy((0.5,), boxes="components").update(comps, gt_boxes, correct)


def test_threshold_and_heatmap_checks():
    with pytest.raises(ValueError, match="strictly increasing"):
        threshold_array([0.5, 0.5])
    with pytest.raises(ValueError, match="non-empty"):
        threshold_array([])
    with pytest.raises(ValueError, match="NaN"):
        threshold_components(torch.full((1, 3, 3), float("nan")), (0.5,))
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        threshold_components(torch.zeros(3, 3), (0.5,))
