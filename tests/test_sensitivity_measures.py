"""Max- and average sensitivity (`measure=[max_sensitivity,avg_sensitivity]`): hand cases of the
engine, noise that does not depend on the batching, the same numbers as Quantus 0.6 on the same
model, images, maps and noise, and a run of the sanity baselines through the tables."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_vit
from hydra import compose, initialize_config_module

from wsol_bench.datasets.base import Sample
from wsol_bench.errors import SettingError
from wsol_bench.methods import get_explainer
from wsol_bench.methods.base import Explainer
from wsol_bench.metrics.sensitivity import copy_changes, input_noise, noise_seed, relative_change
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.run.batch import BatchTruth, MethodBatch
from wsol_bench.run.run_tables import check_run
from wsol_bench.run.runner import run
from wsol_bench.run.scorers.avg_sensitivity import AvgSensitivity, AvgSensitivitySettings
from wsol_bench.run.scorers.max_sensitivity import MaxSensitivity, SensitivitySettings

IDS = ["img_a", "img_b", "img_c"]


def heat_explainer(explainer, size):
    """The engine's view of an explainer: copies and classes -> heatmaps and degenerate flags."""
    return lambda copies, classes: to_heatmaps(explainer(copies, classes).maps, size)


def first_channel(copies, classes):
    """A linear explainer: its map is the input's first channel, as it is."""
    return copies[:, 0], torch.zeros(len(copies), dtype=torch.bool)


def test_an_explainer_that_ignores_its_input_has_sensitivity_zero():
    torch.manual_seed(0)
    fixed = torch.rand(2, 6, 6)
    images = torch.randn(2, 3, 6, 6)
    found = copy_changes(lambda copies, classes: (fixed[classes], torch.zeros(len(copies), dtype=torch.bool)),
                         images, fixed, torch.tensor([0, 1]), IDS[:2], radius=0.5, nr_samples=5, seed=3, batch_size=3)
    assert found.changes.shape == (2, 5)
    assert found.max_sensitivity().tolist() == [0.0, 0.0] and found.avg_sensitivity().tolist() == [0.0, 0.0]
    assert found.degenerate.tolist() == [0, 0]


def test_a_linear_explainer_moves_by_the_noise_over_the_map():
    """e(x) = x's first channel: copy s changes by ||delta_s|| / ||x||. On a map of ones of N
    pixels that is the RMS of uniform noise, radius / sqrt(3), to within sampling error."""
    images = torch.ones(1, 3, 100, 100)
    found = copy_changes(first_channel, images, images[:, 0], torch.tensor([0]), IDS[:1], radius=0.3, nr_samples=4,
                         seed=0, batch_size=2)
    expected = [input_noise((3, 100, 100), 0.3, 0, IDS[0], s)[0].norm().item() / 100 for s in range(4)]
    assert found.changes[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert found.changes[0].tolist() == pytest.approx([0.3 / math.sqrt(3)] * 4, rel=0.01)
    assert found.max_sensitivity().item() == pytest.approx(max(expected), rel=1e-6)
    assert found.avg_sensitivity().item() == pytest.approx(sum(expected) / 4, rel=1e-6)


def test_the_noise_is_uniform_in_the_linf_ball_and_its_own_per_image_and_copy():
    noise = input_noise((3, 64, 64), 0.2, 7, "x", 0)
    assert noise.abs().max() <= 0.2 and noise.abs().max() > 0.199 and abs(noise.mean()) < 0.005
    assert torch.equal(noise, input_noise((3, 64, 64), 0.2, 7, "x", 0))
    others = [input_noise((3, 64, 64), 0.2, *key) for key in ((8, "x", 0), (7, "y", 0), (7, "x", 1))]
    assert not any(torch.equal(noise, other) for other in others)
    assert noise_seed(0, "a1", 0) != noise_seed(0, "a", 1)  # id and index never run together


def test_a_degenerate_copy_counts_as_an_all_zero_heatmap():
    clean = torch.rand(1, 4, 4)

    def constant_on_second_copy(copies, classes):
        flags = torch.tensor([copy[0, 0, 0] != copies[0, 0, 0, 0] for copy in copies])  # not the chunk's first copy
        return torch.where(flags[:, None, None], torch.zeros(len(copies), 4, 4), clean.expand(len(copies), 4, 4)), flags

    found = copy_changes(constant_on_second_copy, torch.zeros(1, 3, 4, 4), clean, torch.tensor([0]), IDS[:1],
                         radius=0.1, nr_samples=2, seed=0, batch_size=2)
    assert found.changes[0].tolist() == pytest.approx([0.0, 1.0]) and found.degenerate.tolist() == [1]
    assert relative_change(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)).isnan().all()


