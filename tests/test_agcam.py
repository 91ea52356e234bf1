"""AG-CAM against an independent, hand-written forward/backward of the same timm weights."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_vit

from methods import get_explainer
from wsol_bench.methods.capture import UnsupportedModelError
from wsol_bench.models import disable_fused_attention


# -- independent reference -------------------------------------------------------------------
def _layer_norm(ln, x):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _maybe_norm(mod, x):
    return x if isinstance(mod, torch.nn.Identity) else _layer_norm(mod, x)


def reference_forward(model, images, *, detach=True):
    """Plain ViT forward; returns (logits, [A^l] post-softmax, [S^l] fp32 CLS scores)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    if not detach:
        x = x.detach().requires_grad_(True)  # build a full graph although weights are frozen
    attentions, scores = [], []
    for blk in model.blocks:
        at = blk.attn
        h = _layer_norm(blk.norm1, x)
        if detach:
            h = h.detach().requires_grad_(True)
        b, n, _c = h.shape
        nh, d = at.num_heads, at.head_dim
        qkv = F.linear(h, at.qkv.weight, at.qkv.bias).reshape(b, n, 3, nh, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = _maybe_norm(at.q_norm, q), _maybe_norm(at.k_norm, k)
        scale = d ** -0.5
        a = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
        attentions.append(a)
        scores.append((q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1))
        out = (a @ v).transpose(1, 2).reshape(b, n, nh * d)
        x = x + F.linear(out, at.proj.weight, at.proj.bias)
        m = blk.mlp
        hm = F.gelu(F.linear(_layer_norm(blk.norm2, x), m.fc1.weight, m.fc1.bias))
        x = x + F.linear(hm, m.fc2.weight, m.fc2.bias)
    x = _layer_norm(model.norm, x)
    logits = F.linear(x[:, 0], model.head.weight, model.head.bias)
    if getattr(model, "head_dist", None) is not None:  # DeiT-distilled in eval: mean of both heads
        logits = (logits + F.linear(x[:, 1], model.head_dist.weight, model.head_dist.bias)) / 2
    return logits, attentions, scores


def reference_agcam(model, images, targets, *, detach=True, head="sum", layer="sum"):
    """M = sum_l sum_h ReLU(dy/dA)[CLS] * sigmoid(S)[CLS] over patch keys, [B, gh, gw]."""
    with torch.enable_grad():
        logits, attentions, scores = reference_forward(model, images, detach=detach)
        score = logits[torch.arange(len(images)), targets].sum()
        grads = torch.autograd.grad(score, attentions)
    per_layer = []
    for g, s in zip(grads, scores):
        c = g[:, :, 0, :].float().clamp(min=0) * torch.sigmoid(s[:, :, 0, :])  # [B, H, N]
        per_layer.append(c.sum(1) if head == "sum" else c.mean(1))
    m = torch.stack(per_layer, 1)
    m = m.sum(1) if layer == "sum" else m.mean(1)
    gh, gw = model.patch_embed.grid_size
    return m[:, model.num_prefix_tokens:].reshape(len(images), gh, gw).detach(), logits.detach()


def _images(n=3, seed=1, size=(32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *size, generator=g)


def _close(actual, expected, rel=1e-5):
    atol = rel * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol)


# -- tests ------------------------------------------------------------------------------------
def test_reference_forward_reproduces_model_logits(tiny_vit):
    """The hand-written forward gives the timm model's logits."""
    images = _images()
    logits, attentions, _ = reference_forward(tiny_vit, images)
    torch.testing.assert_close(logits.detach(), tiny_vit(images), rtol=1e-5, atol=1e-5)
    assert len(attentions) == len(tiny_vit.blocks)


def test_agcam_matches_independent_reference(tiny_vit):
    """AG-CAM maps equal the hand-computed sum over layers/heads of ReLU(G)*sigmoid(S)."""
    images, targets = _images(), torch.tensor([0, 3, 1])
    expected, ref_logits = reference_agcam(tiny_vit, images, targets)
    out = get_explainer("agcam", tiny_vit)(images, targets)
    assert out.maps.shape == (3, 4, 4) and out.maps.dtype == torch.float32
    assert expected.abs().max() > 0
    _close(out.maps, expected)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert out.targets.tolist() == [0, 3, 1] and out.target_source == "given"
    assert out.class_specific is True


def test_agcam_with_qk_norm_uses_normalised_q_and_k():
    """With qk-norm, S is computed from q and k after q_norm/k_norm."""
    model = make_vit(2, qk_norm=True)
    images, targets = _images(2, seed=5), torch.tensor([2, 4])
    expected, _ = reference_agcam(model, images, targets)
    _close(get_explainer("agcam", model)(images, targets).maps, expected)


@pytest.mark.parametrize("head,layer", [("mean", "sum"), ("sum", "mean"), ("mean", "mean")])
def test_mean_fusion_is_sum_divided_by_count(tiny_vit, head, layer):
    """head/layer fusion 'mean' equals the sum map divided by H and/or L."""
    images, targets = _images(2), torch.tensor([1, 2])
    summed = get_explainer("agcam", tiny_vit)(images, targets).maps
    out = get_explainer("agcam", tiny_vit, head_fusion=head, layer_fusion=layer)(images, targets).maps
    div = (3 if head == "mean" else 1) * (3 if layer == "mean" else 1)
    _close(out, summed / div)
    expected, _ = reference_agcam(tiny_vit, images, targets, head=head, layer=layer)
    _close(out, expected)


def test_invalid_fusion_is_rejected(tiny_vit):
    """An unknown fusion name raises ValueError."""
    with pytest.raises(ValueError, match="head_fusion"):
        get_explainer("agcam", tiny_vit, head_fusion="max")
    with pytest.raises(ValueError, match="layer_fusion"):
        get_explainer("agcam", tiny_vit, layer_fusion="prod")


def test_predicted_target_used_when_none(tiny_vit):
    """targets=None explains argmax(logits) and says target_source='predicted'."""
    images = _images(4, seed=7)
    out = get_explainer("agcam", tiny_vit)(images)
    pred = tiny_vit(images).argmax(1)
    assert torch.equal(out.targets, out.logits.argmax(1))
    assert torch.equal(out.targets, pred)
    assert out.target_source == "predicted"
    expected, _ = reference_agcam(tiny_vit, images, pred)
    _close(out.maps, expected)


def test_batched_equals_one_at_a_time_with_mixed_targets(tiny_vit):
    """Each image's map in a batch equals its map computed alone (targets [0, 3, 1])."""
    images, targets = _images(), [0, 3, 1]
    explainer = get_explainer("agcam", tiny_vit)
    batched = explainer(images, torch.tensor(targets)).maps
    for i, t in enumerate(targets):
        single = explainer(images[i:i + 1], torch.tensor([t])).maps
        _close(batched[i:i + 1], single)


def test_class_sensitivity(tiny_vit):
    """Two different targets on the same image give different maps."""
    image = _images(1, seed=3)
    explainer = get_explainer("agcam", tiny_vit)
    a = explainer(image, torch.tensor([0])).maps
    b = explainer(image, torch.tensor([2])).maps
    assert (a - b).abs().max() > 1e-3 * max(a.abs().max(), b.abs().max())


def test_detach_matters(tiny_vit):
    """The map differs from the no-detach (full-gradient) variant of the reference."""
    images, targets = _images(2), torch.tensor([0, 3])
    detached, _ = reference_agcam(tiny_vit, images, targets, detach=True)
    full, _ = reference_agcam(tiny_vit, images, targets, detach=False)
    out = get_explainer("agcam", tiny_vit)(images, targets).maps
    _close(out, detached)
    # the difference is ~1e-2 of the map scale here, 1000x the comparison tolerance
    assert (out - full).abs().max() > 5e-3 * full.abs().max()


@pytest.mark.parametrize("bad", [5, -1])
def test_target_out_of_range_raises(tiny_vit, bad):
    """A target outside [0, C) raises ValueError naming the number of classes."""
    with pytest.raises(ValueError, match="5 classes"):
        get_explainer("agcam", tiny_vit)(_images(2), torch.tensor([0, bad]))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_vit.modules())


