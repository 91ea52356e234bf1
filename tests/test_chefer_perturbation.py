"""Chefer et al.'s positive/negative perturbation test (wsol_bench.metrics.chefer_perturbation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import InputRecorder, make_vit
from torch import nn

from wsol_bench.datasets import EvalTransform, build_dataset
from wsol_bench.errors import SettingError
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.chefer_perturbation import (
    PUBLISHED_STEPS,
    CheferSettings,
    RemovalPlan,
    chefer_rows,
    explained_classes,
    pixel_counts,
    row_columns,
    score_chefer_batch,
)
from wsol_bench.models import load_model
from wsol_bench.regions.heatmaps import to_heatmaps

HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # removed pixels: (0 - 0.5) / 0.5 = -1


class PixelSetModel(nn.Module):
    """Logits [mean of the input over all channels and the pixels `pixels` (row-major flat
    indices), 0.1]: with an image of ones (normalised 1, removed -1), class 0 wins while at
    most one pixel in four of the set is removed."""

    def __init__(self, pixels: list[int]) -> None:
        super().__init__()
        self.pixels = torch.tensor(pixels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = x.flatten(2)[:, :, self.pixels].mean((1, 2))
        return torch.stack([feature, torch.full_like(feature, 0.1)], 1)


class PassCounter:
    """Forward hook counting the images that went through a model."""

    def __init__(self, model: nn.Module) -> None:
        self.samples = 0
        model.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.samples += args[0].shape[0]


def top_row_case() -> tuple[PixelSetModel, torch.Tensor, torch.Tensor]:
    """4x4 image of ones; the model reads the top row; the heatmap ranks the top row first
    (1.0 > 0.9 > 0.8 > 0.7) and the other 12 pixels below it, all values distinct."""
    heat = torch.cat([torch.tensor([1.0, 0.9, 0.8, 0.7]), torch.linspace(0.6, 0.0, 12)]).reshape(1, 4, 4)
    return PixelSetModel([0, 1, 2, 3]).eval(), torch.ones(1, 3, 4, 4), heat


def test_counts_follow_the_script() -> None:
    # int(n * s) in float64 and truncated (P 91): 0.3 * 50176 = 15052.8 -> 15052.
    assert pixel_counts(224 * 224, PUBLISHED_STEPS) == [5017, 10035, 15052, 20070, 25088, 30105, 35123,
                                                        40140, 45158]
    assert pixel_counts(16, PUBLISHED_STEPS) == [1, 3, 4, 6, 8, 9, 11, 12, 14]


def test_hand_computed_curves_and_areas() -> None:
    """Removed top-row pixels r at each step (counts 1,3,4,6,8,9,11,12,14 of 16): positive
    removes the top row first, r = min(k, 4); negative last, r = max(0, k - 12). Correct while
    r <= 1. Areas over x = 0, .1, ..., .9, 1 of [clean, steps, 0]:
    positive [1, 1,0,0,0,0,0,0,0,0, 0] -> 0.1 + 0.05 = 0.15;
    negative [1, 1,1,1,1,1,1,1,1,0, 0] -> 0.8 + 0.05 = 0.85."""
    model, images, heat = top_row_case()
    out = score_chefer_batch(model, images, heat, torch.tensor([0]), CheferSettings(**HALF))
    assert out["clean_correct"].tolist() == [1.0]
    assert out["positive"][0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert out["negative"][0].tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert out["auc_positive"].item() == pytest.approx(0.15, abs=1e-12)
    assert out["auc_negative"].item() == pytest.approx(0.85, abs=1e-12)
    # Label 1: correct exactly where class 0 lost, clean wrong. Positive [0, 0,1,1,1,1,1,1,1,1, 0]
    # -> 0.05 + 0.7 + 0.05 = 0.8; negative [0, 0,0,0,0,0,0,0,0,1, 0] -> 0.05 + 0.05 = 0.1.
    other = score_chefer_batch(model, images, heat, torch.tensor([1]), CheferSettings(**HALF))
    assert other["clean_correct"].tolist() == [0.0]
    assert other["positive"][0].tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert other["auc_positive"].item() == pytest.approx(0.8, abs=1e-12)
    assert other["auc_negative"].item() == pytest.approx(0.1, abs=1e-12)


def test_removed_pixels_are_black_before_normalisation() -> None:
    """With mean 0 and std 1 a removed pixel is 0 in the model input, not -1: the feature
    (4 - r) / 4 stays above 0.1 until all four top-row pixels are gone (k = 4 at 0.3)."""
    model, images, heat = top_row_case()
    out = score_chefer_batch(model, images, heat, torch.tensor([0]),
                             CheferSettings(mean=(0.0,), std=(1.0,), test="positive"))
    assert out["positive"][0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0]
    # A grey baseline (0.75 in [0, 1], 0.5 normalised): the feature 1 - r / 8 never drops to
    # 0.1 -> always correct.
    grey = score_chefer_batch(model, images, heat, torch.tensor([0]),
                              CheferSettings(baseline=0.75, test="positive", **HALF))
    assert grey["positive"][0].tolist() == [1] * 9


def test_ties_resolve_as_torch_topk_not_as_a_stable_sort() -> None:
    """A constant map: every pixel tied. The script removes torch.topk's choice (P 91), which
    is not the first k pixels in index order; the model reads four pixels topk removes at
    step 0.1 (k = 25 of 256) and a stable sort would keep."""
    heat = torch.zeros(1, 16, 16)
    k = pixel_counts(256, PUBLISHED_STEPS)[0]
    chosen = torch.topk(heat.flatten(1), k, dim=1).indices[0].sort().values.tolist()
    pixels = [p for p in chosen if p >= k][:4]
    assert len(pixels) == 4  # the premise: topk's tie choice differs from the stable prefix
    model = PixelSetModel(pixels).eval()
    out = score_chefer_batch(model, torch.ones(1, 3, 16, 16), heat, torch.tensor([0]), CheferSettings(**HALF))
    assert out["positive"][0, 0].item() == 0.0  # all four removed at the first step


def test_steps_that_remove_nothing_reuse_the_clean_pass() -> None:
    model, images, heat = top_row_case()
    counter = PassCounter(model)
    out = score_chefer_batch(model, images, heat, torch.tensor([0]),
                             CheferSettings(steps=(0.01, 0.5), test="positive", **HALF))
    assert out["positive"][0].tolist() == [1.0, 0.0]  # int(16 * 0.01) = 0 pixels: the clean image
    assert counter.samples == 2  # the clean image and the 0.5 step, nothing else
    counter.samples = 0
    nothing = score_chefer_batch(model, images, heat, torch.tensor([0]), CheferSettings(steps=(0.01, 0.05), **HALF),
                                 clean_logits=torch.tensor([[1.0, 0.0]]))
    assert counter.samples == 0 and nothing["positive"][0].tolist() == [1.0, 1.0]  # no step removes a pixel


def synthetic_raw(model: nn.Module, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` synthetic val images as the script stores them: resized, in [0, 1]."""
    dataset = build_dataset("synthetic", split="val", num_images=count,
                            transform=EvalTransform((224, 224), (0.0,) * 3, (1.0,) * 3))
    samples = [dataset[i] for i in range(count)]
    return torch.stack([s.image for s in samples]), torch.tensor([s.label for s in samples])