def test_batched_copies_equal_one_image_at_a_time():
    """Copies of several images in one call, chunks straddling images, give the numbers of each
    image alone, one copy per call (the noise is seeded by seed, image id and copy index):
    exactly for a per-copy explainer, to float noise for a ViT (batched matmuls may round
    differently)."""
    torch.manual_seed(0)
    images = torch.randn(3, 3, 8, 8)
    batched = copy_changes(first_channel, images, images[:, 0], torch.zeros(3, dtype=torch.long), IDS, radius=0.2,
                           nr_samples=5, seed=1, batch_size=4)
    for i in range(3):
        alone = copy_changes(first_channel, images[i:i + 1], images[i:i + 1, 0], torch.zeros(1, dtype=torch.long),
                             IDS[i:i + 1], radius=0.2, nr_samples=5, seed=1, batch_size=1)
        assert torch.equal(batched.changes[i], alone.changes[0])
    model = make_vit()
    explain = heat_explainer(get_explainer("rollout", model), (32, 32))
    images = torch.randn(3, 3, 32, 32)
    heat, _ = explain(images, torch.zeros(3, dtype=torch.long))
    classes = torch.tensor([0, 2, 4])
    batched = copy_changes(explain, images, heat, classes, IDS, radius=0.2, nr_samples=3, seed=1, batch_size=4)
    for i in range(3):
        alone = copy_changes(explain, images[i:i + 1], heat[i:i + 1], classes[i:i + 1], IDS[i:i + 1], radius=0.2,
                             nr_samples=3, seed=1, batch_size=1)
        torch.testing.assert_close(batched.changes[i], alone.changes[0], rtol=1e-5, atol=1e-7)
    assert (batched.changes > 0).all()


@pytest.mark.parametrize(("settings", "bad", "match"), [
    (SensitivitySettings, {"radius": 0}, "measure.max_sensitivity.params.radius=0 must be a finite number > 0"),
    (AvgSensitivitySettings, {"radius": float("nan")}, "measure.avg_sensitivity.params.radius=nan"),
    (SensitivitySettings, {"radius": True}, "params.radius=True"),
    (AvgSensitivitySettings, {"nr_samples": 0}, "measure.avg_sensitivity.params.nr_samples=0 must be an integer >= 1"),
    (SensitivitySettings, {"seed": 1.5}, "params.seed=1.5 must be an integer"),
    (SensitivitySettings, {"batch_size": 0}, "params.batch_size=0 must be an integer >= 1"),
])
def test_bad_settings_are_refused_naming_the_setting(settings, bad, match):
    with pytest.raises(SettingError, match=match.replace("(", r"\(").replace(".", r"\.")):
        settings(**bad)


def method_batch(images: torch.Tensor, method: str = "m") -> MethodBatch:
    samples = [Sample(image=image, label=0, boxes=torch.zeros(0, 4), image_id=IDS[i], orig_size=(32, 32))
               for i, image in enumerate(images)]
    n = len(images)
    return MethodBatch(method=method, truth=BatchTruth(samples, (32, 32), "agcam"), maps=torch.rand(n, 4, 4),
                       logits=torch.zeros(n, 5), targets=torch.zeros(n, dtype=torch.long), positions=list(range(n)),
                       shard_index=0, target_source="predicted", class_specific=False, images=images)


