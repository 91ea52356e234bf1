"""The randomisation sanity checks: model-parameter randomisation (Adebayo et al., 2018) and the
random-logit test (Sixt et al., 2020). Hand-computed similarities, the layer units and their
re-initialisation, batched equal to one image at a time, equal to Quantus per image on the same
tiny ViT, maps and seed, and a run: the baselines fail the check, rollout passes it, and the
randomised maps are cached."""

from __future__ import annotations

import copy
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from conftest import make_vit
from hydra import compose, initialize_config_module
from torch import nn

from wsol_bench.errors import SettingError
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.randomisation import (
    MapComparison,
    RandomisedModels,
    average_ranks,
    model_units,
    random_other_classes,
    randomisation_states,
    spearman,
    ssim,
    top_k_intersection,
)
from wsol_bench.models import UnsupportedModelError
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.report.run_folder import read_run
from wsol_bench.run.maps import Explainers
from wsol_bench.run.run_tables import check_run
from wsol_bench.run.runner import run
from wsol_bench.run.scorers.model_randomisation import ModelRandomisation

TINY = ["dataset.params.num_images=6", "batch_size=3", "gallery_images=0", "progress=false",
        "metric.image_filter=all", "method=[rollout,random,center]", "run_name=test"]
SIZE = (32, 32)


def run_folder(out: Path, *overrides: str) -> Path:
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, f"store.root={out.parent / 'cache'}", *overrides])
    run(cfg, out)
    return out


def heatmaps_of(model: nn.Module, method: str, images, targets) -> torch.Tensor:
    """The suite's heatmaps of `method` on `model` (what a run scores)."""
    maps = get_explainer(method, model)(torch.as_tensor(images), torch.as_tensor(targets)).maps
    return to_heatmaps(maps, SIZE)[0]


@pytest.fixture(scope="module")
def batch():
    model = make_vit()
    images = torch.randn(4, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    return model, images, model(images).argmax(1)


# -- similarities ----------------------------------------------------------------------------------

def test_spearman_by_hand():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert spearman(a, a).item() == pytest.approx(1.0, abs=1e-12)
    assert spearman(a, a.flip(1)).item() == pytest.approx(-1.0, abs=1e-12)
    # ties share their mean rank: [1, 1, 2, 3] ranks [1.5, 1.5, 3, 4]; centred [-1, -1, .5, 1.5] against
    # [-1.5, -.5, .5, 1.5]: 4.5 / sqrt(4.5 * 5)
    tied = torch.tensor([[1.0, 1.0, 2.0, 3.0]])
    assert average_ranks(tied).tolist() == [[1.5, 1.5, 3.0, 4.0]]
    assert spearman(tied, a).item() == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)
    assert math.isnan(spearman(torch.ones(1, 4), a).item())  # a constant map ranks nothing


def test_ssim_by_hand():
    rand = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ssim(rand, rand).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    # two uniform maps: no variance, so only the luminance term (2 a b + C1) / (a^2 + b^2 + C1), C1 = 0.01^2
    value = ssim(torch.full((1, 16, 16), 0.2, dtype=torch.float64), torch.full((1, 16, 16), 0.6, dtype=torch.float64)).item()
    assert value == pytest.approx((2 * 0.2 * 0.6 + 1e-4) / (0.2**2 + 0.6**2 + 1e-4), abs=1e-12)
    with pytest.raises(ValueError, match="at least 11 pixels"):  # the 11 x 11 Gaussian window must fit
        ssim(torch.rand(1, 10, 16), torch.rand(1, 10, 16))


def test_ssim_is_skimage_with_adebayos_gaussian_window():
    metrics = pytest.importorskip("skimage.metrics")
    a, b = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(1)).double()
    ours = ssim(a, b).numpy()
    theirs = [metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, data_range=1.0)
              for x, y in zip(a.numpy(), b.numpy())]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_top_k_intersection_by_hand():
    a = torch.arange(16.0).view(1, 4, 4)
    assert top_k_intersection(a, a, 4).item() == 1.0
    assert top_k_intersection(a, -a, 4).item() == 0.0  # top of a: 12..15, of -a: 0..3
    b = a.clone().view(-1)
    b[[14, 15, 0, 1]] = b[[0, 1, 14, 15]]  # two of the top four swapped with the bottom
    assert top_k_intersection(a, b.view(1, 4, 4), 4).item() == 0.5
    # equal values: the first in raster order ranks higher (pixels 0..3 of a constant map)
    assert top_k_intersection(torch.ones(1, 4, 4), -a, 4).item() == 1.0
    with pytest.raises(ValueError, match="k <= 16"):
        top_k_intersection(a, a, 17)


