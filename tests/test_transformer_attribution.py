"""Transformer Attribution against an independent, per-image, hand-written LRP of the same timm
weights, plus conservation, batching, start_layer and refusal checks (docs/protocol.md 2.3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from conftest import make_vit

import wsol_bench.methods.transformer_attribution as ta
from wsol_bench.methods.capture import AttentionCapture, UnsupportedModelError
from wsol_bench.methods.registry import available, get_explainer

NAME = "transformer_attribution"
CONF = Path(__file__).resolve().parents[1] / "conf" / "method" / "transformer_attribution.yaml"


def _images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _close(actual, expected, rel=1e-4):
    atol = rel * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=atol)


# -- independent reference: one image at a time, rules written out as contribution tensors ----
def _share(c, z):
    """c / (z + 1e-9 sign z), 0 where z == 0."""
    return c / torch.where(z == 0, torch.full_like(z, float("inf")), z + 1e-9 * z.sign())


def ref_linear(x, w, r):
    """x [T, I], w [O, I], r [T, O]: c[t, o, i] = x+ w+ + x- w-; r_in[t, i] = sum_o c/z r."""
    c = x.clamp(min=0)[:, None, :] * w.clamp(min=0) + x.clamp(max=0)[:, None, :] * w.clamp(max=0)
    return (_share(c, c.sum(2, keepdim=True)) * r[:, :, None]).sum(1)


def ref_matmul(a, b, r):
    """z = a @ b: c[i, k, j] = a_ik b_kj; half of r_ij to each operand by c / z."""
    c = a[:, :, None] * b[None, :, :]
    part = _share(c, c.sum(1, keepdim=True)) * r[:, None, :] / 2
    return part.sum(2), part.sum(0)


def ref_residual(x, y, r):
    """LRP-0 split of x + y, each part rescaled to |its sum| / (|sx| + |sy|) of sum(r)."""
    rx, ry = _share(x * r, x + y), _share(y * r, x + y)
    sx, sy = rx.sum(), ry.sum()
    return rx * (sx.abs() / (sx.abs() + sy.abs()) * r.sum() / sx), \
        ry * (sy.abs() / (sx.abs() + sy.abs()) * r.sum() / sy)


def _ln(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def reference_map(model, image, target, start_layer=0):
    """Transformer Attribution of one image [3, H, W] for class `target`, [gh, gw]."""
    x = model._pos_embed(model.patch_embed(image[None]))[0].detach().requires_grad_(True)
    saved = []
    for blk in model.blocks:
        at, mlp = blk.attn, blk.mlp
        nh, d = at.num_heads, at.head_dim
        h1 = _ln(blk.norm1, x)
        qkv = h1 @ at.qkv.weight.T + at.qkv.bias
        q = [qkv[:, h * d:(h + 1) * d] * at.scale for h in range(nh)]
        k = [qkv[:, (nh + h) * d:(nh + h + 1) * d] for h in range(nh)]
        v = [qkv[:, (2 * nh + h) * d:(2 * nh + h + 1) * d] for h in range(nh)]
        attn = [torch.softmax(q[h] @ k[h].T, -1) for h in range(nh)]
        o = torch.cat([attn[h] @ v[h] for h in range(nh)], 1)
        a = o @ at.proj.weight.T + at.proj.bias
        mid = x + a
        h2 = _ln(blk.norm2, mid)
        f = F.gelu(h2 @ mlp.fc1.weight.T + mlp.fc1.bias)
        m = f @ mlp.fc2.weight.T + mlp.fc2.bias
        saved.append(dict(zip(["x", "h1", "q", "k", "v", "attn", "o", "a", "mid", "h2", "f", "m"],
                               (x, h1, q, k, v, attn, o, a, mid, h2, f, m))))
        x = mid + m
    final = _ln(model.norm, x)
    logits = final[0] @ model.head.weight.T + model.head.bias
    grads = torch.autograd.grad(logits[target], [a for s in saved for a in s["attn"]])  # block, head
    with torch.no_grad():
        onehot = F.one_hot(torch.tensor([target]), logits.shape[0]).float()
        r = torch.zeros_like(final)
        r[0] = ref_linear(final[:1], model.head.weight, onehot)[0]
        rel_attn = {}
        for li in reversed(range(start_layer, len(model.blocks))):
            blk, sv = model.blocks[li], saved[li]
            nh, d = blk.attn.num_heads, blk.attn.head_dim
            r_mid, r_m = ref_residual(sv["mid"], sv["m"], r)
            r_f = ref_linear(sv["f"], blk.mlp.fc2.weight, r_m)
            r_mid = r_mid + ref_linear(sv["h2"], blk.mlp.fc1.weight, r_f)
            r_x, r_a = ref_residual(sv["x"], sv["a"], r_mid)
            r_o = ref_linear(sv["o"], blk.attn.proj.weight, r_a)
            r_qkv = torch.zeros(r_o.shape[0], 3 * nh * d)
            for h in range(nh):
                r_ah, r_vh = ref_matmul(sv["attn"][h], sv["v"][h], r_o[:, h * d:(h + 1) * d])
                r_qh, r_kth = ref_matmul(sv["q"][h], sv["k"][h].T, r_ah)
                rel_attn[li, h] = r_ah
                for part, val in ((0, r_qh), (1, r_kth.T), (2, r_vh)):
                    r_qkv[:, (part * nh + h) * d:(part * nh + h + 1) * d] = val
            r = r_x + ref_linear(sv["h1"], blk.attn.qkv.weight, r_qkv)
        n = final.shape[0]
        c = torch.eye(n)
        for li in range(start_layer, len(model.blocks)):
            nh = model.blocks[li].attn.num_heads
            abar = sum((grads[li * nh + h] * rel_attn[li, h]).clamp(min=0) for h in range(nh)) / nh
            c = (abar + torch.eye(n)) @ c
    gh, gw = model.patch_embed.grid_size
    return c[0, model.num_prefix_tokens:].reshape(gh, gw)


# -- tests ------------------------------------------------------------------------------------
def test_registered_and_config_matches():
    """The decorator registers the method; the YAML names it with accepted parameters."""
    assert NAME in available()
    conf = yaml.safe_load(CONF.read_text())
    assert CONF.read_text().splitlines()[0] == f"# @package method.{NAME}"
    assert conf["name"] == NAME and conf["params"] == {"start_layer": 0}
    get_explainer(NAME, make_vit(depth=1), **conf["params"])


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 1}, {"pre_norm": True}])
def test_lrp_forward_reproduces_model_logits(kwargs):
    """The recording forward gives the timm model's logits (and check_forward agrees)."""
    model, images = make_vit(**kwargs), _images()
    trace = ta.lrp_forward(model, images)
    torch.testing.assert_close(trace.logits, model(images), rtol=1e-5, atol=1e-5)
    assert len(trace.blocks) == len(model.blocks)
    assert ta.check_forward(model) <= 1e-5


