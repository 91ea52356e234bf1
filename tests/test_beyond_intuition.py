"""Beyond Intuition's head-wise (bt_h) and token-wise (bt_t) attributions: hand-computed
pieces, an independent re-implementation of the formulas on a plain ViT forward, reference maps
of the authors' published code (tests/data/beyond_intuition/), the model matrix, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import make_vit
from test_model_matrix import CONFIGS, _model

from wsol_bench.errors import SettingError
from wsol_bench.methods import get_explainer, method_table
from wsol_bench.methods.beyond_intuition import cls_rollout, head_weighted_attention
from wsol_bench.methods.capture import UnsupportedModelError
from wsol_bench.models import disable_fused_attention

FIXTURE = Path(__file__).parent / "data" / "beyond_intuition"
METHODS = ("bt_h", "bt_t")


def seeded_vit(seed: int = 0) -> torch.nn.Module:
    """The fixture's model: a 4-block timm ViT (64x64 input, patch 16, width 24, 3 heads, 5
    classes) whose every parameter is drawn from one seeded generator in state-dict order, so
    the weights depend on the parameter shapes only, never on timm's initialisation."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=16,
                              embed_dim=24, depth=4, num_heads=3, num_classes=5)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            draw = torch.randn(p.shape, generator=gen)
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1 + 0.1 * draw)
            elif name.endswith("bias"):
                p.copy_(0.1 * draw)
            elif name in ("cls_token", "pos_embed"):
                p.copy_(0.5 * draw)
            else:  # linear and convolution weights: unit-variance outputs
                p.copy_(draw / float(np.prod(p.shape[1:])) ** 0.5)
    disable_fused_attention(model)
    return model.requires_grad_(False).eval()


def fixture_images() -> torch.Tensor:
    """The fixture's four images."""
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# -- an independent re-implementation on a plain forward ---------------------------------------
def plain_forward(model, images):
    """Logits, post-softmax attentions [B, H, N, N], block inputs z and values v W_proj^T."""
    x = model._pos_embed(model.patch_embed(images))
    x = x.detach().requires_grad_(True)
    attentions, inputs, values = [], [], []
    for blk in model.blocks:
        at = blk.attn
        b, n, d = x.shape
        inputs.append(x.detach())
        qkv = at.qkv(blk.norm1(x)).reshape(b, n, 3, at.num_heads, d // at.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = ((q * at.scale) @ k.transpose(-2, -1)).softmax(-1)
        attentions.append(a)
        flat_v = v.transpose(1, 2).reshape(b, n, d)
        gamma = getattr(blk.ls1, "gamma", torch.ones(d))  # LayerScale, when the block has it
        values.append((flat_v @ at.proj.weight.t() * gamma).detach())
        x = x + blk.ls1(at.proj((a @ v).transpose(1, 2).reshape(b, n, d)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.head(model.norm(x)[:, 0]), attentions, inputs, values


def reference_maps(model, images, targets, method, start_layer=0, steps=20):
    """The formulas of docs/protocol.md section 2 written out image by image with full N x N
    matrices: the whole product P, then its CLS row."""
    maps = []
    for img, t in zip(images, targets):
        img = img[None]
        with torch.enable_grad():
            logits, attns, inputs, values = plain_forward(model, img)
            grads = torch.autograd.grad(logits[0, t], attns)
        n = attns[0].shape[-1]
        product = torch.eye(n)
        for layer in range(start_layer, len(attns)):
            a, g = attns[layer][0].detach(), grads[layer][0]
            if method == "bt_h":
                weights = torch.stack([(a[h].T @ g[h]).abs().mean() for h in range(a.shape[0])])
                fused = sum(w / weights.sum() * a[h] for h, w in enumerate(weights))
            else:
                order = values[layer][0].norm(dim=-1) / inputs[layer][0].norm(dim=-1)
                fused = a.mean(0) @ torch.diag(order)
            product = product + fused @ product
        total = torch.zeros_like(attns[-1][0])
        for alpha in np.linspace(0, 1, steps):
            with torch.enable_grad():
                logits, attns, _, _ = plain_forward(model, img * alpha)
                total = total + torch.autograd.grad(logits[0, t], attns[-1])[0][0]
        feedback = (total / steps).clamp(min=0).mean(0)
        cam = feedback * (product if method == "bt_h" else product.abs())  # the authors' |P| for bt_t
        maps.append(cam[0, 1:].reshape(model.patch_embed.grid_size))
    return torch.stack(maps)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("start_layer", "layer_scale"), [(0, False), (2, False), (1, True)])
def test_maps_equal_the_formulas_written_out_per_image(method, start_layer, layer_scale):
    """Batched, CLS-row-only computation == the full per-image products of the protocol (with
    LayerScale, bt_t's token values are gamma * v W_proj^T, as the branch adds them)."""
    extra = {"init_values": 0.5} if layer_scale else {}
    model = make_vit(3, img_size=64, patch_size=16, depth=3, num_classes=5, **extra)
    images, targets = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4)), torch.tensor([1, 4, 0])
    out = get_explainer(method, model, start_layer=start_layer, steps=4)(images, targets)
    expected = reference_maps(model, images, targets, method, start_layer, steps=4)
    torch.testing.assert_close(out.maps, expected, rtol=1e-4, atol=1e-7)


