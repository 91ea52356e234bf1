"""Two baselines of Chefer, Gur & Wolf's comparison tables (CVPR 2021; docs/protocol.md 2.7),
which the AG-CAM paper's tables also list:

- raw attention: the last block's attention of the CLS token to the patches, mean over heads;
- attention Grad-CAM: the last block's CLS-row attention weighted per head by that row's mean
  gradient of the target logit, mean over heads, ReLU.

Both read the attention after the softmax (before dropout), as the reference's
`get_attention_map` hook does, and run one forward (and, for Grad-CAM, one backward)."""

from __future__ import annotations

import torch
from wsol_bench.methods.capture import AttentionCapture

from .base import Explainer, target_score
from .registry import register_explainer


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