def normalize(tensor: torch.Tensor, mean, std) -> torch.Tensor:
    """The scripts' normalize (P 17-23), with the model's mean and std."""
    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device)
    tensor.sub_(mean[None, :, None, None]).div_(std[None, :, None, None])
    return tensor


@torch.inference_mode()
def published_loop(model, images, vis, labels, neg, mean, std, loader_batch=16):
    """P 47-121 written out: per loader batch, the clean pass, then per step torch.topk of the
    (negated when neg) flattened map, scatter 0 into the [0, 1] image, normalise, one pass,
    top-1 against the label. Then the area: trapezoid over x = [0, steps, 1] of [clean
    accuracy, step accuracies, 0] (sklearn.metrics.auc of the reusing scripts)."""
    base_size = images.shape[2] * images.shape[3]  # P 33: 224 * 224
    perturbation_steps = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    num_correct_model, num_correct_pertub = [], [[] for _ in perturbation_steps]
    for s in range(0, len(images), loader_batch):
        data, vis_b, target = images[s:s + loader_batch], vis[s:s + loader_batch], labels[s:s + loader_batch]
        pred = model(normalize(data.clone(), mean, std))
        pred_class = pred.data.max(1, keepdim=True)[1].squeeze(1)
        num_correct_model += (target == pred_class).tolist()
        org_shape = data.shape
        if neg:
            vis_b = -vis_b
        vis_b = vis_b.reshape(org_shape[0], -1)
        for i in range(len(perturbation_steps)):
            _data = data.clone()
            _, idx = torch.topk(vis_b, int(base_size * perturbation_steps[i]), dim=-1)
            idx = idx.unsqueeze(1).repeat(1, org_shape[1], 1)
            _data = _data.reshape(org_shape[0], org_shape[1], -1)
            _data = _data.scatter_(-1, idx, 0)
            _data = _data.reshape(*org_shape)
            out = model(normalize(_data, mean, std))
            target_class = out.data.max(1, keepdim=True)[1].squeeze(1)
            num_correct_pertub[i] += (target == target_class).tolist()
    x = [0.0, *perturbation_steps, 1.0]
    y = [np.mean(num_correct_model), *np.mean(num_correct_pertub, axis=1), 0.0]
    return np.array(num_correct_model), np.array(num_correct_pertub).T, float(np.trapezoid(y, x))