def test_a_constant_map_compares_as_an_empty_map():
    reference = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(6))
    other = torch.stack([torch.zeros(16, 16), reference[1]])  # image 0: a degenerate map's heatmap
    comparison = MapComparison(reference, 10)
    assert comparison.similarity("spearman", other).tolist() == pytest.approx([0.0, 1.0])
    assert comparison.similarity("topk", other).tolist() == [0.0, 1.0]
    assert comparison.similarity("ssim", other).tolist() == pytest.approx(ssim(reference, other).tolist())


def test_similarities_batched_equal_one_image_at_a_time():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.rand(5, 24, 24, generator=generator), torch.rand(5, 24, 24, generator=generator)
    b[2] = torch.round(b[2] * 3)  # many ties
    comparison = MapComparison(a, 40)
    for name, alone in (("spearman", spearman), ("ssim", ssim), ("topk", lambda x, y: top_k_intersection(x, y, 40))):
        whole = comparison.similarity(name, b)
        torch.testing.assert_close(whole, alone(a, b), rtol=0, atol=1e-12)
        torch.testing.assert_close(whole, torch.cat([alone(x[None], y[None]) for x, y in zip(a, b)]),
                                   rtol=0, atol=1e-12)


# -- units, states, re-initialisation -------------------------------------------------------------

def test_units_of_timm_vits_and_refusals():
    tiny = make_vit()
    assert [u.name for u in model_units(tiny)] == ["head", "block_2", "block_1", "block_0", "patch_embed"]
    units = {u.name: u for u in model_units(tiny)}
    assert units["head"].modules == ("head", "norm") and units["patch_embed"].tokens == ("cls_token", "pos_embed")
    assert units["block_2"].modules[-1] == "blocks.2.norm1"  # top-down: the unit's first module last
    with torch.device("meta"):  # the shipped model's conv stem belongs to the patch embedding
        shipped = timm.create_model("wsol_synthetic_vit", pretrained=False)
    assert [u.name for u in model_units(shipped)][:2] == ["head", "block_5"]
    assert "patch_embed.backbone.1" in model_units(shipped)[-1].modules  # its BatchNorm
    with_registers = make_vit(reg_tokens=2, final_norm=False)
    assert model_units(with_registers)[-1].tokens == ("cls_token", "reg_token", "pos_embed")
    assert model_units(with_registers)[0].modules == ("head",)
    with pytest.raises(UnsupportedModelError, match="has no `patch_embed` and `blocks`"):
        model_units(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(UnsupportedModelError, match=r"attn_pool.latent: no module of it has reset_parameters"):
        model_units(make_vit(global_pool="map"))


def test_states_of_both_orders():
    units = model_units(make_vit())
    cascading = randomisation_states(units, "cascading")
    assert cascading[0] == ("head", ("head",)) and cascading[1] == ("block_2", ("head", "block_2"))
    assert cascading[-1] == ("patch_embed", ("head", "block_2", "block_1", "block_0", "patch_embed"))
    independent = randomisation_states(units, "independent")
    assert independent[1] == ("block_2", ("block_2",)) and independent[-1] == ("all", cascading[-1][1])
    assert len(independent) == len(cascading) + 1


def test_randomised_states_change_only_their_units(batch):
    model = batch[0]
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    before = torch.get_rng_state()
    models = RandomisedModels(model, seed=42)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is untouched
    all_random = {k: v.clone() for k, v in models.model_with(["head", "block_2", "block_1", "block_0",
                                                               "patch_embed"]).state_dict().items()}
    block = {k: v.clone() for k, v in models.model_with(["block_1"]).state_dict().items()}
    for key, value in block.items():
        expected = all_random[key] if key.startswith("blocks.1.") else trained[key]
        assert torch.equal(value, expected), key
    assert not torch.equal(all_random["cls_token"], trained["cls_token"])  # tokens too (Quantus leaves them)
    assert all(torch.equal(v, trained[k]) for k, v in models.model_with([]).state_dict().items())
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())  # the run's model is never changed
    again = RandomisedModels(model, seed=42).model_with(["block_1"]).state_dict()
    assert all(torch.equal(v, block[k]) for k, v in again.items())  # a function of the seed
    other = RandomisedModels(model, seed=7).model_with(["block_1"]).state_dict()
    assert not torch.equal(other["blocks.1.attn.qkv.weight"], block["blocks.1.attn.qkv.weight"])