def test_max_and_avg_share_one_set_of_explanations(tmp_path):
    """A run selecting both measures with the same radius, nr_samples and seed explains the
    copies once; another seed explains them again."""
    explainer = get_explainer("rollout", make_vit())
    calls = []

    def counted(images, targets):
        calls.append(targets.tolist())
        return explainer(images, targets)

    context = SimpleNamespace(explainers=lambda method: counted)
    torch.manual_seed(0)
    mb = method_batch(torch.randn(2, 3, 32, 32))
    keep = torch.tensor([0, 1])
    heat, _ = to_heatmaps(mb.maps, (32, 32))
    classes = torch.tensor([3, 1])  # not the predictions (all 0): e.g. target=label
    rows = {}
    for cls, settings in ((MaxSensitivity, SensitivitySettings(nr_samples=3, batch_size=4)),
                          (AvgSensitivity, AvgSensitivitySettings(nr_samples=3, batch_size=2)),
                          (AvgSensitivity, AvgSensitivitySettings(nr_samples=3, seed=5))):
        scorer = cls(None, {}, settings, tmp_path / f"{cls.name}.csv", dataset_name="d", split="s")
        scorer.context = context
        rows[(cls.name, settings.seed)] = scorer.measure(None, mb, keep, heat[keep], classes, mb.logits)
    # 6 copies for seed 0 (once, 4 per call), 6 for seed 5, each for the class its clean map explains
    assert calls == [[3, 3, 3, 1], [1, 1], [3, 3, 3, 1, 1, 1]]
    maxima = [row["max_sensitivity"] for row in rows[("max_sensitivity", 0)]]
    means = [row["avg_sensitivity"] for row in rows[("avg_sensitivity", 0)]]
    assert all(high >= mean > 0 for high, mean in zip(maxima, means))
    assert means != [row["avg_sensitivity"] for row in rows[("avg_sensitivity", 5)]]


# -- Quantus 0.6 on the same model, images, maps and noise ----------------------------------------

def our_noise(radius: float, seed: int):
    """A Quantus perturb_func adding, at its call s (Quantus perturbs the whole batch once per
    step), the noise our engine draws for copy s of each image of IDS."""
    steps = iter(range(10**6))

    def perturb(arr, indices, **kwargs):
        step = next(steps)
        noise = torch.stack([input_noise((3, 32, 32), radius, seed, image_id, step) for image_id in IDS[:len(arr)]])
        return arr + noise.reshape(len(arr), -1).numpy()

    return perturb


def test_the_same_numbers_as_quantus():
    """Quantus' MaxSensitivity and AvgSensitivity with its defaults' norms and difference, fed our
    heatmaps as a_batch, our explainer as explain_func, and (through perturb_func) the noise our
    engine draws: the same per-image numbers, for the classes given (not the predictions)."""
    quantus = pytest.importorskip("quantus")
    model = make_vit()
    explainer = get_explainer("agcam", model)
    explain = heat_explainer(explainer, (32, 32))
    images = torch.randn(3, 3, 32, 32)
    classes = torch.tensor([1, 3, 0])
    heat, degenerate = explain(images, classes)
    assert not degenerate.any()
    radius, samples = 0.2, 4
    ours = copy_changes(explain, images, heat, classes, IDS, radius=radius, nr_samples=samples, seed=0, batch_size=5)

    def quantus_explain(model, inputs, targets, **kwargs):
        return explain(torch.as_tensor(inputs), torch.as_tensor(targets))[0].numpy()

    for metric, value in ((quantus.MaxSensitivity, ours.max_sensitivity()),
                          (quantus.AvgSensitivity, ours.avg_sensitivity())):
        quantus_metric = metric(nr_samples=samples, lower_bound=radius, perturb_func=our_noise(radius, seed=0),
                                abs=False, normalise=False, disable_warnings=True, display_progressbar=False)
        scores = quantus_metric(
            model=model, x_batch=images.numpy(), y_batch=classes.numpy(), a_batch=heat[:, None].numpy(),
            explain_func=quantus_explain, batch_size=8)
        np.testing.assert_allclose(scores, value.numpy(), rtol=1e-5)


# -- a run: rollout and the sanity baselines ------------------------------------------------------

TINY = ["dataset.params.num_images=6", "batch_size=3", "gallery_images=0", "progress=false",
        "metric.image_filter=all", "method=[rollout,random,center]", "run_name=test"]


def run_folder(out: Path, *overrides: str, measures: tuple[str, ...] = ("max_sensitivity", "avg_sensitivity")
               ) -> Path:
    """A run of the shipped model on synthetic images scoring `measures` with 2 copies per image."""
    chosen = [f"measure=[{','.join(measures)}]", *(f"measure.{name}.params.nr_samples=2" for name in measures)]
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, *chosen, f"store.root={out.parent / 'cache'}",
                                                       *overrides])
    run(cfg, out)
    return out


