"""The built-in synthetic dataset: determinism, disjoint splits, exact masks and boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsol_bench.datasets import EvalTransform, available, build_dataset
from wsol_bench.datasets.synthetic import CLASS_NAMES, SyntheticShapes, mask_boxes, render_scene


def test_same_arguments_give_identical_pixels():
    """A scene is a pure function of (seed, split, index)."""
    a, b = render_scene(7, seed=3, split="val"), render_scene(7, seed=3, split="val")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.instance_masks, b.instance_masks)
    assert a.label == b.label


def test_seed_index_and_split_change_the_image():
    """Different seed, index or split give different images (train and val are disjoint)."""
    base = render_scene(5, seed=0, split="val").image
    for other in (render_scene(5, seed=1, split="val"), render_scene(6, seed=0, split="val"),
                  render_scene(5, seed=0, split="train")):
        assert not np.array_equal(base, other.image)
    train = {render_scene(i, split="train").image.tobytes() for i in range(40)}
    val = {render_scene(i, split="val").image.tobytes() for i in range(40)}
    assert not train & val


def test_masks_boxes_and_labels_are_consistent():
    """Every instance is non-empty, of the labelled class, and its box is its mask's extent."""
    counts = set()
    for i in range(30):
        scene = render_scene(i, split="val")
        k = len(scene.instance_labels)
        counts.add(k)
        assert 1 <= k <= 3 and (scene.instance_labels == scene.label).all()
        assert scene.instance_masks.any(axis=(1, 2)).all()
        # Instances never share a pixel.
        assert scene.instance_masks.sum(0).max() == 1
        for m, box in zip(scene.instance_masks, mask_boxes(scene.instance_masks)):
            ys, xs = np.nonzero(m)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert counts == {1, 2, 3}


