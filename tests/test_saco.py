"""SaCo, the Salience-guided Faithfulness Coefficient (Wu et al., CVPR 2024): the coefficient by
hand, the engine on hand-made models whose output drops are known, and the batched engine
against a one-image, one-subset-per-pass reference."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import InputRecorder, make_vit
from torch import nn
from torch.nn.functional import avg_pool2d

from wsol_bench.errors import SettingError
from wsol_bench.metrics.saco import (
    SacoSettings,
    model_patch_size,
    saco_coefficient,
    saco_row_columns,
    saco_rows,
    salience_subsets,
    score_saco_batch,
    subset_saliences,
)
from wsol_bench.models import load_model


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class WeightedPixels(nn.Module):
    """Two logits: [sum over pixels of weights * channel 0 of the input, 0], so the probability
    of class 0 is sigmoid(that sum) and the effect of replacing any pixels is known."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = nn.Parameter(weights.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = (x[:, 0] * self.weights).sum((1, 2))
        return torch.stack([logit, torch.zeros_like(logit)], 1)


class SampleCounter:
    """Forward hook counting the calls and the images that went through a model."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = self.samples = 0
        model.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.calls += 1
        self.samples += args[0].shape[0]


ROW_WEIGHTS = [3.0, 1.0, 2.0, 0.0]  # what each row of a 4x4 image is worth to the logit


def rows_case() -> tuple[WeightedPixels, torch.Tensor]:
    """4x4 images; the model gives row r weight ROW_WEIGHTS[r] (spread over its 4 pixels), and a
    heatmap of rows 4 > 3 > 2 > 1 makes subset r (of K = 4) exactly row r, s = [16, 12, 8, 4]."""
    weights = torch.tensor(ROW_WEIGHTS)[:, None].expand(4, 4) / 4
    heat = torch.tensor([4.0, 3.0, 2.0, 1.0])[:, None].expand(4, 4)
    return WeightedPixels(weights).eval(), heat[None].clone()


# -- the coefficient -----------------------------------------------------------------------------


def test_coefficient_by_hand():
    # s = [6, 3, 1], drops = [0.2, 0.5, 0.1]:
    #   (1,2): weight 6-3 = 3, 0.2 < 0.5 disagrees -> -3
    #   (1,3): weight 6-1 = 5, 0.2 >= 0.1 agrees   -> +5
    #   (2,3): weight 3-1 = 2, 0.5 >= 0.1 agrees   -> +2
    # F = (-3 + 5 + 2) / (3 + 5 + 2) = 0.4 (unweighted it would be 1/3).
    s, d = torch.tensor([[6.0, 3.0, 1.0]]), torch.tensor([[0.2, 0.5, 0.1]])
    assert saco_coefficient(s, d).tolist() == pytest.approx([0.4])
    # Equal drops agree (the paper's Algorithm 1 tests d_i >= d_j): s = [3, 2, 1],
    # d = [0.1, 0.1, 0.3]: (1,2) tie +1, (1,3) -2, (2,3) -1 -> -2 / 4 = -0.5 (-1 if ties disagreed).
    assert saco_coefficient(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[0.1, 0.1, 0.3]])).tolist() \
        == pytest.approx([-0.5])
    # A more salient later subset that moves the output less is a disagreement: s = [1, 2],
    # d = [0.3, 0.1]: d_1 >= d_2, weight (1 - 2) -> -1 / 1.
    assert saco_coefficient(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.3, 0.1]])).tolist() == [-1.0]


def test_tied_saliences_weigh_nothing_and_all_tied_is_nan():
    # s = [2, 2, 1], d = [0.1, 0.5, 0.0]: (1,2) weight 0 (its disagreement costs nothing),
    # (1,3) +1, (2,3) +1 -> 2 / 2 = 1.
    s, d = torch.tensor([[2.0, 2.0, 1.0], [5.0, 5.0, 5.0]]), torch.tensor([[0.1, 0.5, 0.0], [0.3, 0.2, 0.1]])
    out = saco_coefficient(s, d)
    assert out[0].item() == 1.0
    assert math.isnan(out[1].item())  # no salience differences: no ordering to test


def test_ordered_like_the_drops_gives_one_and_reversed_minus_one():
    torch.manual_seed(0)
    drops = torch.rand(3, 10)
    assert saco_coefficient(drops * 7 + 1, drops).tolist() == pytest.approx([1.0] * 3)
    assert saco_coefficient(-drops, drops).tolist() == pytest.approx([-1.0] * 3)


# -- subsets ---------------------------------------------------------------------------------------


def test_subsets_are_equal_cuts_of_the_ranking_with_ties_by_index():
    heat = torch.tensor([[[1.0, 0.5, 0.5], [0.5, 0.0, 1.0]]])
    # Ranking: value 1 -> pixels 0, 5; value 0.5 -> 1, 2, 3; 0 -> 4; cut into 3 subsets of 2.
    assert salience_subsets(heat, 3).tolist() == [[[0, 1, 1], [2, 2, 0]]]
    assert subset_saliences(heat, salience_subsets(heat, 3), 3).tolist() == [[2.0, 1.0, 0.5]]
    # 10 pixels in 4 subsets: floor(10 i / 4) = 0, 2, 5, 7, 10 -> sizes 2, 3, 2, 3.
    sizes = torch.bincount(salience_subsets(torch.arange(10.0).flip(0).view(1, 2, 5), 4).flatten())
    assert sizes.tolist() == [2, 3, 2, 3]


def test_patch_grouping_ranks_patches_by_their_mean():
    # Four 4x4 patches: A (top left) is zero but one pixel of 10 (mean 0.625, max 10), B all 1,
    # C all 0.5, D all 0. By mean: B > A > C > D (max pooling would put A first).
    heat = torch.zeros(1, 8, 8)
    heat[0, 0, 0] = 10.0
    heat[0, :4, 4:] = 1.0
    heat[0, 4:, :4] = 0.5
    subsets = salience_subsets(heat, 4, patch_size=4)
    assert subsets[0, ::4, ::4].tolist() == [[1, 0], [2, 3]]
    assert (subsets == subsets[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2)).all()
    assert subset_saliences(heat, subsets, 4).tolist() == [[16.0, 10.0, 8.0, 0.0]]


def test_patch_size_is_read_from_the_token_grid():
    with torch.device("meta"):
        shipped = timm.create_model("wsol_synthetic_vit")  # conv stem: patch_size 1, 14x14 tokens
        vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)
    assert model_patch_size(shipped) == 16
    assert model_patch_size(vit) == 8
    with pytest.raises(SettingError, match="faithfulness.patch_size"):
        model_patch_size(nn.Linear(2, 2))


# -- the engine on hand-made models ----------------------------------------------------------------


def test_engine_by_hand_with_a_zero_baseline():
    """Ones everywhere, baseline 0: removing row r takes w_r off the clean logit 6, so the drops
    are sigmoid(6) - sigmoid(6 - w_r) for w = [3, 1, 2, 0]: row 0 > row 2 > row 1 > row 3.
    Pairs with s = [16, 12, 8, 4]: (0,1) +4, (0,2) +8, (0,3) +12, (1,2) -4, (1,3) +8,
    (2,3) +4 -> 32 / 40 = 0.8."""
    model, heat = rows_case()
    out = score_saco_batch(model, torch.ones(1, 3, 4, 4), heat,
                           settings=SacoSettings(num_subsets=4, baseline=0.0))
    drops = [sigmoid(6) - sigmoid(6 - w) for w in ROW_WEIGHTS]
    torch.testing.assert_close(out["drops"][0], torch.tensor(drops, dtype=torch.float64), atol=1e-6, rtol=0)
    assert out["saliences"][0].tolist() == [16.0, 12.0, 8.0, 4.0]
    assert out["classes"].tolist() == [0] and out["clean_probs"][0].item() == pytest.approx(sigmoid(6))
    assert out["saco"].item() == pytest.approx(0.8)
    assert not out["degenerate"].item()


def test_mean_baseline_is_the_images_own_per_channel_mean():
    """Channel 0 of row r is r (its mean 1.5); channels 1 and 2 are r + 10 and r + 20, so an
    all-channel mean (11.5) would differ. Clean logit: sum w_r * r = 1 + 4 = 5.
    Mean baseline: row r moves to 1.5, the logit by w_r (1.5 - r): +4.5, +0.5, -1, 0, so drops
    order row 2 > row 3 (0) > row 1 > row 0: (0,1) -4, (0,2) -8, (0,3) -12, (1,2) -4, (1,3) -8,
    (2,3) +4 -> -32 / 40 = -0.8.
    Baseline 0: logit changes 0, -1, -4, 0: drops d0 = d3 = 0 < d1 < d2: (0,1) -4, (0,2) -8,
    (0,3) tie +12, (1,2) -4, (1,3) +8, (2,3) +4 -> 8 / 40 = 0.2."""
    model, heat = rows_case()
    rows = torch.arange(4.0)[:, None].expand(4, 4)
    image = torch.stack([rows, rows + 10, rows + 20])[None]
    mean = score_saco_batch(model, image, heat, settings=SacoSettings(num_subsets=4))
    expected = [sigmoid(5) - sigmoid(5 + w * (1.5 - r)) for r, w in enumerate(ROW_WEIGHTS)]
    torch.testing.assert_close(mean["drops"][0], torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    assert mean["saco"].item() == pytest.approx(-0.8)
    zero = score_saco_batch(model, image, heat, settings=SacoSettings(num_subsets=4, baseline=0.0))
    assert zero["saco"].item() == pytest.approx(0.2)


def test_class_source_target_reads_the_given_class():
    """Class 1's probability is 1 - sigmoid(logit): its drops are the negated class-0 drops, so
    the case of `test_engine_by_hand_with_a_zero_baseline` scores -0.8 for target 1."""
    model, heat = rows_case()
    settings = SacoSettings(num_subsets=4, baseline=0.0, class_source="target")
    out = score_saco_batch(model, torch.ones(1, 3, 4, 4), heat, torch.tensor([1]), settings)
    assert out["classes"].tolist() == [1]
    assert out["saco"].item() == pytest.approx(-0.8)
    predicted = score_saco_batch(model, torch.ones(1, 3, 4, 4), heat, torch.tensor([1]),
                                 SacoSettings(num_subsets=4, baseline=0.0))
    assert predicted["saco"].item() == pytest.approx(0.8)  # the paper's y-hat ignores the targets


def test_constant_map_is_degenerate_nan_and_costs_no_pass():
    """A constant map ranks nothing: SaCo NaN, flagged, no perturbed pass (with clean logits
    given, a batch of one constant and one real map costs K passes, not 2K). A map whose
    unequal subsets have equal saliences ([2 | 1, 1] for 3 pixels in 2 subsets) is flagged too."""
    model = make_vit()
    counter = SampleCounter(model)
    images = torch.randn(2, 3, 32, 32)
    heat = torch.stack([torch.full((32, 32), 0.5), torch.rand(32, 32)])
    clean = torch.randn(2, 5)
    out = score_saco_batch(model, images, heat, settings=SacoSettings(), clean_logits=clean)
    assert out["degenerate"].tolist() == [True, False]
    assert math.isnan(out["saco"][0].item()) and not math.isnan(out["saco"][1].item())
    assert torch.isnan(out["drops"][0]).all() and not torch.isnan(out["drops"][1]).any()
    assert counter.samples == 10
    rows = saco_rows(out)
    assert rows[0]["saco_degenerate"] == 1.0 and math.isnan(rows[0]["saco"])
    assert rows[1]["saco_degenerate"] == 0.0

    flat = WeightedPixels(torch.ones(1, 3)).eval()
    unequal = score_saco_batch(flat, torch.ones(1, 3, 1, 3), torch.tensor([[[2.0, 1.0, 1.0]]]),
                               settings=SacoSettings(num_subsets=2))
    assert unequal["degenerate"].tolist() == [True] and math.isnan(unequal["saco"].item())


# -- batching --------------------------------------------------------------------------------------


def naive_saco(model: nn.Module, image: torch.Tensor, heat: torch.Tensor, k: int,
               patch: int | None = None) -> tuple[float, list[float]]:
    """SaCo the way the paper's Algorithm 1 reads: one clean pass, then one pass per subset, one
    image at a time, mean baseline, the predicted class; subsets from a plain sort."""
    with torch.no_grad():
        clean = model(image[None]).double().softmax(1)[0]
    label = int(clean.argmax())
    units = heat if patch is None else avg_pool2d(heat[None, None].double(), patch)[0, 0]
    values = units.flatten().tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    fill = image.mean((1, 2))
    saliences, drops = [], []
    for i in range(k):
        mask = torch.zeros(len(values), dtype=torch.bool)
        mask[order[len(values) * i // k:len(values) * (i + 1) // k]] = True
        mask = mask.view(units.shape)
        if patch is not None:
            mask = mask.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        perturbed = image.clone()
        perturbed[:, mask] = fill[:, None]
        with torch.no_grad():
            drops.append(clean[label].item() - model(perturbed[None]).double().softmax(1)[0, label].item())
        saliences.append(heat[mask].double().sum().item())
    score = total = 0.0
    for i in range(k - 1):
        for j in range(i + 1, k):
            weight = saliences[i] - saliences[j] if drops[i] >= drops[j] else saliences[j] - saliences[i]
            score, total = score + weight, total + abs(weight)
    return score / total, drops


def test_batched_equals_one_image_at_a_time_and_the_naive_reference():
    model = make_vit()
    counter = SampleCounter(model)
    torch.manual_seed(2)
    images = torch.randn(4, 3, 32, 32)
    heat = torch.randint(0, 6, (4, 32, 32)).float() / 5  # 6 levels: many ties
    batched = score_saco_batch(model, images, heat, settings=SacoSettings(batch_size=7))
    assert counter.samples == 4 * 11 and counter.calls == math.ceil(4 * 11 / 7)  # clean + 10 per image
    for b in range(4):
        single = score_saco_batch(model, images[b:b + 1], heat[b:b + 1], settings=SacoSettings(batch_size=1))
        for key in ("saco", "drops", "saliences", "clean_probs"):
            torch.testing.assert_close(batched[key][b:b + 1], single[key], atol=1e-6, rtol=0)
    for b in (0, 3):
        score, drops = naive_saco(model, images[b], heat[b], 10)
        torch.testing.assert_close(batched["drops"][b], torch.tensor(drops, dtype=torch.float64), atol=1e-5, rtol=0)
        assert batched["saco"][b].item() == pytest.approx(score, abs=1e-6)


@pytest.mark.parametrize(("baseline", "grouping", "chunk"), [("mean", "pixel", 3), ((0.5, -1.0, 2.0), "patch", 4),
                                                               (0.0, "pixel", 64)])
def test_every_perturbed_input_is_the_image_with_its_subset_replaced(baseline, grouping, chunk):
    """Bit for bit, in image-by-image order: image b with subset i set to the baseline, for
    chunks that split one image's subsets and mix images; a constant map costs no input. Maps
    float16-rounded and quantised, so subsets cut through ties."""
    model = InputRecorder().eval()
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(4, 3, 16, 16, generator=generator)
    heat = torch.rand(4, 16, 16, generator=generator)
    heat[1] = (heat[1] * 3).round() / 3
    heat[2] = heat[2].half().float()
    heat[3] = 0.25
    settings = SacoSettings(num_subsets=5, baseline=baseline, grouping=grouping, patch_size=4, batch_size=chunk)
    out = score_saco_batch(model, images, heat, settings=settings, clean_logits=torch.zeros(4, 4))
    subsets = salience_subsets(heat, 5, 4 if grouping == "patch" else None)
    fill = images.mean((2, 3)) if baseline == "mean" else torch.tensor(baseline).expand(4, 3)
    expected = []
    for b in range(3):
        for i in range(5):
            perturbed = images[b].clone()
            perturbed[:, subsets[b] == i] = fill[b][:, None]
            expected.append(perturbed)
    assert len(model.inputs) == len(expected) and out["degenerate"].tolist() == [False, False, False, True]
    for got, want in zip(model.inputs, expected):
        assert torch.equal(got, want)


def test_clean_logits_are_reused():
    model = make_vit()
    counter = SampleCounter(model)
    images, heat = torch.randn(3, 3, 32, 32), torch.rand(3, 32, 32)
    with torch.no_grad():
        clean = model(images)
    counter.samples = counter.calls = 0
    given = score_saco_batch(model, images, heat, settings=SacoSettings(batch_size=8), clean_logits=clean)
    assert counter.samples == 3 * 10 and counter.calls == 4
    computed = score_saco_batch(model, images, heat, settings=SacoSettings(batch_size=8))
    torch.testing.assert_close(given["saco"], computed["saco"], atol=1e-6, rtol=0)
    assert given["classes"].tolist() == clean.argmax(1).tolist()


def test_map_ordered_like_the_true_drops_gives_one_and_reversed_minus_one():
    """On a random ViT: the reference measures the drop of each subset of a random map; a map
    that gives every pixel of a subset that subset's drop has the same subsets (1024 pixels, 8
    subsets of 128), now ranked by their true drops: SaCo 1; the negated map ranks them the
    other way: -1."""
    model = make_vit()
    torch.manual_seed(1)
    images, heat = torch.randn(2, 3, 32, 32), torch.rand(2, 32, 32)
    true_drops = torch.tensor([naive_saco(model, images[b], heat[b], 8)[1] for b in range(2)])
    by_drop = true_drops.float().gather(1, salience_subsets(heat, 8).flatten(1)).view_as(heat)
    settings = SacoSettings(num_subsets=8, batch_size=16)
    assert score_saco_batch(model, images, by_drop, settings=settings)["saco"].tolist() == pytest.approx([1.0, 1.0])
    assert score_saco_batch(model, images, -by_drop, settings=settings)["saco"].tolist() == pytest.approx([-1.0, -1.0])


def test_shipped_model_patch_grouping_matches_the_reference():
    """The shipped model (14x14 tokens from a conv stem): patch grouping reads 16-pixel patches
    from the model; two images, smooth maps, against the one-pass-per-subset reference."""
    model = load_model("wsol_synthetic_vit", pretrained=True)
    torch.manual_seed(3)
    images = torch.randn(2, 3, 224, 224) * 0.5
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    heat = torch.stack([torch.exp(-(ys ** 2 + xs ** 2) * 3), torch.exp(-((ys - 0.5) ** 2 + xs ** 2) * 5)])
    out = score_saco_batch(model, images, heat, settings=SacoSettings(grouping="patch", batch_size=20))
    for b in range(2):
        score, drops = naive_saco(model, images[b], heat[b], 10, patch=16)
        torch.testing.assert_close(out["drops"][b], torch.tensor(drops, dtype=torch.float64), atol=1e-5, rtol=0)
        assert out["saco"][b].item() == pytest.approx(score, abs=1e-6)


# -- settings, inputs, rows -------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    ({"num_subsets": 1}, "faithfulness.num_subsets"),
    ({"num_subsets": 2.5}, "faithfulness.num_subsets"),
    ({"class_source": "label"}, "faithfulness.class_source"),
    ({"grouping": "token"}, "faithfulness.grouping"),
    ({"batch_size": 0}, "faithfulness.batch_size"),
    ({"patch_size": -16}, "faithfulness.patch_size"),
    ({"baseline": "blur"}, "faithfulness.baseline"),
    ({"baseline": float("nan")}, "faithfulness.baseline"),
])
def test_bad_settings_are_named(kwargs, words):
    with pytest.raises(SettingError, match=words):
        SacoSettings(**kwargs)


def test_bad_inputs_are_named():
    model = make_vit()
    images, heat = torch.randn(1, 3, 32, 32), torch.rand(1, 32, 32)
    cases = [
        (dict(heatmaps=torch.rand(1, 8, 8)), "upsample"),
        (dict(heatmaps=torch.full((1, 32, 32), math.nan)), "NaN"),
        (dict(settings=SacoSettings(class_source="target")), "needs the targets"),
        (dict(targets=torch.tensor([9]), settings=SacoSettings(class_source="target"),
              clean_logits=torch.zeros(1, 5)), "out of range"),
        (dict(settings=SacoSettings(baseline=(0.0, 1.0))), "2 values for 3-channel"),
        (dict(settings=SacoSettings(num_subsets=2000)), "exceeds the 1024 pixels"),
        (dict(settings=SacoSettings(grouping="patch", patch_size=5)), "do not split into 5x5"),
        (dict(clean_logits=torch.zeros(2, 5)), "clean_logits"),
    ]
    for kwargs, words in cases:
        args = {"heatmaps": heat, **kwargs}
        with pytest.raises(SettingError, match=words):
            score_saco_batch(model, images, **args)
    model.train()
    with pytest.raises(SettingError, match="eval mode"):
        score_saco_batch(model, images, heat)


def test_rows_hold_the_coefficient_and_every_subset():
    model, heat = rows_case()
    out = score_saco_batch(model, torch.ones(2, 3, 4, 4), heat.expand(2, 4, 4),
                           settings=SacoSettings(num_subsets=4, baseline=0.0))
    rows = saco_rows(out)
    columns = saco_row_columns(SacoSettings(num_subsets=4))
    assert columns[:4] == ["saco", "saco_degenerate", "saco_class", "saco_clean_prob"]
    assert [list(r) for r in rows] == [columns, columns]
    assert rows[1]["saco"] == pytest.approx(0.8) and rows[1]["saco_class"] == 0.0
    assert rows[0]["saco_salience_03"] == 4.0
    assert rows[0]["saco_drop_00"] == pytest.approx(sigmoid(6) - sigmoid(3))
