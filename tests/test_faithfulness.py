"""Pixel-perturbation faithfulness: MoRF/LeRF curves, ABPC, deletion/insertion (docs/protocol.md 5)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_vit
from PIL import Image
from torch import nn

from wsol_bench.metrics.faithfulness import (
    FaithfulnessSettings,
    constant_baseline_probs,
    default_batch_size,
    faithfulness_rows,
    pixel_ranks,
    score_batch,
    step_counts,
    step_fractions,
)
from wsol_bench.models import fused_attention
from wsol_bench.report.curves import plot_perturbation_curves


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class PixelMeanModel(nn.Module):
    """Two logits, [scale * mean over channels and `pixels` of the input, 0], so the
    probability of class 0 is sigmoid(scale * that mean). Records whether autocast was on."""

    def __init__(self, pixels: list[tuple[int, int]], scale: float = 4.0) -> None:
        super().__init__()
        self.rows = torch.tensor([r for r, _ in pixels])
        self.cols = torch.tensor([c for _, c in pixels])
        self.scale = nn.Parameter(torch.tensor(scale), requires_grad=False)
        self.autocast_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.autocast_seen.append(torch.is_autocast_enabled(x.device.type))
        feature = self.scale * x[:, :, self.rows, self.cols].float().mean((1, 2))
        return torch.stack([feature, torch.zeros_like(feature)], 1)


class SampleCounter:
    """Forward hook counting the calls and the images that went through a model."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = self.samples = 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        self.calls += 1
        self.samples += args[0].shape[0]


TOP_ROW = [(0, 0), (0, 1), (0, 2), (0, 3)]


def top_row_case() -> tuple[PixelMeanModel, torch.Tensor, torch.Tensor, torch.Tensor]:
    """4x4 image of ones; the heatmap ranks the top row first (1.0 > 0.9 > 0.8 > 0.7 > rest);
    the model reads the top row only. 16 pixels, 11 steps: counts 0,1,3,4,6,8,9,11,12,14,16."""
    model = PixelMeanModel(TOP_ROW).eval()
    images = torch.ones(1, 3, 4, 4)
    heat = torch.linspace(0.6, 0.0, 12)
    heat = torch.cat([torch.tensor([1.0, 0.9, 0.8, 0.7]), heat]).reshape(1, 4, 4)
    return model, images, heat, torch.tensor([0])


# Top-row pixels still at the image value x4 is the logit; hand-derived from the step counts.
# MoRF removes the top row first: min(count, 4) of them gone.
MORF_LOGITS = [4, 3, 1, 0, 0, 0, 0, 0, 0, 0, 0]
# LeRF removes the top row last: max(0, count - 12) of them gone.
LERF_LOGITS = [4, 4, 4, 4, 4, 4, 4, 4, 4, 2, 0]
# Insertion reveals the top row first: min(count, 4) of them at the image value.
INSERTION_LOGITS = [0, 1, 3, 4, 4, 4, 4, 4, 4, 4, 4]


def expected(logits: list[float]) -> torch.Tensor:
    return torch.tensor([sigmoid(v) for v in logits], dtype=torch.float64)


def trapezoid(values: list[float]) -> float:
    return sum((a + b) / 2 * 0.1 for a, b in itertools.pairwise(values))


# -- steps and ranking -------------------------------------------------------------------------


REFERENCE_FRACTIONS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # the reference's literal list


def test_step_counts_truncate_as_the_reference():
    """int(H*W*s) over the literal list: 5017.6 -> 5017 at s = 0.1 for 224 x 224 (rounding
    would remove 5018), 15052.8 -> 15052 at 0.3, 30105.6 -> 30105, 40140.8 -> 40140."""
    assert step_fractions(11) == REFERENCE_FRACTIONS
    assert step_counts(224 * 224, 11) == [0, 5017, 10035, 15052, 20070, 25088, 30105, 35123, 40140,
                                          45158, 50176]
    assert step_counts(224 * 224, 11) == [int(224 * 224 * s) for s in REFERENCE_FRACTIONS]
    assert step_counts(16, 11) == [0, 1, 3, 4, 6, 8, 9, 11, 12, 14, 16]  # 1.6, 4.8, 9.6, 12.8 truncated
    assert step_counts(5, 3) == [0, 2, 5]  # 2.5 truncated
    assert step_counts(10, 11) == list(range(11))  # 0.3 * 10 in floats is 3.0000000000000004
    assert step_counts(7, 2) == [0, 7]