def test_equals_the_published_loop_on_the_shipped_model() -> None:
    """Three synthetic images, the shipped model, AG-CAM maps upsampled as G does (ties along
    the borders) and one constant map (every pixel tied); the clean logits of the explanation
    pass are reused, as a run does."""
    model = load_model("wsol_synthetic_vit", pretrained=True)
    mean, std = (0.5,) * 3, (0.5,) * 3  # the shipped model's data config
    raw, labels = synthetic_raw(model, 3)
    images = normalize(raw.clone(), mean, std)
    explanation = get_explainer("agcam", model)(images, labels)
    maps = explanation.maps.clone()
    maps[1] = 0.3
    heatmaps, _ = to_heatmaps(maps, (224, 224))
    counter = PassCounter(model)
    out = score_chefer_batch(model, images, heatmaps, labels, CheferSettings(batch_size=16), explanation.logits)
    # Every distinct perturbed input once, no clean pass: where torch.topk picks the same tied
    # pixels of the constant map and of its negation, its negative input is its positive one.
    flat = heatmaps[1].flatten()[None]
    shared = sum(torch.equal(torch.topk(flat, k).indices.sort().values, torch.topk(-flat, k).indices.sort().values)
                 for k in pixel_counts(224 * 224, PUBLISHED_STEPS))
    assert counter.samples == 3 * 18 - shared
    for test, neg in (("positive", False), ("negative", True)):
        clean, curve, area = published_loop(model, raw, heatmaps, labels, neg, mean, std)
        assert out["clean_correct"].tolist() == clean.tolist()
        assert out[test].tolist() == curve.tolist()
        assert out[f"auc_{test}"].mean().item() == pytest.approx(area, abs=1e-12)
    assert out["clean_correct"].sum() >= 2 and not torch.equal(out["positive"], out["negative"])  # not trivial


def test_batched_equals_one_image_at_a_time() -> None:
    """Eight images of a tiny random ViT (32 x 32 inputs), chunks of 7 across images, steps
    and tests, against one image per call and per pass; one map constant (all pixels tied)."""
    model = make_vit(num_classes=3)
    torch.manual_seed(1)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    maps = torch.rand(8, 4, 4)
    maps[3] = 1.0
    heatmaps, _ = to_heatmaps(maps, (32, 32))
    heatmaps[5] = (heatmaps[5] * 4).round() / 4  # five levels: most cuts split a run of ties
    heatmaps[6] = heatmaps[6].half().float()
    whole = score_chefer_batch(model, images, heatmaps, labels, CheferSettings(batch_size=7))
    singles = [score_chefer_batch(model, images[i:i + 1], heatmaps[i:i + 1], labels[i:i + 1],
                                  CheferSettings(batch_size=1)) for i in range(len(images))]
    for key, value in whole.items():
        assert torch.equal(value, torch.cat([s[key] for s in singles])), key


def tied_maps(size: int) -> torch.Tensor:
    """[7, size, size] maps whose step cuts fall inside runs of equal values: constant, zeros
    of both signs, quantised to 5 and to 3 levels, float16-rounded, a few peaks on zeros (the
    negative test cuts inside the zeros, the positive does not), and all values distinct."""
    generator = torch.Generator().manual_seed(3)
    smooth, _ = to_heatmaps(torch.rand(7, 4, 4, generator=generator), (size, size))
    signed_zeros = torch.zeros(size * size)
    signed_zeros[::3] = -0.0
    peaks = torch.zeros(size * size)
    count = size * size // 3
    peaks[torch.randperm(size * size, generator=generator)[:count]] = 1.0 + torch.arange(count, dtype=torch.float32)
    return torch.stack([torch.full((size, size), 0.3), signed_zeros.view(size, size),
                        (smooth[2] * 4).round() / 4, (smooth[3] * 2).round() / 2, smooth[4].half().float(),
                        peaks.view(size, size), torch.randperm(size * size, generator=generator).float().view(size, size)])


