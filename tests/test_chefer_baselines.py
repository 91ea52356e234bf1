"""Chefer et al.'s raw-attention and attention Grad-CAM baselines against an independent
re-implementation of the ViT forward (tests/test_agcam.py's reference_forward), batched equal
to one image at a time."""

from __future__ import annotations

import torch
from conftest import make_vit
from test_agcam import reference_forward
from wsol_bench.methods import get_explainer


def _images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_raw_attention_is_the_last_blocks_cls_attention_mean_over_heads():
    model = make_vit(0, img_size=64, patch_size=16, num_classes=5)
    images = _images(3)
    with torch.no_grad():
        logits, attentions, _ = reference_forward(model, images)
    expected = attentions[-1][:, :, 0, 1:].mean(1).reshape(3, 4, 4)
    out = get_explainer("raw_attention", model)(images)
    torch.testing.assert_close(out.maps, expected, atol=1e-6, rtol=1e-5)
    assert out.targets.tolist() == logits.argmax(1).tolist() and not out.class_specific


def test_attention_gradcam_weights_each_head_by_its_mean_cls_gradient():
    model = make_vit(1, img_size=64, patch_size=16, num_classes=5)
    images, targets = _images(3, 1), torch.tensor([0, 3, 4])
    logits, attentions, _ = reference_forward(model, images, detach=False)
    last = attentions[-1]
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), last)
    cam = last.detach()[:, :, 0, 1:]
    weights = grad[:, :, 0, 1:].mean(-1, keepdim=True)
    expected = (cam * weights).mean(1).clamp(min=0).reshape(3, 4, 4)
    out = get_explainer("attention_gradcam", model)(images, targets)
    torch.testing.assert_close(out.maps, expected, atol=1e-6, rtol=1e-5)
    assert (out.maps >= 0).all()


def test_batched_equals_one_image_at_a_time():
    model = make_vit(2, img_size=64, patch_size=16, num_classes=5)
    images = _images(4, 2)
    for name in ("raw_attention", "attention_gradcam"):
        explainer = get_explainer(name, model)
        batched = explainer(images).maps
        single = torch.cat([explainer(images[i:i + 1]).maps for i in range(4)])
        torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)