def test_pixel_ranks_break_ties_by_ascending_index():
    heat = torch.tensor([[[1.0, 0.5, 0.5], [0.5, 0.0, 1.0]]])
    # MoRF order: value 1 -> pixels 0, 5; value 0.5 -> 1, 2, 3; value 0 -> 4.
    assert pixel_ranks(heat).tolist() == [[0, 2, 3, 4, 5, 1]]
    assert pixel_ranks(torch.zeros(1, 2, 2)).tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("pixel, morf_gone_from, lerf_gone_from", [((0, 0), 1, 10), ((3, 3), 10, 1)])
def test_tied_heatmap_morf_goes_by_index_and_lerf_by_reverse_index(pixel, morf_gone_from, lerf_gone_from):
    """An all-tied heatmap: MoRF removes pixels 0, 1, 2, ... and LeRF 15, 14, ...; a model that
    reads one pixel shows the step at which that pixel went."""
    model = PixelMeanModel([pixel]).eval()
    out = score_batch(model, torch.ones(1, 3, 4, 4), torch.zeros(1, 4, 4), torch.tensor([0]))
    for curve, gone_from in (("morf", morf_gone_from), ("lerf", lerf_gone_from)):
        logits = [4.0 if s < gone_from else 0.0 for s in range(11)]
        torch.testing.assert_close(out[curve][0].double(), expected(logits), atol=1e-6, rtol=0)


# -- hand-computed curves ----------------------------------------------------------------------


def test_morf_lerf_curves_and_abpc_by_hand():
    model, images, heat, targets = top_row_case()
    out = score_batch(model, images, heat, targets)
    morf, lerf = expected(MORF_LOGITS), expected(LERF_LOGITS)
    torch.testing.assert_close(out["morf"][0].double(), morf, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["lerf"][0].double(), lerf, atol=1e-6, rtol=0)
    auc_morf, auc_lerf = sum(morf.tolist()) / 11, sum(lerf.tolist()) / 11
    assert out["auc_morf"].item() == pytest.approx(auc_morf, abs=1e-6)
    assert out["auc_lerf"].item() == pytest.approx(auc_lerf, abs=1e-6)
    assert out["abpc"].item() == pytest.approx(auc_lerf - auc_morf, abs=1e-6)
    assert out["abpc"].item() == pytest.approx(0.32302, abs=1e-5)  # (10.21892 - 6.66565) / 11
    assert out["auc_morf"].dtype == torch.float64


def test_trapezoid_switch_for_abpc_and_mean_switch_for_deletion():
    model, images, heat, targets = top_row_case()
    morf, lerf = expected(MORF_LOGITS).tolist(), expected(LERF_LOGITS).tolist()
    trap = score_batch(model, images, heat, targets, FaithfulnessSettings(integral="trapezoid"))
    assert trap["auc_morf"].item() == pytest.approx(trapezoid(morf), abs=1e-6)
    assert trap["abpc"].item() == pytest.approx(trapezoid(lerf) - trapezoid(morf), abs=1e-6)
    mean = score_batch(model, images, heat, targets, FaithfulnessSettings(mode="deletion", integral="mean"))
    assert mean["auc_deletion"].item() == pytest.approx(sum(morf) / 11, abs=1e-6)


def test_deletion_and_insertion_by_hand_with_trapezoid_default():
    model, images, heat, targets = top_row_case()
    deletion = score_batch(model, images, heat, targets, FaithfulnessSettings(mode="deletion"))
    insertion = score_batch(model, images, heat, targets, FaithfulnessSettings(mode="insertion"))
    assert set(deletion) == {"deletion", "auc_deletion"}
    assert set(insertion) == {"insertion", "auc_insertion"}
    d, i = expected(MORF_LOGITS), expected(INSERTION_LOGITS)
    torch.testing.assert_close(deletion["deletion"][0].double(), d, atol=1e-6, rtol=0)
    torch.testing.assert_close(insertion["insertion"][0].double(), i, atol=1e-6, rtol=0)
    assert deletion["auc_deletion"].item() == pytest.approx(trapezoid(d.tolist()), abs=1e-6)
    assert insertion["auc_insertion"].item() == pytest.approx(trapezoid(i.tolist()), abs=1e-6)


