"""AttnLRP (methods/attnlrp.py) and the convolution-stem LRP rules (methods/lrp_stem.py): the
authors' library's maps on identical weights (tests/data/attnlrp), an explicit (division-based)
relevance pass through one block, conservation, batching, class specificity, the model matrix,
the shipped model's stem and the command."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import assert_batched_equals_single, make_vit
from test_model_matrix import CONFIGS, _model
from timm.layers import HybridEmbed
from torch import nn

from wsol_bench.errors import SettingError
from wsol_bench.methods import get_explainer
from wsol_bench.models import UnsupportedModelError, disable_fused_attention, load_model

DATA = Path(__file__).parent / "data" / "attnlrp"


def timm_state_from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision VisionTransformer weights under timm VisionTransformer's names: the packed q,
    k, v in-projection is timm's qkv (same [q; k; v] row order), out_proj its proj, mlp.0/mlp.3
    fc1/fc2, ln_1/ln_2 norm1/norm2, conv_proj the patch convolution."""
    names = {"conv_proj": "patch_embed.proj", "class_token": "cls_token", "encoder.pos_embedding": "pos_embed",
             "encoder.ln": "norm", "heads.head": "head"}
    parts = {"ln_1": "norm1", "ln_2": "norm2", "self_attention.in_proj_weight": "attn.qkv.weight",
             "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj": "attn.proj",
             "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2"}
    out = {}
    for key, value in state.items():
        if key.startswith("encoder.layers.encoder_layer_"):
            index, rest = key[len("encoder.layers.encoder_layer_"):].split(".", 1)
            part = next(p for p in parts if rest.startswith(p))
            out[f"blocks.{index}.{parts[part]}{rest[len(part):]}"] = value
        else:
            prefix = next(p for p in names if key.startswith(p))
            out[names[prefix] + key[len(prefix):]] = value
    return out


def timm_vit_from_torchvision(state: dict[str, torch.Tensor], arch: str = "vit_tiny_patch16_224",
                              **kwargs) -> torch.nn.Module:
    """A timm ViT carrying torchvision ViT weights (sizes read from them), eval, fused attention off."""
    mapped = timm_state_from_torchvision(state)
    dim, patch = mapped["patch_embed.proj.weight"].shape[0], mapped["patch_embed.proj.weight"].shape[-1]
    grid = round((mapped["pos_embed"].shape[1] - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[1]) for k in mapped if k.startswith("blocks."))
    model = timm.create_model(arch, pretrained=False, img_size=grid * patch, patch_size=patch, embed_dim=dim,
                              depth=depth, num_classes=mapped["head.weight"].shape[0],
                              mlp_ratio=mapped["blocks.0.mlp.fc1.weight"].shape[0] / dim, **kwargs)
    model.load_state_dict(mapped)
    disable_fused_attention(model)
    return model.requires_grad_(False).eval()


