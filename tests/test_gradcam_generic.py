"""Grad-CAM and generic attention: independent references, batching, class sensitivity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_vit

from wsol_bench.methods import get_explainer


def _images(n=3, seed=1, size=(32, 32)):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _reference_attention_grads(model, images, targets):
    """Post-softmax attention of every block and d(sum_b y[b, t_b])/dA with plain autograd."""
    model.requires_grad_(True)
    attentions = []
    hooks = [b.attn.attn_drop.register_forward_hook(lambda m, a, out: attentions.append(out))
             for b in model.blocks]
    try:
        logits = model(images)
        for a in attentions:
            a.retain_grad()
        logits.gather(1, targets[:, None]).sum().backward()
    finally:
        for h in hooks:
            h.remove()
        model.requires_grad_(False)
    return [a.detach() for a in attentions], [a.grad for a in attentions]


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 1}, {"img_size": (32, 48)}])
def test_generic_attention_matches_hand_written_loop(kwargs):
    """R = I; R += mean_h(relu(G*A)) @ R per block; map = R[0, P:] (plain autograd reference)."""
    model = make_vit(3, **kwargs)
    images = _images(size=model.patch_embed.img_size)
    targets = torch.tensor([0, 3, 1])
    attentions, grads = _reference_attention_grads(model, images, targets)
    n = attentions[0].shape[-1]
    expected = []
    for b in range(len(images)):
        r = torch.eye(n)
        for a, g in zip(attentions, grads):
            r = r + (g[b] * a[b]).clamp(min=0).mean(0) @ r
        expected.append(r[0, model.num_prefix_tokens:].reshape(model.patch_embed.grid_size))
    maps = get_explainer("generic_attention", model)(images, targets).maps
    torch.testing.assert_close(maps, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_gradcam_matches_hand_written_reference():
    """w = grid mean of dy/dT at blocks[-1].norm1; map = relu(sum_c w_c T_c) over patches."""
    model = make_vit(4, reg_tokens=1)
    images = _images()
    targets = torch.tensor([2, 0, 4])
    model.requires_grad_(True)
    store = []
    hook = model.blocks[-1].norm1.register_forward_hook(lambda m, a, out: store.append(out))
    logits = model(images)
    store[0].retain_grad()
    logits.gather(1, targets[:, None]).sum().backward()
    hook.remove()
    model.requires_grad_(False)
    p = model.num_prefix_tokens
    tokens, grads = store[0][:, p:].detach(), store[0].grad[:, p:]
    expected = torch.relu(torch.einsum("bgc,bc->bg", tokens, grads.mean(1))).reshape(3, 4, 4)
    maps = get_explainer("gradcam", model)(images, targets).maps
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)


def test_gradcam_agrees_with_pytorch_grad_cam():
    """Same normalised heatmap as pytorch-grad-cam's GradCAM with a ViT reshape transform."""
    cam_lib = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = make_vit(5)
    images = _images()
    targets = [1, 2, 3]
    model.requires_grad_(True)  # the library needs parameter graphs to reach its hooks

    def reshape(t):
        return t[:, 1:].reshape(t.shape[0], 4, 4, t.shape[-1]).permute(0, 3, 1, 2)

    with cam_lib.GradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape) as cam:
        theirs = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets])
    model.requires_grad_(False)
    ours = get_explainer("gradcam", model)(images, torch.tensor(targets)).maps.numpy()
    # The library min-max normalises on the grid, resizes with OpenCV's bilinear
    # interpolation, then normalises again after aggregating layers.
    import cv2

    def normalise(x):
        x = x - x.min()
        return x / (1e-7 + x.max())

    for b in range(3):
        np.testing.assert_allclose(normalise(cv2.resize(normalise(ours[b]), (32, 32))), theirs[b], atol=1e-5)


def test_gradcam_works_with_fused_attention():
    """Grad-CAM needs no attention matrix: a model with fused SDPA gives the same map."""
    model = make_vit(6)
    images = _images()
    plain = get_explainer("gradcam", model)(images).maps
    for b in model.blocks:
        b.attn.fused_attn = True
    fused = get_explainer("gradcam", model)(images).maps
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gradcam", "generic_attention"])
def test_batched_equals_one_at_a_time_and_class_sensitive(name):
    """Mixed targets in a batch give each image its own map; another class, another map."""
    model = make_vit(7)
    images = _images(4)
    targets = torch.tensor([0, 3, 1, 3])
    explainer = get_explainer(name, model)
    batched = explainer(images, targets).maps
    single = torch.cat([explainer(images[i:i + 1], targets[i:i + 1]).maps for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)
    other = explainer(images[:1], torch.tensor([2])).maps
    assert not torch.allclose(other, batched[:1])
    assert explainer.class_specific


@pytest.mark.parametrize("name", ["agcam", "rollout", "gradcam", "generic_attention"])
def test_one_forward_per_batch(name):
    """The gradient methods run the model once per batch (counted with a forward hook)."""
    model = make_vit(8)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    get_explainer(name, model)(_images(4))
    hook.remove()
    assert len(calls) == 1


def test_bad_targets_are_refused():
    """A target outside the head's classes names the class count."""
    model = make_vit(9)
    with pytest.raises(ValueError, match="5 classes"):
        get_explainer("generic_attention", model)(_images(1), torch.tensor([7]))
    with pytest.raises(ValueError, match="5 classes"):
        get_explainer("gradcam", model)(_images(1), torch.tensor([-1]))