def test_baseline_options_per_channel_and_blur():
    """Per-channel baseline (3, 0, 0) has channel mean 1 = the image's, and blurring a
    constant image changes nothing: both give flat curves. Baseline 1.0 everywhere too."""
    model, images, heat, targets = top_row_case()
    flat = torch.full((11,), sigmoid(4.0), dtype=torch.float64)
    for baseline in [(3.0, 0.0, 0.0), "blur", 1.0]:
        settings = FaithfulnessSettings(baseline=baseline, blur_kernel_size=3)
        out = score_batch(model, images, heat, targets, settings)
        torch.testing.assert_close(out["morf"][0].double(), flat, atol=1e-6, rtol=0)
        torch.testing.assert_close(out["lerf"][0].double(), flat, atol=1e-6, rtol=0)
    # Baseline -1: each removed top-row pixel moves the logit by -2 instead of -1.
    out = score_batch(model, images, heat, targets, FaithfulnessSettings(baseline=-1.0))
    morf_logits = [4 - 2 * min(c, 4) for c in step_counts(16, 11)]
    torch.testing.assert_close(out["morf"][0].double(), expected(morf_logits), atol=1e-6, rtol=0)


# -- reuse of the clean and fully removed passes -----------------------------------------------


def test_clean_logits_and_full_removal_probs_are_reused_not_recomputed():
    """Given logits that differ from the model's show up at step 0, the given full-removal
    probabilities at the last step, and only the 18 intermediate inputs reach the model."""
    model, images, heat, targets = top_row_case()
    counter = SampleCounter(model)
    out = score_batch(model, images, heat, targets, clean_logits=torch.tensor([[10.0, 0.0]]),
                      full_removal_probs=torch.tensor([0.3, 0.7]))
    assert counter.samples == 18
    for curve in ("morf", "lerf"):
        assert out[curve][0, 0].item() == pytest.approx(sigmoid(10.0), abs=1e-6)
        assert out[curve][0, -1].item() == pytest.approx(0.3, abs=1e-6)
    middle = expected(MORF_LOGITS)[1:-1]
    torch.testing.assert_close(out["morf"][0, 1:-1].double(), middle, atol=1e-6, rtol=0)


def test_exactly_eighteen_forward_images_per_image_in_chunks():
    model = make_vit()
    torch.manual_seed(1)
    images, heat = torch.randn(3, 3, 32, 32), torch.rand(3, 32, 32)
    targets = torch.tensor([0, 3, 4])
    clean = model(images)
    full = constant_baseline_probs(model, (3, 32, 32), FaithfulnessSettings())
    counter = SampleCounter(model)
    score_batch(model, images, heat, targets, FaithfulnessSettings(batch_size=10), clean_logits=clean,
                full_removal_probs=full)
    assert (counter.samples, counter.calls) == (54, 6)  # 3 x 18 images in chunks of 10
    counter.samples = counter.calls = 0
    score_batch(model, images, heat, targets, FaithfulnessSettings(batch_size=64))
    # Nothing given: + 3 clean images in the same stream, + 1 shared baseline image.
    assert (counter.samples, counter.calls) == (58, 2)
    counter.samples = counter.calls = 0
    score_batch(model, images, heat, targets, FaithfulnessSettings(baseline="blur", mode="deletion"),
                clean_logits=clean)
    assert counter.samples == 3 * (9 + 1)  # blurred full removal differs per image


def test_chunk_size_left_open_follows_the_device():
    assert default_batch_size(torch.device("cpu")) == 16
    assert default_batch_size(torch.device("cuda")) == 256  # a device object needs no GPU
    model = make_vit()
    images, heat = torch.randn(3, 3, 32, 32), torch.rand(3, 32, 32)
    counter = SampleCounter(model)
    score_batch(model, images, heat, torch.tensor([0, 1, 2]), FaithfulnessSettings())
    # 3 x 18 perturbed + 3 clean images in chunks of 16 (4 passes), + the shared baseline.
    assert (counter.samples, counter.calls) == (58, 5)


# -- batched == one at a time == a naive reference ---------------------------------------------


