"""pytorch-grad-cam methods (methods/cam_library.py): each equals the library used directly, on the
patch grid; batched == one at a time; no hooks left; bad parameters and models refused in one
line; the suite's Grad-CAM == the library's; the CLI runs two of them."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import make_vit
from torch import nn

from wsol_bench.config.methods import check_method_params
from wsol_bench.methods import available, get_explainer
from wsol_bench.methods.base import MissingLibraryError
from wsol_bench.methods.capture import UnsupportedModelError
from wsol_bench.methods.registry import explainer_class
from wsol_bench.regions.heatmaps import to_heatmaps

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
LIBRARY = {"gradcam_library": "GradCAM", "gradcam_pp": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
           "hirescam": "HiResCAM", "layercam": "LayerCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM",
           "ablationcam": "AblationCAM"}
METHODS = sorted(LIBRARY)
COSTLY = {"scorecam": {"batch_size": 7}, "ablationcam": {"batch_size": 5}}  # batches that split C = 24


def _vit(**kwargs) -> nn.Module:
    return make_vit(0, **{"img_size": 32, "patch_size": 8, "num_classes": 4, **kwargs})  # 4x4 grid, 24 channels


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _library(name: str, images: torch.Tensor, targets: torch.Tensor, **vit) -> torch.Tensor:
    """The library as its README uses it on a ViT: trainable weights, its own hooks, targets and
    full-size output (min-max scaled, resized to the input with cv2)."""
    model = _vit(**vit).requires_grad_(True)
    gh, gw = model.patch_embed.grid_size

    def reshape(tokens):
        return tokens[:, model.num_prefix_tokens:].reshape(tokens.size(0), gh, gw, tokens.size(2)).permute(0, 3, 1, 2)

    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = getattr(pytorch_grad_cam, LIBRARY[name])
    kwargs = {"ablation_layer": pytorch_grad_cam.AblationLayerVit(), **COSTLY[name]} if name == "ablationcam" else {}
    cam = cls(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape, **kwargs)
    if name == "scorecam":
        cam.batch_size = COSTLY[name]["batch_size"]
    try:
        return torch.from_numpy(cam(input_tensor=images, targets=[ClassifierOutputTarget(int(t)) for t in targets]))
    finally:
        cam.activations_and_grads.release()


@pytest.fixture(scope="module")
def explained():
    """Each method's explanation of 3 images for targets that are not all the predictions."""
    model, images, targets = _vit(), _images(), torch.tensor([0, 3, 1])
    return {name: get_explainer(name, model, **COSTLY.get(name, {}))(images, targets) for name in METHODS}


@pytest.mark.parametrize("name", METHODS)
def test_equals_the_library_used_directly(name, explained):
    """The suite's heatmap of the grid map (bilinear + min-max) == the library's own full-size map."""
    images, targets = _images(), torch.tensor([0, 3, 1])
    reference = _library(name, images, targets)
    ours = explained[name]
    heat, degenerate = to_heatmaps(ours.maps, (32, 32))
    assert reference.shape == heat.shape == (3, 32, 32) and not degenerate.any()
    torch.testing.assert_close(heat, reference, rtol=0, atol=2e-4)
    assert ours.targets.tolist() == targets.tolist() and ours.target_source == "given"
    torch.testing.assert_close(ours.logits, _vit()(images))
    assert ours.maps.min() >= 0 and (ours.maps.flatten(1).amax(1) != 1).any()  # raw, not min-max scaled


@pytest.mark.parametrize("name", ["hirescam", "scorecam"])
def test_equals_the_library_on_a_non_square_grid_with_two_prefix_tokens(name):
    """24x40 inputs (3x5 patches) and a class token + 1 register token: rows and columns stay apart."""
    vit = {"img_size": (24, 40), "reg_tokens": 1}
    images, targets = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(3)), torch.tensor([2, 0])
    reference = _library(name, images, targets, **vit)
    maps = get_explainer(name, _vit(**vit), **COSTLY.get(name, {}))(images, targets).maps
    assert maps.shape == (2, 3, 5)
    torch.testing.assert_close(to_heatmaps(maps, (24, 40))[0], reference, rtol=0, atol=2e-4)


