"""The pointing game (Zhang et al., IJCV 2018) and the energy-based pointing game (Wang et al.,
Score-CAM, CVPR-W 2020) as measures: hand-computed cases, batched against one image at a time,
Quantus' PointingGame and RelevanceMassAccuracy on the same model, images and heatmaps, and both
measures end to end on the synthetic data (which has masks)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.ndimage import distance_transform_edt
from test_measures import run_folder

from wsol_bench.datasets import EvalTransform, build_dataset
from wsol_bench.errors import InputFileError, SettingError
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.localization import GroundTruth, ground_truth
from wsol_bench.metrics.pointing import energy_shares, max_points, pointing_hits
from wsol_bench.models import load_model
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.report.run_folder import read_run
from wsol_bench.run.run_tables import check_run
from wsol_bench.run.scorers.energy_pointing_game import EnergyPointingGame
from wsol_bench.run.scorers.pointing_game import PointingGame, PointingGameSettings


def one_peak(size: int, row: int, col: int) -> torch.Tensor:
    """A [1, size, size] map that is 0 everywhere and 1 at (row, col)."""
    heat = torch.zeros(1, size, size)
    heat[0, row, col] = 1.0
    return heat


def one_pixel(size: int, row: int, col: int) -> torch.Tensor:
    """A [1, size, size] region holding the one pixel (row, col)."""
    region = torch.zeros(1, size, size, dtype=torch.bool)
    region[0, row, col] = True
    return region


@pytest.mark.parametrize(("pixel", "hit"), [
    ((10, 25), 1.0),  # 15 right of the peak: on the tolerance circle, which counts (d <= 15)
    ((19, 22), 1.0),  # 9 down, 12 right: d = 15 exactly
    ((20, 20), 1.0),  # d = 14.14
    ((11, 25), 0.0),  # 1 down, 15 right: d = 15.03, just outside
    ((21, 21), 0.0),  # d = 15.56
    ((10, 26), 0.0),  # 16 right
])
def test_a_region_just_inside_or_just_outside_the_tolerance(pixel, hit):
    """A peak at (10, 10) and a one-pixel region, tolerance 15 pixels."""
    assert pointing_hits(one_peak(40, 10, 10), one_pixel(40, *pixel), 15).item() == hit


def test_tolerance_zero_asks_the_point_to_lie_on_the_region():
    peak = one_peak(8, 3, 4)
    assert pointing_hits(peak, one_pixel(8, 3, 4), 0).item() == 1.0
    assert pointing_hits(peak, one_pixel(8, 3, 5), 0).item() == 0.0
    assert pointing_hits(peak, one_pixel(8, 3, 5), 1).item() == 1.0
    assert pointing_hits(peak, one_pixel(8, 4, 5), 1).item() == 0.0  # diagonal: d = 1.41
    assert pointing_hits(peak, one_pixel(8, 4, 5), 1.5).item() == 1.0  # a tolerance may be fractional
    assert pointing_hits(peak, one_pixel(8, 7, 0), 1e300).item() == 1.0  # beyond the diagonal: every pixel
    assert pointing_hits(peak, one_pixel(8, 7, 0), 5.65).item() == 0.0  # d = sqrt(32) = 5.657
    assert pointing_hits(peak, one_pixel(8, 7, 0), 5.66).item() == 1.0


def test_a_tied_maximum_points_at_its_first_pixel_in_raster_order():
    """Two pixels share the maximum: the game takes the first (row 2), not every tied pixel."""
    heat = torch.zeros(1, 40, 40)
    heat[0, 2, 30] = heat[0, 30, 2] = 1.0
    assert max_points(heat).tolist() == [[2, 30]]
    assert pointing_hits(heat, one_pixel(40, 30, 2), 0).item() == 0.0  # the second maximum is not the point
    assert pointing_hits(heat, one_pixel(40, 2, 30), 0).item() == 1.0
    assert pointing_hits(heat, one_pixel(40, 30, 12), 15).item() == 0.0  # 10 from the second, 31.6 from the first


def test_energy_of_a_known_map():
    """Heat k / 16 (exact in float32) at the k-th pixel of a 4 x 4 grid: the top-left 2 x 2 holds
    (0 + 1 + 4 + 5) / 16 of the 120 / 16 in all."""
    heat = (torch.arange(16, dtype=torch.float32) / 16).reshape(1, 4, 4)
    region = torch.zeros(1, 4, 4, dtype=torch.bool)
    region[0, :2, :2] = True
    assert energy_shares(heat, region).item() == pytest.approx(10 / 120, abs=1e-15)
    assert energy_shares(heat, torch.ones(1, 4, 4, dtype=torch.bool)).item() == 1.0
    bottom_row = torch.zeros(1, 4, 4, dtype=torch.bool)
    bottom_row[0, 3] = True
    assert energy_shares(heat, bottom_row).item() == pytest.approx((12 + 13 + 14 + 15) / 120, abs=1e-15)


def test_an_empty_region_has_no_score():
    heat = torch.rand(2, 6, 6)
    regions = torch.zeros(2, 6, 6, dtype=torch.bool)
    regions[1, 0, 0] = True
    hits, shares = pointing_hits(heat, regions, 15), energy_shares(heat, regions)
    assert math.isnan(hits[0].item()) and hits[1].item() == 1.0
    assert math.isnan(shares[0].item()) and 0 < shares[1].item() < 1


def test_batched_equals_one_image_at_a_time():
    """Eight heatmaps (two with tied maxima, one constant row) against random regions."""
    generator = torch.Generator().manual_seed(3)
    heat = torch.rand(8, 30, 30, generator=generator)
    heat[2, 5:9, 0] = 1.5  # a tied maximum along the border, as bilinear upsampling makes it
    heat[5] = heat[5].round(decimals=1)  # many ties
    regions = torch.rand(8, 30, 30, generator=generator) > 0.97
    regions[6] = False  # an empty region
    for tolerance in (0, 3, 15):
        whole = pointing_hits(heat, regions, tolerance)
        single = torch.cat([pointing_hits(heat[i:i + 1], regions[i:i + 1], tolerance) for i in range(8)])
        torch.testing.assert_close(whole, single, rtol=0, atol=0, equal_nan=True)
    whole = energy_shares(heat, regions)
    single = torch.cat([energy_shares(heat[i:i + 1], regions[i:i + 1]) for i in range(8)])
    torch.testing.assert_close(whole, single, rtol=0, atol=0, equal_nan=True)


def test_the_tolerance_equals_a_euclidean_distance_transform():
    """Independent oracle: a hit when scipy's exact distance from the point to the nearest
    region pixel is <= tolerance."""
    generator = torch.Generator().manual_seed(5)
    heat = torch.rand(12, 48, 48, generator=generator)
    regions = torch.rand(12, 48, 48, generator=generator) > 0.995
    regions[0, 20:24, 20:24] = True
    for tolerance in (0, 5, 15, 15.5):
        hits = pointing_hits(heat, regions, tolerance)
        for i, (row, col) in enumerate(max_points(heat).tolist()):
            if not regions[i].any():
                assert math.isnan(hits[i].item())
                continue
            distance = distance_transform_edt(~regions[i].numpy())[row, col]
            assert hits[i].item() == float(distance <= tolerance), (i, tolerance)


@pytest.mark.parametrize("bad", [-1, -0.5, math.inf, math.nan, True, "15"])
def test_a_bad_tolerance_is_refused_naming_the_setting(bad):
    with pytest.raises(SettingError, match=r"measure\.pointing_game\.params\.tolerance must be a number of pixels"):
        PointingGameSettings(tolerance=bad)


def test_a_bad_tolerance_is_refused_before_any_work(tmp_path):
    with pytest.raises(SettingError, match=r"measure\.pointing_game\.params\.tolerance must be .* got -3"):
        run_folder(tmp_path / "run", "measure=[pointing_game]", "measure.pointing_game.params.tolerance=-3")
    assert not (tmp_path / "cache").exists()


def test_rows_without_masks_hold_nan_for_the_mask(tmp_path):
    """A dataset without masks: the mask score and size are NaN, the box score is there."""
    scorer = PointingGame(None, {}, PointingGameSettings(tolerance=0), tmp_path / "pointing_game.csv",
                          dataset_name="d", split="val")
    boxes = torch.zeros(2, 6, 6, dtype=torch.bool)
    boxes[:, 1, 1] = True
    heat = torch.zeros(2, 6, 6)
    heat[0, 1, 1] = heat[1, 4, 4] = 1.0
    batch = SimpleNamespace(gt=GroundTruth(box_masks=boxes, seg_masks=None, seg_valid=None, num_boxes=[1, 1]))
    rows = scorer.measure(None, batch, torch.arange(2), heat, torch.zeros(2), torch.zeros(2, 3))
    assert [(r["pointing_box"], r["gt_box_pixels"]) for r in rows] == [(1.0, 1), (0.0, 1)]
    assert all(math.isnan(r["pointing_mask"]) and math.isnan(r["gt_mask_pixels"]) for r in rows)
    assert list(rows[0]) == scorer.row_columns()


def test_a_masks_ignore_pixels_are_outside_it_and_count_in_the_whole_maps_energy(tmp_path):
    """Heat 1 on four pixels: one on the mask, two on its ignore border, one elsewhere. The
    share inside the mask is 1 / 4 (not 1 / 2, as leaving the ignore pixels out would give), and
    a maximum on an ignore pixel does not hit the mask at tolerance 0."""
    scorer = EnergyPointingGame(None, {}, EnergyPointingGame.settings_class(), tmp_path / "energy.csv",
                                dataset_name="d", split="val")
    heat = torch.zeros(1, 6, 6)
    heat[0, 2, 2] = heat[0, 2, 3] = heat[0, 3, 2] = heat[0, 5, 5] = 1.0
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 2, 2] = True
    valid = torch.ones(1, 6, 6, dtype=torch.bool)
    valid[0, 2, 3] = valid[0, 3, 2] = False
    batch = SimpleNamespace(gt=GroundTruth(box_masks=torch.ones(1, 6, 6, dtype=torch.bool), seg_masks=mask,
                                           seg_valid=valid, num_boxes=[1]))
    [row] = scorer.measure(None, batch, torch.arange(1), heat, torch.zeros(1), torch.zeros(1, 3))
    assert row == {"energy_box": 1.0, "energy_mask": 0.25, "gt_box_pixels": 36, "gt_mask_pixels": 1}
    heat[0, 2, 2] = 0.5  # the maximum now lies on the ignore pixel (2, 3) first
    assert pointing_hits(heat, mask, 0).item() == 0.0 and pointing_hits(heat, mask, 1).item() == 1.0


# ---- Quantus on the shipped model, synthetic images and the suite's own heatmaps and masks ----

@pytest.fixture(scope="module")
def shipped_case():
    """Six synthetic val images through the shipped model: normalised inputs, labels, AG-CAM
    and random heatmaps (the suite's own, docs/protocol.md 3) and the ground truth."""
    model = load_model("wsol_synthetic_vit", pretrained=True)
    dataset = build_dataset("synthetic", split="val", num_images=6,
                            transform=EvalTransform((224, 224), (0.5,) * 3, (0.5,) * 3))
    samples = [dataset[i] for i in range(6)]
    images = torch.stack([s.image for s in samples])
    labels = torch.tensor([s.label for s in samples])
    maps = torch.cat([get_explainer(name, model)(images, labels).maps for name in ("agcam", "random")])
    heat, degenerate = to_heatmaps(maps, (224, 224))
    assert not degenerate.any()
    gt = ground_truth(samples, (224, 224))
    return SimpleNamespace(model=model, images=torch.cat([images, images]), labels=torch.cat([labels, labels]),
                           heat=heat, boxes=torch.cat([gt.box_masks, gt.box_masks]),
                           masks=torch.cat([gt.seg_masks, gt.seg_masks]))


def quantus_scores(metric_class, case, heat: np.ndarray, regions: torch.Tensor) -> np.ndarray:
    """Quantus' metric with our heatmaps as they are (no abs, no normalisation)."""
    metric = metric_class(abs=False, normalise=False, disable_warnings=True, display_progressbar=False)
    return np.asarray(metric(model=case.model, x_batch=case.images.numpy(), y_batch=case.labels.numpy(),
                             a_batch=heat, s_batch=regions[:, None].numpy().astype(np.float32),
                             channel_first=True), dtype=np.float64)


def test_pointing_game_equals_quantus_on_the_shipped_model(shipped_case):
    """Quantus' PointingGame has no tolerance: ours at tolerance 0 gives its numbers wherever
    the maximum is one pixel. A maximum in a border patch of the upsampled grid map ties 8
    pixels (the bilinear resize clamps at the edge): there Quantus asks whether ANY tied pixel
    lies on the region, ours whether the first does."""
    quantus = pytest.importorskip("quantus")
    case = shipped_case
    flat = case.heat.flatten(1)
    tied = flat == flat.max(1, keepdim=True).values
    unique = tied.sum(1) == 1
    assert 0 < int(unique.sum()) < 12  # both kinds of map are here
    first = max_points(case.heat)
    for regions in (case.boxes, case.masks):
        ours = pointing_hits(case.heat, regions, 0).numpy()
        theirs = quantus_scores(quantus.PointingGame, case, case.heat.numpy(), regions)
        assert ours[unique.numpy()].tolist() == theirs[unique.numpy()].tolist()
        on_first = regions[torch.arange(12), first[:, 0], first[:, 1]]
        assert ours.tolist() == on_first.double().tolist()
        assert theirs.tolist() == (tied & regions.flatten(1)).any(1).double().tolist()
    assert 0 < pointing_hits(case.heat, case.masks, 0).sum() < 12  # neither all hits nor all misses


def test_quantus_counts_every_tied_maximum_the_paper_one_point(shipped_case):
    """Where the maximum ties, Quantus counts a hit when ANY tied pixel lies on the region; the
    paper extracts one maximum point (its code: np.argmax, the first). A second maximum put
    inside the mask of an image whose first maximum misses it: Quantus hits, we miss."""
    quantus = pytest.importorskip("quantus")
    case = shipped_case
    heat = case.heat.clone()
    misses = (pointing_hits(heat, case.masks, 0) == 0).nonzero()[:, 0]
    image = int(misses[0])
    (row, col), inside = max_points(heat[image:image + 1])[0].tolist(), case.masks[image].nonzero()[-1].tolist()
    assert (inside[0], inside[1]) > (row, col)  # the tied pixel comes later in raster order
    heat[image, inside[0], inside[1]] = heat[image].max()
    ours = pointing_hits(heat, case.masks, 0).numpy()
    theirs = quantus_scores(quantus.PointingGame, case, heat.numpy(), case.masks)
    assert ours[image] == 0.0 and theirs[image] == 1.0
    flat = heat.flatten(1)
    others = (np.arange(12) != image) & ((flat == flat.max(1, keepdim=True).values).sum(1) == 1).numpy()
    assert others.any() and ours[others].tolist() == theirs[others].tolist()


def test_quantus_scores_an_empty_region_as_a_hit_we_score_none(shipped_case):
    """Quantus writes NaN into a bool array for an empty region, which reads as True (a hit);
    an empty region can be neither hit nor missed, so our row holds NaN."""
    quantus = pytest.importorskip("quantus")
    case = shipped_case
    regions = case.boxes.clone()
    regions[0] = False
    assert math.isnan(pointing_hits(case.heat, regions, 0)[0].item())
    assert quantus_scores(quantus.PointingGame, case, case.heat.numpy(), regions)[0] == 1.0


def test_energy_equals_quantus_relevance_mass_accuracy(shipped_case):
    """RelevanceMassAccuracy (sum inside / sum of the map) on the same heatmaps (given to Quantus
    in float64, the precision our sums use) and the same boxes and masks."""
    quantus = pytest.importorskip("quantus")
    case = shipped_case
    for regions in (case.boxes, case.masks):
        ours = energy_shares(case.heat, regions).numpy()
        theirs = quantus_scores(quantus.RelevanceMassAccuracy, case, case.heat.double().numpy(), regions)
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)
        assert ((ours > 0) & (ours < 1)).all()


