"""AttentionCapture: what it records, that it cleans up, and the detach it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit
from torch import nn

from methods import get_explainer
from wsol_bench.errors import SettingError
from wsol_bench.methods.capture import AttentionCapture, UnsupportedModelError, attention_modules, hook_count


def _images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _assert_no_hooks(model):
    for name, module in model.named_modules():
        assert len(module._forward_hooks) == 0, f"forward hook left on {name!r}"
        assert len(module._forward_pre_hooks) == 0, f"forward pre-hook left on {name!r}"


def _attention_inputs(model, images):
    """Input of every blocks[i].attn, recorded with my own (removed) pre-hooks."""
    inputs = []
    handles = [b.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
               for b in model.blocks]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return inputs


def _q_k(attn, x):
    b, n, _ = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(b, n, 3, attn.num_heads, attn.head_dim)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # [B, H, N, d]
    return attn.q_norm(q), attn.k_norm(k)


def _full_attention_grads(model, images, targets):
    """d sum_b y[b, t_b] / dA^l through the unmodified graph (input requires grad, no capture)."""
    attentions = []
    handles = [b.attn.attn_drop.register_forward_hook(lambda m, a, o: attentions.append(o))
               for b in model.blocks]
    try:
        with torch.enable_grad():
            logits = model(images.clone().requires_grad_(True))
            score = logits[torch.arange(len(images)), targets].sum()
            return torch.autograd.grad(score, attentions)
    finally:
        for h in handles:
            h.remove()


# -- cleanup ---------------------------------------------------------------------------------
@pytest.mark.parametrize("detach_input,cls_scores", [(True, True), (False, False), (False, True)])
def test_hooks_removed_on_exit(tiny_vit, detach_input, cls_scores):
    """Inside the context hooks exist; after it, no module has a forward hook or pre-hook."""
    _assert_no_hooks(tiny_vit)
    with AttentionCapture(tiny_vit, detach_input=detach_input, cls_scores=cls_scores) as cap:
        assert hook_count(list(tiny_vit.modules())) > 0
        tiny_vit(_images())
        cap.check()
    _assert_no_hooks(tiny_vit)
    assert hook_count(list(tiny_vit.modules())) == 0


def test_hooks_removed_when_body_raises(tiny_vit):
    """An exception inside the with-block propagates and still removes every hook."""
    with pytest.raises(KeyError, match="boom"), AttentionCapture(tiny_vit, detach_input=True, cls_scores=True):
        tiny_vit(_images())
        raise KeyError("boom")
    _assert_no_hooks(tiny_vit)


def test_explainers_leave_no_hooks(tiny_vit):
    """Running agcam and rollout leaves the model without hooks."""
    images = _images()
    get_explainer("agcam", tiny_vit)(images)
    get_explainer("rollout", tiny_vit)(images)
    _assert_no_hooks(tiny_vit)


# -- what is recorded -------------------------------------------------------------------------
def test_records_one_row_stochastic_attention_per_block(tiny_vit):
    """Exactly L tensors [B, H, N, N], rows summing to 1, equal to softmax(q k^T * scale)."""
    images = _images(3)
    inputs = _attention_inputs(tiny_vit, images)
    with torch.no_grad(), AttentionCapture(tiny_vit) as cap:
        tiny_vit(images)
    cap.check()
    assert len(cap.attentions) == 3
    for attn_mod, x, a in zip(attention_modules(tiny_vit), inputs, cap.attentions):
        assert a.shape == (3, 3, 17, 17)
        assert not a.requires_grad
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 3, 17))
        q, k = _q_k(attn_mod, x)
        expected = torch.softmax((q * attn_mod.scale) @ k.transpose(-2, -1), -1)
        torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-6)


def test_cls_scores_match_hand_computed_q_k(tiny_vit):
    """S == (q[:, :, :1] * scale) @ k^T in float32, and softmax(S) == attention row 0."""
    images = _images(2, seed=4)
    inputs = _attention_inputs(tiny_vit, images)
    with torch.no_grad(), AttentionCapture(tiny_vit, cls_scores=True) as cap:
        tiny_vit(images)
    cap.check()
    assert len(cap.scores) == 3
    for attn_mod, x, s, a in zip(attention_modules(tiny_vit), inputs, cap.scores, cap.attentions):
        assert s.shape == (2, 3, 1, 17) and s.dtype == torch.float32
        q, k = _q_k(attn_mod, x)
        expected = (q[:, :, :1] * attn_mod.scale) @ k.transpose(-2, -1)
        torch.testing.assert_close(s, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.softmax(s, -1), a[:, :, :1], rtol=1e-5, atol=1e-6)


def test_cls_scores_after_qk_norm():
    """With qk_norm the scores use the normalised q and k."""
    model = make_vit(3, qk_norm=True)
    images = _images(1, seed=2)
    inputs = _attention_inputs(model, images)
    with torch.no_grad(), AttentionCapture(model, cls_scores=True) as cap:
        model(images)
    for attn_mod, x, s, a in zip(attention_modules(model), inputs, cap.scores, cap.attentions):
        q, k = _q_k(attn_mod, x)
        torch.testing.assert_close(s, (q[:, :, :1] * attn_mod.scale) @ k.transpose(-2, -1),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.softmax(s, -1), a[:, :, :1], rtol=1e-5, atol=1e-6)


def test_reset_allows_second_forward(tiny_vit):
    """reset() forgets the first pass, so a second forward records exactly L again."""
    with torch.no_grad(), AttentionCapture(tiny_vit, cls_scores=True) as cap:
        tiny_vit(_images())
        tiny_vit(_images())
        with pytest.raises(UnsupportedModelError, match="captured 6 attention tensors for 3 blocks"):
            cap.check()
        cap.reset()
        tiny_vit(_images())
        cap.check()
    assert len(cap.attentions) == 3 and len(cap.scores) == 3


# -- checks and refusals ---------------------------------------------------------------------
def test_check_raises_when_a_block_is_not_captured(tiny_vit):
    """A block switched to fused attention after construction is detected by check()."""
    with torch.no_grad(), AttentionCapture(tiny_vit) as cap:
        tiny_vit.blocks[0].attn.fused_attn = True
        tiny_vit(_images())
    tiny_vit.blocks[0].attn.fused_attn = False
    assert len(cap.attentions) == 2
    with pytest.raises(UnsupportedModelError, match="captured 2 attention tensors for 3 blocks"):
        cap.check()


def test_attention_grads_checks_and_needs_gradients(tiny_vit):
    """attention_grads refuses an incomplete capture and a capture without gradients."""
    with torch.enable_grad(), AttentionCapture(tiny_vit, gradients=True) as cap:
        tiny_vit.blocks[1].attn.fused_attn = True
        logits = tiny_vit(_images())
    tiny_vit.blocks[1].attn.fused_attn = False
    with pytest.raises(UnsupportedModelError, match="captured 2"):
        cap.attention_grads(logits[:, 0].sum())
    with torch.no_grad(), AttentionCapture(tiny_vit) as cap:
        logits = tiny_vit(_images())
    with pytest.raises(SettingError, match="gradients=True"):
        cap.attention_grads(logits[:, 0].sum())


def test_fused_attention_is_switched_off_inside_and_restored(tiny_vit):
    """AttentionCapture turns fused attention off for its pass and restores it on exit."""
    for block in tiny_vit.blocks:
        block.attn.fused_attn = True
    with AttentionCapture(tiny_vit) as cap:
        assert not any(b.attn.fused_attn for b in tiny_vit.blocks)
        tiny_vit(_images())
    cap.check()
    assert all(b.attn.fused_attn for b in tiny_vit.blocks)
    _assert_no_hooks(tiny_vit)


def test_fused_attention_that_cannot_be_switched_off_is_refused(tiny_vit):
    """An attention module that ignores fused_attn=False is refused with a clear error."""
    class StubbornAttention(type(tiny_vit.blocks[1].attn)):
        @property
        def fused_attn(self):
            return True

        @fused_attn.setter
        def fused_attn(self, value):
            pass

    tiny_vit.blocks[1].attn.__class__ = StubbornAttention
    with pytest.raises(UnsupportedModelError, match="block 1: fused attention cannot be switched off"), \
            AttentionCapture(tiny_vit):
        pass
    _assert_no_hooks(tiny_vit)


class _NotAViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])


@pytest.mark.parametrize("module", [nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3)), _NotAViT()],
                         ids=["linear", "sequential", "blocks-without-attention"])
def test_non_vit_module_is_refused(module):
    """Modules without timm ViT blocks/attention raise UnsupportedModelError."""
    with pytest.raises(UnsupportedModelError):
        attention_modules(module)
    with pytest.raises(UnsupportedModelError):
        AttentionCapture(module)


# -- gradients -------------------------------------------------------------------------------
def test_detach_input_changes_attention_gradient(tiny_vit):
    """dy/dA^0 with detach_input=True differs from detach_input=False, which is the full gradient."""
    images, targets = _images(2, seed=6), torch.tensor([1, 3])
    grads = {}
    for detach in (True, False):
        with torch.enable_grad(), AttentionCapture(tiny_vit, detach_input=detach, gradients=True) as cap:
            logits = tiny_vit(images)
            grads[detach] = cap.attention_grads(logits[torch.arange(2), targets].sum())
    full = _full_attention_grads(tiny_vit, images, targets)
    for g, f in zip(grads[False], full):
        torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-7)
    g0_detached, g0_full = grads[True][0], grads[False][0]
    assert (g0_detached - g0_full).abs().max() > 1e-3 * g0_full.abs().max()
    # the last block has no later attention branch: both agree there
    torch.testing.assert_close(grads[True][-1], grads[False][-1], rtol=1e-5, atol=1e-7)


def test_no_parameter_gradients_are_accumulated(tiny_vit):
    """AG-CAM on a frozen model leaves every parameter's .grad empty."""
    get_explainer("agcam", tiny_vit)(_images())
    assert all(p.grad is None for p in tiny_vit.parameters())


def test_later_input_gradients_are_not_corrupted(tiny_vit):
    """After AG-CAM, a plain input gradient of the logits is identical to the one before."""
    images = _images(2, seed=8)

    def input_grad():
        x = images.clone().requires_grad_(True)
        with torch.enable_grad():
            tiny_vit(x)[:, 2].sum().backward()
        return x.grad.clone()

    before = input_grad()
    assert before.abs().max() > 0
    get_explainer("agcam", tiny_vit)(images, torch.tensor([0, 4]))
    assert torch.equal(input_grad(), before)
    # a detaching capture active during the pass would cut part of this gradient
    with AttentionCapture(tiny_vit, detach_input=True):
        x = images.clone().requires_grad_(True)
        with torch.enable_grad():
            tiny_vit(x)[:, 2].sum().backward()
    assert not torch.allclose(x.grad, before, rtol=1e-3, atol=1e-6)
    assert torch.equal(input_grad(), before)
