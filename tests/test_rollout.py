"""Attention Rollout against a hand-written rollout of attention captured by my own hooks."""

from __future__ import annotations

import pytest
import torch
from conftest import make_vit

from methods import get_explainer
from methods.rollout import discard_lowest


def _images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _attentions(model, images):
    """Post-softmax attention of every block via forward hooks on attn_drop."""
    recorded = []
    handles = [b.attn.attn_drop.register_forward_hook(lambda m, a, o: recorded.append(o.detach()))
               for b in model.blocks]
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        for h in handles:
            h.remove()
    assert len(recorded) == len(model.blocks)
    return recorded, logits


def reference_rollout(model, images, head="mean", discard=None, start_layer=0):
    """R = a^L ... a^(start_layer+1), a = rownorm((fused + I) / 2); map = R[:, 0, P:] on the grid."""
    attentions, logits = _attentions(model, images)
    b, _, n, _ = attentions[0].shape
    eye = torch.eye(n)
    r = eye.repeat(b, 1, 1)
    for att in attentions[start_layer:]:
        if head == "mean":
            fused = att.mean(1)
        elif head == "max":
            fused = att.max(1).values
        else:
            fused = att.min(1).values
        if discard is not None:
            fused = discard(fused)
        a = (fused + eye) / 2
        a = a / a.sum(-1, keepdim=True)
        r = a @ r
    gh, gw = model.patch_embed.grid_size
    return r[:, 0, model.num_prefix_tokens:].reshape(b, gh, gw), logits


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("head", ["mean", "max", "min"])
def test_rollout_matches_reference(tiny_vit, head):
    """Rollout maps equal the hand-written rollout for each head fusion."""
    images = _images()
    expected, logits = reference_rollout(tiny_vit, images, head)
    out = get_explainer("rollout", tiny_vit, head_fusion=head)(images, torch.tensor([0, 3, 1]))
    assert out.maps.shape == (3, 4, 4) and out.maps.dtype == torch.float32
    _close(out.maps, expected)
    torch.testing.assert_close(out.logits, logits)


def test_head_fusions_differ(tiny_vit):
    """mean, max and min fusion give different maps (the option is not ignored)."""
    images = _images(1)
    maps = [get_explainer("rollout", tiny_vit, head_fusion=h)(images).maps for h in ("mean", "max", "min")]
    assert not torch.allclose(maps[0], maps[1]) and not torch.allclose(maps[0], maps[2])


def test_rollout_two_prefix_tokens():
    """With a register token (P=2) the map is R[:, 0, 2:] on the 4x4 grid."""
    model = make_vit(4, reg_tokens=1)
    images = _images(2, seed=3)
    expected, _ = reference_rollout(model, images)
    out = get_explainer("rollout", model)(images)
    assert out.maps.shape == (2, 4, 4)
    _close(out.maps, expected)


def _hand_discard(fused, ratio):
    """Zero the k smallest entries per image, skipping (not replacing) the [0, 0] entry."""
    out = fused.clone()
    b, n, _ = fused.shape
    k = int(n * n * ratio)
    for i in range(b):
        order = sorted(range(n * n), key=lambda j: float(fused[i].flatten()[j]))[:k]
        for j in order:
            if j != 0:
                out[i].view(-1)[j] = 0.0
    return out


def test_discard_lowest_zeroes_exactly_the_k_smallest():
    """k = int(n*n*ratio) smallest entries are zeroed per image; the rest are untouched."""
    m = torch.tensor([[[0.90, 0.10, 0.50, 0.30],
                       [0.20, 0.80, 0.05, 0.60],
                       [0.70, 0.15, 0.40, 0.95],
                       [0.35, 0.25, 0.45, 0.55]]])
    second = m.flip(-1).clone()  # another image with a different order: per-image selection
    fused = torch.cat([m, second])
    out = discard_lowest(fused, 0.3)  # int(16 * 0.3) = 4
    expected = m.clone()
    for r, c in [(1, 2), (0, 1), (2, 1), (1, 0)]:  # 0.05, 0.10, 0.15, 0.20
        expected[0, r, c] = 0.0
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], expected[0].flip(-1), rtol=0, atol=0)
    assert torch.equal(fused[0], m[0]), "input must not be modified"
    assert torch.equal(out, _hand_discard(fused, 0.3))