def naive_curves(model: nn.Module, image: torch.Tensor, heat: torch.Tensor, target: int, curve: str,
                 steps: int = 11, fill: float = 0.0) -> list[float]:
    """One image, one step per forward pass, ranking with Python's sort on (-value, index)."""
    values = heat.flatten().tolist()
    n = len(values)
    order = sorted(range(n), key=lambda p: (-values[p], p))
    probs = []
    fractions = REFERENCE_FRACTIONS if steps == 11 else [i / (steps - 1) for i in range(steps)]
    for fraction in fractions:
        count = int(n * fraction)
        if curve == "morf":
            removed = order[:count]
        elif curve == "lerf":
            removed = order[::-1][:count]
        else:  # insertion: everything but the first `count`
            removed = order[count:]
        x = image.clone().reshape(image.shape[0], -1)
        x[:, removed] = fill
        with torch.no_grad():
            logits = model(x.reshape(1, *image.shape))
        probs.append(logits.softmax(1)[0, target].item())
    return probs


def test_batched_equals_one_image_at_a_time_and_the_naive_reference():
    model = make_vit()
    torch.manual_seed(2)
    images = torch.randn(5, 3, 32, 32)
    heat = torch.randint(0, 4, (5, 32, 32)).float() / 3  # 4 levels: many ties
    targets = torch.tensor([0, 1, 2, 3, 4])
    batched = score_batch(model, images, heat, targets, FaithfulnessSettings(batch_size=7))
    for b in range(5):
        single = score_batch(model, images[b:b + 1], heat[b:b + 1], targets[b:b + 1],
                             FaithfulnessSettings(batch_size=1))
        for key in ("morf", "lerf", "auc_morf", "auc_lerf", "abpc"):
            torch.testing.assert_close(batched[key][b:b + 1], single[key], atol=1e-6, rtol=0)
    for b in (0, 3):
        for curve in ("morf", "lerf"):
            naive = torch.tensor(naive_curves(model, images[b], heat[b], int(targets[b]), curve))
            torch.testing.assert_close(batched[curve][b], naive, atol=1e-5, rtol=0)
    insertion = score_batch(model, images[:1], heat[:1], targets[:1], FaithfulnessSettings(mode="insertion"))
    naive = torch.tensor(naive_curves(model, images[0], heat[0], 0, "insertion"))
    torch.testing.assert_close(insertion["insertion"][0], naive, atol=1e-5, rtol=0)


def test_perturbed_passes_use_the_fused_kernel_and_restore_the_explicit_path():
    """The perturbation passes need no attention maps, so they run fused (the naive reference
    above runs the explicit path: same curves to 1e-5); afterwards, and after an error, every
    attention module is back on the explicit path the explainers hook."""
    model = make_vit()
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    seen: list[bool] = []
    attention[0].register_forward_pre_hook(lambda m, _: seen.append(bool(m.fused_attn)))
    images, heat = torch.randn(2, 3, 32, 32), torch.rand(2, 32, 32)
    score_batch(model, images, heat, torch.tensor([0, 1]), FaithfulnessSettings(batch_size=8))
    assert len(seen) == 1 + math.ceil(2 * 18 / 8) and all(seen)  # baseline image + chunks
    assert not any(m.fused_attn for m in attention)
    with pytest.raises(RuntimeError, match="inside"), fused_attention(model):
        assert all(m.fused_attn for m in attention)
        raise RuntimeError("inside")
    assert not any(m.fused_attn for m in attention)


def test_blur_baseline_batched_equals_one_at_a_time():
    model = make_vit()
    torch.manual_seed(3)
    images, heat, targets = torch.randn(3, 3, 32, 32), torch.rand(3, 32, 32), torch.tensor([1, 2, 0])
    settings = FaithfulnessSettings(baseline="blur", batch_size=8)
    batched = score_batch(model, images, heat, targets, settings)
    for b in range(3):
        single = score_batch(model, images[b:b + 1], heat[b:b + 1], targets[b:b + 1], settings)
        torch.testing.assert_close(batched["abpc"][b:b + 1], single["abpc"], atol=1e-6, rtol=0)
    # The blurred image differs from the clean one, so the fully removed step is its own pass.
    assert not torch.allclose(batched["morf"][:, 0], batched["morf"][:, -1])


def test_amp_is_off_by_default_and_on_when_asked():
    model, images, heat, targets = top_row_case()
    score_batch(model, images, heat, targets)
    assert model.autocast_seen and not any(model.autocast_seen)
    model.autocast_seen.clear()
    out = score_batch(model, images, heat, targets, FaithfulnessSettings(amp=True))
    assert model.autocast_seen and all(model.autocast_seen)
    torch.testing.assert_close(out["morf"][0].double(), expected(MORF_LOGITS), atol=2e-2, rtol=0)


