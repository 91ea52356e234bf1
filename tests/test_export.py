"""COCO RLE export of predicted box-union masks and ground-truth masks: exact round trips,
readable by pycocotools' own COCO API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsol_bench.errors import InputFileError, MissingInputError
from wsol_bench.regions.components import threshold_components
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.regions.rasterize import coverage_levels
from wsol_bench.report.export import (
    decode_mask,
    encode_mask,
    predicted_union_masks,
    read_coco_masks,
    write_coco_masks,
)


def _masks() -> torch.Tensor:
    """Random, empty, full and a single corner pixel, on a non-square grid."""
    torch.manual_seed(0)
    masks = torch.rand(5, 7, 11) > 0.5
    masks[1] = False
    masks[2] = True
    masks[3] = False
    masks[3, 6, 10] = True
    return masks


def test_encode_decode_round_trip_is_exact():
    for mask in _masks():
        rle = encode_mask(mask)
        assert rle["size"] == [7, 11] and isinstance(rle["counts"], str)
        assert torch.equal(decode_mask(rle), mask)


def test_encoding_is_column_major_as_coco_defines():
    """Uncompressed COCO counts run down the columns: [0 0 1] over [1 1 0] (2x3, row-major) is
    column-major 0 1 | 0 1 | 1 0 -> runs of 0s/1s: 1, 1, 1, 2, 1."""
    from pycocotools import mask as mask_utils

    mask = torch.tensor([[False, False, True], [True, True, False]])
    rle = encode_mask(mask)
    uncompressed = mask_utils.frPyObjects({"size": [2, 3], "counts": [1, 1, 1, 2, 1]}, 2, 3)
    assert rle["counts"] == uncompressed["counts"].decode("ascii")


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_write_read_round_trip_and_pycocotools_reads_it(tmp_path):
    from pycocotools.coco import COCO

    masks = _masks()
    keys = [f"n0144/{i}.JPEG" for i in range(5)]
    categories = [3, 3, 7, 0, 3]
    scores = [0.9, 0.1, 0.5, 1.0, 0.25]
    path = write_coco_masks(tmp_path / "out" / "pred.json", keys, masks, categories, scores, {3: "cat"})
    document = json.loads(path.read_text())
    assert [c["id"] for c in document["categories"]] == [0, 3, 7]
    assert document["categories"][1]["name"] == "cat"
    assert all(isinstance(a["segmentation"]["counts"], str) for a in document["annotations"])
    back = read_coco_masks(path)
    assert [m.image_key for m in back] == keys
    assert [m.category_id for m in back] == categories
    assert [m.score for m in back] == scores
    assert all(torch.equal(m.mask, masks[i]) for i, m in enumerate(back))

    coco = COCO(str(path))
    for index, annotation in enumerate(coco.loadAnns(coco.getAnnIds())):
        decoded = coco.annToMask(annotation).astype(bool)
        assert np.array_equal(decoded, masks[index].numpy())
        assert annotation["area"] == float(masks[index].sum())
    # the single-pixel mask at row 6, column 10 has the COCO box (x, y, w, h) = (10, 6, 1, 1)
    assert document["annotations"][3]["bbox"] == [10.0, 6.0, 1.0, 1.0]
    ground_truth = read_coco_masks(write_coco_masks(tmp_path / "gt.json", keys, masks, categories))
    assert [m.score for m in ground_truth] == [1.0] * 5


@pytest.mark.parametrize("protocol", ["agcam", "exact"])
def test_predicted_union_masks_equal_the_sweep_coverage(protocol):
    torch.manual_seed(4)
    heat, _ = to_heatmaps(torch.randn(3, 4, 4), (16, 20))
    thresholds = (0.2, 0.5, 0.8)
    cover = coverage_levels(threshold_components(heat, thresholds), protocol)
    for i, t in enumerate(thresholds):
        assert np.array_equal(predicted_union_masks(heat, t, protocol).numpy(), cover > i)


def test_bad_input_is_refused(tmp_path):
    masks = _masks()
    with pytest.raises(ValueError, match="one category per image"):
        write_coco_masks(tmp_path / "x.json", ["a", "b"], masks, [1, 2])
    with pytest.raises(ValueError, match="repeat"):
        write_coco_masks(tmp_path / "x.json", ["a"] * 5, masks, [1] * 5)
    with pytest.raises(ValueError, match="scores"):
        write_coco_masks(tmp_path / "x.json", list("abcde"), masks, [1] * 5, [0.5])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 0}], "annotations": [{"image_id": 0, "category_id": 1,
                                                                         "segmentation": [[0, 0, 1, 1]]}]}))
    with pytest.raises(ValueError, match="bad.json"):
        read_coco_masks(bad)


BAD_RLE = (b'{"images": [{"id": 0}], "annotations": [{"image_id": 0, "category_id": 1, '
           b'"segmentation": {"size": [2, 2], "counts": "zz"}}]}')


@pytest.mark.parametrize("content", [bytes(range(128, 256)) * 8, b"[1, 2]", b'{"images": [7], "annotations": []}',
                                     BAD_RLE])
def test_damaged_or_missing_coco_file_is_a_user_error_naming_it(tmp_path, content):
    """A file that is not UTF-8 JSON, or whose entries are of the wrong kind, is an `InputFileError`
    naming it; an absent one a `MissingInputError`."""
    bad = tmp_path / "masks.json"
    bad.write_bytes(content)
    with pytest.raises(InputFileError, match="masks.json is not a COCO mask file"):
        read_coco_masks(bad)
    with pytest.raises(MissingInputError, match="nowhere.json does not exist"):
        read_coco_masks(tmp_path / "nowhere.json")