def test_discard_lowest_skips_cls_to_cls():
    """When [0, 0] is among the k smallest it is kept and NOT replaced by the next smallest."""
    m = torch.tensor([[[0.01, 0.10, 0.50, 0.30],
                       [0.20, 0.80, 0.05, 0.60],
                       [0.70, 0.15, 0.40, 0.95],
                       [0.35, 0.25, 0.45, 0.55]]])
    out = discard_lowest(m, 0.3)  # the 4 smallest: 0.01 at [0, 0], 0.05, 0.10, 0.15
    expected = m.clone()
    for r, c in [(1, 2), (0, 1), (2, 1)]:
        expected[0, r, c] = 0.0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out[0, 1, 0] == 0.20  # the 5th smallest survives
    assert int((out == 0).sum()) == 3


def test_discard_ratio_zero_is_identity():
    """ratio 0 returns the matrix unchanged."""
    m = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(discard_lowest(m, 0.0), m)


def test_rollout_with_discard_matches_reference(tiny_vit):
    """discard_ratio is applied to each layer's fused matrix before adding I."""
    images = _images(2, seed=5)
    expected, _ = reference_rollout(tiny_vit, images, "max", lambda f: _hand_discard(f, 0.5))
    out = get_explainer("rollout", tiny_vit, head_fusion="max", discard_ratio=0.5)(images).maps
    _close(out, expected)
    plain = get_explainer("rollout", tiny_vit, head_fusion="max")(images).maps
    assert not torch.allclose(out, plain)


def test_start_layer_rolls_out_from_that_block(tiny_vit):
    """start_layer=1 is Chefer et al.'s compute_rollout_attention(start_layer=1): the product of
    rownorm(mean_h A^l + I) over blocks 1..L-1 only; start_layer=0 is every block (the default)."""
    images = _images()
    explainer = get_explainer("rollout", tiny_vit, start_layer=1)
    expected, _ = reference_rollout(tiny_vit, images, start_layer=1)
    _close(explainer(images, None).maps, expected)
    attentions, _ = _attentions(tiny_vit, images)  # their formula: A + I, rows normalised, block 1 first
    joint = None
    for att in attentions[1:]:
        a = att.mean(1) + torch.eye(att.shape[-1])
        a = a / a.sum(-1, keepdim=True)
        joint = a if joint is None else a.bmm(joint)
    _close(explainer(images, None).maps, joint[:, 0, 1:].reshape(3, 4, 4))
    assert not torch.allclose(explainer(images, None).maps, get_explainer("rollout", tiny_vit)(images, None).maps)


@pytest.mark.parametrize("params", [{"head_fusion": "median"}, {"discard_ratio": 1.0},
                                    {"discard_ratio": -0.1}, {"start_layer": 3}, {"start_layer": -1},
                                    {"start_layer": 0.5}])
def test_invalid_parameters_raise(tiny_vit, params):
    """Unknown head fusion, a discard ratio outside [0, 1) and a start layer that is not a block
    of the model (3 blocks) raise ValueError."""
    with pytest.raises(ValueError):
        get_explainer("rollout", tiny_vit, **params)


def test_class_agnostic(tiny_vit):
    """The map ignores the target; class_specific is False; the targets are still reported."""
    images = _images(2)
    explainer = get_explainer("rollout", tiny_vit)
    a = explainer(images, torch.tensor([0, 1]))
    b = explainer(images, torch.tensor([4, 2]))
    c = explainer(images)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.maps, c.maps)
    assert a.class_specific is False and c.class_specific is False
    assert a.targets.tolist() == [0, 1] and a.target_source == "given"
    assert torch.equal(c.targets, c.logits.argmax(1)) and c.target_source == "predicted"


def test_batched_equals_one_at_a_time(tiny_vit):
    """Each image's rollout in a batch equals its rollout computed alone."""
    images = _images(3, seed=2)
    explainer = get_explainer("rollout", tiny_vit)
    batched = explainer(images).maps
    for i in range(3):
        _close(batched[i:i + 1], explainer(images[i:i + 1]).maps)


def test_rollout_refuses_avg_pool_model():
    """A model without a class token is refused."""
    from wsol_bench.methods.capture import UnsupportedModelError
    with pytest.raises(UnsupportedModelError):
        get_explainer("rollout", make_vit(class_token=False, global_pool="avg"))