@pytest.mark.parametrize("name", METHODS)
def test_batched_equals_one_at_a_time_and_no_hooks_are_left(name):
    """[B, gh, gw] maps; a batch gives the maps of its images one by one; predicted targets; the
    model has exactly its hooks (none) and its layers after every call."""
    model, images = _vit(), _images()
    before, layer = _hooks(model), model.blocks[-1].norm1
    explainer = get_explainer(name, model, **COSTLY.get(name, {}))
    batched = explainer(images)
    assert batched.maps.shape == (3, 4, 4) and batched.maps.dtype == torch.float32
    assert batched.targets.tolist() == model(images).argmax(1).tolist() and batched.target_source == "predicted"
    single = torch.cat([explainer(images[i:i + 1]).maps for i in range(3)])
    torch.testing.assert_close(batched.maps, single, rtol=1e-4, atol=1e-6)
    assert _hooks(model) == before == 0 and model.blocks[-1].norm1 is layer
    assert explainer.class_specific == (name != "eigencam") and explainer.resolution == "grid"


def test_suite_gradcam_equals_the_library_gradcam():
    """Same formula on blocks.-1.norm1: the raw maps agree, not only up to normalisation."""
    model, images = _vit(), _images(4)
    ours = get_explainer("gradcam", model)(images)
    library = get_explainer("gradcam_library", model)(images)
    torch.testing.assert_close(library.maps, ours.maps, rtol=1e-4, atol=1e-6)
    assert torch.equal(library.targets, ours.targets)


def test_other_layers_registers_and_distilled_models():
    """Negative and positive indices, register tokens and two prefix tokens reshape correctly:
    the library's Grad-CAM still equals the suite's formula written out here."""
    for kwargs, layer in (({"reg_tokens": 2}, "blocks.1.norm1"), ({}, "blocks.-2.attn")):
        model = _vit(**kwargs)
        captured: list[torch.Tensor] = []

        def leaf(module, args, output, captured=captured):
            captured.append(output.detach().requires_grad_())
            return captured[-1]

        handle = model.get_submodule(layer.replace("-2", str(len(model.blocks) - 2))).register_forward_hook(leaf)
        images, targets = _images(2), torch.tensor([1, 2])
        logits = model(images)
        (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), captured)
        handle.remove()
        tokens, grad = captured[0][:, model.num_prefix_tokens:], grad[:, model.num_prefix_tokens:]
        expected = (tokens * grad.mean(1, keepdim=True)).sum(-1).clamp(min=0).reshape(2, 4, 4)
        maps = get_explainer("gradcam_library", model, target_layer=layer)(images, targets).maps
        torch.testing.assert_close(maps, expected.detach(), rtol=1e-4, atol=1e-6)