@pytest.mark.parametrize(("variant", "params"), [
    ("attnlrp", {"input_rule": "epsilon"}),
    ("cp", {"attention": "cp", "input_rule": "epsilon"}),
    ("attnlrp_zbox", {"input_rule": "zb"}),
])
def test_maps_equal_the_authors_library_on_the_same_weights(variant, params):
    """LXT 2.1's maps on a torchvision ViT (tests/data/attnlrp/README.json says how they were
    made) equal the suite's on a timm ViT given the same weights, within float noise: its AttnLRP
    rules (input x gradient at the pixels), its shipped CP-LRP rules for torchvision's ViT, and
    AttnLRP with zennit's ZBox at the patch convolution (the suite's z^B)."""
    data = np.load(DATA / "lxt_reference.npz")
    state = {k[2:]: torch.from_numpy(data[k]) for k in data.files if k.startswith("w/")}
    model = timm_vit_from_torchvision(state, num_heads=3)
    images, targets = torch.from_numpy(data["images"]), torch.from_numpy(data["targets"]).long()
    out = get_explainer("attnlrp", model, **params)(images, targets)
    reference = torch.from_numpy(data[f"maps/{variant}"])
    torch.testing.assert_close(out.logits, torch.from_numpy(data["logits"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.maps, reference, atol=1e-6 * float(reference.abs().max()), rtol=1e-4)


def explicit_block_relevance(blk, x: torch.Tensor, r_out: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """The AttnLRP rules through one timm Block written as explicit LRP (relevance divided by
    each layer's output), independent of the modified-gradient form: residual adds LRP-0,
    Linear epsilon, R_in = x W^T (R / (z + eps sign z)) (the bias keeps its share), GELU R_in = R_out, LayerNorm as the linear map
    x -> (x - mean) w / std + b with std fixed, A V and q k^T half to each operand, and softmax
    R_in = x (R_out - s sum_j R_out_j)."""
    at, dim = blk.attn, x.shape[-1]

    def layer_norm(norm, t):
        std = (t.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        return (t - t.mean(-1, keepdim=True)) / std * norm.weight + norm.bias, std

    def norm_relevance(norm, t, y, std, r):  # t_i sum_j (delta_ij - 1/D) w_j / std R_j / y_j
        s = r / y * norm.weight / std
        return t * (s - s.sum(-1, keepdim=True) / dim)

    def linear_relevance(layer, t, z, r):
        return t * ((r / (z + eps * torch.where(z >= 0, 1.0, -1.0))) @ layer.weight)

    b, n, _ = x.shape
    h1, std1 = layer_norm(blk.norm1, x)
    qkv = at.qkv(h1)
    q, k, v = qkv.reshape(b, n, 3, at.num_heads, at.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    scores = (q * at.scale) @ k.transpose(-2, -1)
    attn = scores.softmax(-1)
    heads = attn @ v
    o = heads.transpose(1, 2).reshape(b, n, -1)
    a = at.proj(o)
    mid = x + a
    h2, std2 = layer_norm(blk.norm2, mid)
    f1 = blk.mlp.fc1(h2)
    act = blk.mlp.act(f1)
    m = blk.mlp.fc2(act)
    out = mid + m
    r_mid, r_m = mid / out * r_out, m / out * r_out
    r_f1 = linear_relevance(blk.mlp.fc2, act, m, r_m)  # GELU: R_in = R_out
    r_mid = r_mid + norm_relevance(blk.norm2, mid, h2, std2, linear_relevance(blk.mlp.fc1, h2, f1, r_f1))
    r_x, r_a = x / mid * r_mid, a / mid * r_mid
    r_heads = linear_relevance(at.proj, o, a, r_a).reshape(b, n, at.num_heads, at.head_dim).transpose(1, 2)
    s_heads = r_heads / heads / 2
    r_attn, r_v = attn * (s_heads @ v.transpose(-2, -1)), v * (attn.transpose(-2, -1) @ s_heads)
    r_scores = scores * (r_attn - attn * r_attn.sum(-1, keepdim=True))
    s_scores = r_scores / scores / 2
    r_q = q * at.scale * (s_scores @ k)
    r_k = k * (s_scores.transpose(-2, -1) @ (q * at.scale))
    r_qkv = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4).reshape(b, n, -1)
    return r_x + norm_relevance(blk.norm1, x, h1, std1, linear_relevance(at.qkv, h1, qkv, r_qkv))


@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_one_block_equals_the_explicit_relevance_rules(eps):
    """x * (modified gradient) through a block equals the explicit rules, for any output
    relevance, with and without the epsilon of the linear layers."""
    from wsol_bench.methods.attnlrp import block_forward

    model = make_vit(5, depth=1, embed_dim=12, num_heads=2)
    blk = model.blocks[0]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 12, generator=gen)
    r_out = torch.randn(2, 5, 12, generator=gen)
    leaf = x.clone().requires_grad_(True)
    out = block_forward(blk, leaf, eps, "attnlrp")
    (grad,) = torch.autograd.grad(out, leaf, grad_outputs=r_out / out.detach())
    with torch.no_grad():
        expected = explicit_block_relevance(blk, x, r_out, eps)
    torch.testing.assert_close(x * grad, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-3)


def test_softmax_rule_by_hand():
    """s = softmax([0, ln 3]) = [1/4, 3/4]; R_out = [1, 0]: R_in = x (R_out - s sum R_out) =
    [0, ln 3 (0 - 3/4)]; the uniform product q k^T hands each operand half its relevance."""
    from wsol_bench.methods.attnlrp import UniformMatmul

    x = torch.tensor([0.0, float(np.log(3.0))], requires_grad=True)
    s = x.softmax(-1)
    (grad,) = torch.autograd.grad(s, x, grad_outputs=torch.tensor([1.0, 0.0]) / s.detach())
    torch.testing.assert_close(x.detach() * grad, torch.tensor([0.0, -0.75 * float(np.log(3.0))]))
    a = torch.tensor([[2.0, -1.0]], requires_grad=True)
    b = torch.tensor([[3.0], [1.0]], requires_grad=True)
    z = UniformMatmul.apply(a, b)  # 2*3 - 1*1 = 5, relevance 5
    ga, gb = torch.autograd.grad(z, (a, b))
    torch.testing.assert_close((a * ga).detach(), torch.tensor([[3.0, -0.5]]))  # half of [6, -1]
    torch.testing.assert_close((b * gb).detach(), torch.tensor([[3.0], [-0.5]]))


def _bias_free(model):
    """Zero every bias, the class token and the position embedding: nothing absorbs relevance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name in ("cls_token", "pos_embed"):
                p.zero_()
    return model


@pytest.mark.parametrize("input_rule", ["epsilon", "zb"])
def test_cp_rules_conserve_the_target_logit_exactly_without_biases(input_rule):
    """With attention held constant (cp) and no bias, every rule is conserving (identity rules,
    LayerNorm linear with 1/std fixed, z^B): the pixels' relevance sums to y_c. The AttnLRP
    softmax rule is not conserving (its bias share x s sum R is dropped): it gives another sum."""
    model = _bias_free(make_vit(6, depth=2))
    images, targets = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6)), torch.tensor([0, 2, 4])
    out = get_explainer("attnlrp", model, attention="cp", input_rule=input_rule)(images, targets)
    logit = out.logits.gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(out.maps.sum((1, 2)), logit, atol=1e-5, rtol=1e-4)
    full = get_explainer("attnlrp", model, input_rule=input_rule)(images, targets).maps.sum((1, 2))
    assert not torch.allclose(full, logit, atol=1e-3, rtol=1e-2)


def test_batched_equals_one_image_and_maps_are_class_specific():
    """One batch gives each image's own map; another target gives another map."""
    model = make_vit(7, depth=2)
    images, targets = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7)), torch.tensor([1, 2, 3])
    explainer = get_explainer("attnlrp", model)
    out = explainer(images, targets)
    single = torch.cat([explainer(images[i:i + 1], targets[i:i + 1]).maps for i in range(3)])
    torch.testing.assert_close(out.maps, single, atol=1e-7, rtol=1e-4)
    other = explainer(images, (targets + 1) % 5).maps
    assert out.maps.shape == (3, 32, 32) and explainer.resolution == "pixel"
    assert not torch.allclose(other, out.maps, atol=1e-6)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_runs_on_the_model_matrix(key):
    """Class and distillation tokens, registers, patch 8/16/32, non-square inputs; and average
    pooling (no class token read): pixel maps, finite, batched == single, the model's logits."""
    model = _model(key)
    h, w = model.patch_embed.img_size
    images, targets = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 4])
    explainer = get_explainer("attnlrp", model)
    out = explainer(images, targets)
    assert out.maps.shape == (2, h, w) and torch.isfinite(out.maps).all()
    assert_batched_equals_single(explainer, model, images, targets)