@pytest.mark.parametrize("size", [16, 64, 224])
def test_every_step_removes_torch_topks_pixels(size: int) -> None:
    """The removal plan's pixels at every (test, step, image) are torch.topk's on that map
    alone (P 91, one image per loader batch), for maps whose cuts split runs of ties; the
    rank shortcut is taken where the cut is clean (all values distinct: no topk at all)."""
    maps = tied_maps(size).flatten(1)
    counts = pixel_counts(size * size, PUBLISHED_STEPS)
    signed = {"positive": maps, "negative": -maps}  # P 83-84
    plan = RemovalPlan(maps, counts, ("positive", "negative"), clean_pass=False)
    for t, test in enumerate(("positive", "negative")):
        for s, k in enumerate(counts):
            for b in range(len(maps)):
                job = int(plan.job[t, s, b])
                chosen = torch.topk(signed[test][b:b + 1], k, dim=1).indices[0]
                expected = torch.zeros(size * size, dtype=torch.bool).index_fill_(0, chosen, True)
                assert torch.equal(plan.removed(job, job + 1)[0], expected), (test, k, b)
                assert plan.owners[job] == b
    distinct = [j for j in range(plan.total) if plan.owners[j] == len(maps) - 1]
    assert len(distinct) == 18 and not any(j in plan.masks for j in distinct)


def test_tied_maps_give_the_published_loops_rows() -> None:
    """End to end on a model that reads 40 scattered pixels of an image of ones (so which tied
    pixels go decides the prediction): the engine's rows equal the published loop's, one
    image per loader batch and 4 per loader batch, on tied and untied maps."""
    heat = tied_maps(32)
    pixels = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(5))[:40].tolist()
    model = PixelSetModel(pixels).eval()
    raw, labels = torch.ones(len(heat), 3, 32, 32), torch.zeros(len(heat), dtype=torch.long)
    out = score_chefer_batch(model, raw.clone(), heat, labels, CheferSettings(batch_size=5, **HALF))
    for loader_batch in (1, 4):
        for test, neg in (("positive", False), ("negative", True)):
            clean, curve, area = published_loop(model, raw, heat, labels, neg, HALF["mean"], HALF["std"], loader_batch)
            assert out["clean_correct"].tolist() == clean.tolist()
            assert out[test].tolist() == curve.tolist(), (test, loader_batch)
            assert out[f"auc_{test}"].mean().item() == pytest.approx(area, abs=1e-12)
    assert 0 < out["positive"].mean() < 1 and 0 < out["negative"].mean() < 1  # the curves do move


def test_every_input_is_the_published_loops_input_bit_for_bit() -> None:
    """The engine's inputs, in chunks of 5 that split and mix images, are exactly the images
    P builds (topk, scatter 0 into the [0, 1] image, normalise), image by image, positive then
    negative, each distinct one once."""
    model = InputRecorder().eval()
    heat = tied_maps(16)
    raw = torch.rand(len(heat), 3, 16, 16, generator=torch.Generator().manual_seed(6))
    images = normalize(raw.clone(), HALF["mean"], HALF["std"])
    score_chefer_batch(model, images, heat, torch.zeros(len(heat), dtype=torch.long),
                       CheferSettings(batch_size=5, **HALF), clean_logits=torch.zeros(len(heat), 4))
    expected: list[torch.Tensor] = []
    for b in range(len(heat)):
        mine: list[torch.Tensor] = []
        for sign in (1, -1):
            for k in pixel_counts(256, PUBLISHED_STEPS):
                idx = torch.topk(sign * heat[b:b + 1].reshape(1, -1), k, dim=-1).indices
                data = raw[b:b + 1].clone().reshape(1, 3, -1).scatter_(-1, idx.unsqueeze(1).repeat(1, 3, 1), 0)
                data = normalize(data.reshape(1, 3, 16, 16), HALF["mean"], HALF["std"])[0]
                if not any(torch.equal(data, seen) for seen in mine):
                    mine.append(data)
        expected += mine
    assert len(model.inputs) == len(expected)
    for got, want in zip(model.inputs, expected):
        assert torch.equal(got, want)