def test_ablation_restores_the_model_when_a_pass_fails():
    """A pass that raises inside Ablation-CAM's ablation loop leaves the original layer in place
    and no hook behind."""
    model = _vit()
    layer, calls = model.blocks[-1].norm1, []

    def fail_third(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    handle = model.head.register_forward_hook(fail_third)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            get_explainer("ablationcam", model, batch_size=8)(_images(1))
    finally:
        handle.remove()
    assert model.blocks[-1].norm1 is layer and _hooks(model) == 0


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_parameters_and_unsupported_models_are_refused_in_one_line():
    model = _vit()
    with pytest.raises(UnsupportedModelError) as info:
        get_explainer("gradcam_pp", model, target_layer="blocks.-1.norm3")
    assert "has no module 'norm3'; it has: norm1, attn" in _one_line(info)
    with pytest.raises(UnsupportedModelError) as info:
        get_explainer("xgradcam", model, target_layer="blocks.3.norm1")
    assert _one_line(info).endswith("blocks (Sequential) has 3 entries; valid indices: -3..2")
    for value in ("", "blocks..norm1", 3):
        with pytest.raises(ValueError) as info:
            get_explainer("layercam", model, target_layer=value)
        assert _one_line(info).startswith(f"layercam: target_layer={value!r}; valid: a dotted module path")
    for name in ("scorecam", "ablationcam"):
        for value in (0, -1, 2.0, True, "8"):
            with pytest.raises(ValueError, match=rf"^{name}: batch_size={value!r}; valid: an integer >= 1"):
                get_explainer(name, model, batch_size=value)
    for name in METHODS:
        with pytest.raises(TypeError):
            get_explainer(name, model, no_such_option=1)
    with pytest.raises(ValueError) as info:
        get_explainer("hirescam", model)(_images(1), torch.tensor([7]))
    assert "target 7 is out of range" in _one_line(info)
    # models: no `blocks`; a layer that gives no [B, N, C] tokens (refused at the first call, no hook left)
    with pytest.raises(UnsupportedModelError) as info:
        get_explainer("eigencam", nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert "Sequential has no module 'blocks'; it has: 0" in _one_line(info)
    for layer in ("patch_embed.proj", "blocks.-1.attn.attn_drop", "head"):
        explainer = get_explainer("gradcam_pp", model, target_layer=layer)
        with pytest.raises(UnsupportedModelError) as info:
            explainer(_images(1))
        assert _one_line(info).startswith(f"gradcam_pp: target_layer={layer!r} outputs [")
        assert "not [B, 1 + 4*4, C] tokens of VisionTransformer" in _one_line(info)
    with pytest.raises(UnsupportedModelError) as info:
        get_explainer("gradcam_pp", model, target_layer="blocks.-1.attn.qkv.weight")
    assert _one_line(info).endswith("blocks.-1.attn.qkv (Linear) has no module 'weight'; it has: no submodules")
    assert _hooks(model) == 0


def test_configs_match_the_constructors():
    """One YAML per method naming every constructor parameter with its default; the config
    checker knows the parameters."""
    assert set(METHODS) <= set(available())
    for name in METHODS:
        text = (CONF / f"{name}.yaml").read_text()
        conf = yaml.safe_load(text)
        assert text.splitlines()[0] == f"# @package method.{name}" and conf["name"] == name
        signature = inspect.signature(explainer_class(name)).parameters
        defaults = {k: p.default for k, p in list(signature.items())[1:]}
        assert conf["params"] == defaults and defaults["target_layer"] == "blocks.-1.norm1"
        check_method_params(name, conf["params"])
    with pytest.raises(ValueError, match="method 'eigencam' takes no parameter 'batch_size'; valid: target_layer"):
        check_method_params("eigencam", {"batch_size": 4})


def test_missing_library_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    with pytest.raises(MissingLibraryError) as info:
        get_explainer("gradcam_pp", _vit())
    message = _one_line(info)
    assert message.startswith("method gradcam_pp needs the pytorch_grad_cam package")
    assert 'pip install "wsol-bench[explainers]"' in message
    code = ("import sys; sys.modules['pytorch_grad_cam'] = None\n"
            "import wsol_bench.methods as m; assert {'gradcam_pp', 'scorecam'} <= set(m.available())")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, capture_output=True)


def test_cli_end_to_end(tmp_path, command):
    """gradcam_pp and eigencam on the shipped model through the command, one table."""
    proc = command("wsol-bench", ["method=[gradcam_pp,eigencam]", "dataset.params.num_images=4", "progress=false",
                                  "gallery_images=0", f"store.root={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "run" / "table.csv")
    assert {"gradcam_pp", "eigencam"} <= set(table["method"])
    assert (table["n_images"] > 0).all()
