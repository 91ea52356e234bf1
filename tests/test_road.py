"""ROAD with noisy linear imputation (docs/protocol.md 5), against hand computations and
pytorch-grad-cam's `pytorch_grad_cam.metrics.road` as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit
from scipy.sparse import csc_matrix
from scipy.sparse.linalg import spsolve

from wsol_bench.errors import SettingError
from wsol_bench.metrics.grid_solver import OFFSETS, GridCholesky
from wsol_bench.metrics.road import (
    RoadSettings,
    noise_draw,
    percentile_thresholds,
    removal_masks,
    road_columns,
    road_rows,
    road_scores,
)
from wsol_bench.metrics.road_imputation import solve_imputation
from wsol_bench.models import load_model

road = pytest.importorskip("pytorch_grad_cam.metrics.road")
targets_lib = pytest.importorskip("pytorch_grad_cam.utils.model_targets")

EDGE, CORNER = 1 / 6, 1 / 12
# The library turns a torch comparison into numpy with np.float32(tensor), which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")


def smooth_maps(count: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Heatmaps like upsampled patch maps: bilinear from a coarse random grid, in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, max(size[0] // 8, 2), max(size[1] // 8, 2), generator=generator)
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[:, 0]


def library_solution(image: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The library's imputation without noise (its own call), as a [C, H, W] image."""
    return road.NoisyLinearImputer(noise=0.0)(image, (~removed).float())


def test_one_removed_pixel_is_the_weighted_mean_of_its_neighbours() -> None:
    """Centre of a 3x3 image: edge neighbours 1/6, corners 1/12 (sum 1). A removed corner of
    the image keeps only its 3 in-image neighbours, renormalised by their weight sum 5/12.
    (Within 1e-6: each term w v is rounded to float32, as the library computes it.)"""
    image = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 19]]).view(1, 1, 3, 3)  # corner 19: not linear
    centre = torch.zeros(1, 3, 3, dtype=torch.bool)
    centre[0, 1, 1] = True
    expected = EDGE * (2 + 4 + 6 + 8) + CORNER * (1 + 3 + 7 + 19)
    assert solve_imputation(image, centre)[0, 0, 1, 1].item() == pytest.approx(expected, abs=1e-6)
    corner = torch.zeros(1, 3, 3, dtype=torch.bool)
    corner[0, 0, 0] = True
    expected = (EDGE * 2 + EDGE * 4 + CORNER * 5) / (2 * EDGE + CORNER)
    assert solve_imputation(image, corner)[0, 0, 0, 0].item() == pytest.approx(expected, abs=1e-6)


def test_two_removed_neighbours_solve_their_coupled_equations() -> None:
    """Pixels a = (1, 1) and b = (1, 2) of a 3x4 image, both removed: s x_a - w_ab x_b =
    sum of a's kept neighbours (and the same for b), with w_ab = 1/6 and s = 1 inside."""
    image = torch.tensor([[1.0, 7, 2, 9], [4, 0, 8, 3], [6, 5, 12, 1]]).view(1, 1, 3, 4)  # not linear:
    # any symmetric weighting reproduces a linear image, so that would not test the weights
    removed = torch.zeros(1, 3, 4, dtype=torch.bool)
    removed[0, 1, 1:3] = True
    v = image[0, 0].double()
    known_a = EDGE * (v[0, 1] + v[2, 1] + v[1, 0]) + CORNER * (v[0, 0] + v[0, 2] + v[2, 0] + v[2, 2])
    known_b = EDGE * (v[0, 2] + v[2, 2] + v[1, 3]) + CORNER * (v[0, 1] + v[0, 3] + v[2, 1] + v[2, 3])
    x_a, x_b = np.linalg.solve([[1, -EDGE], [-EDGE, 1]], [float(known_a), float(known_b)])
    out = solve_imputation(image, removed)[0, 0]
    assert out[1, 1].item() == pytest.approx(x_a, abs=1e-6)
    assert out[1, 2].item() == pytest.approx(x_b, abs=1e-6)