def test_equal_inputs_go_through_the_model_once() -> None:
    """Two steps with the same pixel count (int(16 * 0.1) = int(16 * 0.11) = 1) are one input;
    a constant map's positive and negative inputs are one input where torch.topk picks the
    same tied pixels of the map and of its negation."""
    model, images, heat = top_row_case()
    counter = PassCounter(model)
    settings = CheferSettings(steps=(0.1, 0.11, 0.5), test="both", **HALF)
    out = score_chefer_batch(model, images, heat, torch.tensor([0]), settings, clean_logits=model(images))
    assert counter.samples == 1 + 2 * 2  # the clean_logits pass above, then counts 1 and 8 per test
    assert out["positive"][0].tolist() == [1.0, 1.0, 0.0] and out["negative"][0].tolist() == [1.0, 1.0, 1.0]
    constant = torch.full((1, 4, 4), 0.5)
    flat = constant.flatten(1)
    shared = sum(torch.equal(torch.topk(flat, k).indices.sort().values, torch.topk(-flat, k).indices.sort().values)
                 for k in (1, 8))
    counter.samples = 0
    score_chefer_batch(model, images, constant, torch.tensor([0]), settings, clean_logits=torch.zeros(1, 2))
    assert counter.samples == 4 - shared


def test_rows_and_explained_classes() -> None:
    model, images, heat = top_row_case()
    settings = CheferSettings(steps=(0.125, 0.5), test="negative", **HALF)
    rows = chefer_rows(score_chefer_batch(model, images, heat, torch.tensor([0]), settings), settings)
    assert list(rows[0]) == row_columns(settings) == ["clean_correct", "auc_negative", "negative_12p5",
                                                      "negative_50"]
    assert rows[0] == {"clean_correct": 1.0, "auc_negative": pytest.approx(0.125 + 0.375 + 0.25),
                       "negative_12p5": 1.0, "negative_50": 1.0}
    logits = torch.tensor([[0.0, 2.0, 2.0], [3.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    assert explained_classes(CheferSettings(), labels, logits).tolist() == [1, 0]  # first index on ties
    assert explained_classes(CheferSettings(vis_class="target"), labels, logits).tolist() == [0, 2]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"steps": (0.5, 0.2)}, "faithfulness.steps must be fractions strictly increasing"),
    ({"steps": (0.0, 0.5)}, "faithfulness.steps"),
    ({"steps": (0.5, 1.0)}, "faithfulness.steps"),
    ({"steps": ()}, "faithfulness.steps"),
    ({"steps": "0.1"}, "faithfulness.steps"),
    ({"test": "pos"}, "faithfulness.test 'pos' is unknown; valid: positive, negative, both"),
    ({"vis_class": "top"}, "faithfulness.vis_class 'top' is unknown; valid: predicted, target"),
    ({"batch_size": 0}, "faithfulness.batch_size must be a positive integer"),
    ({"baseline": float("nan")}, "faithfulness.baseline must be finite"),
    ({"mean": (0.5,)}, "give both faithfulness.mean and faithfulness.std"),
    ({"mean": (0.5,), "std": (0.0,)}, "faithfulness.std must be positive"),
])
def test_bad_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(SettingError, match=message):
        CheferSettings(**kwargs)


def test_bad_inputs_are_refused() -> None:
    model, images, heat = top_row_case()
    with pytest.raises(SettingError, match="no timm data config.*faithfulness.mean and faithfulness.std"):
        score_chefer_batch(model, images, heat, torch.tensor([0]))
    with pytest.raises(SettingError, match="target 5 is out of range for a model with 2 classes"):
        score_chefer_batch(model, images, heat, torch.tensor([5]), CheferSettings(**HALF))
    with pytest.raises(SettingError, match="clean_logits"):
        score_chefer_batch(model, images, heat, torch.tensor([0]), CheferSettings(**HALF), torch.zeros(2, 2))
    with pytest.raises(SettingError, match="NaN"):
        score_chefer_batch(model, images, heat * float("nan"), torch.tensor([0]), CheferSettings(**HALF))
    with pytest.raises(SettingError, match="2/2 values for 3-channel"):
        score_chefer_batch(model, images, heat, torch.tensor([0]),
                           CheferSettings(mean=(0.5, 0.5), std=(0.5, 0.5)))
