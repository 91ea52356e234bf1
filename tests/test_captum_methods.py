"""Captum explainers (methods/captum_methods.py): each equals a direct captum call, batches,
has the shape its `resolution` says, refuses bad parameters in one line, runs through the CLI,
and names the install command when captum is missing."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_vit

from wsol_bench.config.methods import check_method_params
from wsol_bench.methods import captum_methods, get_explainer
from wsol_bench.methods.base import MissingLibraryError

# every test but the missing-captum one needs captum (pip install "wsol-bench[explainers]")
needs_captum = pytest.mark.skipif(importlib.util.find_spec("captum") is None, reason="captum is not installed")

PIXEL = ["ig", "saliency", "input_x_gradient", "smoothgrad", "gradient_shap"]
GRID = ["occlusion", "feature_ablation"]
FAST = {"ig": {"steps": 8}, "smoothgrad": {"samples": 4}, "gradient_shap": {"samples": 4}}


@pytest.fixture(scope="module")
def vit():
    return make_vit(0, img_size=32, patch_size=16, num_classes=4)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


TARGETS = torch.tensor([0, 3, 1])


def _direct(name: str, model, x, t) -> torch.Tensor:
    """The same attribution built from captum by hand, channels reduced the method's default way."""
    ca = importlib.import_module("captum.attr")
    if name == "ig":
        return ca.IntegratedGradients(model).attribute(x, baselines=0.0, target=t, n_steps=8).sum(1)
    if name == "saliency":
        return ca.Saliency(model).attribute(x, target=t, abs=True).abs().sum(1)
    if name == "input_x_gradient":
        return ca.InputXGradient(model).attribute(x, target=t).sum(1)
    if name == "smoothgrad":
        torch.manual_seed(0)
        return ca.NoiseTunnel(ca.Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=4, stdevs=0.15,
                                                            target=t).abs().sum(1)
    if name == "gradient_shap":
        # the documented baseline distribution: the constant 0, then 3 N(0, 1) images from seed 0
        noise = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        baselines = torch.cat([torch.zeros(1, *x.shape[1:]), noise])
        torch.manual_seed(0)
        np.random.seed(0)
        return ca.GradientShap(model).attribute(x, baselines=baselines, n_samples=4, stdevs=0.0, target=t).sum(1)
    if name == "occlusion":
        attr = ca.Occlusion(model).attribute(x, sliding_window_shapes=(3, 16, 16), strides=(3, 16, 16),
                                             baselines=0.0, target=t)
        return attr[:, 0, ::16, ::16]
    if name == "feature_ablation":
        mask = torch.tensor([[0, 1], [2, 3]]).repeat_interleave(16, 0).repeat_interleave(16, 1)[None, None]
        return ca.FeatureAblation(model).attribute(x, baselines=0.0, target=t, feature_mask=mask)[:, 0, ::16, ::16]
    raise KeyError(name)


@needs_captum
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", PIXEL + GRID)
def test_equals_a_direct_captum_call(vit, images, name):
    """Same maps as captum called by hand, the logits of the plain images, the targets used."""
    out = get_explainer(name, vit, **FAST.get(name, {}))(images, TARGETS)
    torch.testing.assert_close(out.maps, _direct(name, vit, images.clone(), TARGETS), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.logits, vit(images), rtol=1e-5, atol=1e-5)
    assert out.targets.tolist() == TARGETS.tolist() and out.target_source == "given"