@pytest.mark.parametrize("size", [(9, 11), (40, 48), (1, 7)])
def test_imputation_equals_the_library_direct_solve(size) -> None:
    """Random and blob-shaped masks (1 to 90 % removed) on 3-channel images: the float64
    solution equals scipy's spsolve of the library's own system to 1e-9 (its right-hand side
    from float32 terms included), and the library's float32 imputation to 1e-6."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, *size, generator=generator)
    blobs = smooth_maps(3, size, seed=2) > torch.tensor([0.2, 0.5, 0.8])[:, None, None]
    scattered = torch.rand(3, *size, generator=generator) < torch.tensor([0.01, 0.5, 0.9])[:, None, None]
    removed = torch.cat([blobs, scattered])
    removed[:, 0, 0] = False  # one kept pixel at least
    removed[:, -1, -1] = True  # one removed pixel at least
    solved = solve_imputation(images, removed)
    for image, mask, ours in zip(images, removed, solved):
        matrix, rhs = road.NoisyLinearImputer.setup_sparse_system((~mask).float().numpy(), image.numpy(),
                                                                 road.neighbors_weights)
        direct = spsolve(csc_matrix(matrix), rhs).reshape(-1, 3)
        assert np.abs(ours[:, mask].numpy().T - direct).max() < 1e-9
        expected = library_solution(image, mask)
        assert (torch.where(mask, ours.float(), image) - expected).abs().max() < 1e-6


def test_grid_solver_equals_a_dense_solve() -> None:
    """GridCholesky on random SPD 9-point systems of a 37 x 41 grid (boxes of every shape,
    blocks on both sides of the sweep/Cholesky switch), float64, against torch.linalg.solve
    on the assembled matrices; `first_solution` and `solve` agree."""
    generator = torch.Generator().manual_seed(21)
    height, width = 37, 41
    n = height * width
    couplings = -torch.rand(2, 9, height, width, generator=generator, dtype=torch.float64) / 8
    index = torch.arange(n).view(height, width)
    dense = torch.zeros(2, n, n, dtype=torch.float64)
    for k, (dy, dx) in enumerate(OFFSETS):
        if (dy, dx) > (0, 0):  # each pair once, mirrored: symmetric
            rows = index[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)].flatten()
            cols = rows + dy * width + dx
            values = couplings[:, k, max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)].flatten(1)
            dense[:, rows, cols] = values
            dense[:, cols, rows] = values
    dense += torch.diag_embed(dense.abs().sum(2) + 0.01)  # diagonally dominant: SPD
    coefficients = torch.zeros(2, 9, n, dtype=torch.float64)
    for k, (dy, dx) in enumerate(OFFSETS):
        rows = index[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)].flatten()
        coefficients[:, k, rows] = dense[:, rows, rows + dy * width + dx]
    rhs = torch.randn(2, 3, height, width, generator=generator, dtype=torch.float64)
    factors = GridCholesky(coefficients.view(2, 9, height, width), torch.float64, rhs)
    expected = torch.linalg.solve(dense, rhs.flatten(2).mT).mT.view(rhs.shape)
    assert (factors.first_solution - expected).abs().max() < 1e-10
    assert (factors.solve(rhs) - expected).abs().max() < 1e-10


def test_noise_equals_the_library_draws_when_seeded() -> None:
    """With torch.manual_seed(s) before the library's imputer, its noise is our per-image
    generator's draw: the perturbed values agree to float32 rounding of the solution."""
    image = torch.randn(3, 20, 24, generator=torch.Generator().manual_seed(3))
    removed = smooth_maps(1, (20, 24), seed=4)[0] > 0.5
    torch.manual_seed(11)
    expected = road.NoisyLinearImputer(noise=0.01)(image, (~removed).float())
    draw = noise_draw(torch.Generator().manual_seed(11), int(removed.sum()), 3)
    ours = solve_imputation(image[None], removed[None])[0].float()
    ours[:, removed] = ours[:, removed] + draw * 0.01
    assert (torch.where(removed, ours, image) - expected).abs().max() < 1e-6
    assert (expected - library_solution(image, removed)).abs().max() > 1e-3  # the noise is there


