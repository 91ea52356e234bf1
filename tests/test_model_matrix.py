"""Every explainer on a matrix of timm ViT configurations: one or two prefix tokens, register
tokens, patch sizes 8/16/32, non-square and non-224 inputs."""

from __future__ import annotations

import pytest
import timm
import torch

from wsol_bench.methods import available, get_explainer
from wsol_bench.methods.capture import UnsupportedModelError
from wsol_bench.models import disable_fused_attention

SMALL = {"embed_dim": 24, "depth": 2, "num_heads": 3, "num_classes": 5}
CONFIGS = {
    "vit_p8_32x32": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}),
    "vit_p16_64x48": ("vit_tiny_patch16_224", {"img_size": (64, 48), "patch_size": 16}),
    "vit_p32_96x64": ("vit_tiny_patch16_224", {"img_size": (96, 64), "patch_size": 32}),
    "vit_p8_24x40_registers": ("vit_tiny_patch16_224", {"img_size": (24, 40), "patch_size": 8, "reg_tokens": 4}),
    "deit_distilled_p8": ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 8}),
}
BUILT_IN = ["agcam", "rollout", "gradcam", "generic_attention", "transformer_attribution", "random", "center"]


def _model(key: str) -> torch.nn.Module:
    arch, kwargs = CONFIGS[key]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs, **SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    disable_fused_attention(model)
    return model.requires_grad_(False).eval()


def test_matrix_covers_every_builtin_method():
    """The matrix below runs every built-in explainer."""
    assert set(BUILT_IN) <= set(available())


@pytest.mark.parametrize("key", sorted(CONFIGS))
@pytest.mark.parametrize("method", BUILT_IN)
def test_explainer_runs_on_configuration(key, method):
    """Maps have the model's grid, are finite, and batched equals one image at a time."""
    model = _model(key)
    grid = tuple(model.patch_embed.grid_size)
    h, w = model.patch_embed.img_size
    images = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 4, 2])
    explainer = get_explainer(method, model)
    explanation = explainer(images, targets)
    assert explanation.maps.shape == (3, *grid)
    assert torch.isfinite(explanation.maps).all()
    single = torch.cat([explainer(images[i:i + 1], targets[i:i + 1]).maps for i in range(3)])
    torch.testing.assert_close(explanation.maps, single, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(explanation.logits, model(images), rtol=1e-5, atol=1e-5)


def _avg_pooled() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, class_token=False,
                              global_pool="avg", **SMALL)
    return model.requires_grad_(False).eval()


@pytest.mark.parametrize("method", ["agcam", "rollout", "generic_attention", "transformer_attribution"])
def test_model_without_class_token_is_refused(method):
    """Average-pooled models have no CLS row to read: a clear error names the pooling."""
    with pytest.raises(UnsupportedModelError, match="class token|global_pool"):
        get_explainer(method, _avg_pooled())


@pytest.mark.parametrize("method", ["gradcam", "random", "center"])
def test_methods_without_cls_row_accept_average_pooling(method):
    """Grad-CAM and the baselines never read the CLS row: they explain avg-pooled models."""
    maps = get_explainer(method, _avg_pooled())(torch.randn(2, 3, 32, 32)).maps
    assert maps.shape == (2, 4, 4) and torch.isfinite(maps).all()