# ---- both measures end to end on the synthetic data ----

MEASURES = {PointingGame: ("pointing", "Pointing"), EnergyPointingGame: ("energy", "Energy PG")}


@pytest.fixture(scope="module")
def pointing_run(tmp_path_factory):
    return run_folder(tmp_path_factory.mktemp("pointing") / "run", "measure=[pointing_game,energy_pointing_game]")


@pytest.mark.parametrize("scorer", list(MEASURES))
def test_both_measures_reach_the_tables_as_the_means_of_their_rows(pointing_run, scorer):
    prefix, name = MEASURES[scorer]
    rows = pd.read_csv(pointing_run / scorer.file)
    assert len(rows) == 12 and (rows["degenerate"] == 0).all()
    assert (rows["gt_box_pixels"] > 0).all() and (rows["gt_mask_pixels"] > 0).all()
    means = rows.groupby("method", sort=False)[[f"{prefix}_box", f"{prefix}_mask"]].mean() * 100
    for variant in ("box", "mask"):
        table = pd.read_csv(pointing_run / f"table_{variant}.csv").set_index("method")
        assert table[f"{name} (box)"].to_dict() == pytest.approx(means[f"{prefix}_box"].to_dict(), abs=1e-12)
        assert table[f"{name} (mask)"].to_dict() == pytest.approx(means[f"{prefix}_mask"].to_dict(), abs=1e-12)
        assert table[scorer.count_column].tolist() == [6, 6]
    joined = pd.read_csv(pointing_run / "table.csv").groupby("method", sort=False).first()
    assert joined[f"{name} (mask)"].to_dict() == pytest.approx(means[f"{prefix}_mask"].to_dict(), abs=1e-12)
    assert check_run(pointing_run) == []