def test_thresholds_and_masks_equal_numpy_percentile_and_the_library() -> None:
    """np.percentile bit for bit (float32, Python-number percentiles), on maps with many ties
    and with threshold values between neighbours one ulp apart; masks as the library's."""
    generator = torch.Generator().manual_seed(5)
    maps = torch.cat([smooth_maps(2, (17, 19), seed=6), torch.rand(2, 17, 19, generator=generator).round(decimals=1),
                      (0.3 + torch.arange(17 * 19) * 2e-8).view(1, 17, 19).float()])
    percentiles = (10, 12.5, 33, 50, 66.7, 90, 99)
    rows = torch.cat([maps.flatten(1), torch.rand(40, 17 * 19, generator=generator)])
    thresholds = percentile_thresholds(rows, percentiles)
    for values, row in zip(rows, thresholds):  # both lerp branches, t < 0.5 and t >= 0.5
        expected = [np.percentile(values.numpy(), p) for p in percentiles]
        assert row.numpy().tobytes() == np.asarray(expected, dtype=np.float32).tobytes()
    settings = RoadSettings(percentiles=percentiles)
    masks = removal_masks(maps, settings)
    for b, heat in enumerate(maps):
        for j, (curve, p) in enumerate((c, p) for c in settings.curves for p in percentiles):
            cls = road.RemoveMostRelevantFirst if curve == "morf" else road.RemoveLeastRelevantFirst
            kept = cls(p, lambda image, mask: mask)(torch.zeros(1, 17, 19), heat)  # the imputer gets the mask
            assert torch.equal(masks[b, j], kept == 0)


def run_library(model, images, heatmaps, labels, percentiles, seed, target_cls):
    """ROADCombined one image per call, seeded before each call (the reference's own call)."""
    out = []
    for image, heat, label in zip(images, heatmaps, labels.tolist()):
        torch.manual_seed(seed)
        out.append(float(road.ROADCombined(percentiles=list(percentiles))(
            image[None], heat[None].numpy(), [target_cls(label)], model)[0]))
    return torch.tensor(out, dtype=torch.float64)


def test_road_combined_equals_pytorch_grad_cam_on_the_shipped_model() -> None:
    """The shipped model at its input size (224 x 224), softmax target, two percentiles:
    ROADCombined and ROADMostRelevantFirstAverage (seeded alike) to 1e-6."""
    model = load_model("wsol_synthetic_vit", pretrained=True)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7)).clamp(-1, 1)
    heatmap = smooth_maps(1, (224, 224), seed=8)
    label = torch.tensor([1])
    with torch.inference_mode():
        clean_logits = model(image)
    ours = road_scores(model, image, heatmap, label, RoadSettings(percentiles=(30, 70), seed=3),
                       clean_logits=clean_logits)
    expected = run_library(model, image, heatmap, label, (30, 70), 3, targets_lib.ClassifierOutputSoftmaxTarget)
    assert abs(float(ours["road_combined"][0] - expected[0])) < 1e-6
    assert abs(float(ours["road_combined"][0])) > 1e-4  # not trivially zero
    torch.manual_seed(3)
    morf = road.ROADMostRelevantFirstAverage([30, 70])(image, heatmap.numpy(),
                                                       [targets_lib.ClassifierOutputSoftmaxTarget(1)], model)
    alone = road_scores(model, image, heatmap, label, RoadSettings(percentiles=(30, 70), order="morf", seed=3),
                        clean_logits=clean_logits)
    assert abs(float(alone["road_morf"][0]) - float(morf[0])) < 1e-6


def test_logit_scores_and_default_percentiles_on_a_tiny_model() -> None:
    """score=logit is the library's ClassifierOutputTarget; all nine default percentiles."""
    model = make_vit()
    generator = torch.Generator().manual_seed(9)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    heatmaps = smooth_maps(2, (32, 32), seed=10)
    labels = torch.tensor([2, 4])
    ours = road_scores(model, images, heatmaps, labels, RoadSettings(score="logit", seed=4))
    expected = run_library(model, images, heatmaps, labels, RoadSettings().percentiles, 4,
                           targets_lib.ClassifierOutputTarget)
    assert (ours["road_combined"] - expected).abs().max() < 1e-5
    assert ours["morf"].shape == (2, 9) and ours["all_removed"].tolist() == [0, 0]


def test_batched_equals_one_image_at_a_time() -> None:
    """Five images with their own noise seeds, odd chunk sizes, against one call per image."""
    model = make_vit()
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    heatmaps = smooth_maps(5, (32, 32), seed=13)
    labels = torch.tensor([0, 1, 2, 3, 4])
    seeds = [5, 6, 7, 8, 9]
    batched = road_scores(model, images, heatmaps, labels, RoadSettings(batch_size=7, solve_batch_size=5),
                          noise_seeds=seeds)
    for b in range(5):
        alone = road_scores(model, images[b:b + 1], heatmaps[b:b + 1], labels[b:b + 1],
                            RoadSettings(seed=seeds[b], batch_size=18))
        for key in ("morf", "lerf", "road_combined"):
            assert torch.allclose(batched[key][b], alone[key][0], rtol=0, atol=1e-6)
    assert not torch.allclose(batched["morf"][0], road_scores(model, images[:1], heatmaps[:1], labels[:1])["morf"][0],
                              rtol=0, atol=1e-6)  # the seed matters