def test_attention_gradients_match_attention_capture(tiny_vit):
    """dy_c/dA from the own forward equals the gradient on the real timm forward."""
    images, targets = _images(), torch.tensor([0, 3, 1])
    with torch.enable_grad():
        trace = ta.lrp_forward(tiny_vit, images, track_attention=True)
        ours = torch.autograd.grad(trace.logits.gather(1, targets[:, None]).sum(),
                                   [rec.attn for rec in trace.blocks])
        with AttentionCapture(tiny_vit, gradients=True) as cap:
            logits = tiny_vit(images)
            theirs = cap.attention_grads(logits.gather(1, targets[:, None]).sum())
    for g, h in zip(ours, theirs):
        _close(g, h, rel=1e-5)


def test_residual_split_conserves_and_keeps_images_apart(tiny_vit):
    """On real activations: per image, relevance leaving a residual add equals the relevance
    entering it, and each image's split is the one it gets alone (no mixing across the batch)."""
    trace = ta.lrp_forward(tiny_vit, _images())
    r = torch.rand(trace.blocks[0].x.shape) * torch.tensor([1.0, 100.0, 0.01])[:, None, None]
    for rec in trace.blocks:
        for x, y in ((rec.x, rec.a), (rec.mid, rec.m)):
            rx, ry = ta.residual_relprop(x, y, r)
            _close((rx + ry).sum((1, 2)), r.sum((1, 2)), rel=1e-6)
            for i in range(3):
                alone = ta.residual_relprop(x[i:i + 1], y[i:i + 1], r[i:i + 1])
                _close(rx[i:i + 1], alone[0], rel=1e-6)
                _close(ry[i:i + 1], alone[1], rel=1e-6)


def test_linear_and_matmul_rules_conserve():
    """z+ Linear keeps the total (bias ignored) and makes no negative relevance; the halved
    LRP-0 matmul gives both operands together the total."""
    g = torch.Generator().manual_seed(0)
    x, w, r = (torch.randn(*s, generator=g) for s in ((2, 5, 7), (4, 7), (2, 5, 4)))
    r = r.abs()
    r_in = ta.linear_relprop(x, w, r)
    _close(r_in.sum((1, 2)), r.sum((1, 2)), rel=1e-6)
    assert (r_in >= 0).all()
    a, b, rz = (torch.randn(*s, generator=g) for s in ((2, 3, 5, 6), (2, 3, 6, 4), (2, 3, 5, 4)))
    ra, rb = ta.matmul_relprop(a, b, rz)
    _close(ra.sum((2, 3)) + rb.sum((2, 3)), rz.sum((2, 3)), rel=1e-5)


@pytest.mark.parametrize("start_layer", [0, 1])
def test_total_relevance_is_one_per_image(tiny_vit, start_layer):
    """Relevance 1 at the target logit arrives, whole, at the input of block start_layer."""
    trace = ta.lrp_forward(tiny_vit, _images())
    rel_attn, r = ta.relevance_pass(tiny_vit, trace, torch.tensor([0, 3, 1]), start_layer)
    assert len(rel_attn) == len(tiny_vit.blocks) - start_layer
    torch.testing.assert_close(r.sum((1, 2)), torch.ones(3), rtol=0, atol=1e-4)