def test_a_run_scores_rollout_and_the_sanity_baselines(tmp_path, monkeypatch):
    """center's map never changes (0); random's map is seeded by the image's bytes, so every
    noisy copy gets a new, independent map (about 0.5 to 0.6, the highest); rollout lies between.
    The two measures share their copies: 6 images + 6 x 2 copies explained per method."""
    explained = []
    call = Explainer.__call__
    monkeypatch.setattr(Explainer, "__call__", lambda self, images, *a, **k: explained.append(len(images)) or call(
        self, images, *a, **k))
    out = run_folder(tmp_path / "run")
    assert sum(explained) == 3 * (6 + 6 * 2)
    table = pd.read_csv(out / "table_box.csv").set_index("method")
    for name, column in (("max_sensitivity", "Max-Sensitivity"), ("avg_sensitivity", "Avg-Sensitivity")):
        rows = pd.read_csv(out / f"{name}.csv")
        assert len(rows) == 18 and (rows["degenerate"] == 0).all() and (rows["degenerate_copies"] == 0).all()
        assert rows["target"].tolist() == rows["prediction"].tolist()  # the class the run's maps explain
        means = rows.groupby("method")[name].mean()
        assert table[column].to_dict() == pytest.approx(means.to_dict())
        assert table[f"n_images_{name}"].tolist() == [6, 6, 6]
        assert means["center"] == 0 and 0 < means["rollout"] < means["random"]
    both = pd.read_csv(out / "max_sensitivity.csv").merge(pd.read_csv(out / "avg_sensitivity.csv"),
                                                          on=["image_id", "method"])
    assert (both["max_sensitivity"] >= both["avg_sensitivity"]).all()
    assert check_run(out) == []


def test_a_bad_setting_is_refused_before_any_model_pass(tmp_path):
    with pytest.raises(SettingError, match=r"measure\.max_sensitivity\.params\.nr_samples=0"):
        run_folder(tmp_path / "run", "measure.max_sensitivity.params.nr_samples=0")
    with pytest.raises(SettingError, match="measure 'avg_sensitivity' takes no parameter 'radus'"):
        run_folder(tmp_path / "run", "+measure.avg_sensitivity.params.radus=0.1")
    assert not (tmp_path / "cache").exists()


def test_the_copies_maps_get_the_map_stores_rounding(tmp_path):
    """With store.dtype=float16 the clean map is read back rounded; the copies' maps are rounded
    the same way, so a map that never changes still scores exactly 0."""
    out = run_folder(tmp_path / "run", "method=[center]", "store.dtype=float16", "dataset.params.num_images=3",
                     measures=("max_sensitivity",))
    assert pd.read_csv(out / "max_sensitivity.csv")["max_sensitivity"].tolist() == [0.0, 0.0, 0.0]


def test_rows_are_cached_per_shard_by_the_settings_that_change_them(tmp_path):
    """batch_size changes speed only: a run with another reads the cached rows; another seed
    draws other copies and recomputes them."""
    first = pd.read_csv(run_folder(tmp_path / "run", "method=[rollout]", measures=("max_sensitivity",))
                        / "max_sensitivity.csv")
    (cached,) = (tmp_path / "cache").rglob("max_sensitivity_*/shard_*.csv")
    pd.read_csv(cached).assign(max_sensitivity=0.125).to_csv(cached, index=False)
    again = run_folder(tmp_path / "again", "method=[rollout]", "measure.max_sensitivity.params.batch_size=1",
                       measures=("max_sensitivity",))
    assert pd.read_csv(again / "max_sensitivity.csv")["max_sensitivity"].tolist() == [0.125] * 6
    other = run_folder(tmp_path / "other", "method=[rollout]", "measure.max_sensitivity.params.seed=1",
                       measures=("max_sensitivity",))
    values = pd.read_csv(other / "max_sensitivity.csv")["max_sensitivity"]
    assert 0.125 not in values.tolist() and values.tolist() != first["max_sensitivity"].tolist()


def test_degenerate_copies_are_noted_under_the_tables():
    rows = pd.DataFrame({"method": ["a", "a", "b", "b"], "degenerate_copies": [1, 2, 0, float("nan")]})
    note = ("a: 3 noisy copies had degenerate maps (constant or non-finite); avg_sensitivity counts each as an "
            "all-zero heatmap, a relative change of 1.")
    assert AvgSensitivity.row_notes(rows) == [note]