class PassCounter:
    """Forward hook counting the images that went through a model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.samples = 0
        model.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.samples += args[0].shape[0]


def test_passes_and_fully_removed_inputs() -> None:
    """One pass per (curve, percentile) with the clean logits given, one more without. A
    heatmap with 45 % zeros removes every pixel at MoRF percentiles 10..40 (threshold 0), a
    constant map at every percentile: those inputs are 0 plus noise, as the library's solver
    makes them, scored as the library scores them, and counted."""
    model = make_vit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(14))
    heatmaps = smooth_maps(2, (32, 32), seed=15)
    flat = heatmaps[0].flatten()
    flat[flat.argsort()[:461]] = 0.0  # 45 % of 1024 pixels tied at zero
    heatmaps[1] = 0.5
    labels = torch.tensor([1, 2])
    counter = PassCounter(model)
    with torch.inference_mode():
        logits = model(images)
    counter.samples = 0
    out = road_scores(model, images, heatmaps, labels, RoadSettings(seed=2), clean_logits=logits)
    assert out["all_removed"].tolist() == [4, 18]
    assert counter.samples == 2 * 18
    expected = run_library(model, images, heatmaps, labels, RoadSettings().percentiles, 2,
                           targets_lib.ClassifierOutputSoftmaxTarget)
    assert (out["road_combined"] - expected).abs().max() < 1e-6
    counter.samples = 0
    road_scores(model, images[:1], heatmaps[:1], labels[:1])
    assert counter.samples == 19


def test_rows_follow_the_columns() -> None:
    settings = RoadSettings(percentiles=(25, 75))
    scores = {"clean": torch.tensor([0.5]), "all_removed": torch.tensor([0]),
              "morf": torch.tensor([[0.2, 0.4]]), "lerf": torch.tensor([[0.6, 0.5]]),
              "road_morf": torch.tensor([-0.2], dtype=torch.float64),
              "road_lerf": torch.tensor([0.05], dtype=torch.float64),
              "road_combined": torch.tensor([0.125], dtype=torch.float64)}
    (row,) = road_rows(scores, settings)
    assert list(row) == road_columns(settings)
    assert row["road_combined"] == 0.125 and row["road_morf_p75"] == pytest.approx(0.4)
    assert row["road_lerf_p25"] == pytest.approx(0.6) and row["road_all_removed"] == 0.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"percentiles": (0, 50)}, "faithfulness.percentiles must lie strictly between 0 and 100"),
    ({"percentiles": (10, 10)}, "faithfulness.percentiles has repeated values"),
    ({"percentiles": ("a",)}, "faithfulness.percentiles must be a list of numbers"),
    ({"order": "up"}, "faithfulness.order 'up' is unknown"),
    ({"score": "prob"}, "faithfulness.score 'prob' is unknown"),
    ({"noise": -0.1}, "faithfulness.noise must be a finite number >= 0"),
    ({"seed": -1}, "faithfulness.seed must be a non-negative integer"),
    ({"batch_size": 0}, "faithfulness.batch_size must be a positive integer"),
    ({"solve_batch_size": 2.5}, "faithfulness.solve_batch_size must be a positive integer"),
])
def test_settings_refusals(kwargs, message) -> None:
    with pytest.raises(SettingError, match=message):
        RoadSettings(**kwargs)


def test_input_refusals() -> None:
    model = make_vit()
    images, heat = torch.zeros(1, 3, 32, 32), torch.rand(1, 32, 32)
    with pytest.raises(SettingError, match="do not match images"):
        road_scores(model, images, heat[:, :16], torch.tensor([0]))
    with pytest.raises(SettingError, match="out of range"):
        road_scores(model, images, heat, torch.tensor([7]))
    with pytest.raises(SettingError, match="one non-negative integer per image"):
        road_scores(model, images, heat, torch.tensor([0]), noise_seeds=[1, 2])