@pytest.mark.parametrize("depth,start_layer,kwargs", [(1, 0, {}), (2, 0, {}),
                                                      (2, 1, {"reg_tokens": 1})])
def test_matches_independent_reference(depth, start_layer, kwargs):
    """Maps equal the per-image, contribution-tensor reference (1 and 2 blocks, 1-2 prefixes)."""
    model = make_vit(4, depth=depth, **kwargs)
    images, targets = _images(), [0, 3, 1]
    out = get_explainer(NAME, model, start_layer=start_layer)(images, torch.tensor(targets))
    assert out.maps.shape == (3, 4, 4) and out.maps.dtype == torch.float32
    expected = torch.stack([reference_map(model, images[i], t, start_layer)
                            for i, t in enumerate(targets)])
    assert expected.abs().max() > 0
    _close(out.maps, expected)
    assert out.targets.tolist() == targets and out.target_source == "given"


def test_batched_equals_one_at_a_time_with_mixed_targets(tiny_vit):
    """Each image's map in a batch with targets [0, 3, 1] equals its map computed alone."""
    images, targets = _images(), [0, 3, 1]
    explainer = get_explainer(NAME, tiny_vit)
    batched = explainer(images, torch.tensor(targets)).maps
    for i, t in enumerate(targets):
        _close(batched[i:i + 1], explainer(images[i:i + 1], torch.tensor([t])).maps)


def test_predicted_target_used_when_none(tiny_vit):
    """targets=None explains argmax(logits); the logits are the model's."""
    images = _images(4, seed=7)
    out = get_explainer(NAME, tiny_vit)(images)
    torch.testing.assert_close(out.logits, tiny_vit(images), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.targets, out.logits.argmax(1)) and out.target_source == "predicted"


def test_class_sensitivity(tiny_vit):
    """Two different targets on the same image give different maps."""
    explainer, image = get_explainer(NAME, tiny_vit), _images(1, seed=3)
    a, b = explainer(image, torch.tensor([0])).maps, explainer(image, torch.tensor([2])).maps
    assert (a - b).abs().max() > 1e-2 * max(a.abs().max(), b.abs().max())


def test_start_layer_changes_map_and_is_validated(tiny_vit):
    """start_layer 0 and 1 give different maps; outside [0, depth) is a ValueError."""
    images, targets = _images(2), torch.tensor([1, 2])
    m0 = get_explainer(NAME, tiny_vit, start_layer=0)(images, targets).maps
    m1 = get_explainer(NAME, tiny_vit, start_layer=1)(images, targets).maps
    assert (m0 - m1).abs().max() > 1e-3 * m0.abs().max()
    for bad in (-1, 3, 1.5):
        with pytest.raises(ValueError, match="start_layer"):
            get_explainer(NAME, tiny_vit, start_layer=bad)


@pytest.mark.parametrize("kwargs,feature", [({"init_values": 1e-5}, "LayerScale"),
                                            ({"qk_norm": True}, "qk-norm"),
                                            ({"class_token": False, "global_pool": "avg"}, "class token"),
                                            ({"global_pool": "avg"}, "global_pool")])
def test_unsupported_models_are_refused(kwargs, feature):
    """LayerScale, qk-norm and non-CLS pooling raise UnsupportedModelError naming the feature."""
    with pytest.raises(UnsupportedModelError, match=feature):
        get_explainer(NAME, make_vit(depth=1, **kwargs))


def test_two_prefix_tokens_and_distilled_heads():
    """Register tokens (P=2) and DeiT-distilled (two heads on tokens 0, 1) give grid maps."""
    images = _images(2)
    out = get_explainer(NAME, make_vit(reg_tokens=1, depth=2))(images)
    assert out.maps.shape == (2, 4, 4) and torch.isfinite(out.maps).all()
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8,
                             embed_dim=24, depth=2, num_heads=3, num_classes=5).eval()
    assert deit.num_prefix_tokens == 2
    out = get_explainer(NAME, deit)(images, torch.tensor([1, 4]))
    torch.testing.assert_close(out.logits, deit(images), rtol=1e-5, atol=1e-5)
    assert out.maps.shape == (2, 4, 4) and out.maps.abs().max() > 0
    trace = ta.lrp_forward(deit, images)
    _, r = ta.relevance_pass(deit, trace, torch.tensor([1, 4]))
    torch.testing.assert_close(r.sum((1, 2)), torch.ones(2), rtol=0, atol=1e-4)


@pytest.mark.parametrize("bad", [5, -1])
def test_target_out_of_range_raises(tiny_vit, bad):
    """A target outside [0, C) raises ValueError naming the number of classes."""
    with pytest.raises(ValueError, match="5 classes"):
        get_explainer(NAME, tiny_vit)(_images(2), torch.tensor([0, bad]))
