"""Chefer et al.'s positive/negative perturbation test (wsol_bench.metrics.chefer_perturbation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_vit
from torch import nn

from wsol_bench.datasets import EvalTransform, build_dataset
from wsol_bench.errors import SettingError
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.chefer_perturbation import (
    PUBLISHED_STEPS,
    CheferSettings,
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
    assert counter.samples == 3 * 18  # every perturbed input once, no clean pass
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
    whole = score_chefer_batch(model, images, heatmaps, labels, CheferSettings(batch_size=7))
    singles = [score_chefer_batch(model, images[i:i + 1], heatmaps[i:i + 1], labels[i:i + 1],
                                  CheferSettings(batch_size=1)) for i in range(len(images))]
    for key, value in whole.items():
        assert torch.equal(value, torch.cat([s[key] for s in singles])), key


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