def test_wrong_number_of_targets_raises(tiny_vit):
    """More targets than images is an error."""
    with pytest.raises(ValueError):
        get_explainer("agcam", tiny_vit)(_images(2), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("kwargs", [{"class_token": False, "global_pool": "avg"},
                                    {"global_pool": "avg"}])
def test_model_without_cls_pooling_is_refused(kwargs):
    """A model that does not predict from the CLS token is refused with UnsupportedModelError."""
    model = make_vit(**kwargs)
    with pytest.raises(UnsupportedModelError):
        get_explainer("agcam", model)


def test_two_prefix_tokens():
    """With a register token (P=2) the map covers exactly the patch grid and matches the reference."""
    model = make_vit(4, reg_tokens=1)
    assert model.num_prefix_tokens == 2
    images, targets = _images(2, seed=9), torch.tensor([1, 4])
    out = get_explainer("agcam", model)(images, targets)
    assert out.maps.shape == (2, 4, 4)
    expected, _ = reference_agcam(model, images, targets)
    _close(out.maps, expected)


def test_deit_distilled_two_prefix_tokens():
    """DeiT-distilled (CLS + distillation token) matches the reference on the patch grid."""
    torch.manual_seed(8)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    disable_fused_attention(model)
    model.requires_grad_(False).eval()
    assert model.num_prefix_tokens == 2
    images, targets = _images(2, seed=12), torch.tensor([3, 1])
    logits, _, _ = reference_forward(model, images)
    torch.testing.assert_close(logits.detach(), model(images), rtol=1e-5, atol=1e-5)
    out = get_explainer("agcam", model)(images, targets)
    assert out.maps.shape == (2, 4, 4)
    expected, _ = reference_agcam(model, images, targets)
    _close(out.maps, expected)


def test_non_square_grid():
    """A 32x48 input with 8-pixel patches gives a 4x6 map equal to the reference."""
    model = make_vit(6, img_size=(32, 48))
    images, targets = _images(2, seed=11, size=(32, 48)), torch.tensor([0, 2])
    out = get_explainer("agcam", model)(images, targets)
    assert out.maps.shape == (2, 4, 6)
    expected, _ = reference_agcam(model, images, targets)
    _close(out.maps, expected)


def test_works_inside_no_grad_and_with_trainable_weights(tiny_vit):
    """Under torch.no_grad() and with requires_grad weights the maps are unchanged; no .grad is set."""
    images, targets = _images(2), torch.tensor([2, 0])
    expected, _ = reference_agcam(tiny_vit, images, targets)
    with torch.no_grad():
        _close(get_explainer("agcam", tiny_vit)(images, targets).maps, expected)
    tiny_vit.requires_grad_(True)
    _close(get_explainer("agcam", tiny_vit)(images, targets).maps, expected)
    assert all(p.grad is None for p in tiny_vit.parameters())