@needs_captum
def test_predicted_targets_and_occlusion_by_hand(vit, images):
    """Without targets the predicted class is explained; an occlusion score is the drop of the
    target logit when the patch is set to the baseline."""
    out = get_explainer("occlusion", vit)(images)
    logits = vit(images)
    assert out.target_source == "predicted" and torch.equal(out.targets, logits.argmax(1))
    occluded = images.clone()
    occluded[:, :, 16:, :16] = 0.0  # patch (1, 0)
    drop = (logits - vit(occluded)).gather(1, out.targets[:, None])[:, 0]
    torch.testing.assert_close(out.maps[:, 1, 0], drop, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(get_explainer("feature_ablation", vit)(images).maps, out.maps, rtol=1e-4, atol=1e-5)


@needs_captum
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["ig", "saliency", "input_x_gradient", "occlusion", "feature_ablation"])
def test_batched_equals_one_at_a_time(vit, images, name):
    params = {**FAST.get(name, {}), **({"perturbations_per_eval": 3} if name in GRID else {})}
    explainer = get_explainer(name, vit, **params)
    batched = explainer(images, TARGETS).maps
    single = torch.cat([explainer(images[i:i + 1], TARGETS[i:i + 1]).maps for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)


@needs_captum
def test_ig_internal_batch_size_does_not_change_the_map(vit, images):
    whole = get_explainer("ig", vit, steps=8)(images, TARGETS).maps
    chunked = get_explainer("ig", vit, steps=8, internal_batch_size=6)(images, TARGETS).maps
    torch.testing.assert_close(whole, chunked, rtol=1e-4, atol=1e-6)


@needs_captum
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_noise_methods_seeded_per_batch(vit, images):
    """The seeding rule: the same call gives the same maps and leaves the global generators as
    they were; noise is drawn per batch, so batched and one at a time agree in expectation only
    (exactly once the noise is off: stdev=0 is saliency)."""
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    for name in ("smoothgrad", "gradient_shap"):
        explainer = get_explainer(name, vit, samples=32)
        first = explainer(images, TARGETS).maps
        assert torch.equal(first, explainer(images, TARGETS).maps)
        assert not torch.equal(first, get_explainer(name, vit, samples=32, seed=1)(images, TARGETS).maps)
        single = torch.cat([explainer(images[i:i + 1], TARGETS[i:i + 1]).maps for i in range(3)])
        for b, s in zip(first, single):
            assert torch.corrcoef(torch.stack([b.flatten(), s.flatten()]))[0, 1] > 0.9
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))
    noiseless = get_explainer("smoothgrad", vit, samples=3, stdev=0.0)
    batched = noiseless(images, TARGETS).maps
    single = torch.cat([noiseless(images[i:i + 1], TARGETS[i:i + 1]).maps for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batched, get_explainer("saliency", vit)(images, TARGETS).maps, rtol=1e-4, atol=1e-6)


@needs_captum
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", PIXEL + GRID)
def test_map_shape_follows_resolution(name):
    """Non-square inputs, register tokens: pixel maps at the input size, grid maps on the grid."""
    model = make_vit(2, img_size=(64, 48), patch_size=16, depth=2, reg_tokens=2)
    explainer = get_explainer(name, model, **FAST.get(name, {}))
    assert explainer.resolution == ("grid" if name in GRID else "pixel")
    assert explainer.map_shape((64, 48)) == ((4, 3) if name in GRID else (64, 48))
    assert isinstance(explainer.passes_per_image, str) and explainer.passes_per_image
    maps = explainer(torch.randn(2, 3, 64, 48)).maps
    assert maps.shape == (2, *explainer.map_shape((64, 48))) and torch.isfinite(maps).all()


@pytest.mark.parametrize("name,params,start", [
    ("ig", {"steps": 0}, "ig: steps=0 "),
    ("ig", {"steps": 2.5}, "ig: steps=2.5 "),
    ("ig", {"internal_batch_size": 0}, "ig: internal_batch_size=0 "),
    ("ig", {"baseline": float("nan")}, "ig: baseline=nan "),
    ("ig", {"reduce": "max"}, "ig: reduce='max'"),
    ("saliency", {"reduce": "mean"}, "saliency: reduce='mean'"),
    ("input_x_gradient", {"reduce": None}, "input_x_gradient: reduce=None"),
    ("smoothgrad", {"samples": 0}, "smoothgrad: samples=0 "),
    ("smoothgrad", {"stdev": -0.1}, "smoothgrad: stdev=-0.1 "),
    ("smoothgrad", {"seed": -1}, "smoothgrad: seed=-1 "),
    ("smoothgrad", {"samples_per_pass": 0}, "smoothgrad: samples_per_pass=0 "),
    ("gradient_shap", {"random_baselines": -1}, "gradient_shap: random_baselines=-1 "),
    ("gradient_shap", {"stdev": "x"}, "gradient_shap: stdev='x' "),
    ("occlusion", {"window": 0}, "occlusion: window=0 "),
    ("occlusion", {"stride": True}, "occlusion: stride=True "),
    ("occlusion", {"perturbations_per_eval": 0}, "occlusion: perturbations_per_eval=0 "),
    ("feature_ablation", {"baseline": float("inf")}, "feature_ablation: baseline=inf "),
])
def test_bad_parameters_refused_in_one_line(vit, name, params, start):
    with pytest.raises(ValueError) as info:
        get_explainer(name, vit, **params)
    assert str(info.value).startswith(start) and "\n" not in str(info.value)


@needs_captum
def test_unknown_parameters_and_config_names(vit, images):
    for name in PIXEL + GRID:
        with pytest.raises(TypeError):
            get_explainer(name, vit, no_such_option=1)
    check_method_params("ig", {"steps": 4, "baseline": 0.0, "internal_batch_size": None, "reduce": "l2"})
    with pytest.raises(ValueError, match="method 'ig' takes no parameter 'n_steps'; valid: steps, baseline"):
        check_method_params("ig", {"n_steps": 4})
    with pytest.raises(ValueError, match=r"^occlusion: window=40 is larger than the 32x32 inputs$"):
        get_explainer("occlusion", vit, window=40)(images)


def test_missing_captum_is_one_line(vit, monkeypatch):
    """Without captum, building a captum method names the install command; the suite imports."""
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(MissingLibraryError) as info:
        get_explainer("ig", vit)
    message = str(info.value)
    assert message.startswith("method ig needs the captum package") and "\n" not in message
    assert 'pip install "wsol-bench[explainers]"' in message
    # the module itself imports no captum (the package imports every method module)
    tree = ast.parse(Path(captum_methods.__file__).read_text())
    imported = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in tree.body if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "captum"]


@needs_captum
def test_cli_end_to_end(tmp_path, command):
    """ig (4 steps) and occlusion on the shipped model through the command (in this process),
    one table. Occlusion slides 112-pixel windows (4 per image) instead of the 196 patches, to
    stay fast."""
    proc = command("wsol-bench", ["method=[ig,occlusion]", "method.ig.params.steps=4",
                                  "method.occlusion.params.window=112", "method.occlusion.params.stride=112",
                                  "dataset.params.num_images=4", "progress=false", "gallery_images=0",
                                  f"store.root={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "run" / "table.csv")
    assert {"ig", "occlusion"} <= set(table.astype(str).to_numpy().ravel())