def test_average_pooled_model_is_explained():
    model = make_vit(8, class_token=False, global_pool="avg")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    out = get_explainer("attnlrp", model, input_rule="epsilon")(images)
    torch.testing.assert_close(out.logits, model(images), rtol=1e-5, atol=1e-5)
    assert out.maps.shape == (2, 32, 32) and out.maps.abs().sum() > 0


def _hybrid(seed: int, stem: nn.Sequential) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=1, embed_dim=12, depth=1,
                              num_heads=2, num_classes=5, embed_layer=partial(HybridEmbed, backbone=stem))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # non-trivial running statistics to fold
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    disable_fused_attention(model)
    return model.requires_grad_(False).eval()


def _stem(*widths: int) -> nn.Sequential:
    layers, c_in = [], 3
    for c_out in widths:
        layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers)


def test_stem_rules_fold_batchnorm_and_conserve_relevance():
    """The shipped model's kind of stem (conv-BN-ReLU, stride 2, padding 1, then a 1x1 projection):
    the folded units reproduce the embedding; z+ through the inner convolutions and z^B at the
    pixels hand on exactly the relevance they receive, except at outputs with no active input;
    every inner rule gives relevance only where the ReLU let the activation through."""
    from wsol_bench.methods.lrp_stem import (
        alpha_beta_rule,
        check_embedding,
        embedding_relprop,
        embedding_units,
    )

    model = _hybrid(9, _stem(4, 6))
    units = embedding_units(model, "test")
    assert [u.relu for u in units] == [True, True, False]
    assert check_embedding(model, units, "test") < 1e-5
    gen = torch.Generator().manual_seed(9)
    images = torch.randn(2, 3, 32, 32, generator=gen)
    relevance = torch.randn(2, 12, 8, 8, generator=gen)
    pixels = embedding_relprop(units, images, relevance)
    # the biases take no relevance: an output whose inputs are all 0 (ReLU) has nothing to give it to
    hidden = units[0].forward(images)
    last_in = units[1].forward(hidden).clamp(min=0)
    live = units[2].conv(last_in, units[2].weight.clamp(min=0)) > 0
    assert 0 < int((~live).sum()) < live.numel() // 10  # a few dead positions in this small stem
    torch.testing.assert_close(pixels.sum((1, 2, 3)), (relevance * live).sum((1, 2, 3)), atol=1e-4, rtol=1e-4)
    inner = alpha_beta_rule(hidden, units[1], torch.rand(2, 6, 8, 8, generator=gen))
    assert (inner[hidden == 0] == 0).all() and (inner >= 0).all()  # z+ on inputs >= 0: positive in, positive out


