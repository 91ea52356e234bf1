"""Chefer et al.'s raw-attention and attention Grad-CAM baselines against an independent
re-implementation of the ViT forward (tests/test_agcam.py's reference_forward), batched equal
to one image at a time."""

from __future__ import annotations

import pytest
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
    for name in ("raw_attention", "attention_gradcam", "lrp_last_layer"):
        explainer = get_explainer(name, model)
        batched = explainer(images).maps
        single = torch.cat([explainer(images[i:i + 1]).maps for i in range(4)])
        torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)


def test_partial_lrp_is_the_last_attentions_relevance_of_the_full_pass():
    """The last block's R_A does not depend on how far the relevance goes down: the map equals
    the positive part, head mean, CLS row of R_A^{L-1} from transformer_attribution's full
    relevance pass; it changes with the target."""
    from wsol_bench.methods.transformer_attribution import lrp_forward, relevance_pass

    model = make_vit(3, img_size=64, patch_size=16, num_classes=5)
    images, targets = _images(3, 3), torch.tensor([1, 2, 0])
    with torch.no_grad():
        trace = lrp_forward(model, images)
        r_attn, _ = relevance_pass(model, trace, targets, start_layer=0)
    expected = r_attn[-1].clamp(min=0).mean(1)[:, 0, 1:].reshape(3, 4, 4)
    explainer = get_explainer("lrp_last_layer", model)
    out = explainer(images, targets)
    torch.testing.assert_close(out.maps, expected, atol=1e-7, rtol=1e-5)
    other = explainer(images, (targets + 1) % 5).maps
    assert not torch.allclose(other, out.maps)
    single = torch.cat([explainer(images[i:i + 1], targets[i:i + 1]).maps for i in range(3)])
    torch.testing.assert_close(single, out.maps, atol=1e-6, rtol=1e-5)


def _zb_by_patches(images, weight, relevance):
    """The z^B rule written per patch with unfold (independent of the convolution form)."""
    _b, _c, h, w = images.shape
    k = weight.shape[-1]
    cols = torch.nn.functional.unfold(images, k, stride=k)  # [B, C*k*k, G]
    low = images.amin(dim=(1, 2, 3))[:, None, None].expand_as(cols)
    high = images.amax(dim=(1, 2, 3))[:, None, None].expand_as(cols)
    flat = weight.reshape(weight.shape[0], -1)  # [D, C*k*k]
    pw, nw = flat.clamp(min=0), flat.clamp(max=0)
    r = relevance.flatten(2)  # [B, D, G]
    z = flat @ cols - pw @ low - nw @ high + 1e-9
    s = r / z
    out = cols * (flat.T @ s) - low * (pw.T @ s) - high * (nw.T @ s)
    return torch.nn.functional.fold(out, (h, w), k, stride=k)


def test_full_lrp_carries_the_relevance_to_the_pixels_with_the_zb_rule():
    """The pixel map is the z^B rule (per-patch form) applied to the patch tokens' share of the
    position-embedding add; z^B keeps the total; batched equals one at a time."""
    from wsol_bench.methods.chefer_baselines import zb_conv_relprop
    from wsol_bench.methods.transformer_attribution import lrp_forward, relevance_pass, residual_relprop

    model = make_vit(4, img_size=64, patch_size=16, num_classes=5)
    images, targets = _images(2, 4), torch.tensor([2, 4])
    with torch.no_grad():
        trace = lrp_forward(model, images)
        _, r = relevance_pass(model, trace, targets, start_layer=0)
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(images)], 1)
        r_tokens, _ = residual_relprop(tokens, model.pos_embed.expand_as(tokens), r)
        r_patches = r_tokens[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4)
    expected = _zb_by_patches(images, model.patch_embed.proj.weight.detach(), r_patches)
    torch.testing.assert_close(zb_conv_relprop(images, model.patch_embed.proj, r_patches), expected,
                               atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(expected.sum((1, 2, 3)), r_patches.sum((1, 2, 3)), atol=1e-5, rtol=1e-4)
    explainer = get_explainer("full_lrp", model)
    out = explainer(images, targets)
    assert out.maps.shape == (2, 64, 64) and explainer.resolution == "pixel"
    torch.testing.assert_close(out.maps, expected.sum(1), atol=1e-6, rtol=1e-4)
    single = torch.cat([explainer(images[i:i + 1], targets[i:i + 1]).maps for i in range(2)])
    torch.testing.assert_close(single, out.maps, atol=1e-6, rtol=1e-4)


def test_full_lrp_refuses_a_stem_layer_without_a_rule_in_one_line():
    """A convolutional stem is explained (tests/test_attnlrp.py); a layer with no rule (here a
    max pool) is refused in one line naming it."""
    from functools import partial

    import pytest
    import timm
    from timm.layers import HybridEmbed
    from torch import nn

    from wsol_bench.models import UnsupportedModelError

    stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(2))
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=1, embed_dim=24, depth=1,
                              num_heads=3, num_classes=5, embed_layer=partial(HybridEmbed, backbone=stem)).eval()
    with pytest.raises(UnsupportedModelError, match=r"full_lrp: .*MaxPool2d \(backbone\[2\]\)"):
        get_explainer("full_lrp", model)


