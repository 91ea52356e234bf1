"""Maps at any resolution: an explainer may return pixel maps at the input size; they are
stored, turned into heatmaps (without resampling), scored and perturbed like patch-grid maps.
float16 storage rounds every map once, before it is scored, so a re-scoring run reads back
exactly the maps the first run scored."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit

from wsol_bench.datasets import EvalTransform, build_dataset
from wsol_bench.methods import Explainer, get_explainer
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.run.pipeline import has_masks, process_dataset
from wsol_bench.run.scorers.records import LocalizationRecords
from wsol_bench.run.store import MapStore

SIZE = (64, 64)


class UpsampledRollout(Explainer):
    """Rollout's map, upsampled to the input size as to_heatmaps would: a pixel map whose
    heatmap equals rollout's."""

    class_specific = False
    resolution = "pixel"

    def __init__(self, model) -> None:
        super().__init__(model)
        self.rollout = get_explainer("rollout", model)

    def explain(self, images, targets):
        out = self.rollout(images, targets)
        return F.interpolate(out.maps[:, None], size=images.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0], out.logits, out.targets


class WrongSize(UpsampledRollout):
    def explain(self, images, targets):
        maps, logits, used = super().explain(images, targets)
        return maps[:, :-1], logits, used


@pytest.fixture(scope="module")
def setup():
    model = make_vit(0, img_size=64, patch_size=16, num_classes=6)
    ds = build_dataset("synthetic", split="val", num_images=6, transform=EvalTransform(SIZE, (0.5,) * 3, (0.5,) * 3))
    return model, ds


def _records(ds, explainers, root, shapes, dtype="float32"):
    stores = {m: MapStore(root / "cache", {"method": m}, 4, grid=shapes[m], dtype=dtype) for m in explainers}
    records = LocalizationRecords(root / "records.csv", [0.3, 0.5], dataset_name="synthetic", split="val",
                                  box_protocol="agcam", has_masks=has_masks(ds))
    try:
        process_dataset({"predicted": stores}, ds, [records], explainer=explainers.__getitem__, batch_size=3,
                        progress=False)
    finally:
        records.close()
    return pd.read_csv(root / "records.csv"), stores


def test_pixel_maps_are_stored_and_scored_without_resampling(setup, tmp_path):
    """The upsampled rollout, stored at 64x64, gives rollout's records exactly."""
    model, ds = setup
    pixel = UpsampledRollout(model)
    assert pixel.map_shape(SIZE) == SIZE and get_explainer("rollout", model).map_shape(SIZE) == (4, 4)
    records, stores = _records(ds, {"rollout": get_explainer("rollout", model), "pixel": pixel}, tmp_path,
                               {"rollout": (4, 4), "pixel": SIZE})
    assert tuple(stores["pixel"].load(0).maps.shape) == (4, *SIZE)
    a = records[records["method"] == "rollout"].drop(columns="method").reset_index(drop=True)
    b = records[records["method"] == "pixel"].drop(columns="method").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_a_map_already_at_the_size_is_not_resampled():
    maps = torch.rand(2, 8, 8)
    heat, _ = to_heatmaps(maps, (8, 8))
    lo, hi = maps.flatten(1).min(1).values, maps.flatten(1).max(1).values
    expected = ((maps.double() - lo[:, None, None].double()) / (hi - lo)[:, None, None].double()).float()
    assert torch.equal(heat, expected)


def test_a_pixel_map_of_the_wrong_size_is_refused(setup):
    model, ds = setup
    with pytest.raises(ValueError, match=r"expected floating-point maps of shape \(2, 64, 64\) \(the input size\)"):
        WrongSize(model)(torch.stack([ds[0].image, ds[1].image]))


def test_float16_store_halves_the_maps_and_rescoring_reads_what_was_scored(setup, tmp_path):
    """dtype=float16: the shard holds float16 maps, the first run scores the rounded maps, and a
    second run that only reads the store writes the same records."""
    model, ds = setup
    explainers = {"pixel": UpsampledRollout(model)}
    first, stores = _records(ds, explainers, tmp_path, {"pixel": SIZE}, dtype="float16")
    payload = torch.load(stores["pixel"].shard_path(0), weights_only=True)
    assert payload["maps"].dtype == torch.float16
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        again, _ = _records(ds, explainers, tmp_path, {"pixel": SIZE}, dtype="float16")
    finally:
        hook.remove()
    assert calls == []
    pd.testing.assert_frame_equal(first, again, check_exact=True)
    with pytest.raises(ValueError, match="store.dtype"):
        MapStore(tmp_path, {"method": "x"}, 4, dtype="int8")


def test_a_float32_shard_is_not_read_as_a_float16_store(setup, tmp_path):
    model, ds = setup
    explainers = {"pixel": UpsampledRollout(model)}
    _, _stores = _records(ds, explainers, tmp_path, {"pixel": SIZE})
    half = MapStore(tmp_path / "cache", {"method": "pixel"}, 4, grid=SIZE, dtype="float16")
    from wsol_bench.run.store import InvalidShard
    with pytest.raises(InvalidShard, match="dtype torch.float32, expected float16"):
        half.load(0, 6)