@pytest.mark.parametrize("method", ["attnlrp", "full_lrp"])
def test_methods_run_on_the_shipped_models_stem(method):
    """The shipped model (a convolution stem): pixel maps at the input size, class-specific;
    full_lrp's conserving rules keep the relevance of the patch tokens down to the pixels."""
    model = load_model("wsol_synthetic_vit", pretrained=True)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(10))
    explainer = get_explainer(method, model)
    out = explainer(images, torch.tensor([0, 1]))
    assert out.maps.shape == (2, 224, 224) and torch.isfinite(out.maps).all()
    assert not torch.allclose(out.maps, explainer(images, torch.tensor([2, 3])).maps)
    if method == "attnlrp":  # the relevance of y_c, less what biases, the class token and softmax kept
        share = out.maps.sum((1, 2)) / out.logits.gather(1, out.targets[:, None]).squeeze(1)
        assert ((share > 0.3) & (share < 1.5)).all(), share


def test_refusals_name_the_setting_or_the_part():
    model = make_vit(11, depth=1)
    for params, text in (({"attention": "softmax"}, "attention='softmax'; valid: attnlrp, cp"),
                         ({"input_rule": "gamma"}, "input_rule='gamma'; valid: zb, epsilon"),
                         ({"epsilon": -1}, "epsilon=-1 must be a number in")):
        with pytest.raises(SettingError, match=text):
            get_explainer("attnlrp", model, **params)
    with pytest.raises(UnsupportedModelError, match="attnlrp: .*qk-norm"):
        get_explainer("attnlrp", make_vit(11, depth=1, qk_norm=True))
    pooled = nn.Sequential(nn.Conv2d(3, 12, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(2))
    with pytest.raises(UnsupportedModelError, match=r"attnlrp: .*MaxPool2d \(backbone\[2\]\)"):
        get_explainer("attnlrp", _hybrid(11, pooled))
    assert get_explainer("attnlrp", _hybrid(11, pooled), input_rule="epsilon").units is None  # plain gradient


def test_attnlrp_and_full_lrp_run_through_the_command_on_the_shipped_model(tmp_path, command):
    import pandas as pd

    proc = command("wsol-bench", ["method=[attnlrp,full_lrp]", "dataset.params.num_images=4", "batch_size=4",
                                  "gallery_images=0", "progress=false", "metric.image_filter=all",
                                  f"store.root={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = pd.read_csv(tmp_path / "run" / "records.csv")
    assert sorted(set(records["method"])) == ["attnlrp", "full_lrp"]
    assert (records.groupby("method")["image_id"].nunique() == 4).all() and (records["degenerate"] == 0).all()