def test_randomised_maps_batched_equal_one_image_at_a_time(batch):
    model, images, targets = batch
    working = RandomisedModels(model, seed=42).model_with(["head", "block_2"])
    whole = heatmaps_of(working, "agcam", images, targets)
    alone = torch.cat([heatmaps_of(working, "agcam", images[i:i + 1], targets[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(whole, alone, rtol=0, atol=1e-5)


def test_random_other_classes_are_per_image():
    targets = torch.tensor([0, 3, 3, 1, 4])
    ids = [f"img{i}" for i in range(5)]
    drawn = random_other_classes(targets, 5, 42, ids)
    assert (drawn != targets).all() and ((drawn >= 0) & (drawn < 5)).all()
    assert torch.equal(drawn, torch.cat([random_other_classes(t[None], 5, 42, [i]) for t, i in zip(targets, ids)]))
    many = random_other_classes(torch.zeros(400, dtype=torch.long), 5, 42, [f"x{i}" for i in range(400)])
    assert sorted(set(many.tolist())) == [1, 2, 3, 4]  # uniform over the other classes
    with pytest.raises(ValueError, match="at least 2 classes"):
        random_other_classes(targets[:1] * 0, 1, 42, ["a"])


# -- equal to Quantus -----------------------------------------------------------------------------

def _skimage_ssim(a, b, batched=True, **kwargs):
    """Adebayo et al.'s SSIM on the 2-D maps (Quantus flattens the maps to 1-D rows first)."""
    from skimage.metrics import structural_similarity
    side = math.isqrt(a.shape[1])
    return np.array([structural_similarity(x.reshape(side, side).astype(np.float64),
                                           y.reshape(side, side).astype(np.float64),
                                           gaussian_weights=True, sigma=1.5, data_range=1.0) for x, y in zip(a, b)])


def _quantus_options():
    return {"abs": False, "normalise": False, "disable_warnings": True, "display_progressbar": False}


def test_mprt_equals_quantus_per_image(batch):
    """Cascading, seed 42: Quantus' state after the last module of each of our units is our
    state, image for image (Spearman, and SSIM on the 2-D maps). Quantus leaves the class token
    and position embedding trained; we re-initialise them with the patch embedding, as the paper
    randomises every weight: our last state equals Quantus' once they are put back."""
    quantus = pytest.importorskip("quantus")
    pytest.importorskip("skimage")
    model, images, targets = batch
    heat = heatmaps_of(model, "agcam", images, targets)

    def explain(model, inputs, targets, **kwargs):
        return heatmaps_of(model, "agcam", inputs, targets)[:, None].numpy()

    arguments = {"model": model, "x_batch": images.numpy(), "y_batch": targets.numpy(),
                 "a_batch": heat[:, None].numpy(), "explain_func": explain, "device": "cpu"}
    theirs = {name: quantus.MPRT(layer_order="top_down", seed=42, similarity_func=func, **_quantus_options())(
        **arguments) for name, func in (("spearman", None), ("ssim", _skimage_ssim))}
    models = RandomisedModels(model, seed=42)
    units = {u.name: u for u in models.units}
    for state, randomised in randomisation_states(models.units, "cascading"):
        working = models.model_with(randomised)
        if state == "patch_embed":  # Quantus' last state: tokens trained
            working = copy.deepcopy(working)
            working.cls_token.data.copy_(model.cls_token)
            working.pos_embed.data.copy_(model.pos_embed)
        comparison = MapComparison(heat, 10)
        random_heat = heatmaps_of(working, "agcam", images, targets)
        for name in theirs:
            np.testing.assert_allclose(comparison.similarity(name, random_heat).numpy(),
                                       theirs[name][units[state].modules[-1]], rtol=0, atol=1e-6, err_msg=state)
    ours_last = heatmaps_of(models.model_with(list(units)), "agcam", images, targets)
    assert not np.allclose(spearman(heat, ours_last).numpy(), theirs["spearman"]["patch_embed.proj"], atol=1e-3)


def test_mprt_independent_equals_quantus_where_a_unit_is_one_module():
    """Independent order: Quantus re-initialises one module at a time, we one unit; they agree
    where the unit is one module (the head of a ViT without final norm)."""
    quantus = pytest.importorskip("quantus")
    model = make_vit(final_norm=False)
    images = torch.randn(3, 3, *SIZE, generator=torch.Generator().manual_seed(4))
    targets = model(images).argmax(1)
    heat = heatmaps_of(model, "gradcam", images, targets)

    def explain(model, inputs, targets, **kwargs):
        return heatmaps_of(model, "gradcam", inputs, targets)[:, None].numpy()

    theirs = quantus.MPRT(layer_order="independent", seed=5, **_quantus_options())(
        model=model, x_batch=images.numpy(), y_batch=targets.numpy(), a_batch=heat[:, None].numpy(),
        explain_func=explain, device="cpu")
    models = RandomisedModels(model, seed=5)
    state, randomised = randomisation_states(models.units, "independent")[0]
    assert (state, models.units[0].modules) == ("head", ("head",))
    ours = spearman(heat, heatmaps_of(models.model_with(randomised), "gradcam", images, targets))
    np.testing.assert_allclose(ours.numpy(), theirs["head"], rtol=0, atol=1e-6)


def test_quantus_default_ssim_flattens_the_maps():
    """Quantus' `ssim` reshapes each map to one row and slides skimage's 7-pixel window along it;
    ours (Adebayo et al.'s) is the 2-D SSIM with an 11 x 11 Gaussian window: other numbers."""
    quantus = pytest.importorskip("quantus")
    metrics = pytest.importorskip("skimage.metrics")
    a, b = torch.rand(2, 2, 24, 24, generator=torch.Generator().manual_seed(5)).double()
    a[:, :12] = 0.0
    a[:, 0, 0] = 1.0  # a spans [0, 1]: Quantus' data range (max - min of both maps) is ours, 1
    theirs = np.asarray(quantus.functions.similarity_func.ssim(a.flatten(1).numpy(), b.flatten(1).numpy(), batched=True))
    flat = [metrics.structural_similarity(x, y, win_size=7, data_range=1.0) for x, y in zip(a.flatten(1).numpy(),
                                                                                      b.flatten(1).numpy())]
    np.testing.assert_allclose(theirs, flat, atol=1e-12)
    assert np.abs(theirs - ssim(a, b).numpy()).min() > 1e-3


def test_random_logit_equals_quantus_per_image(batch):
    """The same other classes (recorded from Quantus' calls: it draws them per batch from one
    global seed, we per image from (seed, image id)) give the same similarity per image."""
    quantus = pytest.importorskip("quantus")
    pytest.importorskip("skimage")
    model, images, targets = batch
    heat = heatmaps_of(model, "agcam", images, targets)
    asked = []

    def explain(model, inputs, targets, **kwargs):
        asked.append(torch.as_tensor(targets))
        return heatmaps_of(model, "agcam", inputs, targets)[:, None].numpy()

    theirs = quantus.RandomLogit(num_classes=5, seed=42, similarity_func=_skimage_ssim, **_quantus_options())(
        model=model, x_batch=images.numpy(), y_batch=targets.numpy(), a_batch=heat[:, None].numpy(),
        explain_func=explain, device="cpu")
    others = asked[-1]
    assert (others != targets).all()
    ours = MapComparison(heat, 10).similarity("ssim", heatmaps_of(model, "agcam", images, others))
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-6)
    assert (ours < 0.999).all()  # agcam is class-specific


# -- the measures in a run ------------------------------------------------------------------------

@pytest.fixture
def explainer_calls(monkeypatch):
    """Counts every call of an explainer the run builds (its own and those on randomised models)."""
    calls: Counter = Counter()
    built = Explainers.on

    class Counted:
        def __init__(self, inner, key):
            self.inner, self.key = inner, key

        def __call__(self, *args, **kwargs):
            calls[self.key] += 1
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(Explainers, "on", lambda self, model, key: Counted(built(self, model, key), key))
    return calls


def test_a_run_fails_the_baselines_passes_rollout_and_caches_the_randomised_maps(tmp_path, explainer_calls):
    out = run_folder(tmp_path / "run", "measure=[model_randomisation,random_logit]")
    rows = pd.read_csv(out / "model_randomisation.csv")
    states = [c.removeprefix("spearman_") for c in rows.columns if c.startswith("spearman_")]
    assert states == ["head", *(f"block_{i}" for i in range(5, -1, -1)), "patch_embed"]
    similarity_columns = [c for c in rows.columns if c.split("_")[0] in ("spearman", "ssim", "topk")]
    baselines = rows[rows["method"].isin(["random", "center"])]
    assert len(baselines) == 12 and np.allclose(baselines[similarity_columns], 1.0)  # maps ignore the weights
    rollout = rows[rows["method"] == "rollout"]
    assert (rollout["spearman"] < 0.5).all() and (rollout["spearman"] == rollout["spearman_patch_embed"]).all()
    assert rollout["spearman_block_0"].mean() < rollout["spearman_block_3"].mean() < rollout["spearman_head"].mean()
    logit = pd.read_csv(out / "random_logit.csv")
    assert np.allclose(logit["random_logit_ssim"], 1.0)  # none of the three maps depends on the class
    assert (logit["other_class"] != logit["target"]).all()
    table = pd.read_csv(out / "table.csv").groupby("method").first()
    assert table.loc["center", "MPRT Spearman"] == pytest.approx(1.0) and table.loc["rollout", "MPRT SSIM"] < 0.5
    assert set(table["n_images_model_randomisation"]) == {6} and set(table["n_images_random_logit"]) == {6}
    assert check_run(out) == []
    first = sum(explainer_calls.values())
    assert first > 0

    explainer_calls.clear()  # another k: new rows, from the stored randomised maps
    again = run_folder(tmp_path / "again", "measure=[model_randomisation]", "measure.model_randomisation.params.top_k=300")
    assert sum(explainer_calls.values()) == 0
    redone = pd.read_csv(again / "model_randomisation.csv")
    assert np.allclose(redone["spearman"], rows["spearman"]) and not np.allclose(redone["topk"], rows["topk"])

    explainer_calls.clear()  # another seed: other randomised models, explained (only they)
    run_folder(tmp_path / "seed", "measure=[model_randomisation]", "measure.model_randomisation.params.seed=7")
    assert sum(explainer_calls.values()) == len(states) * 2 * 3  # states x batches x methods


def test_independent_order_and_maps_the_randomisation_erases(tmp_path):
    """Grad-CAM's map on the fully randomised shipped model is constant (a ReLU of nothing) for
    the third image: an empty map, Spearman and top-k 0, counted in the row and noted."""
    out = run_folder(tmp_path / "run", "measure=[model_randomisation]", "method=[gradcam]",
                     "dataset.params.num_images=3", "measure.model_randomisation.params.order=independent")
    assert check_run(out) == []
    states = pd.read_csv(out / "model_randomisation_states.csv")
    assert [c for c in states.columns if c.startswith("ssim_")] == [
        "ssim_head", *(f"ssim_block_{i}" for i in range(5, -1, -1)), "ssim_patch_embed"]  # `all`: the summary
    rows = pd.read_csv(out / "model_randomisation.csv")
    erased = rows[rows["degenerate_random"] == 1]
    assert len(erased) == 1 and (erased[["spearman", "topk"]] == 0).all(axis=None)
    assert 0 < erased["ssim"].iloc[0] < 0.5 and erased["degenerate_states"].iloc[0] >= 1
    tables = ModelRandomisation.tables(read_run(out))
    assert tables.summary.loc["gradcam", "n_images_model_randomisation"] == 3
    assert ("gradcam: its map on the fully randomised model is degenerate (constant or NaN/inf) for 1 image; "
            "model_randomisation scores it as an empty map (Spearman and top-k 0).") in tables.notes


@pytest.mark.parametrize(("override", "message"), [
    ("measure.model_randomisation.params.order=spiral", r"params.order='spiral' is not an order; valid: cascading"),
    ("measure.model_randomisation.params.seed=-1", r"params.seed=-1 must be an integer >= 0"),
    ("measure.model_randomisation.params.top_k=0", r"params.top_k=0 must be an integer >= 1"),
    ("measure.model_randomisation.params.top_k=60000", r"top_k=60000 exceeds the 50176 pixels .* top_k <= 50176"),
    ("measure.random_logit.params.similarity=pearson", r"similarity='pearson' is not a similarity; valid: spearman"),
])
def test_settings_are_refused_before_any_model_pass(tmp_path, monkeypatch, override, message):
    monkeypatch.setattr("wsol_bench.run.maps.LazyModel.get", lambda self: pytest.fail("the model was loaded"))
    with pytest.raises(SettingError, match=message):
        run_folder(tmp_path / "run", "measure=[model_randomisation,random_logit]", override)