def test_chefer_baselines_run_end_to_end_on_a_plain_vit(tmp_path, command):
    """Through the command on a random plain ViT-Tiny at 64 px: every baseline in table.csv."""
    import pandas as pd

    proc = command("wsol-bench", ["method=[raw_attention,attention_gradcam,lrp_last_layer,full_lrp]",
                                  "model.name=vit_tiny_patch16_224", "model.pretrained=false",
                                  "++model.kwargs.num_classes=6", "++model.kwargs.img_size=64",
                                  "preprocess.input_size=[64,64]", "metric.image_filter=all",
                                  "dataset.params.num_images=4", "progress=false", "gallery_images=2",
                                  f"store.root={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "run" / "table.csv")
    assert sorted(table["method"]) == ["attention_gradcam", "full_lrp", "lrp_last_layer", "raw_attention"]
    assert (tmp_path / "run" / "gallery.png").is_file()


def test_linear_rule_shares_or_doubles_the_relevance():
    """x = [1, -1], W = [[1, -1]], R = 1: the conserving rule gives each input half (x+ W+ and
    x- W- contribute 1 each), the original rule gives each part all of R: [1, 1]."""
    from wsol_bench.methods.transformer_attribution import linear_relprop

    x, weight, relevance = torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0]])
    torch.testing.assert_close(linear_relprop(x, weight, relevance), torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(linear_relprop(x, weight, relevance, conserving=False), torch.tensor([[1.0, 1.0]]))


def test_a_residual_block_by_hand_under_both_rules():
    """z = x + W x with x = [1, -2], W = [[1, 1], [1, -2]] (so W x = [-1, 5], z = [0, 3]) and
    R_z = [0, 1], worked by hand. Residual split: s = R / z = [0, 1/3]: R_x = x s = [0, -2/3],
    R_Wx = W x s = [0, 5/3] (the original rule stops here; the conserving rule rescales each
    part to sum to |its sum| / (2/3 + 5/3) of the total 1: R_x = [0, 2/7], R_Wx = [0, 5/7]). Then
    the linear layer, with x+ = [1, 0], x- = [0, -2], W+ = [[1, 1], [1, 0]], W- = [[0, 0], [0, -2]]:
    output 1 has z+ = x+ W+[1] = 1 and z- = x- W-[1] = 4, so its relevance r goes to x[0], x[1] as
    conserving: r/5 per unit of z, [r/5, 4r/5]; original: all of r to each part, [r, r].
    The input's relevance adds both paths: conserving [1/7, 6/7] (sum 1), original [5/3, 1]."""
    from wsol_bench.methods.transformer_attribution import linear_relprop, residual_relprop

    x, weight = torch.tensor([[1.0, -2.0]]), torch.tensor([[1.0, 1.0], [1.0, -2.0]])
    wx = x @ weight.T
    relevance = torch.tensor([[0.0, 1.0]])
    expected = {True: torch.tensor([[1 / 7, 6 / 7]]), False: torch.tensor([[5 / 3, 1.0]])}
    for conserving, want in expected.items():
        r_x, r_wx = residual_relprop(x, wx, relevance, conserving)
        total = r_x + linear_relprop(x, weight, r_wx, conserving)
        torch.testing.assert_close(total, want)


@pytest.mark.parametrize("method", ["lrp_last_layer", "full_lrp"])
def test_both_rule_sets_on_a_vit_and_conservation_for_the_conserving_one(method):
    """On a plain ViT the two rule sets give different maps; the conserving rules keep the
    relevance of the one-hot at the logit (1 per image) at every block input, the original rules
    do not; an unknown rule set is refused naming the valid ones."""
    from wsol_bench.errors import SettingError
    from wsol_bench.methods.transformer_attribution import lrp_forward, relevance_pass

    model = make_vit(4, img_size=32, patch_size=8, num_classes=5, depth=2)
    images, targets = _images(2, 4)[:, :, :32, :32], torch.tensor([1, 3])
    conserving = get_explainer(method, model)(images, targets).maps
    original = get_explainer(method, model, rules="chefer_original")(images, targets).maps
    assert conserving.shape == original.shape and not torch.allclose(conserving, original)
    with torch.no_grad():
        trace = lrp_forward(model, images)
        for rules, keeps in (("conserving", True), ("chefer_original", False)):
            _, r = relevance_pass(model, trace, targets, start_layer=0, rules=rules)
            sums = r.sum(dim=(1, 2))
            assert torch.allclose(sums, torch.ones(2), atol=1e-4) == keeps, (rules, sums)
    with pytest.raises(SettingError, match="rules='lrp'; valid: conserving, chefer_original"):
        get_explainer(method, model, rules="lrp")
