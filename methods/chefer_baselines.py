"""Baselines of Chefer, Gur & Wolf's comparison tables (CVPR 2021; docs/protocol.md 2.7),
which the AG-CAM paper's tables also list:

- raw attention: the last block's attention of the CLS token to the patches, mean over heads;
- attention Grad-CAM: the last block's CLS-row attention weighted per head by that row's mean
  gradient of the target logit, mean over heads, ReLU;
- partial LRP: the LRP relevance of the last block's attention, positive part, mean over heads;
- full LRP: the same relevance carried down to the pixels (a pixel map), through the patch
  convolution or a convolutional stem (lrp_stem's rules).

The first two read the attention after the softmax (before dropout), as the reference's
`get_attention_map` hook does; partial and full LRP reuse transformer_attribution's relevance
pass, with its conserving rules (the default) or the original rules Chefer et al.'s scripts
computed those two rows with (`rules=chefer_original`)."""

from __future__ import annotations

import torch
from torch import nn

from wsol_bench.errors import SettingError
from wsol_bench.methods.capture import AttentionCapture, UnsupportedModelError

from .base import Explainer, target_score
from .lrp_stem import ConvUnit, check_embedding, conv_unit, embedding_relprop, embedding_units, zb_rule
from .registry import register_explainer
from .transformer_attribution import (
    LRP_RULES,
    check_forward,
    check_supported,
    lrp_forward,
    relevance_pass,
    residual_relprop,
)


@register_explainer("raw_attention")
class RawAttention(Explainer):
    """mean_h A^L[CLS, patches]: the last block's attention from the class token."""

    passes_per_image = "1 forward"
    class_specific = False

    def explain(self, images, targets):
        with torch.no_grad(), AttentionCapture(self.model) as cap:
            logits = self.model(images)
            cap.check()
        used = self.resolve_targets(logits, targets)
        last = cap.attentions[-1].float()  # [B, H, N, N]
        return self.patch_map(last[:, :, 0].mean(1)), logits, used


@register_explainer("attention_gradcam")
class AttentionGradCAM(Explainer):
    """ReLU(mean_h A^L_h[CLS, patches] * mean_patches(dy_c/dA^L_h[CLS, patches])): Grad-CAM on the
    last block's attention probabilities, the reference's `generate_attn_gradcam`."""

    passes_per_image = "1 forward + 1 backward"

    def explain(self, images, targets):
        with torch.enable_grad(), AttentionCapture(self.model, gradients=True) as cap:
            logits = self.model(images)
            used = self.resolve_targets(logits, targets)
            grad = cap.attention_grads(target_score(logits, used))[-1]
        attention = cap.attentions[-1].detach().float()[:, :, 0, self.num_prefix:]  # [B, H, G]
        weights = grad.float()[:, :, 0, self.num_prefix:].mean(-1, keepdim=True)  # [B, H, 1]
        cam = (attention * weights).mean(1).clamp(min=0)  # [B, G]
        gh, gw = self.grid
        return cam.reshape(-1, gh, gw), logits, used


def check_rules(method: str, rules: str) -> str:
    """The LRP rule set a method was given (LRP_RULES), or a SettingError listing them."""
    if rules not in LRP_RULES:
        raise SettingError(f"{method}: rules={rules!r}; valid: {', '.join(LRP_RULES)} (conserving: the rules "
                           "of Transformer Attribution; chefer_original: those of Chefer et al.'s LRP rows)")
    return rules


@register_explainer("lrp_last_layer")
class LastLayerLRP(Explainer):
    """Chefer et al.'s partial LRP: the LRP relevance of the last block's attention matrix
    (alpha=1, beta=0, from a one-hot at the target logit, by `rules`), clamped at 0, mean over
    heads, CLS row."""

    passes_per_image = "1 forward (its own float32 forward) + 1 relevance pass through the last block"

    def __init__(self, model, rules: str = "conserving") -> None:
        super().__init__(model)
        self.rules = check_rules(self.name, rules)
        check_supported(model, self.name)
        check_forward(model, method=self.name)

    def explain(self, images, targets):
        with torch.no_grad():
            trace = lrp_forward(self.model, images)
            used = self.resolve_targets(trace.logits, targets)
            r_attn, _ = relevance_pass(self.model, trace, used, start_layer=len(self.model.blocks) - 1,
                                       rules=self.rules)
        cam = r_attn[-1].clamp(min=0).mean(1)[:, 0]  # [B, N]
        return self.patch_map(cam), trace.logits, used


def check_pixel_lrp(model, method: str) -> list[ConvUnit]:
    """Full LRP reaches the pixels through the position-embedding add and the patch embedding's
    convolutions (lrp_stem): refuse models whose embedding the stem rules do not cover or whose
    position embedding is not added to every token at a fixed size; returns the embedding's
    convolution units, checked against the model's own embedding."""
    units = embedding_units(model, method)
    reasons = []
    if getattr(model, "pos_embed", None) is None or getattr(model, "no_embed_class", False) \
            or getattr(model, "dynamic_img_size", False):
        reasons.append("a position embedding that is not added to every token at a fixed size")
    for part in ("norm_pre", "patch_drop", "pos_drop"):
        if not isinstance(getattr(model, part, nn.Identity()), (nn.Identity, nn.Dropout)):
            reasons.append(f"a {type(getattr(model, part)).__name__} in {part}")
    if reasons:
        raise UnsupportedModelError(f"{method}: {type(model).__name__} uses {reasons[0]}, which its pixel "
                                    "relevance rules do not cover")
    check_embedding(model, units, method)
    return units


def zb_conv_relprop(images: torch.Tensor, conv: nn.Conv2d, relevance: torch.Tensor) -> torch.Tensor:
    """The z^B rule (lrp_stem.zb_rule) through one convolution module, bias ignored."""
    return zb_rule(images, conv_unit(conv), relevance)


@register_explainer("full_lrp")
class FullLRP(Explainer):
    """Chefer et al.'s full LRP: the relevance pass (by `rules`) down to the first block, then
    the position-embedding add (the residual rule), the patch tokens only, and the embedding's
    rules (lrp_stem: z^B at the pixel convolution, alpha-beta through a convolutional stem with
    BatchNorm folded); the relevance summed over the colour channels, a pixel map."""

    resolution = "pixel"
    passes_per_image = "1 forward (its own float32 forward) + 1 relevance pass through every block"

    def __init__(self, model, rules: str = "conserving") -> None:
        super().__init__(model)
        self.rules = check_rules(self.name, rules)
        check_supported(model, self.name)
        self.units = check_pixel_lrp(model, self.name)
        check_forward(model, method=self.name)

    def explain(self, images, targets):
        model = self.model
        with torch.no_grad():
            trace = lrp_forward(model, images)
            used = self.resolve_targets(trace.logits, targets)
            _, r = relevance_pass(model, trace, used, start_layer=0, rules=self.rules)
            patches = model.patch_embed(images.to(next(model.parameters()).dtype)).float()
            prefix = [t.expand(len(images), -1, -1).float() for t in (model.cls_token, model.reg_token)
                      if t is not None]
            tokens = torch.cat([*prefix, patches], dim=1)
            r_tokens, _ = residual_relprop(tokens, model.pos_embed.float().expand_as(tokens), r,
                                           self.rules == "conserving")
            gh, gw = self.grid
            r_patches = r_tokens[:, self.num_prefix:].transpose(1, 2).reshape(len(images), -1, gh, gw)
            pixels = embedding_relprop(self.units, images, r_patches, self.rules == "conserving")
        return pixels.sum(1), trace.logits, used