def test_no_centre_prior_sizes_from_small_to_large_and_objects_at_the_border():
    """v3 calibrates the sanity baselines: the ground truth is spread about evenly over the
    image, leaning slightly to the border (the central quarter, the middle half of each side,
    holds a fifth of it; v1: half, v2: 29 %), box centres are spread over the whole image, most
    images have an object touching the border, and sizes run from about 1 % of the image to a
    quarter."""
    coverage = np.zeros((224, 224))
    centres, areas, on_border = [], [], 0
    for i in range(300):
        scene = render_scene(i, split="val")
        union = scene.instance_masks.any(0)
        coverage += union
        areas.append(union.mean())
        on_border += bool(union[0].any() or union[-1].any() or union[:, 0].any() or union[:, -1].any())
        for box in mask_boxes(scene.instance_masks).tolist():
            centres.append(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
    centre_share = coverage[56:168, 56:168].sum() / coverage.sum()
    assert 0.17 < centre_share < 0.25
    for axis in (0, 1):  # flat: every eighth of the image, as rows or columns, has similar coverage
        bands = coverage.sum(axis).reshape(8, 28).sum(1)
        assert bands.max() < 1.5 * bands.min(), bands
    centres = np.array(centres)
    in_middle = ((centres > 56) & (centres < 168)).all(1).mean()
    assert 0.1 < in_middle < 0.2
    for axis in (0, 1):  # every quarter of each axis holds box centres
        assert (np.histogram(centres[:, axis], bins=4, range=(0, 224))[0] > 0.15 * len(centres)).all()
    assert on_border > 0.6 * 300
    assert min(areas) < 0.015 and max(areas) > 0.2


def test_distractors_are_in_no_mask_and_apart_from_the_objects():
    """Distractors (shapes of no labelled class) are drawn in some images, are in no instance
    mask, and do not touch the labelled objects."""
    drawn = 0
    for i in range(40):
        scene = render_scene(i, split="val")
        drawn += len(scene.distractor_masks)
        for d in scene.distractor_masks:
            assert d.any() and not (d & scene.instance_masks.any(0)).any()
    assert drawn > 20


def test_version_is_part_of_the_id_and_other_versions_are_refused():
    """Only this release's drawing rules are drawn; the version is in every image id (and in
    the fingerprint, so map-store keys differ across versions)."""
    ds = SyntheticShapes("val", num_images=1)
    assert ds.version == "v3" and ds[0].image_id.startswith("synthetic-v3_")
    for old in ("v1", "v2"):
        with pytest.raises(ValueError, match=f"version '{old}'.*valid: 'v3'"):
            SyntheticShapes("val", num_images=1, version=old)


def test_sample_fields_follow_the_contract():
    """Samples carry uint8 image, float xyxy boxes, class+1 semantic mask and stable ids."""
    ds = SyntheticShapes("val", num_images=4)
    s = ds[2]
    assert s.image.dtype == torch.uint8 and s.image.shape == (3, 224, 224)
    assert s.boxes.dtype == torch.float32 and s.boxes.shape[1] == 4
    assert set(torch.unique(s.mask).tolist()) == {0, s.label + 1}
    assert s.image_id == "synthetic-v3_val_0_000002" and s.orig_size == (224, 224)
    assert 0 <= s.label < len(CLASS_NAMES) == ds.num_classes
    with pytest.raises(IndexError):
        ds[4]


def test_two_class_variant_has_two_different_classes_with_masks():
    """The two-class variant draws one instance each of two classes; the label is the first."""
    ds = build_dataset("synthetic_two_class", split="val", num_images=10)
    for i in range(10):
        s = ds[i]
        labels = s.box_labels.tolist()
        assert len(labels) == 2 and labels[0] == s.label and labels[0] != labels[1]
        assert set(torch.unique(s.mask).tolist()) == {0, labels[0] + 1, labels[1] + 1}


def test_transform_moves_image_boxes_and_mask_together():
    """Resizing 224 -> 112 halves the boxes and keeps mask values; orig boxes stay put."""
    raw = SyntheticShapes("val", num_images=1)[0]
    out = EvalTransform((112, 112), mean=(0.5,) * 3, std=(0.5,) * 3)(raw)
    assert out.image.shape == (3, 112, 112) and out.image.dtype == torch.float32
    assert torch.allclose(out.boxes, raw.boxes / 2)
    assert torch.equal(out.orig_boxes, raw.orig_boxes)
    assert set(torch.unique(out.mask).tolist()) <= set(torch.unique(raw.mask).tolist())
    assert out.image.min() >= -1 and out.image.max() <= 1


def test_bad_settings_are_named():
    """Unknown dataset names and splits list the valid ones."""
    assert {"synthetic", "synthetic_two_class"} <= set(available())
    with pytest.raises(ValueError, match="valid: .*synthetic"):
        build_dataset("imagenett")
    with pytest.raises(ValueError, match="unknown split"):
        SyntheticShapes("holdout")
    with pytest.raises(ValueError, match="num_images"):
        SyntheticShapes("val", num_images=0)


def test_timm_centre_crop_moves_boxes_and_masks_by_hand():
    """preprocess.resize=timm on a 400x200 (W x H) image to 100x100, crop_pct 0.8: shorter side
    200 -> floor(100 / 0.8) = 125, so 250x125, then the centre 100x100 crop at left 75, top 12
    (round(12.5) = 12, torchvision's rounding). A box [40, 20, 200, 100] scales by 0.625 to
    [25, 12.5, 125, 62.5] and shifts to [-50, 0.5, 50, 50.5] -> clipped [0, 0.5, 50, 50.5]; a box
    wholly left of the crop is dropped with a note."""
    from wsol_bench.datasets.base import EvalTransform, Sample

    image = torch.zeros(3, 200, 400, dtype=torch.uint8)
    mask = torch.zeros(200, 400, dtype=torch.uint8)
    mask[20:100, 40:200] = 1
    sample = Sample(image=image, label=0, boxes=torch.tensor([[40.0, 20, 200, 100], [0, 0, 50, 50]]),
                    image_id="x", orig_size=(400, 200), mask=mask)
    out = EvalTransform((100, 100), (0.5,) * 3, (0.5,) * 3, resize="timm", crop_pct=0.8)(sample)
    assert tuple(out.image.shape) == (3, 100, 100)
    assert out.boxes.tolist() == [[0.0, 0.5, 50.0, 50.5]] and out.box_labels.tolist() == [0]
    assert out.orig_size == (100, 100) and out.orig_boxes.tolist() == out.boxes.tolist()
    assert "box outside the centre crop dropped" in out.notes
    # nearest neighbour: resized row r reads source row floor(1.6 r), so rows 13..62 hit the
    # mask's 20..99 (crop rows 1..50); columns 25..124 hit 40..199 (crop columns 0..49)
    ys, xs = torch.nonzero(out.mask, as_tuple=True)
    assert int(xs.min()) == 0 and int(xs.max()) == 49 and int(ys.min()) == 1 and int(ys.max()) == 50
    with pytest.raises(ValueError, match="preprocess.resize"):
        EvalTransform((100, 100), (0.5,) * 3, (0.5,) * 3, resize="crop")


def test_first_index_continues_the_same_stream():
    """first_index=k: item i is the scene k + i of the same split and seed (a second training
    phase draws new images from the same deterministic stream)."""
    base = SyntheticShapes(split="train", num_images=6, image_size=64)
    shifted = SyntheticShapes(split="train", num_images=2, image_size=64, first_index=4)
    for i in range(2):
        a, b = base[4 + i], shifted[i]
        assert a.image_id == b.image_id and torch.equal(a.image, b.image) and a.label == b.label
    with pytest.raises(ValueError, match="first_index"):
        SyntheticShapes(split="train", num_images=2, first_index=-1)