# -- reference maps of the authors' published code ------------------------------------------------
def test_fixture_model_is_the_one_the_reference_maps_were_made_with():
    """The rebuilt weights give the logits stored beside the reference maps."""
    stored = np.load(FIXTURE / "reference_maps.npz")
    with torch.no_grad():
        logits = seeded_vit()(fixture_images())
    np.testing.assert_allclose(logits.numpy(), stored["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("start_layer", [0, 2])
def test_maps_equal_the_authors_code(method, start_layer):
    """Equal to the maps of the authors' `generate_ours` / `generate_ours_c` (their start_layer
    = ours + 1), one image at a time there, the whole batch here; float32 noise only."""
    stored = np.load(FIXTURE / "reference_maps.npz")
    meta = json.loads((FIXTURE / "reference.json").read_text())
    out = get_explainer(method, seeded_vit(), start_layer=start_layer, steps=meta["steps"])(
        fixture_images(), torch.as_tensor(stored["targets"]))
    expected = stored[f"{method}_start{start_layer}"]
    np.testing.assert_allclose(out.maps.numpy(), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


# -- hand-computed pieces -----------------------------------------------------------------------
def test_head_weights_are_normalised_mean_absolute_products():
    """Two heads, two tokens: I_h = mean |A_h^T G_h| = [1, 3] (the absolute value after the
    product: before it, head 1 would give 4.5) -> weights [0.25, 0.75]."""
    attention = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]]])
    grad = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]], [[6.0, -9.0], [0.0, 3.0]]]])
    fused = head_weighted_attention(attention, grad)
    torch.testing.assert_close(fused[0], 0.25 * attention[0, 0] + 0.75 * attention[0, 1])


def test_cls_rollout_is_the_first_row_of_the_chained_product():
    """e0^T (I + M2 D2)(I + M1 D1), last block first, with column scales D = diag(s)."""
    gen = torch.Generator().manual_seed(0)
    m1, m2 = torch.rand(2, 3, 5, 5, generator=gen)
    s1, s2 = torch.rand(2, 3, 5, generator=gen)
    eye = torch.eye(5)
    full = (eye + m2 @ torch.diag_embed(s2)) @ (eye + m1 @ torch.diag_embed(s1))
    torch.testing.assert_close(cls_rollout([m1, m2], [s1, s2]), full[:, 0])
    torch.testing.assert_close(cls_rollout([m1, m2]), ((eye + m2) @ (eye + m1))[:, 0])


# -- invariants ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_maps_change_with_the_target(method):
    model, images = seeded_vit(), fixture_images()
    explainer = get_explainer(method, model, steps=3)
    first = explainer(images, torch.zeros(4, dtype=torch.long)).maps
    second = explainer(images, torch.full((4,), 3)).maps
    assert (first - second).abs().amax((1, 2)).min() > 1e-3 * first.abs().max()


def test_method_table_declares_grid_maps_and_the_passes():
    rows = {row["name"]: row for row in method_table()}
    for method in METHODS:
        assert rows[method]["resolution"] == "grid" and rows[method]["class_specific"]
        assert rows[method]["passes_per_image"].startswith("steps (forward + backward)")


@pytest.mark.parametrize("key", sorted(CONFIGS))
@pytest.mark.parametrize("method", METHODS)
def test_model_matrix(method, key):
    """Grid maps, finite, batched == one image at a time, the model's own logits."""
    model = _model(key)
    h, w = model.patch_embed.img_size
    images = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 4, 2])
    explainer = get_explainer(method, model, steps=3)
    out = explainer(images, targets)
    assert out.maps.shape == (3, *model.patch_embed.grid_size) and torch.isfinite(out.maps).all()
    single = torch.cat([explainer(images[i:i + 1], targets[i:i + 1]).maps for i in range(3)])
    torch.testing.assert_close(out.maps, single, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.logits, model(images), rtol=1e-5, atol=1e-5)


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_bad_settings_are_refused_in_one_line(method):
    model = make_vit(0, depth=2)
    with pytest.raises(SettingError, match="start_layer=2 must be an integer in \\[0, 2\\)"):
        get_explainer(method, model, start_layer=2)
    with pytest.raises(SettingError, match="steps=1 must be an integer >= 2"):
        get_explainer(method, model, steps=1)


@pytest.mark.parametrize("method", METHODS)
def test_model_without_class_token_is_refused(method):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, class_token=False,
                              global_pool="avg", embed_dim=24, depth=2, num_heads=3, num_classes=5)
    with pytest.raises(UnsupportedModelError, match="class token"):
        get_explainer(method, model.eval())


def test_token_wise_refuses_a_normalised_attention_output():
    """bt_t reads a token's value as v W_proj^T; an attention output norm breaks that."""
    model = make_vit(0, depth=2)
    model.blocks[1].attn.norm = torch.nn.LayerNorm(24)
    with pytest.raises(UnsupportedModelError, match="block 1 normalises or gates"):
        get_explainer("bt_t", model)
    get_explainer("bt_h", model)  # the head-wise perception reads attention and gradients only


# -- the CLI ------------------------------------------------------------------------------------
def test_runs_end_to_end_on_the_shipped_model(command, tmp_path):
    """`wsol-bench method=[bt_h,bt_t]` on the shipped hybrid ViT exits 0 and records both."""
    import pandas as pd

    result = command("wsol-bench", ["method=[bt_h,bt_t]", "dataset.params.num_images=4", "batch_size=4",
                                    "gallery_images=0", "progress=false", "method.bt_h.params.steps=2",
                                    "method.bt_t.params.steps=2", f"store.root={tmp_path / 'cache'}",
                                    f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = pd.read_csv(tmp_path / "run" / "records.csv")
    assert sorted(set(records["method"])) == ["bt_h", "bt_t"]