def test_compiled_perturbed_passes_equal_eager_mode():
    """compile=True: the same curves as eager mode up to float rounding, the remainder chunk
    padded (54 inputs in chunks of 8), and one compiled module per model."""
    from wsol_bench.metrics.faithfulness import compiled

    model = make_vit(0, img_size=32, patch_size=16, num_classes=4).eval()
    g = torch.Generator().manual_seed(3)
    images, heat = torch.randn(3, 3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g)
    targets = torch.tensor([0, 2, 3])
    eager = score_batch(model, images, heat, targets, FaithfulnessSettings(batch_size=8))
    fast = score_batch(model, images, heat, targets, FaithfulnessSettings(batch_size=8, compile=True))
    for key in ("morf", "lerf", "abpc"):
        torch.testing.assert_close(fast[key], eager[key], atol=1e-5, rtol=0)
    assert compiled(model) is compiled(model)


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    ({"mode": "aopc"}, "mode"), ({"steps": 1}, "steps"), ({"integral": "simpson"}, "integral"),
    ({"baseline": "black"}, "baseline"), ({"baseline": float("nan")}, "baseline"),
    ({"batch_size": 0}, "batch_size"), ({"blur_kernel_size": 4}, "blur_kernel_size"),
])
def test_bad_settings_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        FaithfulnessSettings(**kwargs)


def test_bad_inputs_are_named():
    model, images, heat, targets = top_row_case()
    with pytest.raises(ValueError, match="do not match"):
        score_batch(model, images, heat[:, :2], targets)
    with pytest.raises(ValueError, match="NaN"):
        score_batch(model, images, heat * float("nan"), targets)
    with pytest.raises(ValueError, match="out of range"):
        score_batch(model, images, heat, torch.tensor([2]))
    with pytest.raises(ValueError, match="blur"):
        score_batch(model, images, heat, targets, FaithfulnessSettings(baseline="blur"),
                    full_removal_probs=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="per channel"):
        score_batch(model, images, heat, targets, FaithfulnessSettings(baseline=(0.0, 0.0)))
    with pytest.raises(ValueError, match="blur_kernel_size"):
        score_batch(model, images, heat, targets, FaithfulnessSettings(baseline="blur"))
    with pytest.raises(ValueError, match="eval"):
        score_batch(model.train(), images, heat, targets)


# -- records and figure ------------------------------------------------------------------------


def test_rows_hold_areas_and_every_step():
    model, images, heat, targets = top_row_case()
    out = score_batch(model, images.repeat(2, 1, 1, 1), heat.repeat(2, 1, 1), targets.repeat(2))
    rows = faithfulness_rows(out)
    assert len(rows) == 2
    steps = [f"{c}_{s:02d}" for c in ("morf", "lerf") for s in range(11)]
    assert list(rows[0]) == ["auc_morf", "auc_lerf", "abpc", *steps]
    assert rows[1]["morf_02"] == pytest.approx(sigmoid(1.0), abs=1e-6)
    assert rows[1]["lerf_10"] == pytest.approx(0.5, abs=1e-6)
    assert rows[0]["abpc"] == pytest.approx(out["abpc"][0].item())
    settings = FaithfulnessSettings(mode="deletion")
    deletion = faithfulness_rows(score_batch(model, images, heat, targets, settings))
    assert list(deletion[0]) == ["auc_deletion", *[f"deletion_{s:02d}" for s in range(11)]]


def test_curve_figure_is_written_and_not_blank(tmp_path):
    model, images, heat, targets = top_row_case()
    rows = []
    for method, h in (("top_row_first", heat), ("top_row_last", 1 - heat)):
        scores = score_batch(model, images, h, targets)
        rows += [{"method": method, **row} for row in faithfulness_rows(scores)]
    path = plot_perturbation_curves(pd.DataFrame(rows), tmp_path / "fig" / "curves.png")
    picture = np.asarray(Image.open(path).convert("RGB")).astype(float)
    assert picture.shape == (460, 900, 3)
    assert picture.std() > 10
    with pytest.raises(ValueError, match="method"):
        plot_perturbation_curves(pd.DataFrame(rows).drop(columns="method"), tmp_path / "x.png")