def test_the_run_tables_name_the_tolerance_and_the_rows_match_the_engine(pointing_run):
    """The caption carries the run's tolerance; the rows equal the engine on the run's maps."""
    assert "within 15 pixels of the ground-truth boxes or mask" in (pointing_run / "table_box.md").read_text()
    rows = pd.read_csv(pointing_run / PointingGame.file)
    assert set(rows["pointing_box"]) <= {0.0, 1.0} and set(rows["pointing_mask"]) <= {0.0, 1.0}
    assert (rows["pointing_box"] >= rows["pointing_mask"]).all()  # the mask lies inside the boxes
    energy = pd.read_csv(pointing_run / EnergyPointingGame.file)
    assert (energy["energy_box"] >= energy["energy_mask"]).all()


def edited_tables(run, scorer, edit):
    """The scorer's tables of a copy of the run's rows changed by `edit`."""
    rows = pd.read_csv(run / scorer.file)
    edit(rows)
    rows.to_csv(run / scorer.file, index=False)
    return scorer.tables(read_run(run))


def test_images_with_an_empty_region_or_no_masks_are_left_out_and_said(pointing_run, tmp_path):
    import shutil

    run = shutil.copytree(pointing_run, tmp_path / "copy")
    rows = pd.read_csv(run / PointingGame.file)

    def empty_first_box(frame):
        frame.loc[0, ["pointing_box", "gt_box_pixels"]] = [math.nan, 0]

    part = edited_tables(run, PointingGame, empty_first_box)
    method = rows.loc[0, "method"]
    kept = rows[(rows["method"] == method)].iloc[1:]
    assert part.summary.loc[method, "Pointing (box)"] == pytest.approx(kept["pointing_box"].mean() * 100)
    assert part.summary.loc[method, "n_images_pointing_game"] == 5
    assert any("leaves out 1 image whose ground-truth box has no pixel" in note for note in part.notes)

    def no_masks(frame):
        frame["pointing_mask"] = frame["gt_mask_pixels"] = math.nan

    part = edited_tables(run, PointingGame, no_masks)
    assert list(part.summary.columns) == ["Pointing (box)", "Pointing (box) ci_lo", "Pointing (box) ci_hi",
                                          "n_images_pointing_game"]

    def lost_score(frame):
        frame.loc[3, "pointing_box"] = math.nan  # the region has pixels: a score is missing

    with pytest.raises(InputFileError, match="missing scores for 1 rows"):
        edited_tables(run, PointingGame, lost_score)
